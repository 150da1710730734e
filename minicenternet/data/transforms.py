"""Geometric pre-processing shared by training and inference: the reference affine crop.

The official CenterNet code describes every crop by a centre ``c = (cx, cy)`` and a scale ``s``
(the side, in source pixels, of the square that is mapped onto the network input). The map is a
pure scale-and-translate: the point ``c`` goes to the middle of the output and ``s`` source
pixels become ``output_w`` pixels. The same ``(c, s)`` with the output-stride size gives the map
to the heatmap, and its inverse brings detections back to the original image.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = [
    "affine_matrix",
    "invert_affine",
    "apply_affine_to_boxes",
    "warp_image",
    "hflip_image_and_boxes",
    "random_crop_params",
    "jitter_crop_params",
    "normalize_batch",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]


def affine_matrix(center: np.ndarray | tuple[float, float], scale: float, output_size: tuple[int, int]) -> np.ndarray:
    """``(2, 3)`` float64 matrix taking source ``(x, y)`` to output ``(x, y)``.

    Same map as the reference ``get_affine_transform(c, s, rot=0, [w_out, h_out])``, written in
    closed form: ``k = w_out / s``, ``x' = k (x - cx) + w_out / 2``, ``y' = k (y - cy) + h_out / 2``.

    Args:
        center: ``(cx, cy)`` in source pixels.
        scale: side ``s`` of the source square (the reference uses ``max(H, W)`` at test time).
        output_size: ``(H_out, W_out)``.
    """
    out_h, out_w = output_size
    k = out_w / float(scale)
    cx, cy = float(center[0]), float(center[1])
    return np.array([[k, 0.0, out_w / 2 - k * cx], [0.0, k, out_h / 2 - k * cy]], dtype=np.float64)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a ``(2, 3)`` affine matrix, also ``(2, 3)``."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def apply_affine_to_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map ``(N, 4)`` ``xyxy`` boxes through a scale-and-translate ``(2, 3)`` matrix.

    Maps the two corners (exact for the axis-aligned maps used here) and re-orders them so that
    ``x1 <= x2`` and ``y1 <= y2``. Returns float32 ``(N, 4)``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    corners = boxes.reshape(-1, 2)
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    mapped = mapped.reshape(-1, 2, 2)
    lo, hi = mapped.min(axis=1), mapped.max(axis=1)
    return np.concatenate([lo, hi], axis=1).astype(np.float32)


def warp_image(image: np.ndarray, matrix: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """Warp an ``(H, W, 3)`` uint8 image to ``output_size = (H_out, W_out)`` with bilinear sampling.

    Pixels outside the source are 0 (the reference's constant border).
    """
    out_h, out_w = output_size
    return cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR)


def hflip_image_and_boxes(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an ``(H, W, 3)`` image and its ``(N, 4)`` ``xyxy`` boxes left to right.

    Uses the reference convention ``x' = W - x - 1`` for both box edges (boxes in the COCO
    convention would use ``W - x``; the reference's one-pixel shift is kept on purpose).
    """
    width = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2] - 1
    flipped[:, 2] = width - boxes[:, 0] - 1
    return np.ascontiguousarray(image[:, ::-1]), flipped


def _border(border: int, size: int) -> int:
    """Largest ``border / 2^i`` that leaves room for the centre (the reference ``_get_border``)."""
    i = 1
    while size - border // i <= border // i:
        i *= 2
    return border // i


def random_crop_params(
    image_size: tuple[int, int],
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.6, 1.4),
    border: int = 128,
) -> tuple[np.ndarray, float]:
    """Random centre and scale of the reference training crop (CenterNet ``ctdet`` loader).

    The scale is ``max(H, W)`` times a factor drawn from ``arange(lo, hi, 0.1)`` (the reference's
    0.6 ... 1.3 for the default ``(0.6, 1.4)``); the centre is drawn uniformly with integer
    coordinates at least a border away from the image edges.

    Args:
        image_size: ``(H, W)`` of the source image.
        rng: numpy random generator.
        scale_range: half-open range of scale factors, stepped by 0.1.
        border: the reference's 128-pixel border (halved until it fits the image).

    Returns:
        ``(center (2,) float32 (x, y), scale float)``.
    """
    height, width = image_size
    factors = np.arange(scale_range[0], scale_range[1] - 1e-6, 0.1)
    scale = max(height, width) * float(rng.choice(factors))
    w_border, h_border = _border(border, width), _border(border, height)
    cx = rng.integers(w_border, width - w_border)
    cy = rng.integers(h_border, height - h_border)
    return np.array([cx, cy], dtype=np.float32), scale


def jitter_crop_params(
    image_size: tuple[int, int],
    rng: np.random.Generator,
    shift: float = 0.1,
    scale: float = 0.4,
) -> tuple[np.ndarray, float]:
    """The reference loader's branch without random crops (``--not_rand_crop``): the whole image,
    jittered.

    With ``s = max(H, W)``, the centre moves by ``s * clip(N(0, shift^2), -2 shift, 2 shift)`` in
    x and in y, then ``s`` is multiplied by ``clip(N(1, scale^2), 1 - scale, 1 + scale)``; the
    reference's defaults are ``shift = 0.1`` and ``scale = 0.4``.

    Returns:
        ``(center (2,) float32 (x, y), scale float)``.
    """
    height, width = image_size
    side = float(max(height, width))
    center = np.array([width / 2, height / 2], dtype=np.float32)
    center[0] += side * np.clip(rng.normal() * shift, -2 * shift, 2 * shift)
    center[1] += side * np.clip(rng.normal() * shift, -2 * shift, 2 * shift)
    return center, side * float(np.clip(rng.normal() * scale + 1, 1 - scale, 1 + scale))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_batch(
    images: torch.Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 RGB -> float32 ``(x / 255 - mean) / std``, on the batch's device.

    Loaders hand over uint8 (four times fewer bytes to pin and copy); the network input is made
    where the network runs. ImageNet statistics, so that torchvision's pretrained trunks fit.
    """
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t
