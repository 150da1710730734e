"""From head outputs to boxes (CenterNet Sec. 4, "From points to bounding boxes").

Peaks are the pixels that equal the maximum of their 3x3 neighbourhood (the paper's replacement
for NMS), the K = 100 highest over all classes become detections, and each is turned into a box
from its offset and size: ``(x + dx - w / 2, y + dy - h / 2, x + dx + w / 2, y + dy + h / 2)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from torchvision.ops import box_iou

from .data.transforms import affine_matrix, apply_affine_to_boxes, invert_affine
from .losses import clamped_sigmoid, gather_at

__all__ = [
    "peak_mask", "decode_scores", "centernet_decode", "merge_flip", "padded_size", "boxes_to_image", "soft_nms",
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


def centernet_decode(hm_logits: Tensor, wh: Tensor, reg: Tensor | None, K: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """Decode raw head outputs: clamped sigmoid, 3x3 max-pool peaks, top-K, boxes.

    Args:
        hm_logits: ``(B, C, H, W)`` heatmap logits.
        wh: ``(B, 2, H, W)``; reg: ``(B, 2, H, W)`` or ``None``; K: detections per image.

    Returns:
        See :func:`decode_scores`.
    """
    return decode_scores(clamped_sigmoid(hm_logits), wh, reg, K)


def merge_flip(outputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Flip test of the reference code: a batch ``[images, mirrored images]`` of size ``2B``.

    The heatmap probabilities and the sizes are averaged with the mirrored halves flipped back;
    the offsets are taken from the unflipped half only (offsets do not mirror).

    Returns:
        ``heat (B, C, H, W)`` probabilities, ``wh (B, 2, H, W)``, ``reg (B, 2, H, W)``.
    """
    half = outputs["hm"].shape[0] // 2
    heat = clamped_sigmoid(outputs["hm"])
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
) -> np.ndarray:
    """Map ``(N, 4)`` output-stride boxes back to original-image pixels, clipped to the image.

    Inverts the affine map ``affine_matrix(center, scale, output_size)`` that took the original
    image to the output map (the reference ``transform_preds``).

    Args:
        boxes: ``(N, 4)`` ``xyxy`` at the output stride.
        center: ``(cx, cy)`` of the pre-processing crop; scale: its side ``s``.
        output_size: ``(H/4, W/4)`` of the head outputs.
        image_size: ``(H, W)`` of the original image.

    Returns:
        ``(N, 4)`` float32 ``xyxy`` in original-image pixels.
    """
    boxes = boxes.detach().cpu().numpy() if isinstance(boxes, Tensor) else np.asarray(boxes)
    inverse = invert_affine(affine_matrix(center, scale, output_size))
    mapped = apply_affine_to_boxes(boxes, inverse)
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


def merge_scales(
    detections: list[tuple[Tensor, Tensor, Tensor]], K: int = 100
) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-scale test of the reference code: pool the detections of every scale (boxes already
    in original-image pixels), apply :func:`soft_nms` per class and keep the ``K`` best.

    Args:
        detections: one ``(boxes (N, 4), scores (N,), labels (N,))`` per test scale.
        K: detections kept per image (100 in the reference).

    Returns:
        ``boxes (M, 4)``, ``scores (M,)``, ``labels (M,)`` with ``M <= K``, by decreasing score.
    """
    boxes, scores, labels = (torch.cat(parts) for parts in zip(*detections))
    boxes, scores, labels = soft_nms(boxes, scores, labels)
    order = scores.argsort(descending=True)[:K]
    return boxes[order], scores[order], labels[order]
