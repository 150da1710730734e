"""Tests of minicenternet.models.dla: DLA-34 CenterNet (full size for the counts and one forward,
the small configuration for everything else)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minicenternet.losses import centernet_loss
from minicenternet.models.dla import DLA, DLA34, DLA_SMALL, DLACenterNet, DLAConfig, dla34, load_dla_weights
from minicenternet.models.heads import HM_PRIOR_BIAS
from minicenternet.models.layers import ModulatedDeformConv2d
from minicenternet.targets import encode_centernet

OFFICIAL_PARAMS = 19_675_892  # official DLA-34 CenterNet (ctdet, 80 classes) without the ImageNet fc
# in_channels of the 16 neck convolutions that are DCNv2 by default:
# DLAUp pass 1 (to stride 16, 256 wide): proj 512, node 256; pass 2 (to stride 8, 128 wide):
# proj 256, 256, node 128, 128; pass 3 (to stride 4, 64 wide): proj 128 x 3, node 64 x 3;
# IDAUp (64 wide): proj 128, 256, node 64, 64.
NECK_DCN_IN_CHANNELS = [512, 256] + [256, 256, 128, 128] + [128] * 3 + [64] * 3 + [128, 256, 64, 64]
TINY = DLAConfig(depths=(1, 1, 1, 2, 2, 1), channels=(4, 8, 16, 32, 64, 128))  # DLA-34 at a quarter of the width


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def full() -> DLACenterNet:
    torch.manual_seed(0)
    return dla34().eval()


@pytest.fixture(scope="module")
def small() -> dict[bool, DLACenterNet]:
    torch.manual_seed(0)
    return {dcn: dla34(num_classes=3, dcn=dcn, small=True).eval() for dcn in (False, True)}


# ---------------------------------------------------------------------------------------------
# size and structure
# ---------------------------------------------------------------------------------------------


def test_parameter_count_equals_the_official_model(full):
    assert _num_params(full) == OFFICIAL_PARAMS
    assert _num_params(full.trunk) == 15_270_832  # the official 15,783,832 less fc (512 x 1000 + 1000)
    assert _num_params(full.dla_up) + _num_params(full.ida_up) == 3_940_336
    assert _num_params(full.heads) == 3 * (64 * 256 * 9 + 256) + 256 * 84 + 84 == 464_724
    # the two unused, frozen projections of the depth-2 trees (levels 3 and 4)
    frozen = sum(p.numel() for p in full.parameters() if not p.requires_grad)
    assert frozen == (64 * 128 + 2 * 128) + (128 * 256 + 2 * 256) == 41_728


def test_without_dcn_each_neck_conv_loses_its_offset_mask_conv():
    """A 3x3 DCNv2 has, besides the plain convolution, a 3x3 conv predicting 27 = 2 x 9 offsets +
    9 masks, with bias: 27 * (9 * in_channels + 1) parameters."""
    assert len(NECK_DCN_IN_CHANNELS) == 16 and sum(NECK_DCN_IN_CHANNELS) == 2624
    offset_params = sum(27 * (9 * c + 1) for c in NECK_DCN_IN_CHANNELS)
    assert offset_params == 638_064
    assert _num_params(dla34(dcn=False)) == OFFICIAL_PARAMS - offset_params == 19_037_828


def test_small_configuration_sizes():
    """DLA_SMALL: half the widths, trees of depth 1, heads 64 wide (80 classes here)."""
    model, plain = dla34(small=True), dla34(small=True, dcn=False)
    assert _num_params(model) == 4_222_204
    assert _num_params(model.trunk) == 3_011_096 and _num_params(model.heads) == 60_948
    assert _num_params(model) - _num_params(plain) == sum(27 * (9 * (c // 2) + 1) for c in NECK_DCN_IN_CHANNELS)
    assert model.trunk.level5.root.conv.in_channels == 2 * 256 + 128
    assert all(p.requires_grad for p in model.parameters())  # depth-1 trees only: nothing frozen
    assert DLA_SMALL.channels == (8, 16, 32, 64, 128, 256) and DLA34.channels == (16, 32, 64, 128, 256, 512)


def test_trunk_names_are_those_of_the_imagenet_checkpoint():
    shapes = {k: tuple(v.shape) for k, v in DLA(DLA34).state_dict().items()}
    assert shapes["base_layer.0.weight"] == (16, 3, 7, 7)
    assert shapes["level0.0.weight"] == (16, 16, 3, 3)
    assert shapes["level1.0.weight"] == (32, 16, 3, 3)
    assert shapes["level2.tree1.conv1.weight"] == (64, 32, 3, 3)
    assert shapes["level2.root.conv.weight"] == (64, 128, 1, 1)
    assert shapes["level3.project.0.weight"] == (128, 64, 1, 1)
    assert shapes["level3.tree1.project.0.weight"] == (128, 64, 1, 1)
    # root of the second subtree: its two blocks, the level's input (64) and the first subtree
    assert shapes["level3.tree2.root.conv.weight"] == (128, 128 + 128 + 64 + 128, 1, 1)
    assert shapes["level4.tree2.root.conv.weight"] == (256, 256 + 256 + 128 + 256, 1, 1)
    assert shapes["level5.root.conv.weight"] == (512, 512 + 512 + 256, 1, 1)
    assert shapes["level5.project.1.running_var"] == (512,)
    assert len(shapes) == 234 and not any(k.startswith("fc.") for k in shapes)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


def test_full_model_output_at_stride_4(full):
    assert full.pad_multiple == 32
    with torch.no_grad():
        out = full(torch.randn(1, 3, 256, 256))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "hm": (1, 80, 64, 64),
        "wh": (1, 2, 64, 64),
        "reg": (1, 2, 64, 64),
    }


@pytest.mark.parametrize(("dcn", "size"), [(False, (96, 128)), (True, (64, 96))])
def test_small_output_shapes_at_stride_4(small, dcn, size):
    height, width = size
    with torch.no_grad():
        out = small[dcn](torch.randn(2, 3, height, width))
    assert out["hm"].shape == (2, 3, height // 4, width // 4)
    assert out["wh"].shape == out["reg"].shape == (2, 2, height // 4, width // 4)


def test_trunk_levels_halve_the_resolution(small):
    with torch.no_grad():
        levels = small[False].trunk(torch.randn(1, 3, 64, 96))
    assert [tuple(x.shape) for x in levels] == [
        (1, c, 64 // 2**i, 96 // 2**i) for i, c in enumerate(DLA_SMALL.channels)
    ]


def test_dcn_flag_and_zero_offsets(small):
    dcns = [m for m in small[True].modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(dcns) == 16
    for layer in dcns:
        assert torch.count_nonzero(layer.offset_mask.weight) == 0
        assert torch.count_nonzero(layer.offset_mask.bias) == 0
    assert not any(isinstance(m, ModulatedDeformConv2d) for m in small[False].modules())


def test_heads_start_at_the_focal_prior(small):
    bias = small[True].heads.hm[-1].bias
    assert torch.equal(bias, torch.full_like(bias, HM_PRIOR_BIAS))
    assert small[True].heads.hm[0].out_channels == 64


def test_every_transposed_conv_is_a_depthwise_bilinear_upsampler(small, full):
    ups = [m for m in small[False].modules() if isinstance(m, nn.ConvTranspose2d)]
    assert sorted(m.stride[0] for m in ups) == [2] * 7 + [4]  # DLAUp: 1 + 2 + 3, IDAUp: 2 and 4
    torch.manual_seed(3)
    for up in ups:
        factor, channels = up.stride[0], up.in_channels
        assert up.groups == channels and up.kernel_size == (2 * factor,) * 2 and up.padding == (factor // 2,) * 2
        assert up.bias is None
        x = torch.randn(1, channels, 5, 6)
        with torch.no_grad():
            out, constant = up(x), up(torch.full_like(x, 2.0))
        reference = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        b = factor // 2  # the border where interpolate clamps and the transposed conv sees zeros
        torch.testing.assert_close(out[..., b:-b, b:-b], reference[..., b:-b, b:-b])
        torch.testing.assert_close(constant[..., b:-b, b:-b], torch.full_like(constant[..., b:-b, b:-b], 2.0))
    for up in (m for m in full.modules() if isinstance(m, nn.ConvTranspose2d)):  # every channel, 256 wide too
        assert torch.equal(up.weight, up.weight[:1].expand_as(up.weight))
        # the bilinear kernel of factor f sums to f^2 (each input pixel spreads over f x f outputs)
        assert up.weight[0].sum().item() == pytest.approx(up.stride[0] ** 2)


def test_unused_projections_are_frozen_and_every_other_parameter_learns():
    torch.manual_seed(4)
    trunk = DLA(TINY)
    sum(x.mean() for x in trunk(torch.randn(2, 3, 64, 64))).backward()
    frozen = {name for name, p in trunk.named_parameters() if not p.requires_grad}
    assert frozen == {f"level{i}.project.{p}" for i in (3, 4) for p in ("0.weight", "1.weight", "1.bias")}
    for name, param in trunk.named_parameters():
        assert (param.grad is None) == (name in frozen), name


# ---------------------------------------------------------------------------------------------
# loss and training
# ---------------------------------------------------------------------------------------------


def _batch(num_classes: int = 3, size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Two random images and the targets of three boxes (given on the stride-4 map)."""
    boxes = [np.array([[1.0, 2.0, 7.0, 10.0], [9.0, 1.0, 15.0, 5.0]]), np.array([[3.0, 4.0, 12.5, 13.0]])]
    labels = [np.array([0, 2]), np.array([1])]
    output_size = (size // 4, size // 4)
    encoded = [
        encode_centernet(b, c, num_classes, output_size, max_objects=8) for b, c in zip(boxes, labels, strict=True)
    ]
    targets = {k: torch.from_numpy(np.stack([e[k] for e in encoded])) for k in encoded[0]}
    torch.manual_seed(5)
    return torch.randn(2, 3, size, size), targets


def test_a_few_adam_steps_lower_the_loss():
    torch.manual_seed(6)
    model = dla34(num_classes=3, dcn=False, small=True).train()
    images, targets = _batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = centernet_loss(model(images), targets)["loss"]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_dcn_backward_reaches_the_offsets():
    torch.manual_seed(7)
    model = dla34(num_classes=3, dcn=True, small=True).train()
    images, targets = _batch()
    loss = centernet_loss(model(images), targets)
    assert all(torch.isfinite(v) for v in loss.values())
    loss["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    dcns = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert all(m.offset_mask.weight.grad.abs().sum() > 0 for m in dcns)


# ---------------------------------------------------------------------------------------------
# pretrained trunk from a local file
# ---------------------------------------------------------------------------------------------


def _imagenet_like_state(config: DLAConfig, seed: int) -> dict[str, torch.Tensor]:
    """A trunk state_dict as the ImageNet file has it: every float tensor random, plus the fc."""
    torch.manual_seed(seed)
    state = {
        k: (torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v)) if v.is_floating_point() else v
        for k, v in DLA(config).state_dict().items()
    }
    state["fc.weight"] = torch.randn(1000, config.channels[-1], 1, 1)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_pretrained_from_local_file(tmp_path):
    state = _imagenet_like_state(DLA_SMALL, 8)
    path = tmp_path / "dla_small_imagenet.pth"
    torch.save(state, path)
    model = dla34(num_classes=3, pretrained=path, dcn=False, small=True)
    trunk = model.trunk.state_dict()
    assert set(trunk) == set(state) - {"fc.weight", "fc.bias"}
    for key, value in trunk.items():
        assert torch.equal(value, state[key]), key
    assert not hasattr(model.trunk, "fc")
    # a str works too, and load_dla_weights on a bare trunk
    model2 = DLACenterNet(3, pretrained=str(path), dcn=False, head_channels=64, config=DLA_SMALL)
    assert torch.equal(model2.trunk.level5.root.conv.weight, state["level5.root.conv.weight"])
    trunk = DLA(DLA_SMALL)
    load_dla_weights(trunk, path)
    assert torch.equal(trunk.base_layer[0].weight, state["base_layer.0.weight"])


def test_pretrained_true_says_to_pass_a_local_file():
    with pytest.raises(ValueError, match=r"cannot be downloaded.*torchvision has no DLA.*pretrained="):
        dla34(pretrained=True)


def test_pretrained_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        dla34(small=True, pretrained=tmp_path / "nope.pth")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(512))
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        dla34(small=True, pretrained=garbage)

    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match=r"tensor\.pth.*state_dict"):
        dla34(small=True, pretrained=not_a_dict)

    state = _imagenet_like_state(DLA_SMALL, 9)
    del state["level2.root.conv.weight"]
    state["level9.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError, match=r"broken.pth.*missing \['level2.root.conv.weight'\].*unexpected \['level9"):
        dla34(small=True, pretrained=broken)

    # the right names at other widths (the TINY trunk has the DLA-34 trees, hence its names)
    tiny = tmp_path / "tiny.pth"
    torch.save(_imagenet_like_state(TINY, 10), tiny)
    wrong_shape = r"wrong shapes \['base_layer.0.weight \(4, 3, 7, 7\) != \(16, 3, 7, 7\)"
    with pytest.raises(ValueError, match=r"tiny\.pth.*missing \[\], unexpected \[\], " + wrong_shape):
        load_dla_weights(DLA(DLA34), tiny)
