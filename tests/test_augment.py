"""Tests of the reference colour augmentation (colour jitter, PCA lighting, their uint8 wrapper), of
its use in CenterNetDataset, and of viz.render_targets.

Expected values are worked out by hand (in the comments) or from properties derived here: the
grayscale weights sum to 1, so contrast and saturation steps keep the mean gray when the gray is
recomputed; the lighting shift ``V (lambda * alpha)`` with ``alpha ~ N(0, s^2 I)`` has covariance
``V diag(s^2 lambda^2) V^T`` and its projection on eigenvector ``k`` has standard deviation
``s lambda_k``.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from minicenternet.data.centernet_dataset import CenterNetDataset
from minicenternet.data.coco import CocoDetection
from minicenternet.data.transforms import (
    COCO_EIGVAL,
    COCO_EIGVEC,
    COCO_EIGVEC_BGR,
    augment_colour,
    color_jitter,
    pca_lighting,
    random_crop_params,
)
from minicenternet.targets import encode_centernet, encode_cornernet
from minicenternet.viz import render_targets

LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601 weights of R, G, B (OpenCV's RGB -> gray)


class FixedDraws:
    """Stands in for ``np.random.Generator``: a given permutation, given uniform draws and given
    standard normals (scaled by the requested ``scale``); records the arguments it was called with."""

    def __init__(self, order=(0, 1, 2), uniforms=(0.0, 0.0, 0.0), normals=(0.0, 0.0, 0.0)):
        self.order, self.uniforms, self.normals = list(order), list(uniforms), np.asarray(normals, float)
        self.calls: list[tuple] = []

    def permutation(self, n):
        self.calls.append(("permutation", n))
        return np.array(self.order)

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return self.uniforms.pop(0)

    def normal(self, loc, scale, size):
        self.calls.append(("normal", loc, scale, size))
        return loc + scale * self.normals


# Two pixels with gray 0.299 * 0.5 + 0.587 * 0.25 = 0.29625 and 0.587 * 0.5 + 0.114 = 0.4075, mean 0.351875.
TWO_PIXELS = np.array([[[0.5, 0.25, 0.0], [0.0, 0.5, 1.0]]], dtype=np.float32)


def test_color_jitter_hand_values_with_the_input_gray():
    """Order brightness, contrast, saturation with factors 1.2, 0.9, 1.4 and the reference's gray,
    taken once from the input: x -> 1.2 x -> 0.9 x + 0.1 * 0.351875 -> 1.4 x - 0.4 * (0.29625 | 0.4075).
    Pixel 0: (0.6, 0.3, 0) -> (0.5751875, 0.3051875, 0.0351875) -> (0.6867625, 0.3087625, -0.0692375);
    pixel 1 likewise. Values leave [0, 1]: nothing is clipped."""
    rng = FixedDraws(order=(0, 1, 2), uniforms=(0.2, -0.1, 0.4))
    out = color_jitter(TWO_PIXELS, rng, strength=0.4)
    expected = [[[0.6867625, 0.3087625, -0.0692375], [-0.1137375, 0.6422625, 1.3982625]]]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert out.dtype == np.float32 and out.shape == TWO_PIXELS.shape
    assert rng.calls == [("permutation", 3)] + [("uniform", -0.4, 0.4)] * 3
    assert TWO_PIXELS[0, 0, 0] == 0.5  # the input is not modified


def test_color_jitter_hand_values_with_refreshed_gray():
    """Same draws, refresh_gray=True: after brightness the grays are 0.3555, 0.489 (mean 0.42225), so
    contrast gives 0.9 x + 0.042225; the grays become 0.362175, 0.482325, and saturation gives
    1.4 x - 0.4 g: pixel 0 (0.582225, 0.312225, 0.042225) -> (0.670245, 0.292245, -0.085755)."""
    out = color_jitter(TWO_PIXELS, FixedDraws(order=(0, 1, 2), uniforms=(0.2, -0.1, 0.4)), refresh_gray=True)
    expected = [[[0.670245, 0.292245, -0.085755], [-0.133815, 0.622185, 1.378185]]]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def _reference_on_bgr(bgr: np.ndarray, steps: list[tuple[str, float]], alpha: np.ndarray) -> np.ndarray:
    """The reference's sequence written out for BGR pixels: gray (OpenCV's BGR weights) and its mean
    once from the input, the steps in the given order, then the BGR eigenvectors as the reference
    lists them."""
    x = bgr.copy()
    gray = cv2.cvtColor(x, cv2.COLOR_BGR2GRAY)
    mean = float(gray.mean())
    for name, a in steps:
        if name == "brightness":
            x = a * x
        elif name == "contrast":
            x = a * x + (1 - a) * mean
        else:
            x = a * x + (1 - a) * gray[:, :, None]
    return x + COCO_EIGVEC_BGR.astype(np.float64) @ (COCO_EIGVAL * alpha)


def test_jitter_then_lighting_equals_the_reference_on_the_bgr_image():
    """Permutation (2, 0, 1) means saturation, brightness, contrast; on an RGB image our result is,
    channel by channel, the reference's on the same image stored as BGR."""
    rgb = np.random.default_rng(5).random((5, 7, 3), dtype=np.float32)
    rng = FixedDraws(order=(2, 0, 1), uniforms=(0.3, -0.25, 0.1), normals=(1.5, -0.7, 2.0))
    ours = pca_lighting(color_jitter(rgb, rng), rng)
    steps = [("saturation", 1.3), ("brightness", 0.75), ("contrast", 1.1)]
    reference = _reference_on_bgr(np.ascontiguousarray(rgb[..., ::-1]), steps, 0.1 * np.array([1.5, -0.7, 2.0]))
    np.testing.assert_allclose(ours, reference[..., ::-1], rtol=0, atol=2e-6)
    naive = pca_lighting(rgb, FixedDraws(normals=(1.5, -0.7, 2.0)), eigvec=COCO_EIGVEC_BGR)
    assert not np.allclose(naive, pca_lighting(rgb, FixedDraws(normals=(1.5, -0.7, 2.0))), atol=1e-4)


