"""Training targets: Gaussian radius, Gaussian peaks, and the CenterNet and CornerNet target tensors.

CornerNet (Law & Deng, 2018) softens each ground-truth keypoint into an unnormalised
2-D Gaussian whose radius is the largest corner displacement that still yields a box with IoU of
at least ``t`` against the ground truth (CornerNet Sec. 3.2); CenterNet (Zhou et al., 2019, Sec. 3, Eq. 1) keeps the
same Gaussians around object centres. Everything here works in numpy on one image at a time, so
it runs inside data-loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache
from typing import Literal

import numpy as np

__all__ = ["gaussian_radius", "gaussian_kernel", "draw_gaussian", "encode_centernet", "encode_cornernet", "ENCODERS"]


def _smaller_root(a: float, b: float, c: float) -> float:
    """Smaller root of ``a r^2 + b r + c = 0`` (assumes a real root exists)."""
    return (-b - math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)


def _larger_root(a: float, b: float, c: float) -> float:
    """Larger root of ``a r^2 + b r + c = 0`` (assumes a real root exists)."""
    return (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)


def gaussian_radius(
    height: float,
    width: float,
    min_overlap: float = 0.7,
    variant: Literal["reference", "exact"] = "reference",
) -> float:
    """Largest corner displacement ``r`` that keeps IoU >= ``min_overlap`` (CornerNet Sec. 3.2).

    Let the ground-truth box be ``w x h`` and move each corner by ``r`` along both axes. Three
    movements bound the IoU ``t``:

    * case 1, shift: both corners move the same way, ``I = (w - r)(h - r)``, ``U = 2wh - I``.
      ``IoU >= t``  <=>  ``r^2 - (w + h) r + wh (1 - t) / (1 + t) >= 0``; the answer is the
      smaller root ``((w + h) - sqrt((w + h)^2 - 4 wh (1 - t) / (1 + t))) / 2``.
    * case 2, shrink: both corners move inwards, ``IoU = (w - 2r)(h - 2r) / wh``.
      ``4 r^2 - 2 (w + h) r + (1 - t) wh >= 0``; smaller root, divided by ``2a = 8``.
    * case 3, grow: both corners move outwards, ``IoU = wh / ((w + 2r)(h + 2r))``.
      ``4t r^2 + 2t (w + h) r + (t - 1) wh <= 0``; the positive root, divided by ``2a = 8t``.

    ``variant="exact"`` returns the minimum of those three roots.

    ``variant="reference"`` (the default) reproduces the formula of CenterNet's official code,
    which kept the one of CornerNet's first release (CornerNet's authors later called it a bug and
    corrected it; CornerNet-Lite ships the corrected formula, our ``exact``), character for
    character in its arithmetic: every case is evaluated as
    ``(b + sqrt(b^2 - 4ac)) / 2`` with the code's own ``(a, b, c)``. That takes the larger root in
    cases 1 and 2 (the widely reported sign error) and divides by 2 instead of ``2a`` in cases 2
    and 3. The case-1 and case-2 values are so large that case 3 always wins the minimum, so the
    reference radius is the exact case-3 radius times ``4t``: 2.8x too large at ``t = 0.7`` and
    1.2x at ``t = 0.3``. CenterNet's models are trained against these targets, hence it stays the
    default; lesson 01 measures what the difference does.

    Args:
        height: box height (any unit; the reference passes the ceil of the output-stride size).
        width: box width, same unit.
        min_overlap: the IoU threshold ``t`` (0.7 in the reference code of both papers).
        variant: ``"reference"`` or ``"exact"``.

    Returns:
        The radius as a float (callers truncate it with ``max(0, int(r))`` like the reference).
    """
    t, h, w = float(min_overlap), float(height), float(width)
    if not 0.0 < t < 1.0:
        raise ValueError(f"min_overlap must lie in (0, 1), got {min_overlap}")
    if variant == "reference":
        b1, c1 = h + w, w * h * (1 - t) / (1 + t)
        r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
        b2, c2 = 2 * (h + w), (1 - t) * w * h
        r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
        a3, b3, c3 = 4 * t, -2 * t * (h + w), (t - 1) * w * h
        r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
        return min(r1, r2, r3)
    if variant == "exact":
        r1 = _smaller_root(1.0, -(h + w), w * h * (1 - t) / (1 + t))
        r2 = _smaller_root(4.0, -2 * (h + w), (1 - t) * w * h)
        r3 = _larger_root(4 * t, 2 * t * (h + w), (t - 1) * w * h)
        return min(r1, r2, r3)
    raise ValueError(f"variant must be 'reference' or 'exact', got {variant!r}")


@lru_cache(maxsize=512)
def gaussian_kernel(radius: int) -> np.ndarray:
    """The reference "umich" Gaussian: ``(2r+1, 2r+1)`` float64, peak 1 at the centre.

    ``diameter = 2r + 1`` and ``sigma = diameter / 6`` as in the official code, so the square
    spans +-3 sigma; values below ``eps * max`` are set to exactly 0. The returned array is
    cached and read-only.
    """
    diameter = 2 * radius + 1
    sigma = diameter / 6
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    kernel = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    kernel[kernel < np.finfo(kernel.dtype).eps * kernel.max()] = 0
    kernel.setflags(write=False)
    return kernel


def draw_gaussian(heatmap: np.ndarray, center: tuple[float, float], radius: int) -> np.ndarray:
    """Merge a Gaussian peak into ``heatmap`` in place with an element-wise max (CenterNet Eq. 1).

    Overlapping objects of one class keep the larger value, never the sum, so no pixel exceeds
    1 and every peak stays exactly 1. The kernel is clipped where it crosses the border.

    Args:
        heatmap: ``(H, W)`` float array, modified in place.
        center: ``(x, y)``; truncated to integers like the reference.
        radius: integer radius, ``>= 0`` (radius 0 marks a single pixel).

    Returns:
        ``heatmap`` itself.
    """
    radius = int(radius)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    kernel = gaussian_kernel(radius)
    x, y = int(center[0]), int(center[1])
    height, width = heatmap.shape
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    if left + right <= 0 or top + bottom <= 0:
        return heatmap
    region = heatmap[y - top : y + bottom, x - left : x + right]
    patch = kernel[radius - top : radius + bottom, radius - left : radius + right]
    np.maximum(region, patch, out=region)
    return heatmap


def _clip_boxes(
    boxes: np.ndarray, labels: np.ndarray, num_classes: int, output_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``labels`` and clip ``(N, 4)`` xyxy boxes to ``x in [0, W-1]``, ``y in [0, H-1]``."""
    out_h, out_w = output_size
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got {labels.tolist()}")
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, out_w - 1)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, out_h - 1)
    return clipped, labels


