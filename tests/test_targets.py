"""Tests of minicenternet.targets: Gaussian radius, kernel, drawing and CenterNet target encoding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minicenternet.targets import draw_gaussian, encode_centernet, gaussian_kernel, gaussian_radius


# ---------------------------------------------------------------------------------------------
# gaussian_radius
# ---------------------------------------------------------------------------------------------

# Hand computation with the original CornerNet / CenterNet formula (all cases (b + sqrt(b^2 - 4ac)) / 2):
#
# box h=10, w=20, t=0.7
#   r1: b1=30, c1=200*0.3/1.7=35.294118, 900-141.176471=758.823529, sqrt=27.546751, r1=28.773376
#   r2: b2=60, c2=0.3*200=60, a2=4: 3600-16*60=2640, sqrt=51.380930, r2=55.690465
#   r3: a3=2.8, b3=-2*0.7*30=-42, c3=-0.3*200=-60: 1764+4*2.8*60=2436, sqrt=49.355851,
#       r3=(-42+49.355851)/2=3.677925                                  -> min = 3.677925
# box h=10, w=20, t=0.3
#   r1: c1=200*0.7/1.3=107.692308, 900-430.769231=469.230769, sqrt=21.661735, r1=25.830868
#   r2: c2=140, 3600-2240=1360, sqrt=36.878178, r2=48.439089
#   r3: a3=1.2, b3=-18, c3=-140: 324+672=996, sqrt=31.559468, r3=6.779734 -> min = 6.779734
# box h=50, w=50, t=0.7
#   r1: b1=100, c1=750/1.7=441.176471, 10000-1764.705882=8235.294118, sqrt=90.748521, r1=95.374261
#   r2: b2=200, c2=750, 40000-12000=28000, sqrt=167.332005, r2=183.666003
#   r3: a3=2.8, b3=-140, c3=-750: 19600+8400=28000, sqrt=167.332005, r3=13.666003 -> min = 13.666003
# box h=50, w=50, t=0.3
#   r1: c1=1750/1.3=1346.153846, 10000-5384.615385=4615.384615, sqrt=67.936622, r1=83.968311
#   r2: c2=1750, 40000-28000=12000, sqrt=109.544512, r2=154.772256
#   r3: a3=1.2, b3=-60, c3=-1750: 3600+8400=12000, sqrt=109.544512, r3=24.772256 -> min = 24.772256
REFERENCE_CASES = [
    (10, 20, 0.7, 3.677925),
    (10, 20, 0.3, 6.779734),
    (50, 50, 0.7, 13.666003),
    (50, 50, 0.3, 24.772256),
]


@pytest.mark.parametrize("h, w, t, expected", REFERENCE_CASES)
def test_reference_radius_hand_values(h, w, t, expected):
    """The default (reference) radius matches the hand-computed CornerNet formula."""
    assert gaussian_radius(h, w, t) == pytest.approx(expected, abs=2e-6)
    assert gaussian_radius(h, w, t, variant="reference") == pytest.approx(expected, abs=2e-6)


def _exact_grow_root(h: float, w: float, t: float) -> float:
    """Positive root of 4t r^2 + 2t(h+w) r + (t-1) wh = 0 (case 3, boxes grown by r)."""
    a, b, c = 4 * t, 2 * t * (h + w), (t - 1) * w * h
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


@pytest.mark.parametrize("h, w", [(10, 20), (4, 8), (50, 50), (3, 97), (1, 1), (128, 7)])
@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_reference_radius_is_4t_times_exact_grow_root(h, w, t):
    """The reference radius equals 4t times the exact case-3 root (its divide-by-2 error)."""
    assert gaussian_radius(h, w, t) == pytest.approx(4 * t * _exact_grow_root(h, w, t), rel=1e-9)


def _iou(a, b) -> float:
    """IoU of two xyxy boxes; a box with non-positive extent has zero area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _case_ious(h: float, w: float, r: float) -> tuple[float, float, float]:
    """IoU of the box [0, 0, w, h] with its three corner movements by r: shift, shrink, grow."""
    gt = (0.0, 0.0, w, h)
    shift = (r, r, w + r, h + r)
    shrink = (r, r, w - r, h - r)
    grow = (-r, -r, w + r, h + r)
    return _iou(gt, shift), _iou(gt, shrink), _iou(gt, grow)


EXACT_CASES = [(10, 20, 0.7), (10, 20, 0.3), (50, 50, 0.7), (4, 8, 0.5), (3, 97, 0.7), (128, 7, 0.9), (30, 40, 0.1)]


