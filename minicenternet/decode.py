"""From head outputs to boxes (CenterNet Sec. 4, "From points to bounding boxes"; CornerNet
Sec. 4.2, "Testing details", for :func:`cornernet_decode`), and the multi-scale merge (soft-NMS
itself lives in :mod:`minicenternet.nms` and is re-exported here).

Peaks are the pixels that equal the maximum of their 3x3 neighbourhood (the paper's replacement
for NMS), the K = 100 highest over all classes become detections, and each is turned into a box
from its offset and size: ``(x + dx - w / 2, y + dy - h / 2, x + dx + w / 2, y + dy + h / 2)``.

Where the official test code does something we do not by default, the reference behaviour sits
behind an argument (``Detector(reference=True)`` switches all of them on):

- ``clamp``: we clamp the test probabilities to ``[1e-4, 1 - 1e-4]`` like the training loss;
  the official test takes the plain sigmoid. Clamping only ties scores beyond the bounds.
- ``clip``: we clip decoded boxes to the image; the official code does not, so a box may stick
  out of its image (COCOeval then computes its IoU with the part outside counted).
- ``reference`` of :func:`soft_nms`: IoU in the ``+1`` pixel convention, and a box compared with
  the score threshold only when a kept box overlaps it (the official Cython).
- ``reference`` of :func:`merge_scales`: the official multi-scale merge runs that in-place
  soft-NMS and ignores the list of kept rows it returns, so its output still holds the rows it
  meant to drop, as stale copies (see :func:`reference_soft_nms`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data.transforms import affine_matrix, apply_affine_to_boxes, invert_affine
from .losses import clamped_sigmoid, gather_at
from .nms import reference_soft_nms, soft_nms

__all__ = [
    "peak_mask", "heatmap_probabilities", "decode_scores", "centernet_decode", "decode_corners",
    "cornernet_decode", "merge_flip", "mirror_boxes", "padded_size", "boxes_to_image", "soft_nms", "reference_soft_nms",
    "merge_scales",
]


def peak_mask(heat: Tensor, kernel: int = 3) -> Tensor:
    """``True`` where a pixel equals the max of its ``kernel x kernel`` neighbourhood.

    Args:
        heat: ``(B, C, H, W)`` scores.
        kernel: window size (3 in the reference code).
    """
    hmax = F.max_pool2d(heat, kernel, stride=1, padding=(kernel - 1) // 2)
    return hmax == heat


def _top_peaks(heat: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ``K`` highest 3x3 peaks of ``(B, C, H, W)`` probabilities, one top-K over all classes
    (``K`` capped at ``C * H * W``); non-peaks score 0 and come last.

    Returns:
        ``scores``, ``classes`` (int64), flat ``pixel`` indices ``y * W + x`` (int64) and float
        ``xs``, ``ys``, each ``(B, K)``, by decreasing score.
    """
    batch, _, height, width = heat.shape
    heat = heat * peak_mask(heat)
    scores, flat = heat.reshape(batch, -1).topk(min(K, heat[0].numel()))
    classes = torch.div(flat, height * width, rounding_mode="floor")
    pixel = flat - classes * height * width
    ys = torch.div(pixel, width, rounding_mode="floor")
    return scores, classes, pixel, (pixel - ys * width).float(), ys.float()


