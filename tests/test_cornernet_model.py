"""Tests of the CornerNet model: corner pooling, the prediction modules, the Hourglass CornerNet.

The full-size model (201M parameters) is built once, for its parameter count, and never run;
everything that runs uses HOURGLASS_SMALL, the same code at CPU-lesson size.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from minicenternet.models import build_model
from minicenternet.models.cornernet import CornerNetHeads, CornerPoolModule, HourglassCornerNet
from minicenternet.models.heads import HM_PRIOR_BIAS
from minicenternet.models.hourglass import HOURGLASS_SMALL
from minicenternet.models.layers import CORNER_POOL_DIRECTIONS, corner_pool

OFFICIAL_PARAMETERS = 201_035_212  # princeton-vl/CornerNet's models/CornerNet.py, 80 classes
KEYS = ("tl_hm", "br_hm", "tl_emb", "br_emb", "tl_off", "br_off")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _small(num_classes: int = 5, seed: int = 0) -> HourglassCornerNet:
    torch.manual_seed(seed)
    return build_model("hourglass-small", task="cornernet", num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# corner_pool
# ---------------------------------------------------------------------------------------------


def _brute_force_pool(x: Tensor, direction: str) -> Tensor:
    """The definition, one output location at a time."""
    out = torch.empty_like(x)
    height, width = x.shape[-2:]
    for i in range(height):
        for j in range(width):
            region = {
                "top": x[..., i:, j],  # itself and everything below
                "left": x[..., i, j:],  # itself and everything to the right
                "bottom": x[..., : i + 1, j],  # itself and everything above
                "right": x[..., i, : j + 1],  # itself and everything to the left
            }[direction]
            out[..., i, j] = region.amax(dim=-1)
    return out


@pytest.mark.parametrize("direction", ["top", "left", "bottom", "right"])
def test_corner_pool_matches_a_brute_force_loop(direction):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(corner_pool(x, direction), _brute_force_pool(x, direction))


def test_corner_pool_on_a_hand_computed_example():
    x = torch.tensor([[3.0, 0, 2], [1, 5, 0], [0, 2, 6]]).view(1, 1, 3, 3)
    expected = {
        "top": [[3, 5, 6], [1, 5, 6], [0, 2, 6]],
        "left": [[3, 2, 2], [5, 5, 0], [6, 6, 6]],
        "bottom": [[3, 0, 2], [3, 5, 2], [3, 5, 6]],
        "right": [[3, 3, 3], [1, 5, 5], [0, 2, 6]],
    }
    assert CORNER_POOL_DIRECTIONS == tuple(expected)
    for direction, values in expected.items():
        assert corner_pool(x, direction)[0, 0].tolist() == values, direction


def test_corner_pool_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)  # distinct values: no ties
    assert torch.autograd.gradcheck(lambda t: corner_pool(t, "top"), (x,))
    assert torch.autograd.gradcheck(lambda t: corner_pool(t, "right"), (x,))


def test_corner_pool_ties_send_the_gradient_to_the_nearest_position():
    """As the docstring says: cummax routes a tie to the tied position nearest the output."""
    x = torch.tensor([2.0, 2.0, 1.0]).view(1, 1, 1, 3).requires_grad_()
    corner_pool(x, "left")[0, 0, 0, 0].backward()  # max of all three, tied at columns 0 and 1
    assert x.grad.flatten().tolist() == [1.0, 0.0, 0.0]  # the reference's C++ would pick column 1


def test_corner_pool_errors():
    with pytest.raises(ValueError, match="direction"):
        corner_pool(torch.zeros(1, 1, 2, 2), "up")
    with pytest.raises(ValueError, match="B, C, H, W"):
        corner_pool(torch.zeros(2, 2), "top")


# ---------------------------------------------------------------------------------------------
# the full-size model: parameter count only
# ---------------------------------------------------------------------------------------------


def test_full_model_has_the_official_parameter_count():
    torch.manual_seed(0)
    model = build_model("hourglass104", task="cornernet", num_classes=80)
    assert isinstance(model, HourglassCornerNet) and model.task == "cornernet"
    pools = sum(_count(heads.corners[corner].pool) for heads in model.heads for corner in heads.corners)
    parts = {"backbone": _count(model.backbone), "pools": pools, "heads": _count(model.heads) - pools}
    # the per-part numbers of the module docstring
    assert parts == {"backbone": 187_700_352, "pools": 6_168_576, "heads": 7_166_284}
    assert _count(model) == sum(parts.values()) == OFFICIAL_PARAMETERS
    pool = model.heads[0].corners["tl"].pool
    assert pool.directions == ("top", "left") and model.heads[0].corners["br"].pool.directions == ("bottom", "right")
    assert pool.branches[0][0].out_channels == 128 and pool.conv[0].out_channels == 256
    assert model.heads[0].corners["tl"].hm[0].out_channels == 256


def test_factory_task_errors():
    with pytest.raises(ValueError, match="Hourglass"):
        build_model("resnet18", task="cornernet", num_classes=3)
    with pytest.raises(ValueError, match="unknown task"):
        build_model("hourglass-small", task="extremenet", num_classes=3)
    with pytest.raises(ValueError, match="resnet7"):
        build_model("resnet7", task="cornernet", num_classes=3)


# ---------------------------------------------------------------------------------------------
# the small model: outputs, initialisation, training
# ---------------------------------------------------------------------------------------------


def test_small_model_outputs_per_stack_in_training_and_the_last_in_eval():
    model = _small(num_classes=5)
    assert model.pad_multiple == 32 and model.num_stacks == 2
    height, width = 64, 96
    with torch.no_grad():
        train_out = model.train()(torch.randn(2, 3, height, width))
        eval_out = model.eval()(torch.randn(1, 3, height, width))
    channels = {"hm": 5, "emb": 1, "off": 2}
    assert isinstance(train_out, list) and len(train_out) == 2
    for out, batch in [*((stack, 2) for stack in train_out), (eval_out, 1)]:
        assert isinstance(out, dict) and tuple(out) == KEYS
        for key, value in out.items():
            assert value.shape == (batch, channels[key.split("_")[1]], height // 4, width // 4), key
            assert torch.isfinite(value).all()


def test_heatmap_bias_starts_at_the_prior():
    model = _small()
    for heads in model.heads:
        for corner in heads.corners.values():
            bias = corner.hm[-1].bias
            assert torch.equal(bias, torch.full_like(bias, HM_PRIOR_BIAS))


def test_corner_pool_module_shapes_and_heads_dict():
    torch.manual_seed(0)
    module = CornerPoolModule(8, ("bottom", "right"), pool_channels=4)
    assert module(torch.randn(2, 8, 6, 5)).shape == (2, 8, 6, 5)
    heads = CornerNetHeads(8, num_classes=3, head_channels=16, pool_channels=4)
    out = heads(torch.randn(1, 8, 6, 5))
    assert tuple(out) == KEYS and out["br_hm"].shape == (1, 3, 6, 5) and out["tl_off"].shape == (1, 2, 6, 5)


def test_heatmaps_stay_fp32_under_autocast():
    model = _small().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 32, 32))
    assert out["tl_hm"].dtype == out["br_hm"].dtype == torch.float32
    assert out["tl_emb"].dtype == torch.bfloat16


def test_a_few_adam_steps_lower_a_loss_on_one_batch():
    model = _small(num_classes=3).train()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    targets = {key: torch.randn(o.shape, generator=generator) for key, o in model(images)[0].items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_fn() -> Tensor:
        stacks = model(images)
        return sum(nn.functional.mse_loss(stack[k], targets[k]) for stack in stacks for k in KEYS) / len(stacks)

    losses = []
    for _ in range(8):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < 0.9 * losses[0], losses