@pytest.mark.parametrize("h, w, t", EXACT_CASES)
def test_exact_radius_brute_force(h, w, t):
    """Moving the corners by the exact radius keeps every case at IoU >= t, the worst exactly t."""
    r = gaussian_radius(h, w, t, variant="exact")
    assert r > 0
    ious = _case_ious(h, w, r)
    assert min(ious) == pytest.approx(t, abs=1e-6)
    assert all(iou >= t - 1e-9 for iou in ious)
    # a slightly larger displacement breaks the threshold
    assert min(_case_ious(h, w, r + 1e-3)) < t - 1e-7


@pytest.mark.parametrize("h, w, t", EXACT_CASES)
def test_exact_radius_is_min_of_three_roots(h, w, t):
    """Exact variant = min over cases of the largest r with IoU >= t, found by bisection."""

    def largest_ok(case: int) -> float:
        lo, hi = 0.0, 10.0 * max(h, w)  # IoU(lo) = 1 >= t > IoU(hi) for every case
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _case_ious(h, w, mid)[case] >= t else (lo, mid)
        return lo

    expected = min(largest_ok(c) for c in range(3))
    assert gaussian_radius(h, w, t, variant="exact") == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("h, w", [(10, 20), (50, 50), (4, 8), (3, 97)])
@pytest.mark.parametrize("t", [0.3, 0.7])
def test_reference_radius_violates_shrink_case(h, w, t):
    """The reference radius is too large: shrinking the box by it gives IoU < t (known error)."""
    r = gaussian_radius(h, w, t, variant="reference")
    assert r > gaussian_radius(h, w, t, variant="exact")
    assert _case_ious(h, w, r)[1] < t


@pytest.mark.parametrize("t", [0.0, 1.0, -0.2, 1.5])
def test_radius_rejects_bad_overlap(t):
    """min_overlap outside (0, 1) raises ValueError, for both variants."""
    with pytest.raises(ValueError):
        gaussian_radius(10, 10, t)
    with pytest.raises(ValueError):
        gaussian_radius(10, 10, t, variant="exact")


def test_radius_rejects_bad_variant():
    """An unknown variant raises ValueError."""
    with pytest.raises(ValueError):
        gaussian_radius(10, 10, 0.7, variant="paper")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# gaussian_kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 2, 3, 7, 20])
def test_kernel_shape_peak_symmetry_sigma(r):
    """Kernel is (2r+1)^2, peak exactly 1, fully symmetric, sigma = (2r+1)/6."""
    k = gaussian_kernel(r)
    assert k.shape == (2 * r + 1, 2 * r + 1)
    assert k[r, r] == 1.0
    assert k.max() == 1.0 and np.argmax(k) == r * (2 * r + 1) + r
    np.testing.assert_array_equal(k, k.T)
    np.testing.assert_array_equal(k, k[::-1, :])
    np.testing.assert_array_equal(k, k[:, ::-1])
    sigma = (2 * r + 1) / 6
    assert k[r, r + 1] == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-12)
    assert k[0, 0] == pytest.approx(math.exp(-2 * r * r / (2 * sigma**2)), rel=1e-12)
    assert k[r, 0] == pytest.approx(math.exp(-r * r / (2 * sigma**2)), rel=1e-12)


def test_kernel_hand_values_radius_1():
    """Radius 1: sigma = 0.5, so the side is exp(-2) and the corner exp(-4)."""
    e2, e4 = math.exp(-2), math.exp(-4)
    np.testing.assert_allclose(gaussian_kernel(1), [[e4, e2, e4], [e2, 1, e2], [e4, e2, e4]], rtol=1e-12)


def test_kernel_radius_zero_and_read_only():
    """Radius 0 gives [[1.]]; the cached kernel cannot be written to."""
    np.testing.assert_array_equal(gaussian_kernel(0), [[1.0]])
    k = gaussian_kernel(3)
    assert not k.flags.writeable
    with pytest.raises(ValueError):
        k[0, 0] = 5.0
    assert gaussian_kernel(3)[0, 0] < 1.0


# ---------------------------------------------------------------------------------------------
# draw_gaussian
# ---------------------------------------------------------------------------------------------


