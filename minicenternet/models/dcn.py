"""Modulated deformable convolution (DCNv2) in plain PyTorch, fast on CPU.

DCNv2 (Zhu et al., 2019, "Deformable ConvNets v2", Eq. 3) computes, at every output position
``p``,

    y(p) = sum_k  w_k * x(p + p_k + dp_k) * m_k,

a ``kh x kw`` convolution whose ``K = kh * kw`` taps ``p_k`` are moved by learned offsets
``dp_k`` and weighted by learned masks ``m_k``; ``x`` at a fractional position is the bilinear
interpolation of its four neighbouring pixels, a pixel outside the map counting as zero.

How it is computed here (``impl="native"``): the interpolation is a *weighted sum of four rows*
of the input seen channels-last as a table ``(B * H * W, C)``. The four row indices and the
four weights (bilinear weight times validity times mask) are computed once per
``(batch, output position, tap)`` and shared by all ``C`` channels; one
:func:`torch.nn.functional.embedding_bag` (mode ``"sum"`` with ``per_sample_weights``) then
gathers and sums them into the column buffer ``(B * H_out * W_out, K * C)``, and one matrix
product with the weight ``(C_out, K * C)`` finishes the convolution. Autograd differentiates
it: ``embedding_bag`` returns the gradient of each neighbour's weight (a dot product with the
sampled row), from which the offset and mask gradients follow through the weight formula; the
input gradient is ``S^T @ grad_cols`` with ``S`` the sparse sampling matrix (four weights a
row), one sparse-dense product (:class:`_ScatterGradToTable`).

``impl="auto"`` takes torchvision's kernel on CUDA, where the two have not been compared yet, and
this formulation everywhere else: on a CPU ``benchmarks/bench_dcn.py`` measures it several times
faster than ``torchvision.ops.deform_conv2d``'s kernel (figures in benchmarks/README.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

__all__ = ["IMPLS", "ModulatedDeformConv2d", "deform_conv2d", "resolve_impl", "set_impl"]

IMPLS = ("native", "torchvision", "auto")


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"native"`` or ``"torchvision"``: ``"auto"`` picks torchvision's kernel on CUDA, native
    everywhere else (the CPU, where it is faster, and devices torchvision has no kernel for)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "torchvision" if device.type == "cuda" else "native"
    return impl


def set_impl(model: nn.Module, impl: str) -> dict[nn.Module, str]:
    """Switch every :class:`ModulatedDeformConv2d` of ``model`` to ``impl``; return each one's
    previous setting (to restore them)."""
    resolve_impl(impl, torch.device("cpu"))
    previous = {}
    for module in model.modules():
        if isinstance(module, ModulatedDeformConv2d):
            previous[module], module.impl = module.impl, impl
    return previous


def _bilinear_taps(
    offset: Tensor,
    mask: Tensor | None,
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Rows and weights of the four bilinear neighbours of every sample.

    Tap ``k = i * kw + j`` of output ``(oy, ox)`` samples ``y = oy * s - pad + i * d + dy``,
    ``x = ox * s - pad + j * d + dx``. Its neighbours are ``(y0, x0), (y0, x0 + 1),
    (y0 + 1, x0), (y0 + 1, x0 + 1)`` with ``y0 = floor(y)``, weighted ``(1 - ly)(1 - lx),
    (1 - ly) lx, ly (1 - lx), ly lx`` (``ly = y - y0``). A neighbour outside the map gets
    weight 0 (its row index is clamped into range, so it is read but contributes nothing), and,
    as in torchvision, a whole sample with ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W``
    is zero (at exactly ``y = -1`` or ``x = -1`` it still passes a gradient to its offset, as
    torchvision's does). The geometry is computed in float32 (float64 for float64 offsets) whatever the input
    dtype, since bf16 cannot even represent pixel positions above 256 exactly.

    Args:
        offset: ``(B, 2K, H_out, W_out)``, ``(dy, dx)`` of tap ``k`` in channels ``2k, 2k + 1``.
        mask: ``(B, K, H_out, W_out)`` or ``None`` (no modulation).
        size: ``(H, W)`` of the input.

    Returns:
        ``index``: ``(B * H_out * W_out * K, 4)`` int64 rows of the ``(B * H * W, C)`` table,
        ordered batch, output row, output column, tap; ``weight``: the same shape, float32 or
        float64.
    """
    batch, _, out_h, out_w = offset.shape
    height, width = size
    taps = kernel[0] * kernel[1]
    device = offset.device
    dtype = torch.promote_types(offset.dtype, torch.float32)
    off = offset.to(dtype).view(batch, taps, 2, out_h, out_w)
    tap = torch.arange(taps, device=device)
    grid_y = (torch.arange(out_h, device=device) * stride[0] - padding[0]).view(out_h, 1, 1)
    grid_x = (torch.arange(out_w, device=device) * stride[1] - padding[1]).view(1, out_w, 1)
    y = grid_y + (tap // kernel[1]) * dilation[0] + off[:, :, 0].permute(0, 2, 3, 1)  # [B, H_out, W_out, K]
    x = grid_x + (tap % kernel[1]) * dilation[1] + off[:, :, 1].permute(0, 2, 3, 1)
    y0, x0 = y.floor(), x.floor()
    ly, lx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    # y >= -1 gives y0 + 1 >= 0, y < H gives y0 <= H - 1. At y = -1 exactly the sample is 0 (its
    # only valid neighbour has weight ly = 0) but its gradient towards row 0 is not, as torchvision's
    inside = (y >= -1) & (y < height) & (x >= -1) & (x < width)
    zero = ly.new_zeros(())
    wy0 = torch.where(inside & (y0 >= 0), 1 - ly, zero)    # where, not a product: no nan from inf offsets
    wy1 = torch.where(inside & (y0 < height - 1), ly, zero)
    wx0 = torch.where(x0 >= 0, 1 - lx, zero)
    wx1 = torch.where(x0 < width - 1, lx, zero)
    weight = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], -1)  # [B, H_out, W_out, K, 4]
    if mask is not None:
        weight = weight * mask.to(dtype).permute(0, 2, 3, 1).unsqueeze(-1)
    row0 = y0.clamp(0, height - 1) * width
    row1 = (y0 + 1).clamp(0, height - 1) * width
    col0, col1 = x0.clamp(0, width - 1), (x0 + 1).clamp(0, width - 1)
    base = (torch.arange(batch, device=device) * (height * width)).view(batch, 1, 1, 1)
    index = torch.stack([row0 + col0, row0 + col1, row1 + col0, row1 + col1], -1) + base.unsqueeze(-1)
    return index.view(-1, 4), weight.view(-1, 4)


