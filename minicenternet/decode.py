"""From head outputs to boxes (CenterNet Sec. 4, "From points to bounding boxes").

Peaks are the pixels that equal the maximum of their 3x3 neighbourhood (the paper's replacement
for NMS), the K = 100 highest over all classes become detections, and each is turned into a box
from its offset and size: ``(x + dx - w / 2, y + dy - h / 2, x + dx + w / 2, y + dy + h / 2)``.

Where the official test code does something we do not by default, the reference behaviour sits
behind an argument (``Detector(reference=True)`` switches all of them on):

- ``clamp``: we clamp the test probabilities to ``[1e-4, 1 - 1e-4]`` like the training loss;
  the official test takes the plain sigmoid. Clamping only ties scores beyond the bounds.
- ``clip``: we clip decoded boxes to the image; the official code does not, so a box may stick
  out of its image (COCOeval then computes its IoU with the part outside counted).
- ``reference`` of :func:`soft_nms`: the official multi-scale merge runs an in-place soft-NMS and
  ignores the list of kept rows it returns, so its output still holds the rows it meant to drop,
  as stale copies (see :func:`reference_soft_nms`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from torchvision.ops import box_iou

from .data.transforms import affine_matrix, apply_affine_to_boxes, invert_affine
from .losses import clamped_sigmoid, gather_at

__all__ = [
    "peak_mask", "heatmap_probabilities", "decode_scores", "centernet_decode", "merge_flip", "padded_size",
    "boxes_to_image", "soft_nms", "reference_soft_nms", "merge_scales",
]


def peak_mask(heat: Tensor, kernel: int = 3) -> Tensor:
    """``True`` where a pixel equals the max of its ``kernel x kernel`` neighbourhood.

    Args:
        heat: ``(B, C, H, W)`` scores.
        kernel: window size (3 in the reference code).
    """
    hmax = F.max_pool2d(heat, kernel, stride=1, padding=(kernel - 1) // 2)
    return hmax == heat


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
    batch, _, height, width = heat.shape
    heat = heat * peak_mask(heat)
    scores, flat = heat.reshape(batch, -1).topk(min(K, heat[0].numel()))
    classes = torch.div(flat, height * width, rounding_mode="floor")
    pixel = flat - classes * height * width
    ys = torch.div(pixel, width, rounding_mode="floor").float()
    xs = (pixel - ys.long() * width).float()
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


def soft_nms(
    boxes: Tensor, scores: Tensor, labels: Tensor, sigma: float = 0.5, threshold: float = 1e-3
) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian soft-NMS (Bodla et al. 2017), class by class.

    Repeatedly keeps the highest-scoring box of a class and multiplies the scores of the others
    of that class by ``exp(-IoU^2 / sigma)``; boxes that fall below ``threshold`` are dropped.
    ``sigma = 0.5`` and ``threshold = 0.001`` are the reference's settings for merging the
    detections of several test scales. The reference computes IoU with its ``+1`` pixel
    convention; here IoU is the continuous one of :func:`torchvision.ops.box_iou`.

    Args:
        boxes: ``(N, 4)`` ``xyxy``; scores: ``(N,)``; labels: ``(N,)`` int64.

    Returns:
        The kept ``boxes (M, 4)``, their decayed ``scores (M,)`` and ``labels (M,)``, in the
        order they were kept within each class, classes in increasing order.
    """
    kept: list[tuple[Tensor, Tensor, Tensor]] = []
    for label in labels.unique():
        pick = labels == label
        class_boxes, class_scores = boxes[pick].float(), scores[pick].float().clone()
        while class_scores.numel():
            best = int(class_scores.argmax())
            kept.append((class_boxes[best], class_scores[best], label))
            decay = torch.exp(-box_iou(class_boxes[best : best + 1], class_boxes)[0] ** 2 / sigma)
            class_scores = class_scores * decay
            class_scores[best] = 0.0
            alive = class_scores >= threshold
            class_boxes, class_scores = class_boxes[alive], class_scores[alive]
    if not kept:
        return boxes.new_zeros((0, 4)).float(), scores.new_zeros(0).float(), labels.new_zeros(0)
    kept_boxes, kept_scores, kept_labels = zip(*kept)
    return torch.stack(kept_boxes), torch.stack(kept_scores), torch.stack(kept_labels)


def reference_soft_nms(rows: np.ndarray, sigma: float = 0.5, threshold: float = 1e-3) -> np.ndarray:
    """The official multi-scale merge's Gaussian soft-NMS of one class, rows and all.

    The official code calls an in-place soft-NMS (Bodla et al.'s Cython, ``method=2``) on an
    array ``(N, 5)`` of ``x1, y1, x2, y2, score`` and ignores the indices of the kept rows it
    returns. In place, the highest remaining row is swapped to the front, the rows after it are
    decayed by ``exp(-IoU^2 / sigma)`` with IoU in the ``+1`` pixel convention (only where the
    boxes overlap), and a row that falls below ``threshold`` is overwritten by the current last
    row while the count shrinks. The array is never cut to that count, so its tail keeps stale
    copies: rows that were moved forward (often a duplicate of a kept box with an older score),
    and the dropped row itself when it was the last. This replays those steps on a copy.

    Args:
        rows: ``(N, 5)`` float array.

    Returns:
        ``(N, 5)`` float32: the array as the official code leaves it.
    """
    boxes = [list(map(float, row)) for row in np.asarray(rows, dtype=np.float32)]
    count = len(boxes)
    for i in range(len(boxes)):
        if i >= count:  # the official loop runs on, but past the count it changes nothing
            break
        best = max(range(i, count), key=lambda k: (boxes[k][4], -k))  # the first of equal maxima
        boxes[i], boxes[best] = boxes[best], boxes[i]
        tx1, ty1, tx2, ty2, _ = boxes[i]
        top_area = (tx2 - tx1 + 1) * (ty2 - ty1 + 1)
        pos = i + 1
        while pos < count:
            x1, y1, x2, y2, _ = boxes[pos]
            inter_w = min(tx2, x2) - max(tx1, x1) + 1
            inter_h = min(ty2, y2) - max(ty1, y1) + 1
            if inter_w > 0 and inter_h > 0:
                inter = inter_w * inter_h
                overlap = inter / (top_area + (x2 - x1 + 1) * (y2 - y1 + 1) - inter)
                boxes[pos][4] *= math.exp(-overlap * overlap / sigma)
                if boxes[pos][4] < threshold:
                    boxes[pos] = list(boxes[count - 1])  # the last row is copied, not moved
                    count -= 1
                    continue  # the copied row is decayed in its new place
            pos += 1
    return np.array(boxes, dtype=np.float32).reshape(-1, 5)


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