def _padded_reference(heatmap: np.ndarray, center: tuple[int, int], radius: int) -> np.ndarray:
    """Draw the full, unclipped kernel on a zero-padded copy, then crop back and max-merge."""
    h, w = heatmap.shape
    pad = radius + 4
    big = np.zeros((h + 2 * pad, w + 2 * pad))
    x, y = center[0] + pad, center[1] + pad
    big[y - radius : y + radius + 1, x - radius : x + radius + 1] = gaussian_kernel(radius)
    return np.maximum(heatmap, big[pad : pad + h, pad : pad + w])


def test_draw_single_peak_hand_values():
    """A radius-1 peak in the interior writes exactly the 3x3 kernel around (x, y)."""
    hm = np.zeros((6, 8), dtype=np.float32)
    out = draw_gaussian(hm, (5, 2), 1)
    assert out is hm
    expected = np.zeros((6, 8), dtype=np.float32)
    expected[1:4, 4:7] = gaussian_kernel(1)
    np.testing.assert_array_equal(hm, expected)
    assert hm[2, 5] == 1.0


def test_draw_max_merge_never_sums():
    """Overlapping peaks merge with an element-wise max: no sum, peaks stay 1, all values <= 1."""
    a = draw_gaussian(np.zeros((12, 16)), (5, 5), 3)
    b = draw_gaussian(np.zeros((12, 16)), (8, 6), 3)
    both = draw_gaussian(draw_gaussian(np.zeros((12, 16)), (5, 5), 3), (8, 6), 3)
    np.testing.assert_array_equal(both, np.maximum(a, b))
    overlap = (a > 0) & (b > 0)
    assert overlap.sum() > 4
    assert np.all(both[overlap] < a[overlap] + b[overlap])
    assert both[6, 6] == max(a[6, 6], b[6, 6])
    assert both.max() == 1.0 and both[5, 5] == 1.0 and both[6, 8] == 1.0
    # order of drawing does not matter
    other = draw_gaussian(draw_gaussian(np.zeros((12, 16)), (8, 6), 3), (5, 5), 3)
    np.testing.assert_array_equal(both, other)


def test_draw_keeps_larger_existing_values():
    """Existing heatmap values larger than the kernel are kept, smaller ones are raised."""
    hm = np.full((9, 9), 0.5)
    draw_gaussian(hm, (4, 4), 2)
    k = gaussian_kernel(2)
    np.testing.assert_array_equal(hm[2:7, 2:7], np.maximum(k, 0.5))
    assert hm[0, 0] == 0.5


BORDER_CENTERS = [
    (0, 0), (9, 0), (0, 6), (9, 6),  # the four corners
    (0, 3), (9, 3), (4, 0), (4, 6),  # the four edges
    (1, 1), (8, 5), (2, 4),  # near a border, kernel partly outside
    (-1, 3), (10, 3), (4, -2), (4, 8), (-2, -2), (11, 8),  # centre just outside, kernel partly inside
]


@pytest.mark.parametrize("radius", [0, 1, 2, 3])
@pytest.mark.parametrize("center", BORDER_CENTERS)
def test_draw_clipping_matches_padded_reference(center, radius):
    """Clipping at every border and corner equals drawing on a padded map and cropping."""
    rng = np.random.default_rng(abs(hash((center, radius))) % 2**32)
    start = rng.uniform(0, 0.4, (7, 10))
    hm = start.copy()
    draw_gaussian(hm, center, radius)
    np.testing.assert_array_equal(hm, _padded_reference(start, center, radius))


def test_draw_truncates_center():
    """Float centres are truncated like int(): (3.9, 2.2) draws at x=3, y=2."""
    a = draw_gaussian(np.zeros((8, 8)), (3.9, 2.2), 2)
    b = draw_gaussian(np.zeros((8, 8)), (3, 2), 2)
    np.testing.assert_array_equal(a, b)
    assert a[2, 3] == 1.0 and np.count_nonzero(a == 1.0) == 1


@pytest.mark.parametrize("center", [(-5, 3), (20, 3), (3, -4), (3, 11), (-10, -10), (30, 30)])
def test_draw_fully_outside_does_nothing(center):
    """A centre whose whole kernel lies outside the map leaves the heatmap untouched."""
    hm = np.full((7, 10), 0.25)
    draw_gaussian(hm, center, 2)
    np.testing.assert_array_equal(hm, 0.25)


def test_draw_negative_radius_raises():
    """A negative radius raises ValueError."""
    with pytest.raises(ValueError, match="radius"):
        draw_gaussian(np.zeros((4, 4)), (1, 1), -1)


# ---------------------------------------------------------------------------------------------
# encode_centernet
# ---------------------------------------------------------------------------------------------