def test_reference_eigen_statistics_and_their_channel_order():
    """The constants are the reference's (CornerNet's db/coco.py), its rows are B, G, R (its authors
    computed them on OpenCV's BGR pixels), and COCO_EIGVEC lists them R, G, B. Corroboration: with
    the rows reversed the columns lie closer, each up to sign, to fb.resnet.torch's RGB ImageNet
    eigenvectors than with the rows as written."""
    np.testing.assert_array_equal(COCO_EIGVAL, np.float32([0.2141788, 0.01817699, 0.00341571]))
    as_written = np.float32([
        [-0.58752847, -0.69563484, 0.41340352],
        [-0.5832747, 0.00994535, -0.81221408],
        [-0.56089297, 0.71832671, 0.41158938],
    ])
    np.testing.assert_array_equal(COCO_EIGVEC_BGR, as_written)
    np.testing.assert_array_equal(COCO_EIGVEC, as_written[[2, 1, 0]])
    np.testing.assert_allclose(COCO_EIGVEC.T @ COCO_EIGVEC, np.eye(3), atol=1e-6)
    imagenet_rgb = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])

    def distance(vectors: np.ndarray) -> float:
        signs = np.sign(np.sum(vectors * imagenet_rgb, axis=0))
        return float(np.linalg.norm(vectors * signs - imagenet_rgb))

    assert 2 * distance(COCO_EIGVEC) < distance(COCO_EIGVEC_BGR)
    with pytest.raises(ValueError):
        COCO_EIGVEC[0, 0] = 1.0  # read-only: a default argument cannot be changed by accident


def test_pca_lighting_hand_values():
    """eigval (1, 2, 3), alpha = 0.1 * (1, -2, 3) = (0.1, -0.2, 0.3): lambda * alpha = (0.1, -0.4, 0.9).
    Columns of V are the eigenvectors, rows the channels: with V = [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    the shift is (-0.4, 0.9, 0.1), added unclipped to the gray 0.5 pixel."""
    rng = FixedDraws(normals=(1.0, -2.0, 3.0))
    eigvec = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    out = pca_lighting(np.full((1, 1, 3), 0.5, np.float32), rng, 0.1, np.array([1.0, 2.0, 3.0]), eigvec)
    np.testing.assert_allclose(out[0, 0], [0.1, 1.4, 0.6], atol=1e-7)
    assert out.dtype == np.float32
    assert rng.calls == [("normal", 0.0, 0.1, 3)]