class _ScatterGradToTable(torch.autograd.Function):
    """Identity on the columns whose backward also returns the gradient of the sampled table.

    ``cols = S @ table`` with ``S`` the ``(N, B*H*W)`` sampling matrix (four weights a row).
    ``embedding_bag``'s own table gradient scatters row by row; ``S^T @ grad_cols`` as one
    sparse-dense product is 2-3x faster on the CPU, so the table enters ``embedding_bag``
    detached and its gradient comes from here (the bilinear weights still get theirs from
    ``embedding_bag``).
    """

    @staticmethod
    def forward(ctx, cols: Tensor, table: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(index, weight)
        ctx.rows = table.shape[0]
        return cols.view_as(cols)

    @staticmethod
    @once_differentiable  # the weights come in detached: no second derivative through them
    def backward(ctx, grad_cols: Tensor) -> tuple[Tensor, Tensor | None, None, None]:
        grad_table = None
        if ctx.needs_input_grad[1]:
            index, weight = ctx.saved_tensors
            samples = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
            dtype = torch.promote_types(grad_cols.dtype, torch.float32)  # sparse kernels: float32/64 only
            transposed = torch.sparse_coo_tensor(
                torch.stack([index.reshape(-1), samples]), weight.reshape(-1).to(dtype), (ctx.rows, index.shape[0]),
                check_invariants=False,
            )
            grad_table = torch.sparse.mm(transposed, grad_cols.to(dtype)).to(grad_cols.dtype)
        return grad_cols, grad_table, None, None


def _native(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
) -> Tensor:
    """DCNv2 as one ``embedding_bag`` (bilinear sampling) and one matrix product."""
    batch, channels, height, width = input.shape
    out_channels, _, kh, kw = weight.shape
    out_h, out_w = offset.shape[2:]
    index, taps = _bilinear_taps(offset, mask, (height, width), (kh, kw), stride, padding, dilation)
    table = input.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # free if channels_last
    cols = F.embedding_bag(index, table.detach(), mode="sum", per_sample_weights=taps.to(input.dtype))
    cols = _ScatterGradToTable.apply(cols, table, index, taps.detach())
    cols = cols.view(batch * out_h * out_w, kh * kw * channels)  # [B*P, K*C], tap-major like the weight below
    kernel = weight.permute(0, 2, 3, 1).reshape(out_channels, kh * kw * channels)  # [C_out, K*C]
    out = cols @ kernel.t() if bias is None else torch.addmm(bias, cols, kernel.t())
    return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)  # channels_last memory


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    """Deformable convolution v1/v2, the semantics of :func:`torchvision.ops.deform_conv2d`.

    Args:
        input: ``(B, C, H, W)``.
        offset: ``(B, 2 * kh * kw, H_out, W_out)``: ``(dy, dx)`` in pixels for each tap, taps in
            row-major kernel order. One offset group only.
        weight: ``(C_out, C, kh, kw)`` (no weight groups).
        bias: ``(C_out,)`` or ``None``.
        stride, padding, dilation: as in :func:`torch.nn.functional.conv2d`.
        mask: ``(B, kh * kw, H_out, W_out)`` modulation (DCNv2), or ``None`` (DCNv1).
        impl: ``"native"`` (this module's PyTorch formulation), ``"torchvision"``, or
            ``"auto"`` (:func:`resolve_impl`).

    Returns:
        ``(B, C_out, H_out, W_out)``. The native path computes in the inputs' dtype (autocast
        off; bf16 inputs: bf16 columns and matrix product, float32 sampling geometry) and returns
        channels_last memory.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if resolve_impl(impl, input.device) == "torchvision":
        return torchvision.ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    taps = weight.shape[2] * weight.shape[3]
    out_size = tuple(
        (input.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )
    for name, tensor in (("offset", offset), ("mask", mask)):
        if tensor is not None and (tensor.shape[0] != input.shape[0] or tuple(tensor.shape[2:]) != out_size):
            raise ValueError(f"{name} must be (B={input.shape[0]}, *, {out_size[0]}, {out_size[1]}) for this input, "
                             f"stride, padding and dilation; got {tuple(tensor.shape)}")
    if weight.shape[1] != input.shape[1]:
        raise ValueError(f"native deform_conv2d has no weight groups: weight {tuple(weight.shape)}, input {tuple(input.shape)}")
    if offset.shape[1] != 2 * taps:
        raise ValueError(f"native deform_conv2d supports one offset group: offset has {offset.shape[1]} channels, expected {2 * taps}")
    if mask is not None and mask.shape[1] != taps:
        raise ValueError(f"mask has {mask.shape[1]} channels, expected {taps}")
    with torch.autocast(input.device.type, enabled=False):  # computes in the inputs' dtype
        return _native(input, offset, weight, bias, stride, padding, dilation, mask)


class ModulatedDeformConv2d(nn.Module):
    """DCNv2: a ``k x k`` convolution sampled at learned offsets and weighted by learned masks.

    A plain convolution (zero-initialised, so training starts from a regular grid) predicts, at
    every output position, ``2 k^2`` offsets ``(dy, dx)`` and ``k^2`` mask logits; the masks go
    through a sigmoid (0.5 at initialisation, as in the reference DCNv2 module). The deformable
    convolution runs in float32 even under autocast.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: ``k``.
        stride: stride of the convolution.
        padding: zero padding.
        dilation: dilation of the sampling grid.
        bias: add a learned bias.
        impl: ``"native"``, ``"torchvision"`` or ``"auto"``, see :func:`deform_conv2d`.

    Shape:
        ``(B, in_channels, H, W) -> (B, out_channels, H_out, W_out)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        bias: bool = True,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        resolve_impl(impl, torch.device("cpu"))  # reject unknown names now, not at the first forward
        self.stride, self.padding, self.dilation, self.impl = stride, padding, dilation, impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.offset_mask = nn.Conv2d(
            in_channels, 3 * kernel_size * kernel_size, kernel_size, stride, padding, dilation, bias=True
        )
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.offset_mask(x)
        k2 = self.weight.shape[2] * self.weight.shape[3]
        offset, mask = out[:, : 2 * k2], torch.sigmoid(out[:, 2 * k2 :])
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return deform_conv2d(
            x.to(dtype), offset.to(dtype), self.weight.to(dtype), bias, stride=self.stride,
            padding=self.padding, dilation=self.dilation, mask=mask.to(dtype), impl=self.impl,
        )
