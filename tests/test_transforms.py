"""Tests of minicenternet.data.transforms: reference affine crop, flips and random crop parameters."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from minicenternet.data.transforms import (
    affine_matrix,
    apply_affine_to_boxes,
    hflip_image_and_boxes,
    invert_affine,
    jitter_crop_params,
    random_crop_params,
    warp_image,
)


def _get_3rd_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference CenterNet: b + rot90(a - b) = b + (-(a - b)[1], (a - b)[0])."""
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def _reference_affine(center, scale, out_w, out_h) -> np.ndarray:
    """Reference ``get_affine_transform(center, scale, rot=0, (out_w, out_h))`` via three point pairs."""
    c = np.asarray(center, dtype=np.float32)
    src_dir = np.array([0, -0.5 * scale], dtype=np.float32)
    dst_dir = np.array([0, -0.5 * out_w], dtype=np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = c
    src[1] = c + src_dir
    dst[0] = [out_w * 0.5, out_h * 0.5]
    dst[1] = dst[0] + dst_dir
    src[2] = _get_3rd_point(src[0], src[1])
    dst[2] = _get_3rd_point(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


@pytest.mark.parametrize(
    "center, scale, out_hw",
    [
        ((256.0, 256.0), 512.0, (512, 512)),
        ((320.0, 213.5), 640.0, (512, 512)),
        ((100.0, 60.0), 153.6, (128, 128)),
        ((37.5, 81.0), 300.0, (96, 160)),  # non-square output
        ((200.0, 150.0), 400.0, (128, 64)),
    ],
)
def test_affine_matrix_matches_reference_three_point_construction(center, scale, out_hw):
    """affine_matrix equals cv2.getAffineTransform on the reference's three point pairs."""
    out_h, out_w = out_hw
    m = affine_matrix(center, scale, out_hw)
    assert m.shape == (2, 3) and m.dtype == np.float64
    np.testing.assert_allclose(m, _reference_affine(center, scale, out_w, out_h), rtol=1e-5, atol=1e-4)


def test_affine_matrix_hand_values():
    """centre (50, 40), s = 200, output 128x128: k = 0.64, x' = 0.64 (x - 50) + 64, y' = 0.64 (y - 40) + 64."""
    m = affine_matrix(np.array([50.0, 40.0]), 200.0, (128, 128))
    np.testing.assert_allclose(m, [[0.64, 0, 32.0], [0, 0.64, 38.4]], rtol=1e-12)


def test_invert_affine_round_trip():
    """Points mapped by M then by invert_affine(M) come back; the inverse has the closed form."""
    m = affine_matrix((37.5, 81.0), 300.0, (96, 160))
    inv = invert_affine(m)
    assert inv.shape == (2, 3)
    pts = np.random.default_rng(0).uniform(-50, 400, (20, 2))
    there = pts @ m[:, :2].T + m[:, 2]
    back = there @ inv[:, :2].T + inv[:, 2]
    np.testing.assert_allclose(back, pts, rtol=0, atol=1e-9)
    # inverse of x' = k (x - cx) + w/2 is x = (x' - w/2) / k + cx, k = 160 / 300
    k = 160 / 300
    np.testing.assert_allclose(inv, [[1 / k, 0, 37.5 - 80 / k], [0, 1 / k, 81.0 - 48 / k]], rtol=1e-12)
    full = np.vstack([m, [0, 0, 1]]) @ np.vstack([inv, [0, 0, 1]])
    np.testing.assert_allclose(full, np.eye(3), atol=1e-12)


def test_apply_affine_to_boxes_hand_values():
    """Box (10, 20, 60, 90) through k=0.64 around (50, 40) -> (38.4, 51.2, 70.4, 96)."""
    m = affine_matrix((50.0, 40.0), 200.0, (128, 128))
    out = apply_affine_to_boxes(np.array([[10.0, 20.0, 60.0, 90.0], [50.0, 40.0, 50.0, 40.0]]), m)
    assert out.dtype == np.float32 and out.shape == (2, 4)
    np.testing.assert_allclose(out, [[38.4, 51.2, 70.4, 96.0], [64, 64, 64, 64]], rtol=1e-6)


def test_apply_affine_to_boxes_reorders_corners():
    """A mirroring matrix x' = 100 - x keeps x1 <= x2: (10, 20, 30, 40) -> (70, 20, 90, 40)."""
    m = np.array([[-1.0, 0.0, 100.0], [0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(apply_affine_to_boxes(np.array([[10, 20, 30, 40]]), m), [[70, 20, 90, 40]])


def test_warp_image_translation_moves_bright_pixel():
    """k = 1, centre (40, 24) on a 64x64 output: x' = x - 8, y' = y + 8; pixel (20, 10) -> (12, 18)."""
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[10, 20] = (255, 128, 7)
    m = affine_matrix((40.0, 24.0), 64.0, (64, 64))
    out = warp_image(image, m, (64, 64))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[18, 12], [255, 128, 7])
    assert np.count_nonzero(out.any(axis=2)) == 1


def test_warp_image_upscale_predicted_location():
    """k = 2 around (32, 32) into 64x48: x' = 2x - 32, y' = 2y - 40; pixel (24, 28) -> (16, 16) is the max."""
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[28, 24] = 200
    m = affine_matrix((32.0, 32.0), 32.0, (48, 64))
    out = warp_image(image, m, (48, 64))
    assert out.shape == (48, 64, 3)
    gray = out[..., 0].astype(int)
    assert gray[16, 16] == 200
    assert np.unravel_index(np.argmax(gray), gray.shape) == (16, 16)
    assert gray[16, 17] == pytest.approx(100, abs=1) and gray[15, 16] == pytest.approx(100, abs=1)
    # predicted by apply_affine_to_boxes on a degenerate box at the pixel
    assert apply_affine_to_boxes(np.array([[24, 28, 24, 28]]), m)[0, :2].tolist() == [16.0, 16.0]


def test_warp_image_outside_is_zero():
    """Output pixels that map outside the source are 0 (constant border)."""
    image = np.full((32, 32, 3), 90, dtype=np.uint8)
    m = affine_matrix((16.0, 16.0), 64.0, (64, 64))  # k = 1: source occupies x', y' in [16, 48)
    out = warp_image(image, m, (64, 64))
    assert (out[:15] == 0).all() and (out[:, :15] == 0).all() and (out[49:] == 0).all()
    assert (out[17:47, 17:47] == 90).all()


def test_hflip_hand_values_and_involution():
    """x' = W - x - 1 on both edges: W=10, (1, 2, 4, 5) -> (5, 2, 8, 5); flipping twice is identity."""
    image = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    boxes = np.array([[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 9.0, 5.0]], dtype=np.float32)
    img2, boxes2 = hflip_image_and_boxes(image, boxes)
    np.testing.assert_array_equal(boxes2, [[5, 2, 8, 5], [0, 0, 9, 5]])
    assert img2.flags.c_contiguous
    for x in range(10):
        np.testing.assert_array_equal(img2[:, x], image[:, 9 - x])
    np.testing.assert_array_equal(boxes, [[1, 2, 4, 5], [0, 0, 9, 5]])  # input untouched
    img3, boxes3 = hflip_image_and_boxes(img2, boxes2)
    np.testing.assert_array_equal(img3, image)
    np.testing.assert_array_equal(boxes3, boxes)


def test_hflip_moves_marked_pixel_with_its_box():
    """A pixel at column x inside a 1-pixel box (x, y, x, y) lands at column W-1-x, where the box goes."""
    image = np.zeros((5, 12, 3), dtype=np.uint8)
    image[3, 2] = 255
    img2, boxes2 = hflip_image_and_boxes(image, np.array([[2.0, 3.0, 2.0, 3.0]]))
    assert img2[3, 9].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(boxes2, [[9, 3, 9, 3]])


@pytest.mark.parametrize("size, border", [(256, 64), (512, 128), (384, 128), (200, 64), (128, 32), (96, 32)])
def test_border_like_reference(size, border):
    """The border is the reference _get_border(128, size): 256 -> 64, 512 -> 128."""
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for _ in range(400):
        c, _ = random_crop_params((size, size), rng)
        xs.append(c[0])
        ys.append(c[1])
    xs, ys = np.array(xs), np.array(ys)
    for v in (xs, ys):
        assert v.min() >= border and v.max() < size - border
        assert v.min() <= border + 0.1 * (size - 2 * border) and v.max() >= size - border - 1 - 0.1 * (size - 2 * border)
        np.testing.assert_array_equal(v, np.round(v))


def test_random_crop_params_non_square_and_scale_factors():
    """(H, W) = (256, 512): x border 128, y border 64, scale = 512 x one of 0.6, 0.7, ..., 1.3."""
    rng = np.random.default_rng(1)
    factors = set()
    for _ in range(500):
        c, s = random_crop_params((256, 512), rng)
        assert c.dtype == np.float32 and c.shape == (2,)
        assert 128 <= c[0] < 512 - 128 and 64 <= c[1] < 256 - 64
        f = s / 512
        assert abs(f * 10 - round(f * 10)) < 1e-6
        factors.add(round(f, 1))
    assert factors == {0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3}


def test_random_crop_params_deterministic():
    """The same seed gives the same sequence of crops; another seed a different one."""
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [random_crop_params((300, 400), rng) for _ in range(20)]

    a, b, c = draw(7), draw(7), draw(8)
    for (ca, sa), (cb, sb) in zip(a, b):
        np.testing.assert_array_equal(ca, cb)
        assert sa == sb
    assert any(not np.array_equal(ca, cc) or sa != sc for (ca, sa), (cc, sc) in zip(a, c))


def test_jitter_crop_params_follow_the_clipped_gaussians():
    """The reference's no-random-crop branch on a 300x400 image (s = 400): the centre moves by
    400 * clip(N(0, 0.1^2), -0.2, 0.2), the side is 400 * clip(N(1, 0.4^2), 0.6, 1.4). A normal
    lies beyond 2 sigma 4.55 % of the time and beyond 1 sigma 31.73 %, so that many shifts and
    scales sit exactly on their bounds."""
    rng = np.random.default_rng(0)
    draws = [jitter_crop_params((300, 400), rng) for _ in range(20_000)]
    shifts = np.array([c for c, _ in draws]) - np.array([200.0, 150.0])
    sides = np.array([s for _, s in draws]) / 400.0
    assert np.abs(shifts).max() <= 80.0 + 1e-3 and sides.min() >= 0.6 - 1e-9 and sides.max() <= 1.4 + 1e-9
    at_bound = np.isclose(np.abs(shifts), 80.0, atol=1e-3).mean(axis=0)
    np.testing.assert_allclose(at_bound, [0.0455, 0.0455], atol=0.006)
    assert np.isclose(np.abs(sides - 1), 0.4).mean() == pytest.approx(0.3173, abs=0.012)
    assert abs(shifts.mean()) < 1.0 and abs(sides.mean() - 1) < 0.01  # symmetric
    assert np.corrcoef(shifts[:, 0], shifts[:, 1])[0, 1] == pytest.approx(0.0, abs=0.03)  # x and y drawn apart
