"""Soft-NMS (Bodla et al. 2017, "Soft-NMS -- Improving Object Detection With One Line of Code"):
the merge of the multi-scale test of CenterNet and of CornerNet's test, with the official Cython
algorithm replayed exactly behind ``reference=True``."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["SOFT_NMS_METHODS", "soft_nms", "reference_soft_nms"]


SOFT_NMS_METHODS = ("linear", "gaussian", "hard")


def _decay_weights(iou: np.ndarray, method: str, sigma: float, iou_threshold: float) -> np.ndarray:
    """Bodla et al.'s rescoring ``f(IoU)`` of the boxes overlapping a kept one, float32 as the
    official Cython: ``"linear"`` ``1 - IoU`` where ``IoU > iou_threshold``, ``"gaussian"``
    ``exp(-IoU^2 / sigma)`` (the exponential taken in float64, as ``np.exp`` there), ``"hard"``
    ``0`` where ``IoU > iou_threshold``; 1 elsewhere."""
    if method == "gaussian":
        return np.exp((-(iou * iou) / np.float32(sigma)).astype(np.float64)).astype(np.float32)
    above = iou > iou_threshold
    if method == "linear":
        return np.where(above, np.float32(1) - iou, np.float32(1)).astype(np.float32)
    return (~above).astype(np.float32)


def _iou_with(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``(4,)`` box with ``(N, 4)`` boxes, float32, continuous coordinates (the formula
    of :func:`torchvision.ops.box_iou`; 0 / 0 for two empty boxes gives ``nan`` as there)."""
    width = (np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])).clip(min=0)
    height = (np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])).clip(min=0)
    inter = width * height
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / union