def _encoded_objects(
    boxes: np.ndarray, labels: np.ndarray, num_classes: int, output_size: tuple[int, int], max_objects: int,
    min_overlap: float, radius_variant: Literal["reference", "exact"],
) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """``(slot k, clipped box (4,), label, radius)`` of each box that both encoders encode: the first
    ``max_objects`` boxes, clipped, those left with no width or height skipped (slots stay dense);
    radius ``max(0, int(gaussian_radius(ceil(h), ceil(w))))``."""
    clipped, labels = _clip_boxes(boxes, labels, num_classes, output_size)
    k = 0
    for box, label in zip(clipped[:max_objects], labels[:max_objects]):
        w, h = box[2] - box[0], box[3] - box[1]
        if w <= 0 or h <= 0:
            continue
        yield k, box, int(label), max(0, int(gaussian_radius(math.ceil(h), math.ceil(w), min_overlap, radius_variant)))
        k += 1


def encode_centernet(
    boxes: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    output_size: tuple[int, int],
    max_objects: int = 128,
    min_overlap: float = 0.7,
    radius_variant: Literal["reference", "exact"] = "reference",
) -> dict[str, np.ndarray]:
    """CenterNet ground truth for one image (CenterNet Sec. 3: Eq. 1 heatmap, Eq. 2 offset, Eq. 3 size).

    Boxes are clipped to the output map (``x`` to ``[0, W - 1]``, ``y`` to ``[0, H - 1]``) and
    those left with no width or height are skipped, as the reference data loader does. For each
    kept box ``k``: centre ``c = ((x1 + x2) / 2, (y1 + y2) / 2)``, truncated to ``p = int(c)``;
    radius ``max(0, int(gaussian_radius(ceil(h), ceil(w))))``; ``size[k] = (w, h)``,
    ``offset[k] = c - p``, ``index[k] = p_y * W + p_x``, ``mask[k] = 1``. Only the first
    ``max_objects`` boxes are encoded (the reference's ``max_objs``, 128 for COCO).

    Args:
        boxes: ``(N, 4)`` ``xyxy`` already in output-stride coordinates.
        labels: ``(N,)`` class indices in ``0..num_classes-1``.
        num_classes: ``C``.
        output_size: ``(H, W)`` of the output map.
        max_objects: ``K``, the length of the per-object arrays.
        min_overlap: IoU threshold for the radius.
        radius_variant: see :func:`gaussian_radius`.

    Returns:
        ``hm (C, H, W)`` float32, ``wh (K, 2)`` float32 ``(w, h)``, ``reg (K, 2)`` float32,
        ``ind (K,)`` int64, ``mask (K,)`` float32.
    """
    out_h, out_w = output_size
    hm = np.zeros((num_classes, out_h, out_w), dtype=np.float32)
    wh = np.zeros((max_objects, 2), dtype=np.float32)
    reg = np.zeros((max_objects, 2), dtype=np.float32)
    ind = np.zeros((max_objects,), dtype=np.int64)
    mask = np.zeros((max_objects,), dtype=np.float32)
    objects = _encoded_objects(boxes, labels, num_classes, output_size, max_objects, min_overlap, radius_variant)
    for k, (x1, y1, x2, y2), label, radius in objects:
        w, h = x2 - x1, y2 - y1
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        px, py = int(cx), int(cy)
        draw_gaussian(hm[label], (px, py), radius)
        wh[k] = w, h
        reg[k] = cx - px, cy - py
        ind[k] = py * out_w + px
        mask[k] = 1
    return {"hm": hm, "wh": wh, "reg": reg, "ind": ind, "mask": mask}


