"""Tests of the CornerNet targets (encode_cornernet) and losses (embedding, offset, cornernet_loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minicenternet.losses import corner_offset_loss, cornernet_loss, embedding_loss, focal_loss, gather_at
from minicenternet.targets import encode_cornernet, gaussian_kernel, gaussian_radius

KEYS = {"tl_hm", "br_hm", "tl_off", "br_off", "tl_ind", "br_ind", "mask"}


def _placed_kernel(shape: tuple[int, int], x: int, y: int, radius: int) -> np.ndarray:
    """A map with gaussian_kernel(radius) centred at (x, y), cut at the border (brute force)."""
    out = np.zeros(shape, dtype=np.float32)
    kernel = gaussian_kernel(radius)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if 0 <= y + dy < shape[0] and 0 <= x + dx < shape[1]:
                out[y + dy, x + dx] = kernel[dy + radius, dx + radius]
    return out


# ---------------------------------------------------------------------------------------------
# encode_cornernet
# ---------------------------------------------------------------------------------------------


def test_cornernet_radius_hand_value_at_iou_03():
    """Box 10 x 6 at t = 0.3: the three roots by hand; the exact radius is the shrink root."""
    # case 1: r^2 - 16 r + 60 * 0.7 / 1.3 = 0, smaller root (16 - sqrt(256 - 129.2308)) / 2 = 2.37040
    # case 2: 4 r^2 - 32 r + 42 = 0,           smaller root (32 - sqrt(352)) / 8            = 1.65479
    # case 3: 1.2 r^2 + 9.6 r - 42 = 0,        positive root (-9.6 + sqrt(293.76)) / 2.4    = 3.14143
    r1 = (16 - math.sqrt(256 - 4 * 60 * 0.7 / 1.3)) / 2
    r2 = (32 - math.sqrt(352)) / 8
    r3 = (-9.6 + math.sqrt(293.76)) / 2.4
    assert (r1, r2, r3) == pytest.approx((2.37041, 1.65479, 3.14143), abs=1e-5)
    assert gaussian_radius(6, 10, 0.3, variant="exact") == pytest.approx(r2, rel=1e-12)
    # the first-release formula (our "reference"): 4t times the case-3 root
    assert gaussian_radius(6, 10, 0.3, variant="reference") == pytest.approx(1.2 * r3, rel=1e-9)


@pytest.mark.parametrize("h, w", [(6, 10), (3, 40), (25, 25), (128, 9), (1, 1)])
def test_exact_radius_equals_corrected_cornernet_formula(h, w):
    """variant="exact" = CornerNet's corrected sample/utils.py: smaller roots 1, 2, larger 3, all / 2a."""
    t = 0.3
    a1, b1, c1 = 1, h + w, w * h * (1 - t) / (1 + t)
    a2, b2, c2 = 4, 2 * (h + w), (1 - t) * w * h
    a3, b3, c3 = 4 * t, -2 * t * (h + w), (t - 1) * w * h
    r1 = (b1 - math.sqrt(b1**2 - 4 * a1 * c1)) / (2 * a1)
    r2 = (b2 - math.sqrt(b2**2 - 4 * a2 * c2)) / (2 * a2)
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / (2 * a3)
    assert gaussian_radius(h, w, t, variant="exact") == pytest.approx(min(r1, r2, r3), rel=1e-12)


