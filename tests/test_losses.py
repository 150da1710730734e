"""Tests of minicenternet.losses: focal loss, masked L1, gather and the combined CenterNet loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minicenternet.losses import centernet_loss, clamped_sigmoid, focal_loss, gather_at, reg_l1_loss
from minicenternet.targets import encode_centernet

LN3 = math.log(3.0)  # sigmoid(ln 3) = 3 / (1 + 3) = 0.75


# ---------------------------------------------------------------------------------------------
# focal_loss
# ---------------------------------------------------------------------------------------------


def test_focal_loss_hand_computed():
    """gt [1, 0.5, 0], logits [ln3, ln3, 0] -> p [0.75, 0.75, 0.5]; one positive."""
    # pos (y=1, p=0.75):   (1-p)^2 log p        = 0.0625 * ln 0.75              = -0.017980130
    # neg (y=0.5, p=0.75): (1-y)^4 p^2 log(1-p) = 0.0625 * 0.5625 * ln 0.25     = -0.048736911
    # neg (y=0, p=0.5):    1 * p^2 log(1-p)     = 0.25 * ln 0.5                 = -0.173286795
    # loss = -(sum) / 1 = 0.240003836
    logits = torch.tensor([LN3, LN3, 0.0]).view(1, 1, 1, 3)
    gt = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    expected = -(0.0625 * math.log(0.75) + 0.0625 * 0.5625 * math.log(0.25) + 0.25 * math.log(0.5))
    assert expected == pytest.approx(0.240003836, abs=1e-9)
    assert focal_loss(logits, gt).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_divides_by_number_of_positives():
    """Two positives: the summed terms are divided by 2 (batch-wide count)."""
    # batch of 2 images, one positive each (p=0.5 and p=0.75) and one negative (y=0, p=0.25)
    logits = torch.tensor([[0.0, -LN3], [LN3, 0.0]]).view(2, 1, 1, 2)
    gt = torch.tensor([[1.0, 0.0], [1.0, 0.2]]).view(2, 1, 1, 2)
    pos = 0.25 * math.log(0.5) + 0.0625 * math.log(0.75)
    neg = 0.0625 * math.log(0.75) + 0.8**4 * 0.25 * math.log(0.5)
    assert focal_loss(logits, gt).item() == pytest.approx(-(pos + neg) / 2, rel=1e-6)


def test_focal_loss_without_positives():
    """With no y == 1 anywhere the loss is minus the negative sum, divided by 1."""
    logits = torch.tensor([0.0, LN3, -LN3, 0.0]).view(1, 2, 1, 2)
    gt = torch.tensor([0.0, 0.5, 0.9, 0.99]).view(1, 2, 1, 2)
    neg = (
        1.0 * 0.25 * math.log(0.5)
        + 0.5**4 * 0.5625 * math.log(0.25)
        + 0.1**4 * 0.0625 * math.log(0.75)
        + 0.01**4 * 0.25 * math.log(0.5)
    )
    assert focal_loss(logits, gt).item() == pytest.approx(-neg, rel=1e-6)


def test_focal_loss_general_alpha_beta():
    """alpha and beta are the exponents on p / (1 - p) and (1 - y)."""
    logits = torch.tensor([0.0, LN3]).view(1, 1, 1, 2)
    gt = torch.tensor([1.0, 0.5]).view(1, 1, 1, 2)
    expected = -(0.5**3 * math.log(0.5) + 0.5**1 * 0.75**3 * math.log(0.25))
    assert focal_loss(logits, gt, alpha=3.0, beta=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_matches_numpy_reference_on_random_input():
    """Random batch: equals a float64 numpy evaluation of the formula."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g) * 3
    gt = torch.rand(2, 3, 5, 6, generator=g) * 0.9
    gt[0, 1, 2, 3] = gt[1, 2, 0, 0] = gt[1, 0, 4, 5] = 1.0
    p = np.clip(1 / (1 + np.exp(-logits.double().numpy())), 1e-4, 1 - 1e-4)
    y = gt.double().numpy()
    pos = y == 1
    total = np.sum(np.log(p) * (1 - p) ** 2 * pos) + np.sum(np.log(1 - p) * p**2 * (1 - y) ** 4 * ~pos)
    assert focal_loss(logits, gt).item() == pytest.approx(-total / 3, rel=1e-5)


