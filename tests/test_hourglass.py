"""Tests of minicenternet.models.hourglass: Hourglass-104 CenterNet and its small configuration.

The full-size model (191M parameters) is built once, for its parameter count and structure, and
never run; everything that runs uses HOURGLASS_SMALL, the same code at CPU-lesson size.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from minicenternet.losses import centernet_loss
from minicenternet.models.heads import HM_PRIOR_BIAS
from minicenternet.models.hourglass import (
    HOURGLASS_SMALL,
    HourglassBackbone,
    HourglassCenterNet,
    HourglassConfig,
    HourglassModule,
    HourglassNet,
    Residual,
    hourglass104,
)
from minicenternet.targets import encode_centernet

OFFICIAL_PARAMETERS = 191_284_008  # xingyizhou/CenterNet's HourglassNet with heads hm 80, wh 2, reg 2


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _small(num_classes: int = 3, seed: int = 0, **kwargs) -> HourglassCenterNet:
    torch.manual_seed(seed)
    return HourglassCenterNet(num_classes, config=HOURGLASS_SMALL, **kwargs)


@pytest.fixture(scope="module")
def full() -> HourglassCenterNet:
    torch.manual_seed(0)
    return hourglass104()


# ---------------------------------------------------------------------------------------------
# the full-size model: parameters and structure, no forward
# ---------------------------------------------------------------------------------------------


def test_full_model_has_the_official_parameter_count(full):
    backbone = full.backbone
    parts = {
        "stem": _count(backbone.stem),
        "stacks": _count(backbone.hourglasses) + _count(backbone.convs),
        "merges": _count(backbone.merges),
        "heads": _count(full.heads),
    }
    # the per-part numbers of the module docstring
    assert parts == {"stem": 938_112, "stacks": 185_449_472, "merges": 1_312_768, "heads": 3_583_656}
    assert _count(full) == sum(parts.values()) == OFFICIAL_PARAMETERS


def test_full_model_structure(full):
    assert full.pad_multiple == 128 == HourglassNet.pad_multiple
    assert full.num_stacks == 2 and len(full.heads) == 2 and len(full.backbone.merges) == 1
    assert full.backbone.stem[0][0].kernel_size == (7, 7) and full.backbone.stem[0][0].out_channels == 128
    for hourglass in full.backbone.hourglasses:
        level, widths = hourglass, []
        while isinstance(level, HourglassModule):  # 5 nested levels, each going down by stride 2
            assert level.low1[0].conv1.stride == (2, 2)
            widths.append(level.up1[0].conv1.out_channels)
            level = level.low2
        assert widths == [256, 256, 384, 384, 384]
        assert len(level) == 4 and level[0].conv1.out_channels == 512  # the bottom: 4 residuals of 512
        # up1, low1 and low3 hold 2 residual blocks at each of the 5 levels, plus the 4 at the bottom
        assert sum(isinstance(m, Residual) for m in hourglass.modules()) == 5 * 3 * 2 + 4
    for heads in full.heads:  # 256-wide heads with a bias on both convolutions, as the official code
        assert heads.hm[0].out_channels == 256 and heads.hm[0].bias is not None
        assert torch.equal(heads.hm[-1].bias, torch.full((80,), HM_PRIOR_BIAS))


# ---------------------------------------------------------------------------------------------
# the small configuration: outputs in train and eval mode
# ---------------------------------------------------------------------------------------------


def test_train_mode_returns_one_dict_per_stack_at_stride_4():
    model = _small().train()
    out = model(torch.randn(2, 3, 128, 96))
    assert isinstance(out, list) and len(out) == HOURGLASS_SMALL.stacks == 2
    for stack in out:
        assert {k: tuple(v.shape) for k, v in stack.items()} == {
            "hm": (2, 3, 32, 24),
            "wh": (2, 2, 32, 24),
            "reg": (2, 2, 32, 24),
        }


def _calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_eval_mode_returns_the_last_stacks_dict_and_skips_the_other_heads():
    """Eval mode against the training path with every BN frozen (running statistics), so both
    compute the same function: the eval dict must be the last element of the training list."""
    model = _small()
    with torch.no_grad():  # give the BN layers running statistics that are not the initial 0 / 1
        for seed in range(3):
            model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5)
    assert model.backbone.stem[0][1].running_var.abs().sub(1).abs().max() > 0.1
    first_heads = _calls(model.heads[0])
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        evaluated = model.eval()(images)
        assert not first_heads  # the first stack's heads did not run
        model.train()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        stacks = model(images)
    assert len(first_heads) == 1
    assert isinstance(evaluated, dict) and isinstance(stacks, list)
    assert evaluated.keys() == stacks[-1].keys()
    for key in evaluated:
        torch.testing.assert_close(evaluated[key], stacks[-1][key], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(stacks[0]["hm"], stacks[1]["hm"])  # the stacks do differ


def test_hm_bias_starts_at_the_prior_on_every_stack():
    model = _small(num_classes=4)
    for heads in model.heads:
        assert torch.equal(heads.hm[-1].bias, torch.full((4,), HM_PRIOR_BIAS))
    assert abs(torch.sigmoid(torch.tensor(HM_PRIOR_BIAS)).item() - 0.1) < 1e-3


def test_inputs_must_be_a_multiple_of_pad_multiple():
    model = _small().eval()
    assert model.pad_multiple == 32  # stem stride 4 times 2 ** 3 levels
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 160))["hm"].shape == (1, 3, 24, 40)
        with pytest.raises(ValueError, match=r"100x128 .*pad_multiple=32"):
            model(torch.randn(1, 3, 100, 128))
    # the pad multiple follows the levels: 2 levels -> 16, and one stack (no merge) works too
    tiny = HourglassConfig(stacks=1, channels=(8, 8, 16), residuals=(1, 1, 1), stem_channels=8, head_channels=8)
    model = HourglassCenterNet(2, config=tiny).eval()
    assert model.pad_multiple == 16 and len(model.backbone.merges) == 0
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 80))["hm"].shape == (1, 2, 12, 20)


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="residual count"):
        HourglassConfig(channels=(32, 32, 48), residuals=(1, 1))
    with pytest.raises(ValueError, match="level"):
        HourglassConfig(channels=(32,), residuals=(1,))
    with pytest.raises(ValueError):
        HourglassConfig(stacks=0)


def test_backbone_takes_other_heads():
    """What CornerNet will do: the same backbone, its own heads factory."""

    class CountHeads(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, 1, 1)

        def forward(self, features: Tensor) -> dict[str, Tensor]:
            return {"count": self.conv(features)}

    torch.manual_seed(0)
    model = HourglassNet(CountHeads, HOURGLASS_SMALL).train()
    out = model(torch.randn(1, 3, 64, 64))
    assert [tuple(stack["count"].shape) for stack in out] == [(1, 1, 16, 16)] * 2
    features = HourglassBackbone(HOURGLASS_SMALL)(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(1, 32, 16, 16)] * 2


# ---------------------------------------------------------------------------------------------
# training: the loss over the stacks
# ---------------------------------------------------------------------------------------------


def _fixed_batch(num_classes: int = 3) -> tuple[Tensor, dict[str, Tensor]]:
    """Two 128x128 images with bright rectangles on noise, and their CenterNet targets."""
    rng = np.random.default_rng(0)
    boxes = [np.array([[16, 20, 60, 72]]), np.array([[70, 28, 112, 100], [8, 84, 44, 124]])]
    labels = [np.array([0]), np.array([1, 2])]
    images = rng.normal(0, 0.3, (2, 3, 128, 128)).astype(np.float32)
    targets = []
    for image, image_boxes, image_labels in zip(images, boxes, labels, strict=True):
        for (x1, y1, x2, y2), label in zip(image_boxes, image_labels, strict=True):
            image[label, y1:y2, x1:x2] += 2.0
        targets.append(encode_centernet(image_boxes / 4, image_labels, num_classes, (32, 32), max_objects=8))
    batch = {key: torch.from_numpy(np.stack([t[key] for t in targets])) for key in targets[0]}
    return torch.from_numpy(images), batch


def test_loss_is_finite_and_every_parameter_gets_a_gradient():
    model = _small().train()
    images, targets = _fixed_batch()
    losses = centernet_loss(model(images), targets)
    assert all(math.isfinite(v.item()) for v in losses.values())
    losses["loss"].backward()
    for name, param in model.named_parameters():  # the first stack's heads too: intermediate supervision
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.heads[0].hm[-1].bias.grad.abs().sum() > 0


def test_a_few_adam_steps_on_one_batch_lower_the_loss():
    model = _small().train()
    images, targets = _fixed_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = centernet_loss(model(images), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# weights from a local file
# ---------------------------------------------------------------------------------------------


def _random_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state_dict with every float tensor randomised (running variances positive)."""
    torch.manual_seed(7)
    return {
        k: (torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v)) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }


def test_pretrained_loads_a_whole_state_dict_from_a_local_file(tmp_path):
    state = _random_state(_small())
    path = tmp_path / "hourglass_small.pth"
    torch.save(state, path)
    for model in (
        _small(seed=1, pretrained=path),
        hourglass104(3, pretrained=str(path), small=True),
    ):
        loaded = model.state_dict()
        assert loaded.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(loaded[key], value), key
    # a minicenternet checkpoint (the model's state_dict under "model") works too
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": state, "epoch": 3}, checkpoint)
    assert torch.equal(_small(pretrained=checkpoint).heads[1].hm[-1].bias, state["heads.1.hm.2.bias"])


def test_pretrained_errors_name_the_file_and_the_keys(tmp_path):
    with pytest.raises(ValueError, match="no ImageNet weights.*path of a saved state_dict"):
        _small(pretrained=True)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        _small(pretrained=tmp_path / "nope.pth")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(512))
    with pytest.raises(ValueError, match="garbage.pth"):
        _small(pretrained=garbage)

    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match="tensor.pth.*state_dict"):
        _small(pretrained=not_a_dict)

    other_classes = tmp_path / "five_classes.pth"
    torch.save(_small(num_classes=5).state_dict(), other_classes)
    with pytest.raises(ValueError, match=r"five_classes.pth do not fit.*wrong shapes \['heads.0.hm.2.weight \(5, 32"):
        _small(num_classes=3, pretrained=other_classes)

    unrelated = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(ValueError, match=r"unrelated.pth.*missing \['backbone.stem.*unexpected \['encoder.weight'\]"):
        _small(pretrained=unrelated)