def _peaks(channel: np.ndarray) -> set[tuple[int, int]]:
    """(y, x) of the pixels equal to 1."""
    return {(int(y), int(x)) for y, x in zip(*np.nonzero(channel == 1.0))}


def test_encode_one_box_hand_values():
    """Box (2.5, 3, 10.5, 7) in 16x16: centre (6.5, 5), ind 86, reg (0.5, 0), wh (8, 4), radius 1."""
    out = encode_centernet(np.array([[2.5, 3.0, 10.5, 7.0]]), np.array([2]), num_classes=4, output_size=(16, 16), max_objects=5)
    # radius: int(gaussian_radius(ceil(4), ceil(8))): a3=2.8, b3=-16.8, c3=-9.6,
    # disc = 282.24 + 107.52 = 389.76, sqrt = 19.742340, r3 = (19.742340 - 16.8) / 2 = 1.47117 -> 1
    assert int(gaussian_radius(4, 8)) == 1
    assert out["ind"][0] == 5 * 16 + 6
    np.testing.assert_array_equal(out["reg"][0], [0.5, 0.0])
    np.testing.assert_array_equal(out["wh"][0], [8.0, 4.0])
    np.testing.assert_array_equal(out["mask"], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["wh"][1:], 0)
    np.testing.assert_array_equal(out["reg"][1:], 0)
    np.testing.assert_array_equal(out["ind"][1:], 0)
    hm = out["hm"]
    assert hm[2, 5, 6] == 1.0
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[4:7, 5:8] = gaussian_kernel(1)  # rows y-1..y+1, cols x-1..x+1
    np.testing.assert_array_equal(hm[2], expected)
    for c in (0, 1, 3):
        assert not hm[c].any()


def test_encode_dtypes_and_shapes():
    """hm (C,H,W) float32, wh/reg (K,2) float32, ind (K,) int64, mask (K,) float32."""
    out = encode_centernet(np.array([[1, 1, 5, 4]]), np.array([0]), num_classes=3, output_size=(10, 12), max_objects=7)
    assert set(out) == {"hm", "wh", "reg", "ind", "mask"}
    assert out["hm"].shape == (3, 10, 12) and out["hm"].dtype == np.float32
    assert out["wh"].shape == (7, 2) and out["wh"].dtype == np.float32
    assert out["reg"].shape == (7, 2) and out["reg"].dtype == np.float32
    assert out["ind"].shape == (7,) and out["ind"].dtype == np.int64
    assert out["mask"].shape == (7,) and out["mask"].dtype == np.float32


def test_encode_clips_boxes_to_map():
    """Boxes are clipped to x in [0, W-1], y in [0, H-1] before centre, size and offset."""
    boxes = np.array([[-4.0, -2.0, 6.0, 3.0], [10.0, 5.0, 20.0, 12.0]])
    out = encode_centernet(boxes, np.array([0, 1]), num_classes=2, output_size=(8, 16), max_objects=4)
    # box 0 -> (0, 0, 6, 3): wh (6, 3), centre (3, 1.5), int (3, 1), reg (0, 0.5), ind 1*16+3
    # box 1 -> (10, 5, 15, 7): wh (5, 2), centre (12.5, 6), int (12, 6), reg (0.5, 0), ind 6*16+12
    np.testing.assert_array_equal(out["mask"], [1, 1, 0, 0])
    np.testing.assert_array_equal(out["wh"][:2], [[6, 3], [5, 2]])
    np.testing.assert_array_equal(out["reg"][:2], [[0, 0.5], [0.5, 0]])
    np.testing.assert_array_equal(out["ind"][:2], [19, 108])
    assert _peaks(out["hm"][0]) == {(1, 3)}
    assert _peaks(out["hm"][1]) == {(6, 12)}


def test_encode_skips_zero_area_boxes():
    """Zero-width/height boxes (also after clipping) get no mask entry and no peak."""
    boxes = np.array(
        [
            [3.0, 3.0, 3.0, 8.0],  # zero width
            [20.0, 2.0, 30.0, 5.0],  # fully right of a 16-wide map -> x1 = x2 = 15
            [2.0, -9.0, 6.0, -1.0],  # fully above -> y1 = y2 = 0
            [4.0, 4.0, 8.0, 6.0],  # the only real box
        ]
    )
    out = encode_centernet(boxes, np.array([0, 0, 1, 1]), num_classes=2, output_size=(12, 16), max_objects=6)
    assert out["mask"].sum() == 1
    k = int(np.flatnonzero(out["mask"])[0])
    np.testing.assert_array_equal(out["wh"][k], [4, 2])
    assert out["ind"][k] == 5 * 16 + 6
    assert not out["hm"][0].any()
    assert _peaks(out["hm"][1]) == {(5, 6)}
    assert np.all(out["wh"][out["mask"] == 0] == 0)


