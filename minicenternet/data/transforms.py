"""Pre-processing shared by training and inference: the reference affine crop, and the training
colour augmentation (jitter and PCA lighting, at the end of this file).

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
    "color_jitter",
    "pca_lighting",
    "augment_colour",
    "COCO_EIGVAL",
    "COCO_EIGVEC",
    "COCO_EIGVEC_BGR",
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


# The reference's lighting statistics (CornerNet's ``db/coco.py``, kept by CenterNet): a PCA of the
# pixel colours of 5000 COCO images on the [0, 1] scale, computed on OpenCV's BGR pixels (CornerNet's
# authors, CornerNet-Lite issue #106). Eigenvalues are variances, largest first. In the matrices each
# column is an eigenvector and each row a channel: (B, G, R) as the reference writes it, (R, G, B)
# in ``COCO_EIGVEC``, the one for our RGB images.
COCO_EIGVAL = np.array([0.2141788, 0.01817699, 0.00341571], dtype=np.float32)
COCO_EIGVEC_BGR = np.array(
    [[-0.58752847, -0.69563484, 0.41340352], [-0.5832747, 0.00994535, -0.81221408], [-0.56089297, 0.71832671, 0.41158938]],
    dtype=np.float32,
)
COCO_EIGVEC = np.ascontiguousarray(COCO_EIGVEC_BGR[::-1])
for _constant in (COCO_EIGVAL, COCO_EIGVEC_BGR, COCO_EIGVEC):
    _constant.setflags(write=False)

_JITTER_OPS = ("brightness", "contrast", "saturation")  # indexed by the drawn permutation


def color_jitter(
    image: np.ndarray, rng: np.random.Generator, strength: float = 0.4, refresh_gray: bool = False
) -> np.ndarray:
    """Brightness, contrast and saturation jitter in a random order (the reference ``color_aug``).

    The reference (CenterNet ``utils/image.py``, from CornerNet) takes the grayscale ``g`` of the
    image and its mean ``m`` once, then runs the three steps in a shuffled order, each with a factor
    ``a = 1 + U(-strength, strength)`` drawn when it runs: brightness ``x <- a x``; contrast
    ``x <- a x + (1 - a) m`` (towards one scalar, the grayscale's mean); saturation
    ``x <- a x + (1 - a) g`` (towards each pixel's gray). Nothing is clipped: values may leave
    [0, 1]. The reference's pixels are OpenCV's BGR and its ``cv2.COLOR_BGR2GRAY`` weights them as
    BGR, so on each channel it is the luma ``g = 0.299 R + 0.587 G + 0.114 B``, used here on our RGB
    pixels (OpenCV's ``COLOR_RGB2GRAY``; equal to float32 rounding).

    Draws from ``rng``: the permutation of (brightness, contrast, saturation), then one factor per
    step in the order applied. The reference shuffles with Python's global ``random`` and draws the
    factors from one ``RandomState(123)`` per dataset, which every data-loader worker copies (each
    worker repeats the same factors every epoch); one generator per sample avoids that.

    Args:
        image: ``(H, W, 3)`` float32 RGB, nominally in [0, 1]; not modified.
        rng: the sample's generator.
        strength: the reference's ``var``, 0.4 for all three; 0 returns the image unchanged.
        refresh_gray: ``False`` (the reference) blends towards the gray of the *input* even after
            brightness has changed the image, so a later contrast or saturation step partly undoes
            the brightness change. ``True`` recomputes ``g`` and ``m`` before each step, as
            torchvision's ``ColorJitter`` does: contrast and saturation then keep the mean gray.

    Returns:
        ``(H, W, 3)`` float32, a new array.
    """
    out = np.array(image, dtype=np.float32)
    gray = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)  # (H, W)
    gray_mean = float(gray.mean())
    for name in [_JITTER_OPS[i] for i in rng.permutation(len(_JITTER_OPS))]:
        alpha = 1.0 + float(rng.uniform(-strength, strength))
        if refresh_gray and name != "brightness":
            gray = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
            gray_mean = float(gray.mean())
        out *= alpha
        if name == "contrast":
            out += gray_mean * (1.0 - alpha)
        elif name == "saturation":
            out += gray[:, :, None] * (1.0 - alpha)
    return out


def pca_lighting(
    image: np.ndarray,
    rng: np.random.Generator,
    alphastd: float = 0.1,
    eigval: np.ndarray = COCO_EIGVAL,
    eigvec: np.ndarray = COCO_EIGVEC,
) -> np.ndarray:
    """AlexNet's PCA lighting noise (Krizhevsky et al., 2012, Sec. 4.1), as the reference ``lighting_``.

    One colour shift for the whole image: ``x <- x + V (lambda * alpha)``, ``alpha ~ N(0, alphastd^2 I)``
    (3 draws), ``lambda`` the eigenvalues, ``V`` the eigenvectors as columns; so the shift has
    covariance ``V diag((alphastd lambda)^2) V^T``. No clipping.

    Channel order: the reference adds ``COCO_EIGVEC_BGR`` to OpenCV's BGR pixels, and that matrix
    was computed on BGR pixels (rows reversed, it is also the closer match to fb.resnet.torch's RGB
    ImageNet eigenvectors), so the reference's noise is AlexNet's, consistently applied. For RGB
    images the same noise per channel is ``COCO_EIGVEC`` (rows reversed), the default. The naive
    port, ``COCO_EIGVEC_BGR`` on RGB pixels, swaps the red and blue loadings: a small error (the
    eigenvectors are nearly symmetric in R and B), but no longer the reference.

    Args:
        image: ``(H, W, 3)`` float32, channels in the order of ``eigvec``'s rows; not modified.
        rng: the sample's generator (3 normal draws).
        alphastd: standard deviation of ``alpha`` (0.1, AlexNet's and the reference's).
        eigval: ``(3,)`` eigenvalues (variances) of the pixel covariance.
        eigvec: ``(3, 3)`` eigenvectors as columns, rows in the image's channel order.

    Returns:
        ``(H, W, 3)`` float32, a new array (the shift is computed in float64, as the reference's).
    """
    alpha = rng.normal(0.0, alphastd, size=3)
    shift = np.asarray(eigvec) @ (np.asarray(eigval) * alpha)  # (3,) float64
    out = np.array(image, dtype=np.float32)
    out += shift  # in place, as the reference's ``image += ...``: added in float64, stored as float32
    return out


def augment_colour(
    image: np.ndarray, rng: np.random.Generator, strength: float = 0.4, alphastd: float = 0.1,
    refresh_gray: bool = False,
) -> np.ndarray:
    """The reference's training colour augmentation of a uint8 RGB sample: jitter, then lighting.

    ``x = image / 255`` (float32), :func:`color_jitter`, :func:`pca_lighting` (defaults: the
    reference's statistics in RGB order), then ``rint(clip(x, 0, 1) * 255)`` back to uint8, since
    the library's samples stay uint8 until :func:`normalize_batch`. The reference normalises its
    float result directly, so here values pushed outside [0, 1] saturate at 0 or 255 where the
    reference lets them through, and every pixel is rounded to one of 256 levels (error <= 0.5/255).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        rng: the sample's generator; draws as :func:`color_jitter`, then :func:`pca_lighting`.
        strength: jitter strength (reference 0.4).
        alphastd: lighting noise scale (reference 0.1).
        refresh_gray: see :func:`color_jitter`.

    Returns:
        ``(H, W, 3)`` uint8 RGB, a new array.
    """
    x = np.asarray(image, dtype=np.float32) / np.float32(255)
    x = pca_lighting(color_jitter(x, rng, strength, refresh_gray), rng, alphastd)
    np.clip(x, 0.0, 1.0, out=x)  # in place: this runs on every training sample
    x *= np.float32(255)
    return np.rint(x, out=x).astype(np.uint8)