def _official_soft_nms_(
    rows: np.ndarray, sigma: float, iou_threshold: float, score_threshold: float, method: str
) -> int:
    """The official Cython ``soft_nms`` (Bodla et al.; CornerNet's ``external/nms.pyx``), in place
    on a float32 ``(N, 5)`` array of ``x1, y1, x2, y2, score``; returns its count of kept rows.

    Pass ``i`` swaps the highest row of ``i..count`` (the first of equal maxima) to position ``i``
    and rescores the rows after it that overlap it in the ``+1`` pixel convention (widths
    ``x2 - x1 + 1``, intersection only where both sides are positive). An overlapping row whose
    new score is below ``score_threshold`` is overwritten by a copy of the current last row
    (which is then rescored in its new place) and the count shrinks; rows that overlap nothing
    are never compared with the threshold. The rescoring of a pass is vectorised (each row after
    ``i`` is rescored exactly once per pass, moved or not); the swaps are replayed in order, so
    the tail past the count holds the same stale rows as the official array.
    """
    sigma, iou_threshold, score_threshold = (float(np.float32(v)) for v in (sigma, iou_threshold, score_threshold))
    one = np.float32(1)
    count = len(rows)
    for i in range(len(rows)):
        if i >= count:  # the official loop runs on, but past the count it changes nothing
            break
        best = i + int(np.argmax(rows[i:count, 4]))  # argmax: the first of equal maxima, as there
        rows[[i, best]] = rows[[best, i]]
        top, rest = rows[i], rows[i + 1 : count]  # rest is a view
        iw = np.minimum(top[2], rest[:, 2]) - np.maximum(top[0], rest[:, 0]) + one
        ih = np.minimum(top[3], rest[:, 3]) - np.maximum(top[1], rest[:, 1]) + one
        overlap = (iw > 0) & (ih > 0)
        inter = np.where(overlap, iw * ih, np.float32(0))
        union = (top[2] - top[0] + one) * (top[3] - top[1] + one) + (rest[:, 2] - rest[:, 0] + one) * (
            rest[:, 3] - rest[:, 1] + one
        ) - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=overlap)
        weight = _decay_weights(iou, method, sigma, iou_threshold)
        before = rest[:, 4].copy()
        rest[:, 4] = np.where(overlap, weight * before, before)
        dropped = (overlap & (rest[:, 4] < score_threshold)).tolist()
        pos, end = 0, len(dropped)  # positions relative to i + 1
        while pos < end:
            if not dropped[pos]:
                pos += 1
                continue
            end -= 1
            if end != pos:  # the last row is copied forward (already rescored: it is, at pos) ...
                rest[pos], dropped[pos] = rest[end], dropped[end]
                rest[end, 4] = before[end]  # ... and its old copy stays behind, never rescored
        count = i + 1 + end
    return count


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor | None = None,
    *,
    method: str = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 1e-3,
    reference: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017), class by class.

    Repeatedly keeps the highest-scoring box of a class and rescales the scores of the others of
    that class by ``f(IoU)`` with the kept box: ``"linear"`` ``1 - IoU`` where ``IoU >
    iou_threshold``, ``"gaussian"`` ``exp(-IoU^2 / sigma)`` (``iou_threshold`` unused), or
    ``"hard"``: plain NMS, boxes with ``IoU > iou_threshold`` removed. ``sigma = 0.5`` and
    ``score_threshold = 0.001`` are the settings of both official codes (CornerNet Sec. 4.2 merges
    the original and flipped detections by soft-NMS; CenterNet the test scales).

    Default: continuous IoU (:func:`torchvision.ops.box_iou`), and every box that scores below
    ``score_threshold``, from the start or after a decay, is removed (every returned score is at
    least ``score_threshold``), as is every box whose weight is 0.

    ``reference=True``: the official Cython ``soft_nms`` exactly (see
    :func:`_official_soft_nms_`, float32 throughout): IoU in the ``+1`` pixel convention
    (``[0, 0, 9, 9]`` is 10 x 10; boxes that merely touch overlap), and a box is compared with
    ``score_threshold`` only right after it is rescored for overlapping a kept box (a positive
    ``+1`` intersection, whatever the weight: with ``"linear"`` or ``"hard"`` a weight of 1 still
    removes a box that was already below the threshold). A box below ``score_threshold`` that
    overlaps no box kept before it therefore stays, with its score; so does a box that ``"hard"``
    set to 0 when ``score_threshold <= 0``. The returned rows are the first ``count`` of the
    official array (its kept indices), not the stale tail that :func:`reference_soft_nms` keeps.

    Args:
        boxes: ``(N, 4)`` ``xyxy``; scores: ``(N,)``.
        labels: ``(N,)`` int64 classes, or ``None``: all boxes one class, returned labels 0.
        method: ``"linear"``, ``"gaussian"`` or ``"hard"``.
        sigma: the Gaussian's ``sigma``; iou_threshold: ``Nt`` of ``"linear"`` and ``"hard"``.
        score_threshold: see above; reference: the official code's semantics.

    Returns:
        The kept ``boxes (M, 4)`` float32, their rescored ``scores (M,)`` float32 and ``labels
        (M,)`` int64, in the order they were kept within each class, classes in increasing order.
    """
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"method must be one of {SOFT_NMS_METHODS}, got {method!r}")
    if labels is None:
        labels = torch.zeros(len(scores), dtype=torch.int64, device=scores.device)
    kept: list[tuple[Tensor, Tensor, Tensor]] = []
    for label in labels.unique():
        pick = labels == label
        class_boxes, class_scores = boxes[pick].float(), scores[pick].float()
        if reference:
            rows = torch.cat([class_boxes, class_scores[:, None]], 1).cpu().numpy().copy()
            count = _official_soft_nms_(rows, sigma, iou_threshold, score_threshold, method)
            rows_t = torch.from_numpy(rows[:count]).to(boxes.device)
            class_boxes, class_scores = rows_t[:, :4], rows_t[:, 4]
        else:
            class_boxes, class_scores = _soft_nms_one_class(
                class_boxes, class_scores, method, sigma, iou_threshold, score_threshold
            )
        kept.append((class_boxes, class_scores, label.expand(len(class_scores))))
    if not kept:
        return boxes.new_zeros((0, 4)).float(), scores.new_zeros(0).float(), labels.new_zeros(0)
    kept_boxes, kept_scores, kept_labels = zip(*kept)
    return torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_labels)


def _soft_nms_one_class(
    boxes: Tensor, scores: Tensor, method: str, sigma: float, iou_threshold: float, score_threshold: float
) -> tuple[Tensor, Tensor]:
    """The default :func:`soft_nms` of one class: ``(N, 4)``, ``(N,)`` float32 to the kept
    ``(M, 4)``, ``(M,)`` in the order kept. The loop runs in NumPy on the CPU: one pass per kept
    box, each a handful of operations on short arrays, where PyTorch's per-call overhead would
    dominate (CornerNet's test runs it on hundreds of pairs per class and image)."""
    rows = torch.cat([boxes, scores[:, None]], 1).detach().cpu().numpy()
    rows = rows[rows[:, 4] >= score_threshold]
    kept = np.empty((len(rows), 5), dtype=np.float32)
    count = 0
    while len(rows):
        best = int(np.argmax(rows[:, 4]))  # the first of equal maxima, as torch.argmax
        kept[count] = rows[best]
        count += 1
        rows = np.delete(rows, best, axis=0)
        weight = _decay_weights(_iou_with(kept[count - 1, :4], rows[:, :4]), method, sigma, iou_threshold)
        rows[:, 4] *= weight
        rows = rows[(weight > 0) & (rows[:, 4] >= score_threshold)]
    kept = torch.from_numpy(kept[:count]).to(boxes.device)
    return kept[:, :4], kept[:, 4]


def reference_soft_nms(
    rows: np.ndarray,
    sigma: float = 0.5,
    threshold: float = 1e-3,
    *,
    method: str = "gaussian",
    iou_threshold: float = 0.3,
) -> np.ndarray:
    """The official multi-scale merge's soft-NMS of one class, rows and all.

    The official code calls an in-place soft-NMS (Bodla et al.'s Cython, ``method=2``, Gaussian)
    on an array ``(N, 5)`` of ``x1, y1, x2, y2, score`` and ignores the indices of the kept rows
    it returns. In place, the highest remaining row is swapped to the front, the rows after it
    are rescored with IoU in the ``+1`` pixel convention (only where the boxes overlap), and a
    row that falls below ``threshold`` is overwritten by the current last row while the count
    shrinks. The array is never cut to that count, so its tail keeps stale copies: rows that were
    moved forward (often a duplicate of a kept box with an older score), and the dropped row
    itself when it was the last. This replays those steps on a copy (:func:`_official_soft_nms_`,
    which :func:`soft_nms` with ``reference=True`` also runs, keeping only the counted rows).

    Args:
        rows: ``(N, 5)`` float array.
        sigma, threshold: the Gaussian's ``sigma`` and the score threshold.
        method, iou_threshold: see :func:`soft_nms` (the official merges use ``"gaussian"``).

    Returns:
        ``(N, 5)`` float32: the array as the official code leaves it.
    """
    rows = np.array(rows, dtype=np.float32).reshape(-1, 5)  # a copy
    _official_soft_nms_(rows, sigma, iou_threshold, threshold, method)
    return rows