def encode_cornernet(
    boxes: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    output_size: tuple[int, int],
    max_objects: int = 128,
    min_overlap: float = 0.3,
    radius_variant: Literal["reference", "exact"] = "exact",
) -> dict[str, np.ndarray]:
    """CornerNet ground truth for one image (CornerNet Sec. 3.2-3.3: Eq. 1 heatmaps, Eq. 2 offsets, Eq. 4-5 pairs).

    Boxes are clipped and degenerate ones skipped exactly as in :func:`encode_centernet`. For each
    kept box ``k`` with corners ``(x1, y1)``, ``(x2, y2)`` (output-map pixels, floats):

    * ``tl_hm[label]`` gets a Gaussian peak (value 1) at ``(int(x1), int(y1))`` and ``br_hm[label]``
      one at ``(int(x2), int(y2))``, both of radius ``max(0, int(gaussian_radius(ceil(h), ceil(w),
      t)))``, merged by element-wise max;
    * ``tl_off[k] = (x1 - int(x1), y1 - int(y1))``, ``br_off[k]`` likewise (x then y; CornerNet Eq. 2
      with the stride already divided out);
    * ``tl_ind[k] = int(y1) * W + int(x1)``, ``br_ind[k]`` likewise; ``mask[k] = 1`` ties slot ``k``
      of both corner lists to one object, which is what the embedding loss pairs.

    Radius: ``t = 0.3`` is CornerNet's value (the official ``config/CornerNet.json`` sets
    ``gaussian_iou: 0.3``; its first release left the 0.7 default of ``db/detection.py`` in force).
    The official ``sample/utils.py`` was corrected in a later commit to take the smaller root in
    cases 1 and 2 and to divide every root by ``2a``; that corrected formula is, case by case, our
    ``variant="exact"`` (checked against hand values in the tests), hence the default here.
    ``"reference"`` gives CornerNet's first-release / CenterNet radius instead.

    Border corners: the reference clips boxes in *input* pixels to ``[0, in_W - 1]`` and scales to
    the output map, so a right/bottom corner lands at most at ``(in_W - 1) W / in_W`` (127.75 for
    511 -> 128), which ``int()`` truncates to ``W - 1`` with an offset up to 0.75. Boxes reach this
    function already in output coordinates, so we clip to ``[0, W - 1]`` as ``encode_centernet`` does:
    a corner on the border gets index ``W - 1`` (``H - 1``) and offset 0. The reference has no limit
    on the number of objects (it would fail past ``max_tag_len = 128``); we encode the first
    ``max_objects`` boxes.

    Args:
        boxes: ``(N, 4)`` ``xyxy`` already in output-stride coordinates.
        labels: ``(N,)`` class indices in ``0..num_classes-1``.
        num_classes: ``C``.
        output_size: ``(H, W)`` of the output map.
        max_objects: ``K``, the length of the per-object arrays.
        min_overlap: IoU threshold ``t`` for the radius (0.3 in CornerNet).
        radius_variant: see :func:`gaussian_radius`; ``"exact"`` equals CornerNet's corrected code.

    Returns:
        ``tl_hm``, ``br_hm`` ``(C, H, W)`` float32; ``tl_off``, ``br_off`` ``(K, 2)`` float32;
        ``tl_ind``, ``br_ind`` ``(K,)`` int64; ``mask`` ``(K,)`` float32.
    """
    out_h, out_w = output_size
    out = {
        "tl_hm": np.zeros((num_classes, out_h, out_w), dtype=np.float32),
        "br_hm": np.zeros((num_classes, out_h, out_w), dtype=np.float32),
        "tl_off": np.zeros((max_objects, 2), dtype=np.float32),
        "br_off": np.zeros((max_objects, 2), dtype=np.float32),
        "tl_ind": np.zeros((max_objects,), dtype=np.int64),
        "br_ind": np.zeros((max_objects,), dtype=np.int64),
        "mask": np.zeros((max_objects,), dtype=np.float32),
    }
    objects = _encoded_objects(boxes, labels, num_classes, output_size, max_objects, min_overlap, radius_variant)
    for k, (x1, y1, x2, y2), label, radius in objects:
        for corner, (fx, fy) in (("tl", (x1, y1)), ("br", (x2, y2))):
            px, py = int(fx), int(fy)
            draw_gaussian(out[f"{corner}_hm"][label], (px, py), radius)
            out[f"{corner}_off"][k] = fx - px, fy - py
            out[f"{corner}_ind"][k] = py * out_w + px
        out["mask"][k] = 1
    return out


ENCODERS = {"centernet": encode_centernet, "cornernet": encode_cornernet}  # the targets of each task, by name