def test_focal_loss_clamp():
    """Logits of +-1000 give a finite loss and finite gradients; p is clamped to [1e-4, 1-1e-4]."""
    logits = torch.tensor([-1000.0, 1000.0, -1000.0, 1000.0]).view(1, 1, 2, 2).requires_grad_()
    gt = torch.tensor([1.0, 1.0, 0.0, 0.3]).view(1, 1, 2, 2)
    loss = focal_loss(logits, gt)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    p_lo, p_hi = 1e-4, 1 - 1e-4
    expected = -(
        (1 - p_lo) ** 2 * math.log(p_lo)  # positive, p clamped up to 1e-4
        + (1 - p_hi) ** 2 * math.log(p_hi)  # positive, p clamped down to 1 - 1e-4
        + p_lo**2 * math.log(1 - p_lo)  # negative y=0
        + 0.7**4 * p_hi**2 * math.log(1 - p_hi)  # negative y=0.3
    ) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(clamped_sigmoid(torch.tensor([-1000.0, 0.0, 1000.0])).numpy(), [p_lo, 0.5, p_hi], rtol=1e-6)


def test_focal_loss_single_saturated_positive():
    """A logit of -1000 at a lone positive gives exactly -log(1e-4) * (1 - 1e-4)^2."""
    logits = torch.tensor([-1000.0]).view(1, 1, 1, 1)
    gt = torch.ones(1, 1, 1, 1)
    assert focal_loss(logits, gt).item() == pytest.approx(-math.log(1e-4) * (1 - 1e-4) ** 2, rel=1e-6)


