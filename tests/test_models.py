"""Tests of minicenternet.models: the factory, the ResNet CenterNet, DCNv2 and bilinear upsampling."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from minicenternet.models import ARCHS, PAPER_ARCHS, SMALL_ARCHS, build_model, input_multiple
from minicenternet.models.heads import HM_PRIOR_BIAS
from minicenternet.models.layers import ModulatedDeformConv2d, fill_bilinear

# torchvision ResNet attribute -> index in ResNetCenterNet.trunk (an nn.Sequential)
_TRUNK_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


@pytest.fixture(scope="module")
def models() -> dict[bool, nn.Module]:
    torch.manual_seed(0)
    return {dcn: build_model("resnet18", num_classes=3, dcn=dcn).eval() for dcn in (False, True)}


# ---------------------------------------------------------------------------------------------
# build_model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dcn", [False, True])
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_output_shapes_at_stride_4(models, dcn, size):
    height, width = size
    with torch.no_grad():
        out = models[dcn](torch.randn(2, 3, height, width))
    assert set(out) == {"hm", "wh", "reg"}
    assert out["hm"].shape == (2, 3, height // 4, width // 4)
    assert out["wh"].shape == (2, 2, height // 4, width // 4)
    assert out["reg"].shape == (2, 2, height // 4, width // 4)


def test_dcn_flag_selects_the_convolution(models):
    assert any(isinstance(m, ModulatedDeformConv2d) for m in models[True].modules())
    assert not any(isinstance(m, ModulatedDeformConv2d) for m in models[False].modules())


@pytest.mark.parametrize("dcn", [False, True])
def test_head_initialisation(models, dcn):
    """hm bias -2.19 (sigmoid = 0.1 prior); wh / reg outputs start near 0 (weights ~ N(0, 1e-6))."""
    model = models[dcn]
    bias = model.heads.hm[-1].bias
    assert torch.equal(bias, torch.full_like(bias, HM_PRIOR_BIAS))
    assert HM_PRIOR_BIAS == -2.19
    assert abs(torch.sigmoid(torch.tensor(HM_PRIOR_BIAS)).item() - 0.1) < 1e-3
    for name in ("wh", "reg"):
        assert torch.count_nonzero(getattr(model.heads, name)[-1].bias) == 0
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    # features after BN + ReLU are O(1): 3x3x64 weights of std 1e-3 give O(0.03), then 64 of
    # std 1e-3 give O(1e-4); a default-initialised head would give O(0.1 - 1)
    assert out["wh"].abs().max() < 1e-2
    assert out["reg"].abs().max() < 1e-2
    assert out["hm"].abs().max() > 1.0  # the heatmap head is not the tiny one


OFFICIAL_PARAMETERS = {"resnet18": 14_437_349, "resnet101": 49_673_189, "dla34": 19_675_892, "hourglass104": 191_284_008}


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_the_factory_defaults_are_the_official_models(arch):
    """build_model(arch, num_classes=80) has the parameter count of the official CenterNet model
    (the DLA-34 count without the official loader's unused 1000-class fc)."""
    model = build_model(arch, num_classes=80)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS[arch]


@pytest.mark.parametrize("arch", ("resnet18",) + SMALL_ARCHS)
def test_the_factory_gives_stride_4_maps_and_one_dict_per_stack_in_training(arch):
    """Through build_model, at the pad multiple of each model (the full-size DLA-34 and
    Hourglass-104 have the same code as their small configurations, tested in their own files)."""
    model = build_model(arch, num_classes=3, dcn=False)
    size = model.pad_multiple
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, size, 2 * size))
        train_out = model.train()(torch.zeros(2, 3, size, size))
    assert out["hm"].shape == (1, 3, size // 4, size // 2) and out["wh"].shape == (1, 2, size // 4, size // 2)
    stacks = train_out if isinstance(train_out, list) else [train_out]
    assert len(stacks) == getattr(model, "num_stacks", 1)
    assert all(s["hm"].shape == (2, 3, size // 4, size // 4) for s in stacks)


def test_factory_errors():
    with pytest.raises(ValueError, match="resnet7"):
        build_model("resnet7", num_classes=3)
    with pytest.raises(ValueError, match="task"):
        build_model("resnet18", task="cornernet_typo", num_classes=3)


@pytest.mark.parametrize("dcn", [False, True])
def test_backward_gives_finite_gradients_everywhere(dcn):
    torch.manual_seed(1)
    model = build_model("resnet18", num_classes=2, dcn=dcn).train()
    out = model(torch.randn(2, 3, 64, 64))
    loss = sum((value.float() ** 2).mean() + value.float().mean() for value in out.values())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    # the head's last layers always get a gradient signal
    assert model.heads.hm[-1].bias.grad.abs().sum() > 0


@pytest.mark.parametrize("dcn", [False, True])
def test_channels_last_gives_the_same_outputs(dcn):
    torch.manual_seed(2)
    model = build_model("resnet18", num_classes=3, dcn=dcn).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        reference = model(images)
        model = model.to(memory_format=torch.channels_last)
        assert model.trunk[0].weight.is_contiguous(memory_format=torch.channels_last)
        out = model(images.contiguous(memory_format=torch.channels_last))
    for key in reference:
        torch.testing.assert_close(out[key], reference[key], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# pretrained trunk from a local file
# ---------------------------------------------------------------------------------------------


def _random_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    """torchvision ResNet-18 state_dict (fc included) with every float tensor randomised, so that
    nothing in it matches a freshly initialised network by accident."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18(weights=None).state_dict()
    return {
        k: (torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v)) if v.is_floating_point() else v
        for k, v in state.items()
    }


def test_pretrained_from_local_file(tmp_path):
    state = _random_resnet18_state(3)
    path = tmp_path / "resnet18_trunk.pth"
    torch.save(state, path)
    model = build_model("resnet18", num_classes=3, pretrained=path, dcn=False)
    trunk = model.trunk.state_dict()
    compared = 0
    for key, value in state.items():
        head, rest = key.split(".", 1)
        if head == "fc":
            continue
        assert torch.equal(trunk[f"{_TRUNK_INDEX[head]}.{rest}"], value), key
        compared += 1
    assert compared == len(trunk)  # every trunk tensor came from the file
    # also accepted as a str
    model2 = build_model("resnet18", num_classes=3, pretrained=str(path), dcn=False)
    assert torch.equal(model2.trunk[0].weight, state["conv1.weight"])


def test_imagenet_weights_offline_say_how_to_use_a_local_file(monkeypatch):
    """No network: the error names the weights and the --pretrained PATH way out (the download is
    replaced by a failing stub, so the test never touches the network)."""
    from urllib.error import URLError

    import torchvision

    def offline(self, *args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match=r"ResNet18_Weights\.IMAGENET1K_V1.*--pretrained resnet18\.pt"):
        build_model("resnet18", num_classes=3, pretrained=True, dcn=False)


def test_pretrained_wrong_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("resnet18", num_classes=3, pretrained=missing)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(512))
    with pytest.raises(ValueError, match="garbage.pth"):
        build_model("resnet18", num_classes=3, pretrained=garbage)

    unrelated = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(ValueError, match="do not fit"):
        build_model("resnet18", num_classes=3, pretrained=unrelated)

    # right names, wrong shapes (as ResNet-50 weights would be for a ResNet-18)
    wrong_shape = torchvision.models.resnet18(weights=None).state_dict()
    wrong_shape["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    wrong_arch = tmp_path / "wrong_shape.pth"
    torch.save(wrong_shape, wrong_arch)
    with pytest.raises(ValueError, match="wrong_shape.pth.*do not fit"):
        build_model("resnet18", num_classes=3, pretrained=wrong_arch)

    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match="tensor.pth"):
        build_model("resnet18", num_classes=3, pretrained=not_a_dict)


# ---------------------------------------------------------------------------------------------
# ModulatedDeformConv2d
# ---------------------------------------------------------------------------------------------


def _dcn(in_channels: int = 3, out_channels: int = 4, seed: int = 4) -> ModulatedDeformConv2d:
    torch.manual_seed(seed)
    layer = ModulatedDeformConv2d(in_channels, out_channels, 3, padding=1)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(out_channels))
    return layer


def test_dcn_at_init_is_half_a_plain_convolution():
    """Zero offsets and zero mask logits: masks are sigmoid(0) = 0.5 on the sampled input and the
    bias is added afterwards, so out = 0.5 * conv(x, w) + b."""
    layer = _dcn()
    x = torch.randn(2, 3, 9, 11)
    expected = 0.5 * F.conv2d(x, layer.weight, padding=1) + layer.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_dcn_integer_offset_shifts_the_sampling_grid():
    """Offset channels are (dy, dx) per kernel tap; dx = +1 everywhere samples x[.., j + 1]: the
    same as a plain convolution of the input shifted one pixel left (interior pixels)."""
    layer = _dcn()
    k2 = 9
    with torch.no_grad():
        layer.offset_mask.bias[1 : 2 * k2 : 2] = 1.0  # dx of every tap
        layer.offset_mask.bias[2 * k2 :] = 20.0  # mask = sigmoid(20) ~ 1
    x = torch.randn(1, 3, 8, 10)
    shifted = torch.zeros_like(x)
    shifted[..., :-1] = x[..., 1:]
    mask = torch.sigmoid(torch.tensor(20.0))
    expected = mask * F.conv2d(shifted, layer.weight, padding=1) + layer.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=1e-5)
    # and it really moved: the unshifted convolution is far from it
    unshifted = mask * F.conv2d(x, layer.weight, padding=1) + layer.bias.view(1, -1, 1, 1)
    assert (out - unshifted)[..., 1:-1, 1:-1].abs().max() > 0.1


def test_dcn_offset_and_mask_convolution_start_at_zero():
    layer = ModulatedDeformConv2d(5, 6, 3, padding=1)
    assert layer.offset_mask.out_channels == 27
    assert torch.count_nonzero(layer.offset_mask.weight) == 0
    assert torch.count_nonzero(layer.offset_mask.bias) == 0


# ---------------------------------------------------------------------------------------------
# fill_bilinear
# ---------------------------------------------------------------------------------------------

KERNEL_1D = torch.tensor([0.25, 0.75, 0.75, 0.25])  # 1 - |i / 2 - 0.75|, i = 0..3


def _up(channels: int = 2) -> nn.ConvTranspose2d:
    torch.manual_seed(5)
    return nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False)


def test_fill_bilinear_kernel_values():
    up = _up()
    fill_bilinear(up, "identity")
    torch.testing.assert_close(up.weight[0, 0], KERNEL_1D[:, None] * KERNEL_1D[None, :])


def test_fill_bilinear_identity_is_an_exact_bilinear_upsampler():
    up = _up()
    fill_bilinear(up, "identity")
    assert torch.count_nonzero(up.weight[0, 1]) == 0 and torch.count_nonzero(up.weight[1, 0]) == 0
    with torch.no_grad():
        constant = up(torch.full((1, 2, 6, 7), 3.0))
        # channel 0: ramp in x; channel 1: ramp in y (channels do not mix)
        ramp = torch.stack(
            [torch.arange(7.0).expand(6, 7), torch.arange(6.0)[:, None].expand(6, 7)]
        )[None]
        ramped = up(ramp)
    assert constant.shape == (1, 2, 12, 14)
    torch.testing.assert_close(constant[..., 1:-1, 1:-1], torch.full((1, 2, 10, 12), 3.0))
    # output pixel o sits at input coordinate (o - 0.5) / 2 (align_corners=False)
    xs = (torch.arange(14.0) - 0.5) / 2
    ys = (torch.arange(12.0) - 0.5) / 2
    torch.testing.assert_close(ramped[0, 0, 1:-1, 1:-1], xs[1:-1].expand(10, 12))
    torch.testing.assert_close(ramped[0, 1, 1:-1, 1:-1], ys[1:-1, None].expand(10, 12))
    # which is F.interpolate's bilinear upsampling away from the border
    x = torch.randn(1, 2, 5, 6)
    with torch.no_grad():
        reference = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(up(x)[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1])


def test_fill_bilinear_reference_writes_only_output_channel_0():
    up = _up(3)
    before = up.weight.detach().clone()
    fill_bilinear(up, "reference")
    kernel = KERNEL_1D[:, None] * KERNEL_1D[None, :]
    for c in range(3):
        torch.testing.assert_close(up.weight[c, 0], kernel)
    torch.testing.assert_close(up.weight[:, 1:], before[:, 1:])


def test_fill_bilinear_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        fill_bilinear(_up(), "nearest")


@pytest.mark.parametrize("up_init", ["reference", "identity"])
def test_build_model_passes_up_init_to_every_transposed_conv(up_init):
    model = build_model("resnet18", num_classes=2, dcn=False, up_init=up_init)
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 3
    kernel = KERNEL_1D[:, None] * KERNEL_1D[None, :]
    for up in ups:
        if up_init == "reference":  # every input feeds output 0 bilinearly; the rest keeps its random init
            torch.testing.assert_close(up.weight[1, 0], kernel)
            assert torch.count_nonzero(up.weight[1, 2]) > 0
        else:  # channel c -> channel c only
            torch.testing.assert_close(up.weight[1, 1], kernel)
            assert torch.count_nonzero(up.weight[1, 0]) == 0 and torch.count_nonzero(up.weight[1, 2]) == 0


@pytest.mark.parametrize("arch, weight_std_below, zero_bias", [("resnet18", 0.002, True), ("dla-small", None, True),
                                                              ("hourglass-small", None, False)])
def test_size_and_offset_heads_start_as_each_official_backbone(arch, weight_std_below, zero_bias):
    """ResNet: weights N(0, 0.001^2), biases 0; DLA: PyTorch's default weights, biases 0;
    Hourglass: PyTorch's defaults (uniform weights of bound 1/sqrt(fan_in), non-zero biases)."""
    heads = build_model(arch, num_classes=3, dcn=False).heads
    heads = heads[0] if isinstance(heads, nn.ModuleList) else heads
    for head in (heads.wh, heads.reg):
        for conv in head[0::2]:
            fan_in = conv.weight[0].numel()
            std = conv.weight.std().item()
            if weight_std_below is not None:
                assert std < weight_std_below
            else:  # kaiming_uniform(a=sqrt(5)): uniform in +-1/sqrt(fan_in), std 1/sqrt(3 fan_in)
                assert std == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.2)
            assert bool((conv.bias == 0).all()) is zero_bias


@pytest.mark.parametrize("arch", ARCHS)
def test_input_multiple_is_the_built_models_pad_multiple(arch):
    assert input_multiple(arch) == build_model(arch, num_classes=2, dcn=False).pad_multiple