def decode_scores(heat: Tensor, wh: Tensor, reg: Tensor | None, K: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """Top-K peaks of a probability heatmap turned into boxes.

    Args:
        heat: ``(B, C, H, W)`` probabilities (already through the sigmoid).
        wh: ``(B, 2, H, W)`` sizes ``(w, h)`` in output-stride pixels.
        reg: ``(B, 2, H, W)`` sub-pixel offsets ``(dx, dy)``, or ``None`` (centre of the pixel
            cell, ``+0.5``, as the reference does without an offset head).
        K: number of detections per image (100 in the reference code); capped at ``C * H * W``.

    Returns:
        ``boxes (B, K, 4)`` ``xyxy`` in output-stride coordinates, ``scores (B, K)`` and
        ``classes (B, K)`` int64, sorted by decreasing score.
    """
    scores, classes, pixel, xs, ys = _top_peaks(heat, K)
    if reg is None:
        xs, ys = xs + 0.5, ys + 0.5
    else:
        offset = gather_at(reg.float(), pixel)
        xs, ys = xs + offset[..., 0], ys + offset[..., 1]
    size = gather_at(wh.float(), pixel)
    half_w, half_h = size[..., 0] / 2, size[..., 1] / 2
    boxes = torch.stack([xs - half_w, ys - half_h, xs + half_w, ys + half_h], dim=2)
    return boxes, scores, classes


def heatmap_probabilities(hm_logits: Tensor, clamp: bool = True) -> Tensor:
    """Heatmap probabilities at test time, float32: the clamped sigmoid of the training loss, or
    (``clamp=False``) the plain sigmoid of the official test code."""
    return clamped_sigmoid(hm_logits) if clamp else hm_logits.float().sigmoid()


def centernet_decode(
    hm_logits: Tensor, wh: Tensor, reg: Tensor | None, K: int = 100, clamp: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode raw head outputs: sigmoid (clamped unless ``clamp=False``), 3x3 max-pool peaks,
    top-K, boxes.

    Args:
        hm_logits: ``(B, C, H, W)`` heatmap logits.
        wh: ``(B, 2, H, W)``; reg: ``(B, 2, H, W)`` or ``None``; K: detections per image.
        clamp: see :func:`heatmap_probabilities`.

    Returns:
        See :func:`decode_scores`.
    """
    return decode_scores(heatmap_probabilities(hm_logits, clamp), wh, reg, K)


def decode_corners(
    tl_heat: Tensor,
    br_heat: Tensor,
    tl_emb: Tensor,
    br_emb: Tensor,
    tl_off: Tensor,
    br_off: Tensor,
    K: int = 100,
    ae_threshold: float = 0.5,
    num_dets: int = 1000,
) -> tuple[Tensor, Tensor, Tensor]:
    """Group corner peaks into boxes (CornerNet Sec. 4.2, "Testing details").

    The ``K`` highest 3x3 peaks of each heatmap (one top-K over all classes, as for CenterNet)
    have their offsets added; every top-left is paired with every bottom-right, ``K x K`` pairs,
    scored by the mean of the two corner scores. A pair is rejected (score ``-1``) when the two
    classes differ, when ``|e_tl - e_br| > ae_threshold`` (the paper's L1 distance, 0.5), or when
    ``x_br < x_tl`` or ``y_br < y_tl``. The geometric test is not in the paper; it is the official
    ``_decode``'s, and its comparisons are strict, as is the embedding one: a pair at exactly
    the threshold distance, or with ``x_br == x_tl`` (a box of zero width), is kept.

    Args:
        tl_heat, br_heat: ``(B, C, H, W)`` probabilities (already through the sigmoid).
        tl_emb, br_emb: ``(B, 1, H, W)`` embeddings.
        tl_off, br_off: ``(B, 2, H, W)`` offsets ``(dx, dy)`` in map pixels, added to the integer
            corner position.
        K: corners of each type (100 in the paper); capped at ``C * H * W``.
        ae_threshold: the largest embedding distance of a pair (0.5 in the paper).
        num_dets: pairs returned (1000 in the official code); capped at ``K * K``.

    Returns:
        ``boxes (B, num_dets, 4)`` ``(x1, y1, x2, y2)`` in output-map pixels, ``scores
        (B, num_dets)`` and ``classes (B, num_dets)`` int64 (the top-left's class), by decreasing
        score: the rejected pairs, at ``-1``, last.
    """
    batch = tl_heat.shape[0]
    corners = []
    for heat, emb, off in ((tl_heat, tl_emb, tl_off), (br_heat, br_emb, br_off)):
        scores, classes, pixel, xs, ys = _top_peaks(heat, K)
        offset = gather_at(off.float(), pixel)  # (B, K, 2)
        embedding = gather_at(emb.float(), pixel)[..., 0]  # (B, K)
        corners.append((scores, classes, xs + offset[..., 0], ys + offset[..., 1], embedding))
    (tl_s, tl_c, tl_x, tl_y, tl_e), (br_s, br_c, br_x, br_y, br_e) = corners
    k = tl_s.shape[1]
    # pair (i, j) of top-left i and bottom-right j: [:, :, None] indexes i, [:, None, :] indexes j
    scores = (tl_s[:, :, None] + br_s[:, None, :]) / 2  # (B, K, K)
    rejected = (
        (tl_c[:, :, None] != br_c[:, None, :])
        | ((tl_e[:, :, None] - br_e[:, None, :]).abs() > ae_threshold)
        | (br_x[:, None, :] < tl_x[:, :, None])
        | (br_y[:, None, :] < tl_y[:, :, None])
    )
    scores = scores.masked_fill(rejected, -1.0).reshape(batch, k * k)
    boxes = torch.stack(
        [tl_x[:, :, None].expand(-1, k, k), tl_y[:, :, None].expand(-1, k, k),
         br_x[:, None, :].expand(-1, k, k), br_y[:, None, :].expand(-1, k, k)], dim=3
    ).reshape(batch, k * k, 4)
    scores, pair = scores.topk(min(num_dets, k * k))
    boxes = boxes.gather(1, pair[..., None].expand(-1, -1, 4))
    classes = tl_c.gather(1, torch.div(pair, k, rounding_mode="floor"))
    return boxes, scores, classes


def cornernet_decode(
    outputs: dict[str, Tensor], K: int = 100, ae_threshold: float = 0.5, num_dets: int = 1000, clamp: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode raw CornerNet outputs: sigmoid of both heatmaps (clamped unless ``clamp=False``),
    then :func:`decode_corners`.

    Args:
        outputs: one stack's ``tl_hm``, ``br_hm`` ``(B, C, H, W)`` logits, ``tl_emb``, ``br_emb``
            ``(B, 1, H, W)`` and ``tl_off``, ``br_off`` ``(B, 2, H, W)``.
        K, ae_threshold, num_dets: see :func:`decode_corners`.
        clamp: see :func:`heatmap_probabilities` (the official test takes the plain sigmoid).

    Returns:
        See :func:`decode_corners`.
    """
    return decode_corners(
        heatmap_probabilities(outputs["tl_hm"], clamp), heatmap_probabilities(outputs["br_hm"], clamp),
        outputs["tl_emb"], outputs["br_emb"], outputs["tl_off"], outputs["br_off"], K, ae_threshold, num_dets,
    )


def merge_flip(outputs: dict[str, Tensor], clamp: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Flip test of the reference code: a batch ``[images, mirrored images]`` of size ``2B``.

    The heatmap probabilities (see :func:`heatmap_probabilities` for ``clamp``) and the sizes are
    averaged with the mirrored halves flipped back; the offsets are taken from the unflipped half
    only (offsets do not mirror).

    Returns:
        ``heat (B, C, H, W)`` probabilities, ``wh (B, 2, H, W)``, ``reg (B, 2, H, W)``.
    """
    half = outputs["hm"].shape[0] // 2
    heat = heatmap_probabilities(outputs["hm"], clamp)
    heat = (heat[:half] + heat[half:].flip(3)) / 2
    wh = (outputs["wh"][:half].float() + outputs["wh"][half:].float().flip(3)) / 2
    return heat, wh, outputs["reg"][:half]


def mirror_boxes(boxes: Tensor, width: int) -> Tensor:
    """Boxes of a mirrored image back in the original's coordinates: ``(x1, y1, x2, y2) ->
    (W - x2, y1, W - x1, y2)`` for ``(..., 4)`` boxes on a map ``width`` pixels wide, the
    official CornerNet test's mapping of its flipped half (``out_width - x``).

    ``W - x`` is the exact mirror when pixel ``i`` spans ``[i, i + 1)``. This library's warp puts
    pixel centres at integer coordinates (OpenCV's convention), where mirroring the input image
    maps ``x`` to ``W - 1/4 - x`` on a stride-4 map: the official mapping places the mirror's
    boxes a quarter of an output pixel (one input pixel) to the right. Kept as the official code
    does; lesson 06 measures the same question for CenterNet's flip test."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def padded_size(size: int, variant: str = "reference", multiple: int = 32) -> int:
    """Input side used for testing at the original resolution (CenterNet Sec. 5).

    ``multiple`` is the network's input multiple: 32 for ResNet and DLA, 128 for Hourglass (the
    model's ``pad_multiple``). ``"reference"``: ``(size | (multiple - 1)) + 1``, as the official
    code; a side already divisible still gets ``multiple`` more pixels (256 -> 288 for 32).
    ``"minimal"``: the next multiple (256 -> 256).
    """
    if multiple < 1 or multiple & (multiple - 1):
        raise ValueError(f"multiple must be a power of two, got {multiple}")
    if variant == "reference":
        return (size | (multiple - 1)) + 1
    if variant == "minimal":
        return -(-size // multiple) * multiple
    raise ValueError(f"variant must be 'reference' or 'minimal', got {variant!r}")


def boxes_to_image(
    boxes: Tensor | np.ndarray,
    center: np.ndarray,
    scale: float,
    output_size: tuple[int, int],
    image_size: tuple[int, int],
    clip: bool = True,
) -> np.ndarray:
    """Map ``(N, 4)`` output-stride boxes back to original-image pixels, clipped to the image
    (``clip=False``: unclipped, as the official code).

    Inverts the affine map ``affine_matrix(center, scale, output_size)`` that took the original
    image to the output map (the reference ``transform_preds``).

    Args:
        boxes: ``(N, 4)`` ``xyxy`` at the output stride.
        center: ``(cx, cy)`` of the pre-processing crop; scale: its side ``s``.
        output_size: ``(H/4, W/4)`` of the head outputs.
        image_size: ``(H, W)`` of the original image.
        clip: clip the boxes to ``[0, W] x [0, H]``.

    Returns:
        ``(N, 4)`` float32 ``xyxy`` in original-image pixels.
    """
    boxes = boxes.detach().cpu().numpy() if isinstance(boxes, Tensor) else np.asarray(boxes)
    inverse = invert_affine(affine_matrix(center, scale, output_size))
    mapped = apply_affine_to_boxes(boxes, inverse)
    if not clip:
        return mapped
    mapped[:, [0, 2]] = mapped[:, [0, 2]].clip(0, image_size[1])
    mapped[:, [1, 3]] = mapped[:, [1, 3]].clip(0, image_size[0])
    return mapped


def merge_scales(
    detections: list[tuple[Tensor, Tensor, Tensor]], K: int = 100, reference: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-scale test of the reference code: pool the detections of every scale (boxes already
    in original-image pixels), apply soft-NMS per class and keep the ``K`` best.

    Args:
        detections: one ``(boxes (N, 4), scores (N,), labels (N,))`` per test scale.
        K: detections kept per image (100 in the reference).
        reference: the official code's merge: :func:`reference_soft_nms` with its stale rows,
            then every row scoring at least the ``K``-th highest score (more than ``K`` on ties,
            which the stale copies make common). Default: :func:`soft_nms` and the top ``K``.

    Returns:
        ``boxes (M, 4)``, ``scores (M,)``, ``labels (M,)`` by decreasing score; ``M <= K`` unless
        ``reference``.
    """
    boxes, scores, labels = (torch.cat(parts) for parts in zip(*detections))
    if not reference:
        boxes, scores, labels = soft_nms(boxes, scores, labels)
        order = scores.argsort(descending=True)[:K]
        return boxes[order], scores[order], labels[order]
    if len(labels) == 0:
        return boxes.float(), scores.float(), labels
    merged = []
    for label in labels.unique():
        pick = labels == label
        rows = torch.cat([boxes[pick].float(), scores[pick].float()[:, None]], 1).numpy()
        merged.append((torch.from_numpy(reference_soft_nms(rows)), label))
    rows = torch.cat([r for r, _ in merged])
    labels = torch.cat([label.repeat(len(r)) for r, label in merged])
    scores = rows[:, 4]
    if len(scores) > K:
        keep = scores >= scores.topk(K).values[-1]
        rows, scores, labels = rows[keep], scores[keep], labels[keep]
    order = scores.argsort(descending=True, stable=True)
    return rows[order, :4], scores[order], labels[order]