def _focal_grad_closed_form(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d loss / d logit by hand (alpha=2, beta=4), with dp/dz = p (1 - p):

    positive: d/dz (1-p)^2 log p        = -2 p (1-p)^2 log p + (1-p)^3
    negative: d/dz (1-y)^4 p^2 log(1-p) = (1-y)^4 (2 p^2 (1-p) log(1-p) - p^3)
    and the loss is -(sum) / num_pos.
    """
    p = torch.sigmoid(z)
    pos = y == 1
    g = torch.where(
        pos,
        -2 * p * (1 - p) ** 2 * torch.log(p) + (1 - p) ** 3,
        (1 - y) ** 4 * (2 * p**2 * (1 - p) * torch.log(1 - p) - p**3),
    )
    return -g / max(int(pos.sum()), 1)


def _small_focal_inputs():
    g = torch.Generator().manual_seed(1)
    z = torch.empty(2, 2, 3, 3, dtype=torch.float64).uniform_(-4, 4, generator=g)  # inside the clamp
    y = torch.rand(2, 2, 3, 3, dtype=torch.float64, generator=g) * 0.95
    y[0, 0, 1, 1] = y[1, 1, 0, 2] = 1.0
    return z, y


def test_focal_loss_gradient_closed_form():
    """Autograd gradient equals the hand-derived derivative of the focal loss."""
    z, y = _small_focal_inputs()
    z32 = z.float().requires_grad_()
    focal_loss(z32, y.float()).backward()
    torch.testing.assert_close(z32.grad.double(), _focal_grad_closed_form(z, y), rtol=1e-4, atol=1e-6)


def test_focal_loss_gradcheck_float32_tolerance():
    """gradcheck with float32-sized step and tolerance (focal_loss computes in float32 via .float()).

    A strict float64 gradcheck is impossible: ``clamped_sigmoid`` casts every input to float32, so
    the default 1e-6 finite-difference step is lost in rounding.
    """
    z, y = _small_focal_inputs()
    z.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: focal_loss(x, y).double(), (z,), eps=1e-2, atol=5e-4, rtol=1e-2
    )


def test_focal_loss_gradient_zero_where_clamped():
    """Where the clamp is active the gradient is exactly 0."""
    z = torch.tensor([-30.0, 30.0, 0.0]).view(1, 1, 1, 3).requires_grad_()
    y = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 3)
    focal_loss(z, y).backward()
    assert z.grad[0, 0, 0, 0] == 0 and z.grad[0, 0, 0, 1] == 0
    assert z.grad[0, 0, 0, 2] != 0


# ---------------------------------------------------------------------------------------------
# gather_at and reg_l1_loss
# ---------------------------------------------------------------------------------------------


def test_gather_at_matches_explicit_indexing():
    """gather_at(f, ind)[b, k, d] == f[b, d, ind // W, ind % W]."""
    g = torch.Generator().manual_seed(2)
    feature = torch.randn(2, 3, 4, 5, generator=g)
    index = torch.randint(0, 20, (2, 6), generator=g)
    out = gather_at(feature, index)
    assert out.shape == (2, 6, 3)
    expected = torch.empty(2, 6, 3)
    for b in range(2):
        for k in range(6):
            i = int(index[b, k])
            expected[b, k] = feature[b, :, i // 5, i % 5]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_gather_at_gradcheck_float64():
    """gather_at keeps the dtype, so a strict float64 gradcheck passes (repeated indices included)."""
    g = torch.Generator().manual_seed(3)
    feature = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.tensor([[4, 7, 4, 0]])
    assert torch.autograd.gradcheck(lambda f: gather_at(f, index), (feature,))


def _hand_l1_inputs():
    pred = torch.arange(18.0).view(1, 2, 3, 3)  # channel 0: 0..8, channel 1: 9..17
    index = torch.tensor([[4, 7, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    target = torch.tensor([[[3.5, 14.0], [7.0, 15.0], [100.0, 100.0]]])
    return pred, index, mask, target


def test_reg_l1_loss_hand_computed():
    """Two objects and one padding entry: sum |pred - target| over 2 objects x 2 coords / (4 + 1e-4)."""
    # index 4 -> pred (4, 13), target (3.5, 14): 0.5 + 1
    # index 7 -> pred (7, 16), target (7, 15):   0   + 1
    # padding (index 0, target 100) is ignored; 2.5 / 4.0001 = 0.624984375...
    pred, index, mask, target = _hand_l1_inputs()
    assert reg_l1_loss(pred, index, mask, target).item() == pytest.approx(2.5 / 4.0001, rel=1e-6)


def test_reg_l1_loss_no_objects_is_zero():
    """All-zero mask gives exactly 0."""
    pred, index, _, target = _hand_l1_inputs()
    assert reg_l1_loss(pred, index, torch.zeros(1, 3), target).item() == 0.0


def test_reg_l1_loss_gradient_closed_form():
    """Gradient is sign(pred - target) * mask / (D * N + 1e-4), scattered to the centre pixels."""
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 2, 4, 4, generator=g).requires_grad_()
    index = torch.tensor([[1, 6, 9, 0], [15, 3, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    target = torch.randn(2, 4, 2, generator=g)
    reg_l1_loss(pred, index, mask, target).backward()
    expected = torch.zeros(2, 2, 16)
    denom = 2 * 5 + 1e-4
    for b in range(2):
        for k in range(4):
            if mask[b, k]:
                i = int(index[b, k])
                expected[b, :, i] += torch.sign(pred.detach().view(2, 2, 16)[b, :, i] - target[b, k]) / denom
    torch.testing.assert_close(pred.grad.view(2, 2, 16), expected)


def test_reg_l1_loss_gradcheck_float32_tolerance():
    """gradcheck away from the |x| kink, with float32-sized step (reg_l1_loss computes in float32)."""
    pred = torch.arange(18.0, dtype=torch.float64).view(1, 2, 3, 3).requires_grad_()
    index = torch.tensor([[4, 7, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    target = torch.tensor([[[3.5, 14.5], [7.5, 15.5], [100.0, 100.0]]], dtype=torch.float64)  # |diff| >= 0.5
    assert torch.autograd.gradcheck(
        lambda p: reg_l1_loss(p, index, mask, target).double(), (pred,), eps=1e-2, atol=1e-4, rtol=1e-3
    )


# ---------------------------------------------------------------------------------------------
# centernet_loss
# ---------------------------------------------------------------------------------------------


def _batch_targets(num_classes=3, size=(16, 16), max_objects=8):
    """Batched encode_centernet targets for two images (one of them empty)."""
    per_image = [
        encode_centernet(np.array([[1.5, 2.0, 9.0, 8.5], [8.0, 8.0, 14.0, 15.0]]), np.array([0, 2]), num_classes, size, max_objects),
        encode_centernet(np.array([[3.0, 3.0, 12.25, 6.5]]), np.array([1]), num_classes, size, max_objects),
    ]
    return {key: torch.from_numpy(np.stack([t[key] for t in per_image])) for key in per_image[0]}


def _random_outputs(seed, num_classes=3, size=(16, 16)):
    g = torch.Generator().manual_seed(seed)
    return {
        "hm": torch.randn(2, num_classes, *size, generator=g),
        "wh": torch.rand(2, 2, *size, generator=g) * 10,
        "reg": torch.rand(2, 2, *size, generator=g),
    }


def test_centernet_loss_total_and_terms():
    """total == hm + 0.1 wh + 1 off, and each term is the matching individual loss."""
    targets, outputs = _batch_targets(), _random_outputs(0)
    out = centernet_loss(outputs, targets)
    assert set(out) == {"loss", "hm_loss", "wh_loss", "off_loss"}
    hm = focal_loss(outputs["hm"], targets["hm"])
    wh = reg_l1_loss(outputs["wh"], targets["ind"], targets["mask"], targets["wh"])
    off = reg_l1_loss(outputs["reg"], targets["ind"], targets["mask"], targets["reg"])
    torch.testing.assert_close(out["hm_loss"], hm)
    torch.testing.assert_close(out["wh_loss"], wh)
    torch.testing.assert_close(out["off_loss"], off)
    torch.testing.assert_close(out["loss"], hm + 0.1 * wh + 1.0 * off)
    assert out["wh_loss"] > 0 and out["off_loss"] > 0
    custom = centernet_loss(outputs, targets, size_weight=0.5, offset_weight=2.0)
    torch.testing.assert_close(custom["loss"], hm + 0.5 * wh + 2.0 * off)


def test_centernet_loss_stack_list():
    """A list of stacks averages each term; two identical stacks equal one."""
    targets = _batch_targets()
    a, b = _random_outputs(0), _random_outputs(1)
    one = centernet_loss(a, targets)
    same = centernet_loss([a, a], targets)
    for key in one:
        torch.testing.assert_close(same[key], one[key])
    la, lb, both = centernet_loss(a, targets), centernet_loss(b, targets), centernet_loss([a, b], targets)
    for key in ("hm_loss", "wh_loss", "off_loss", "loss"):
        torch.testing.assert_close(both[key], (la[key] + lb[key]) / 2)
    assert not torch.allclose(la["hm_loss"], lb["hm_loss"])


def test_centernet_loss_empty_image():
    """No objects: size and offset losses are exactly 0, the heatmap loss finite and positive."""
    targets = {
        "hm": torch.zeros(1, 3, 8, 8),
        "wh": torch.zeros(1, 4, 2),
        "reg": torch.zeros(1, 4, 2),
        "ind": torch.zeros(1, 4, dtype=torch.int64),
        "mask": torch.zeros(1, 4),
    }
    g = torch.Generator().manual_seed(5)
    outputs = {"hm": torch.randn(1, 3, 8, 8, generator=g), "wh": torch.randn(1, 2, 8, 8, generator=g), "reg": torch.randn(1, 2, 8, 8, generator=g)}
    out = centernet_loss(outputs, targets)
    assert out["wh_loss"].item() == 0.0
    assert out["off_loss"].item() == 0.0
    assert torch.isfinite(out["hm_loss"]) and out["hm_loss"] > 0
    assert out["loss"].item() == out["hm_loss"].item()


def test_centernet_loss_backward_reaches_all_heads():
    """The total loss back-propagates into every head."""
    targets = _batch_targets()
    outputs = {k: v.requires_grad_() for k, v in _random_outputs(2).items()}
    centernet_loss(outputs, targets)["loss"].backward()
    for key, value in outputs.items():
        assert value.grad is not None and value.grad.abs().sum() > 0, key


def test_centernet_loss_empty_list_raises():
    """An empty list of stacks raises ValueError."""
    with pytest.raises(ValueError, match="empty"):
        centernet_loss([], _batch_targets())