def test_pca_lighting_default_shift_is_the_reference_first_component_in_rgb_order():
    """alpha = (0.1, 0, 0): the shift is 0.1 * 0.2141788 times the reference's first column read from
    the bottom up (its last row is red): (-0.56089297, -0.5832747, -0.58752847)."""
    out = pca_lighting(np.zeros((2, 2, 3), np.float32), FixedDraws(normals=(1.0, 0.0, 0.0)))
    expected = 0.1 * 0.2141788 * np.array([-0.56089297, -0.5832747, -0.58752847])
    np.testing.assert_allclose(out, np.broadcast_to(expected, (2, 2, 3)), rtol=1e-6)


def test_pca_lighting_shift_covariance_over_many_draws():
    """20000 draws: the sample covariance of the per-image shift matches V diag((0.1 lambda)^2) V^T
    (the red and blue variances differ by about 10%, so the channel order shows), and the shift's
    coordinates along the eigenvectors have standard deviations 0.1 lambda_k."""
    rng = np.random.default_rng(0)
    zero = np.zeros((1, 1, 3), np.float32)
    shifts = np.array([pca_lighting(zero, rng)[0, 0] for _ in range(20000)], dtype=np.float64)
    expected = COCO_EIGVEC @ np.diag((0.1 * COCO_EIGVAL.astype(np.float64)) ** 2) @ COCO_EIGVEC.T
    np.testing.assert_allclose(np.cov(shifts.T), expected, rtol=0, atol=5e-6)
    assert abs(expected[0, 0] - expected[2, 2]) > 1e-5  # the tolerance above separates R from B
    np.testing.assert_allclose((shifts @ COCO_EIGVEC).std(axis=0), 0.1 * COCO_EIGVAL, rtol=0.03)
    np.testing.assert_allclose(shifts.mean(axis=0), 0.0, atol=5e-4)


def test_zero_strength_is_the_identity_and_seeds_reproduce():
    image = np.random.default_rng(1).random((6, 5, 3), dtype=np.float32)
    assert np.array_equal(color_jitter(image, np.random.default_rng(7), strength=0.0), image)
    every_level = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    unchanged = augment_colour(every_level, np.random.default_rng(7), strength=0.0, alphastd=0.0)
    assert np.array_equal(unchanged, every_level)
    sample = (image * 255).astype(np.uint8)
    first = augment_colour(sample, np.random.default_rng(11))
    assert np.array_equal(first, augment_colour(sample, np.random.default_rng(11)))
    assert not np.array_equal(first, augment_colour(sample, np.random.default_rng(12)))


def test_refreshed_gray_keeps_the_mean_gray_and_gray_stays_gray():
    """The weights sum to 1, so with the gray recomputed contrast and saturation keep the mean gray:
    after brightness 1.3, contrast 0.65, saturation 1.25 it is 1.3 times the input's. The reference's
    stale gray does not keep it. A gray image (R = G = B) stays gray under every step."""
    image = np.random.default_rng(2).random((6, 5, 3), dtype=np.float32)
    draws = dict(order=(0, 1, 2), uniforms=(0.3, -0.35, 0.25))

    def mean_gray(x: np.ndarray) -> float:
        return float((x.astype(np.float64) @ LUMA).mean())

    target = pytest.approx(1.3 * mean_gray(image), rel=1e-5)
    assert mean_gray(color_jitter(image, FixedDraws(**draws), refresh_gray=True)) == target
    assert mean_gray(color_jitter(image, FixedDraws(**draws))) != pytest.approx(1.3 * mean_gray(image), rel=1e-3)
    gray = image[..., :1].repeat(3, axis=2)
    out = color_jitter(gray, np.random.default_rng(3))
    np.testing.assert_allclose(out, out[..., :1].repeat(3, axis=2), atol=1e-6)


@pytest.mark.parametrize(
    "pixel, draws, expected",
    [
        # brightness 1.2: (1.2, 0.6024, 0) -> clip to (1, 0.6024, 0) -> 255 * : (255, 153.6, 0) -> (255, 154, 0)
        ((255, 128, 0), dict(uniforms=(0.2, 0.0, 0.0)), (255, 154, 0)),
        # saturation 1.4 on blue: gray 0.114, 1.4 x - 0.4 * 0.114 = (-0.0456, -0.0456, 1.3544) -> (0, 0, 255)
        ((0, 0, 255), dict(uniforms=(0.0, 0.0, 0.4)), (0, 0, 255)),
    ],
)
def test_augment_colour_clips_and_rounds(pixel, draws, expected):
    image = np.array(pixel, np.uint8).reshape(1, 1, 3)
    out = augment_colour(image, FixedDraws(**draws))
    assert out.dtype == np.uint8 and out.shape == (1, 1, 3)
    assert out[0, 0].tolist() == list(expected)


