"""Building blocks shared by the backbones: modulated deformable convolution and upsampling.

Deformable convolution v2 (Zhu et al., 2019) is what CenterNet puts in its ResNet and DLA
upsampling paths (CenterNet Sec. 5, "Implementation details"); here it is plain PyTorch through
``torchvision.ops.deform_conv2d``, with no extension to compile.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

__all__ = ["ModulatedDeformConv2d", "fill_bilinear", "conv3x3"]


class ModulatedDeformConv2d(nn.Module):
    """DCNv2: a ``k x k`` convolution sampled at learned offsets and weighted by learned masks.

    A plain convolution (zero-initialised, so training starts from a regular grid) predicts, at
    every output position, ``2 k^2`` offsets ``(dy, dx)`` and ``k^2`` mask logits; the masks go
    through a sigmoid (0.5 at initialisation, as in the reference DCNv2 module).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: ``k``.
        stride: stride of the convolution.
        padding: zero padding.
        dilation: dilation of the sampling grid.
        bias: add a learned bias.

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
    ) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
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
        with torch.autocast(device_type=x.device.type, enabled=False):
            return deform_conv2d(
                x.to(dtype), offset.to(dtype), self.weight.to(dtype), bias,
                stride=self.stride, padding=self.padding, dilation=self.dilation, mask=mask.to(dtype),
            )


def conv3x3(in_channels: int, out_channels: int, dcn: bool) -> nn.Module:
    """3x3, stride-1 convolution: DCNv2 when ``dcn`` else a plain ``nn.Conv2d`` (both with bias)."""
    if dcn:
        return ModulatedDeformConv2d(in_channels, out_channels, 3, padding=1)
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


@torch.no_grad()
def fill_bilinear(up: nn.ConvTranspose2d, variant: str = "reference") -> None:
    """Initialise a stride-2, 4x4 transposed convolution to bilinear upsampling.

    The kernel is the outer product of ``1 - |i / f - c|`` with ``f = ceil(k / 2)`` and
    ``c = (2f - 1 - f % 2) / (2f)``.

    * ``variant="reference"`` copies the official CenterNet ResNet code: the bilinear kernel is
      written into ``weight[c, 0]`` for every input channel ``c`` (all inputs feed output channel
      0 bilinearly) and every other ``weight[c, o]`` keeps PyTorch's default initialisation.
    * ``variant="identity"`` makes the layer an exact per-channel bilinear upsampler:
      ``weight[c, c]`` is the kernel and everything else 0 (what DLA's grouped upsampling does).
    """
    weight = up.weight
    k = weight.shape[2]
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    ramp = torch.tensor([1 - abs(i / f - c) for i in range(k)], dtype=weight.dtype)
    kernel = ramp[:, None] * ramp[None, :]
    if variant == "reference":
        weight[:, 0] = kernel
    elif variant == "identity":
        weight.zero_()
        for channel in range(min(weight.shape[0], weight.shape[1])):
            weight[channel, channel] = kernel
    else:
        raise ValueError(f"variant must be 'reference' or 'identity', got {variant!r}")