def test_encode_cornernet_one_box_hand_values():
    """Box (2.25, 3.5, 11.75, 9) in 16x16: corners (2, 3) and (11, 9), radius int(1.655) = 1."""
    out = encode_cornernet(np.array([[2.25, 3.5, 11.75, 9.0]]), np.array([1]), 3, (16, 16), max_objects=4)
    assert set(out) == KEYS
    for key in ("tl_hm", "br_hm", "tl_off", "br_off", "mask"):
        assert out[key].dtype == np.float32, key
    assert out["tl_ind"].dtype == np.int64 and out["br_ind"].dtype == np.int64
    assert out["tl_hm"].shape == out["br_hm"].shape == (3, 16, 16)
    assert out["tl_off"].shape == out["br_off"].shape == (4, 2)
    np.testing.assert_array_equal(out["tl_ind"], [3 * 16 + 2, 0, 0, 0])
    np.testing.assert_array_equal(out["br_ind"], [9 * 16 + 11, 0, 0, 0])
    np.testing.assert_array_equal(out["tl_off"], [[0.25, 0.5], [0, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(out["br_off"], [[0.75, 0.0], [0, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(out["mask"], [1, 0, 0, 0])
    # w = 9.5 -> 10, h = 5.5 -> 6: radius int(1.65479) = 1 (the first-release formula would give 3)
    assert out["tl_hm"][1, 3, 2] == 1.0 and out["br_hm"][1, 9, 11] == 1.0
    np.testing.assert_array_equal(out["tl_hm"][1], _placed_kernel((16, 16), 2, 3, 1))
    np.testing.assert_array_equal(out["br_hm"][1], _placed_kernel((16, 16), 11, 9, 1))
    assert (out["tl_hm"][1] == 1).sum() == 1 and (out["br_hm"][1] == 1).sum() == 1
    for c in (0, 2):
        assert not out["tl_hm"][c].any() and not out["br_hm"][c].any()
    reference = encode_cornernet(
        np.array([[2.25, 3.5, 11.75, 9.0]]), np.array([1]), 3, (16, 16), 4, radius_variant="reference"
    )
    np.testing.assert_array_equal(reference["tl_hm"][1], _placed_kernel((16, 16), 2, 3, 3))


def test_encode_cornernet_clips_and_skips():
    """Boxes are clipped to [0, W-1] x [0, H-1]; degenerate ones are skipped and take no slot."""
    boxes = np.array(
        [
            [-3.0, -2.0, 20.0, 30.0],  # clipped to (0, 0, 15, 11)
            [14.0, 13.0, 18.0, 19.0],  # clipped to (14, 11, 15, 11): zero height -> skipped
            [5.0, 5.0, 5.0, 9.0],  # zero width -> skipped
            [4.5, 2.25, 16.5, 7.75],  # x2 clipped to 15: border corner, offset 0
        ]
    )
    out = encode_cornernet(boxes, np.array([0, 1, 1, 2]), 3, (12, 16), max_objects=5)
    np.testing.assert_array_equal(out["mask"], [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["tl_ind"][:2], [0, 2 * 16 + 4])
    np.testing.assert_array_equal(out["br_ind"][:2], [11 * 16 + 15, 7 * 16 + 15])
    np.testing.assert_array_equal(out["tl_off"][:2], [[0, 0], [0.5, 0.25]])
    np.testing.assert_array_equal(out["br_off"][:2], [[0, 0], [0, 0.75]])
    assert out["tl_hm"][0, 0, 0] == 1 and out["br_hm"][0, 11, 15] == 1
    assert out["tl_hm"][2, 2, 4] == 1 and out["br_hm"][2, 7, 15] == 1
    assert not out["tl_hm"][1].any() and not out["br_hm"][1].any()
    # radius of the clipped first box: ceil sizes 11 x 15
    r = int(gaussian_radius(11, 15, 0.3, variant="exact"))
    np.testing.assert_array_equal(out["br_hm"][0], _placed_kernel((12, 16), 15, 11, r))


def test_encode_cornernet_empty_and_max_objects():
    """No boxes: all zeros; more boxes than max_objects: only the first K are encoded."""
    empty = encode_cornernet(np.zeros((0, 4)), np.zeros((0,)), 2, (8, 8), max_objects=3)
    for key, value in empty.items():
        assert not value.any(), key
    boxes = np.array([[1, 1, 3, 3], [4, 1, 6, 3], [1, 4, 3, 7]], dtype=np.float32)
    out = encode_cornernet(boxes, np.array([0, 0, 1]), 2, (8, 8), max_objects=2)
    np.testing.assert_array_equal(out["mask"], [1, 1])
    np.testing.assert_array_equal(out["tl_ind"], [1 * 8 + 1, 1 * 8 + 4])
    assert not out["tl_hm"][1].any()
    with pytest.raises(ValueError):
        encode_cornernet(boxes, np.array([0, 0, 2]), 2, (8, 8))


# ---------------------------------------------------------------------------------------------
# embedding_loss
# ---------------------------------------------------------------------------------------------


def _brute_force_embedding(tl: list[list[float]], br: list[list[float]], mask: list[list[int]]):
    """Pull and push by explicit loops over objects and ordered pairs, summed over images."""
    pull = push = 0.0
    for tl_i, br_i, m_i in zip(tl, br, mask):
        objs = [(a, b) for a, b, m in zip(tl_i, br_i, m_i) if m]
        n = len(objs)
        means = [(a + b) / 2 for a, b in objs]
        if n >= 1:
            pull += sum((a - e) ** 2 + (b - e) ** 2 for (a, b), e in zip(objs, means)) / n
        if n >= 2:
            pairs = 0.0
            for j in range(n):
                for k in range(n):
                    if j != k:
                        pairs += max(0.0, 1.0 - abs(means[j] - means[k]))
            push += pairs / (n * (n - 1))
    return pull, push


# image 0: three objects in slots 0, 2, 3 (means 0.2, 0.55, 2.1: one pair within the margin);
# image 1: one object in slot 1. Slot values outside the mask must not matter.
TL = [[0.1, 9.0, 0.9, 2.0], [-5.0, 1.5, 7.0, 3.0]]
BR = [[0.3, -9.0, 0.2, 2.2], [4.0, 0.5, -7.0, 3.0]]
MASK = [[1, 0, 1, 1], [0, 1, 0, 0]]


def _as_inputs(tl, br, mask, dtype=torch.float32):
    return torch.tensor(tl, dtype=dtype).unsqueeze(-1), torch.tensor(br, dtype=dtype).unsqueeze(-1), torch.tensor(mask)


def test_embedding_loss_hand_computed_pair():
    """N = 2, e_tl (0, 1), e_br (0.4, 1.2): e = (0.2, 1.1), pull 0.05, push 2 * 0.1 / 2 = 0.1."""
    pull, push = embedding_loss(*_as_inputs([[0.0, 1.0]], [[0.4, 1.2]], [[1, 1]]))
    assert pull.item() == pytest.approx((2 * 0.2**2 + 2 * 0.1**2) / 2, rel=1e-6)
    assert pull.item() == pytest.approx(0.05, rel=1e-6)
    assert push.item() == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32, torch.int64])
def test_embedding_loss_matches_brute_force(mask_dtype):
    """The 2-image batch (3 objects and 1 object) equals the double loop, for every mask dtype."""
    tl, br, mask = _as_inputs(TL, BR, MASK)
    pull, push = embedding_loss(tl, br, mask.to(mask_dtype))
    ref_pull, ref_push = _brute_force_embedding(TL, BR, MASK)
    assert ref_push > 0 and ref_pull > 0
    assert pull.item() == pytest.approx(ref_pull, rel=1e-6)
    assert push.item() == pytest.approx(ref_push, rel=1e-6)
    assert pull.shape == push.shape == ()


def test_embedding_loss_sums_over_images_and_batch_size_one():
    """Batch size 1 works, and the batch loss is the sum of the per-image losses."""
    per_image = [embedding_loss(*_as_inputs([tl], [br], [m])) for tl, br, m in zip(TL, BR, MASK)]
    both = embedding_loss(*_as_inputs(TL, BR, MASK))
    for term in range(2):
        assert both[term].item() == pytest.approx(sum(p[term].item() for p in per_image), rel=1e-6)
    # one object: push is 0 (the reference would add 1 / (1 + 1e-4)); pull = 2 * 0.5^2 / 1
    pull, push = per_image[1]
    assert push.item() == 0.0
    assert pull.item() == pytest.approx(2 * 0.5**2, rel=1e-6)


def test_embedding_loss_no_objects():
    """An image without objects gives exactly 0 for both terms, with zero gradient."""
    tl, br, mask = _as_inputs([[0.3, 0.1, 5.0]], [[0.2, 0.1, -5.0]], [[0, 0, 0]])
    tl.requires_grad_()
    pull, push = embedding_loss(tl, br, mask)
    assert pull.item() == 0.0 and push.item() == 0.0
    (pull + push).backward()
    assert torch.equal(tl.grad, torch.zeros_like(tl))


def test_embedding_loss_gradients_match_brute_force_autograd():
    """Gradients are finite, zero at padded slots, and equal autograd of a float64 double loop."""
    tl, br, mask = _as_inputs(TL, BR, MASK)
    tl.requires_grad_()
    br.requires_grad_()
    pull, push = embedding_loss(tl, br, mask)
    (pull + 3 * push).backward()
    assert torch.isfinite(tl.grad).all() and torch.isfinite(br.grad).all()
    assert tl.grad[0, 1].item() == 0.0 and br.grad[1, 0].item() == 0.0

    tl64 = torch.tensor(TL, dtype=torch.float64, requires_grad=True)
    br64 = torch.tensor(BR, dtype=torch.float64, requires_grad=True)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(2):
        idx = [k for k in range(4) if MASK[i][k]]
        n = len(idx)
        means = {k: (tl64[i, k] + br64[i, k]) / 2 for k in idx}
        total = total + sum((tl64[i, k] - means[k]) ** 2 + (br64[i, k] - means[k]) ** 2 for k in idx) / n
        for j in idx:
            for k in idx:
                if j != k:
                    total = total + 3 * torch.relu(1 - (means[j] - means[k]).abs()) / (n * (n - 1))
    total.backward()
    torch.testing.assert_close(tl.grad.squeeze(-1).double(), tl64.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(br.grad.squeeze(-1).double(), br64.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# corner_offset_loss and cornernet_loss
# ---------------------------------------------------------------------------------------------


def test_corner_offset_loss_hand_computed_smooth_l1():
    """Two objects: |d| = 0.5 and 0.2 (quadratic), 1.5 and 0 (linear / zero); divided by 2 + 1e-4."""
    pred_map = torch.zeros(1, 2, 3, 3)
    pred_map[0, :, 0, 1] = torch.tensor([0.75, 0.3])  # index 1
    pred_map[0, :, 2, 2] = torch.tensor([2.0, 0.5])  # index 8
    index = torch.tensor([[1, 8, 4]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.uint8)
    target = torch.tensor([[[0.25, 0.5], [0.5, 0.5], [9.0, 9.0]]])
    # 0.5 * 0.5^2 + 0.5 * 0.2^2 + (1.5 - 0.5) + 0 = 0.125 + 0.02 + 1.0 = 1.145
    expected = 1.145 / (2 + 1e-4)
    assert corner_offset_loss(pred_map, index, mask, target).item() == pytest.approx(expected, rel=1e-6)
    assert corner_offset_loss(pred_map, index, torch.zeros(1, 3), target).item() == 0.0


def _batch_targets(num_classes=3, size=(16, 16), max_objects=6):
    """Batched encode_cornernet targets: an image with three objects and one with a single object."""
    per_image = [
        encode_cornernet(
            np.array([[1.5, 2.0, 9.0, 8.5], [8.0, 8.0, 14.0, 15.0], [3.0, 9.25, 7.5, 13.0]]),
            np.array([0, 2, 0]),
            num_classes,
            size,
            max_objects,
        ),
        encode_cornernet(np.array([[3.0, 3.0, 12.25, 6.5]]), np.array([1]), num_classes, size, max_objects),
    ]
    return {key: torch.from_numpy(np.stack([t[key] for t in per_image])) for key in per_image[0]}


def _random_outputs(seed, num_classes=3, size=(16, 16), batch=2):
    g = torch.Generator().manual_seed(seed)
    out = {f"{c}_hm": torch.randn(batch, num_classes, *size, generator=g) for c in ("tl", "br")}
    out.update({f"{c}_emb": torch.randn(batch, 1, *size, generator=g) for c in ("tl", "br")})
    out.update({f"{c}_off": torch.rand(batch, 2, *size, generator=g) for c in ("tl", "br")})
    return out


def test_cornernet_loss_terms_and_total():
    """Each term is the matching building block; total = hm + 0.1 pull + 0.1 push + 1 off."""
    targets, outputs = _batch_targets(), _random_outputs(0)
    out = cornernet_loss(outputs, targets)
    assert set(out) == {"loss", "hm_loss", "pull_loss", "push_loss", "off_loss"}
    hm = focal_loss(outputs["tl_hm"], targets["tl_hm"]) + focal_loss(outputs["br_hm"], targets["br_hm"])
    tl_emb = gather_at(outputs["tl_emb"], targets["tl_ind"])
    br_emb = gather_at(outputs["br_emb"], targets["br_ind"])
    pull, push = embedding_loss(tl_emb, br_emb, targets["mask"])
    ref_pull, ref_push = _brute_force_embedding(
        tl_emb.squeeze(-1).tolist(), br_emb.squeeze(-1).tolist(), targets["mask"].tolist()
    )
    assert pull.item() == pytest.approx(ref_pull, rel=1e-5) and push.item() == pytest.approx(ref_push, rel=1e-5)
    off = corner_offset_loss(outputs["tl_off"], targets["tl_ind"], targets["mask"], targets["tl_off"])
    off = off + corner_offset_loss(outputs["br_off"], targets["br_ind"], targets["mask"], targets["br_off"])
    for key, value in (("hm_loss", hm), ("pull_loss", pull), ("push_loss", push), ("off_loss", off)):
        torch.testing.assert_close(out[key], value)
        assert value > 0, key
    torch.testing.assert_close(out["loss"], hm + 0.1 * pull + 0.1 * push + off)
    custom = cornernet_loss(outputs, targets, pull_weight=1.0, push_weight=2.0, offset_weight=0.5)
    torch.testing.assert_close(custom["loss"], hm + pull + 2 * push + 0.5 * off)


def test_cornernet_loss_two_stacks_is_mean_of_stacks():
    """A list of two stacks gives the mean of the per-stack losses, term by term."""
    targets = _batch_targets()
    a, b = _random_outputs(1), _random_outputs(2)
    la, lb, both = cornernet_loss(a, targets), cornernet_loss(b, targets), cornernet_loss([a, b], targets)
    for key in both:
        torch.testing.assert_close(both[key], (la[key] + lb[key]) / 2)
        assert not torch.allclose(la[key], lb[key]), key
    with pytest.raises(ValueError, match="empty"):
        cornernet_loss([], targets)


def test_cornernet_loss_empty_image_and_backward():
    """No objects: pull, push and offset are exactly 0; with objects every head gets a gradient."""
    empty = {k: v[:1] * 0 for k, v in _batch_targets().items()}
    out = cornernet_loss(_random_outputs(3, batch=1), empty)
    for key in ("pull_loss", "push_loss", "off_loss"):
        assert out[key].item() == 0.0, key
    assert torch.isfinite(out["hm_loss"]) and out["hm_loss"] > 0
    outputs = {k: v.requires_grad_() for k, v in _random_outputs(4).items()}
    cornernet_loss([outputs, outputs], _batch_targets())["loss"].backward()
    for key, value in outputs.items():
        assert value.grad is not None and torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0, key
