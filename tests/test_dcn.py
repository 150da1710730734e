"""The native DCNv2 (``minicenternet.models.dcn``) against torchvision and a brute-force loop."""

from __future__ import annotations

import pytest
import torch
import torchvision

from minicenternet.models.dcn import ModulatedDeformConv2d, deform_conv2d, resolve_impl, set_impl


def _inputs(
    batch: int, channels: int, out_channels: int, size: tuple[int, int], kernel: tuple[int, int],
    stride: int, padding: int, dilation: int, with_mask: bool, max_offset: float, seed: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor | int | None]:
    """Random DCN arguments; offsets uniform in ``[-max_offset, max_offset]`` pixels."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    out_h = (size[0] + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    out_w = (size[1] + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    return {
        "input": torch.randn(batch, channels, *size, generator=g, dtype=dtype),
        "offset": ((torch.rand(batch, 2 * kh * kw, out_h, out_w, generator=g, dtype=dtype) * 2 - 1) * max_offset),
        "weight": torch.randn(out_channels, channels, kh, kw, generator=g, dtype=dtype),
        "bias": torch.randn(out_channels, generator=g, dtype=dtype),
        "mask": torch.rand(batch, kh * kw, out_h, out_w, generator=g, dtype=dtype) if with_mask else None,
        "stride": stride, "padding": padding, "dilation": dilation,
    }


def _forward_and_grads(args: dict, impl: str) -> list[torch.Tensor]:
    """Output and the gradients of input, offset, weight, bias (and mask) for a fixed random upstream gradient."""
    args = {k: v.detach().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    out = deform_conv2d(**args, impl=impl)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(out.dtype)
    leaves = [args[k] for k in ("input", "offset", "weight", "bias", "mask") if args[k] is not None]
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Elementwise agreement to ``rel`` times the largest magnitude of ``expected``."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale)


CASES = [  # size, kernel, stride, padding, dilation, mask
    ((7, 7), (3, 3), 1, 1, 1, True),
    ((9, 13), (3, 3), 1, 1, 1, False),
    ((10, 7), (3, 3), 2, 1, 1, True),
    ((11, 9), (3, 3), 1, 2, 2, True),
    ((8, 10), (3, 2), 2, 0, 1, True),
]


@pytest.mark.parametrize(("size", "kernel", "stride", "padding", "dilation", "with_mask"), CASES)
def test_matches_torchvision_forward_and_gradients(size, kernel, stride, padding, dilation, with_mask):
    # offsets up to 15 px on maps of 7-13 px: many samples fall partly or wholly outside
    args = _inputs(2, 6, 5, size, kernel, stride, padding, dilation, with_mask, max_offset=15.0, seed=1)
    native = _forward_and_grads(args, "native")
    reference = _forward_and_grads(args, "torchvision")
    assert len(native) == (6 if with_mask else 5)
    for name, a, b in zip(("output", "input", "offset", "weight", "bias", "mask"), native, reference):
        assert a.shape == b.shape, name
        _assert_close(a, b, rel=1e-4)


def test_gradient_of_the_input_alone():
    # fixed offsets and mask (no gradient): the input's gradient must not depend on theirs
    args = _inputs(2, 3, 4, (6, 8), (3, 3), 1, 1, 1, True, max_offset=4.0, seed=8)
    grads = []
    for impl in ("native", "torchvision"):
        x = args["input"].clone().requires_grad_()
        out = deform_conv2d(**{**args, "input": x}, impl=impl)
        grads.append(torch.autograd.grad(out.square().sum(), x)[0])
    _assert_close(*grads, rel=1e-4)


def test_small_offsets_matter():
    # a check that the comparison above can fail: a half-pixel shift of the offsets changes everything
    args = _inputs(1, 3, 2, (6, 6), (3, 3), 1, 1, 1, True, max_offset=2.0, seed=2)
    shifted = {**args, "offset": args["offset"] + 0.5}
    diff = deform_conv2d(**shifted, impl="native") - deform_conv2d(**args, impl="torchvision")
    assert diff.abs().max() > 0.1


def _brute_force(input, offset, weight, bias, stride, padding, dilation, mask) -> torch.Tensor:
    """DCNv2 Eq. 3 pixel by pixel, bilinear sampling written as a separable tent kernel.

    ``x(py, px) = sum_{iy, ix} max(0, 1 - |py - iy|) max(0, 1 - |px - ix|) x[iy, ix]`` over the
    pixels of the map, so anything beyond one pixel outside is zero without a special case.
    """
    batch, _, height, width = input.shape
    out_channels, _, kh, kw = weight.shape
    out_h, out_w = offset.shape[2:]
    rows, cols = torch.arange(height, dtype=input.dtype), torch.arange(width, dtype=input.dtype)
    out = torch.zeros(batch, out_channels, out_h, out_w, dtype=input.dtype)
    for b in range(batch):
        for oy in range(out_h):
            for ox in range(out_w):
                for i in range(kh):
                    for j in range(kw):
                        k = i * kw + j
                        py = oy * stride - padding + i * dilation + offset[b, 2 * k, oy, ox]
                        px = ox * stride - padding + j * dilation + offset[b, 2 * k + 1, oy, ox]
                        tent = (1 - (py - rows).abs()).clamp(min=0)[:, None] * (1 - (px - cols).abs()).clamp(min=0)
                        sample = (input[b] * tent).sum((1, 2))  # [C]
                        modulation = 1.0 if mask is None else mask[b, k, oy, ox]
                        out[b, :, oy, ox] += weight[:, :, i, j] @ sample * modulation
    return out + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize(("stride", "with_mask"), [(1, True), (2, False)])
def test_matches_a_brute_force_loop(stride, with_mask):
    args = _inputs(1, 2, 3, (4, 5), (3, 3), stride, 1, 1, with_mask, max_offset=3.0, seed=3, dtype=torch.float64)
    expected = _brute_force(**args)
    torch.testing.assert_close(deform_conv2d(**args, impl="native"), expected, rtol=1e-10, atol=1e-10)


def test_gradients_match_finite_differences():
    args = _inputs(1, 2, 2, (4, 5), (3, 3), 1, 1, 1, True, max_offset=3.0, seed=4, dtype=torch.float64)
    names = ("input", "offset", "weight", "bias", "mask")

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return deform_conv2d(**{**args, **dict(zip(names, tensors))}, impl="native")

    assert torch.autograd.gradcheck(fn, tuple(args[n].requires_grad_() for n in names))


def test_bfloat16_within_stated_tolerance():
    # bf16 columns and matmul (float32 geometry): within 2e-2 of the largest output magnitude
    args = _inputs(2, 16, 8, (9, 11), (3, 3), 1, 1, 1, True, max_offset=5.0, seed=5, dtype=torch.bfloat16)
    as_float = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    out = deform_conv2d(**args, impl="native")
    assert out.dtype == torch.bfloat16
    _assert_close(out, torchvision.ops.deform_conv2d(**as_float), rel=2e-2)


def test_unsupported_groups_and_names_raise():
    args = _inputs(1, 4, 2, (5, 5), (3, 3), 1, 1, 1, False, max_offset=1.0, seed=6)
    with pytest.raises(ValueError, match="offset group"):
        deform_conv2d(**{**args, "offset": args["offset"].repeat(1, 2, 1, 1)}, impl="native")
    with pytest.raises(ValueError, match="weight groups"):
        deform_conv2d(**{**args, "weight": args["weight"][:, :2]}, impl="native")
    with pytest.raises(ValueError, match="impl"):
        deform_conv2d(**args, impl="cuda")
    with pytest.raises(ValueError, match="impl"):
        ModulatedDeformConv2d(4, 2, impl="fast")
    assert resolve_impl("auto", torch.device("cpu")) == "native"
    assert resolve_impl("auto", torch.device("cuda")) == "torchvision"
    assert resolve_impl("auto", torch.device("mps")) == "native"        # torchvision has no kernel there
    with pytest.raises(ValueError, match="offset must be"):               # batch of the offsets
        deform_conv2d(**{**args, "offset": args["offset"].repeat(2, 1, 1, 1)}, impl="native")
    with pytest.raises(ValueError, match="mask must be"):                 # output size of the mask
        deform_conv2d(**{**args, "mask": torch.ones(1, 9, 4, 5)}, impl="native")


def test_module_same_with_both_implementations():
    torch.manual_seed(7)
    native = ModulatedDeformConv2d(4, 6, impl="native")
    with torch.no_grad():  # leave the zero initialisation, so that offsets and masks vary
        native.offset_mask.weight.normal_(0, 0.5)
        native.offset_mask.bias.normal_(0, 1)
    reference = ModulatedDeformConv2d(4, 6, impl="torchvision")
    reference.load_state_dict(native.state_dict())
    x = torch.randn(2, 4, 9, 7)
    results = []
    for layer in (native, reference):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        params = [xi, layer.weight, layer.bias, layer.offset_mask.weight, layer.offset_mask.bias]
        results.append([out, *torch.autograd.grad(out.square().sum(), params)])
    for a, b in zip(*results):
        _assert_close(a, b, rel=1e-4)


def test_offset_gradient_at_initialisation_matches_torchvision():
    # zero offsets with padding 1 put the outer taps of the first row and column exactly on -1,
    # where torchvision's sample is 0 but its gradient towards the map is not
    torch.manual_seed(8)
    layers = {impl: ModulatedDeformConv2d(3, 4, impl=impl) for impl in ("native", "torchvision")}
    layers["torchvision"].load_state_dict(layers["native"].state_dict())
    x = torch.randn(2, 3, 6, 5)
    grads = []
    for layer in layers.values():
        out = layer(x)
        grads.append(torch.autograd.grad(out.square().sum(), layer.offset_mask.weight)[0])
    assert grads[1].abs().max() > 0
    _assert_close(*grads, rel=1e-4)


def test_set_impl_switches_every_dcn_and_returns_the_old_settings():
    model = torch.nn.Sequential(ModulatedDeformConv2d(2, 2, impl="native"), torch.nn.ReLU(),
                                ModulatedDeformConv2d(2, 2, impl="torchvision"))
    previous = set_impl(model, "auto")
    assert [m.impl for m in (model[0], model[2])] == ["auto", "auto"]
    assert list(previous.values()) == ["native", "torchvision"]
    with pytest.raises(ValueError, match="impl"):
        set_impl(model, "fast")


def test_second_derivatives_are_refused_not_wrong():
    args = _inputs(1, 2, 2, (4, 5), (3, 3), 1, 1, 1, True, max_offset=2.0, seed=9)
    x = args["input"].requires_grad_()
    out = deform_conv2d(**args, impl="native")
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward"):
        grad.sum().backward()