def test_encode_max_objects_truncates():
    """Only the first max_objects boxes are encoded."""
    boxes = np.array([[2.0 + 6 * i, 2.0, 6.0 + 6 * i, 6.0] for i in range(5)])  # centres x = 4, 10, 16, 22, 28
    out = encode_centernet(boxes, np.zeros(5, dtype=int), num_classes=1, output_size=(8, 32), max_objects=3)
    assert out["mask"].shape == (3,)
    np.testing.assert_array_equal(out["mask"], [1, 1, 1])
    np.testing.assert_array_equal(out["ind"], [4 * 32 + 4, 4 * 32 + 10, 4 * 32 + 16])
    assert _peaks(out["hm"][0]) == {(4, 4), (4, 10), (4, 16)}


@pytest.mark.parametrize("boxes", [np.zeros((0, 4)), []])
def test_encode_empty_input(boxes):
    """No boxes: every output is all zeros."""
    out = encode_centernet(boxes, [], num_classes=3, output_size=(8, 8), max_objects=4)
    for key, value in out.items():
        assert not value.any(), key
    assert out["hm"].shape == (3, 8, 8)


@pytest.mark.parametrize("labels", [[3], [-1], [0, 1]])
def test_encode_bad_labels_raise(labels):
    """Labels outside 0..C-1, or a label count that differs from the box count, raise ValueError."""
    with pytest.raises(ValueError):
        encode_centernet(np.array([[1.0, 1.0, 4.0, 4.0]]), np.array(labels), num_classes=3, output_size=(8, 8))


def test_encode_same_class_objects_give_separate_peaks():
    """Several objects of one class: one pixel equal to 1 per distinct centre, values <= 1."""
    boxes = np.array(
        [
            [2.0, 2.0, 10.0, 10.0],  # centre (6, 6)
            [5.0, 3.0, 11.0, 11.0],  # centre (8, 7): overlapping Gaussians
            [20.0, 20.0, 28.0, 26.0],  # centre (24, 23)
            [21.0, 21.0, 27.0, 25.0],  # same centre (24, 23) as the previous box
        ]
    )
    out = encode_centernet(boxes, np.zeros(4, dtype=int), num_classes=2, output_size=(32, 32))
    hm = out["hm"][0]
    assert _peaks(hm) == {(6, 6), (7, 8), (23, 24)}
    assert hm.max() == 1.0
    assert not out["hm"][1].any()
    assert out["mask"].sum() == 4


def test_encode_radius_uses_ceil_of_size():
    """Fractional sizes are rounded up before the radius: w 6.5, h 7.5 -> gaussian_radius(8, 7) -> r 2."""
    # h=8, w=7, t=0.7: a3=2.8, b3=-21, c3=-16.8, disc = 441 + 188.16 = 629.16, sqrt = 25.08306,
    # r3 = 4.08306 / 2 = 2.04153 -> 2 (without the ceil: gaussian_radius(7.5, 6.5) = 1.904 -> 1)
    out = encode_centernet(np.array([[4.0, 2.0, 10.5, 9.5]]), [0], 1, (16, 16), max_objects=2)
    np.testing.assert_array_equal(out["wh"][0], [6.5, 7.5])
    np.testing.assert_array_equal(out["reg"][0], [0.25, 0.75])  # centre (7.25, 5.75)
    assert out["ind"][0] == 5 * 16 + 7
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[3:8, 5:10] = gaussian_kernel(2)
    np.testing.assert_array_equal(out["hm"][0], expected)


def test_encode_radius_follows_variant():
    """The peak's support is 2r+1 wide with r = int(gaussian_radius(ceil h, ceil w)) of the chosen variant."""
    box = np.array([[10.0, 10.0, 50.0, 40.0]])  # w 40, h 30, centre (30, 25)
    for variant in ("reference", "exact"):
        r = int(gaussian_radius(30, 40, 0.7, variant))
        hm = encode_centernet(box, [0], 1, (64, 64), radius_variant=variant)["hm"][0]
        ys, xs = np.nonzero(hm)
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == (25 - r, 25 + r, 30 - r, 30 + r)
    assert int(gaussian_radius(30, 40, 0.7, "exact")) < int(gaussian_radius(30, 40, 0.7))