def test_dataset_colour_augmentation_changes_pixels_not_targets(tiny_shapes):
    """Same torch seed: identical targets, different pixels; the coloured image is augment_colour of
    the plain one with the sample's generator continued after the crop and flip draws. Evaluation
    samples are never coloured."""
    source = CocoDetection.from_root(tiny_shapes, "train")
    plain = CenterNetDataset(source, (64, 64), train=True)
    coloured = CenterNetDataset(source, (64, 64), train=True, color_aug=True)
    for seed in range(3):
        torch.manual_seed(seed)
        plain_image, plain_targets = plain[seed]
        torch.manual_seed(seed)
        image, targets = coloured[seed]
        assert targets.keys() == plain_targets.keys()
        assert all(torch.equal(targets[k], plain_targets[k]) for k in targets)
        assert image.dtype == torch.uint8 and not torch.equal(image, plain_image)
        torch.manual_seed(seed)
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        random_crop_params((64, 64), rng)
        rng.random()  # the flip draw
        expected = augment_colour(plain_image.permute(1, 2, 0).numpy(), rng)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
    evaluation = CenterNetDataset(source, (64, 64), train=False, color_aug=True)
    assert torch.equal(evaluation[0][0], CenterNetDataset(source, (64, 64), train=False)[0][0])


BOX = np.array([[4.0, 4.0, 12.0, 10.0]], np.float32)  # output-map pixels; (16, 16, 48, 40) in the 64x64 image


def test_render_targets_centernet_boxes_and_heatmap():
    """Black 64x64 image, one class-1 box: the box panel shows the box's left edge at x = 16 in
    tab10's second colour (orange, R > B), nothing at x = 8 or inside; the heatmap panel is bright
    at the centre peak, map pixel (8, 7) = image pixels 32..35 x 28..31, and dark far from it."""
    targets = encode_centernet(BOX, np.array([1]), num_classes=2, output_size=(16, 16))
    picture = render_targets(np.zeros((64, 64, 3), np.uint8), targets, ["a", "b"])
    assert picture.shape == (64, 128, 3) and picture.dtype == np.uint8
    boxes_panel, heat_panel = picture[:, :64].astype(int), picture[:, 64:].astype(int)
    edge = boxes_panel[20:36, 15:18]
    brightest = edge.reshape(-1, 3)[edge.sum(axis=2).argmax()]
    assert edge.sum(axis=2).max(axis=1).min() > 60 and brightest[0] > 2 * brightest[2]
    assert boxes_panel[20:36, 7:10].max() == 0 and boxes_panel[20:36, 22:42].max() == 0
    assert heat_panel[29:31, 33:35].sum(axis=2).min() > 250
    assert heat_panel[50:62, 2:14].max() < 20


def test_render_targets_cornernet_and_input_layouts():
    """CornerNet: three panels; the top-left heatmap peaks at map (4, 4) = image 16..19, the
    bottom-right one at map (12, 10) = image 48..51 x 40..43, each dark at the other corner. A
    (3, H, W) tensor and torch targets give the same picture as (H, W, 3) numpy input."""
    targets = encode_cornernet(BOX, np.array([0]), num_classes=1, output_size=(16, 16))
    picture = render_targets(np.zeros((64, 64, 3), np.uint8), targets, task="cornernet").astype(int)
    assert picture.shape == (64, 192, 3)
    tl_panel, br_panel = picture[:, 64:128], picture[:, 128:]
    assert tl_panel[17:19, 17:19].sum(axis=2).min() > 250 and br_panel[41:43, 49:51].sum(axis=2).min() > 250
    assert tl_panel[41:43, 49:51].max() < 20 and br_panel[17:19, 17:19].max() < 20
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    as_tensors = {k: torch.from_numpy(v) for k, v in targets.items()}
    from_tensors = render_targets(chw, as_tensors, task="cornernet")
    assert np.array_equal(from_tensors, render_targets(image, targets, task="cornernet"))
    with pytest.raises(ValueError, match="unknown task"):
        render_targets(image, targets, task="ctdet")
