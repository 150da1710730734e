"""Building blocks shared by the backbones: modulated deformable convolution and upsampling.

Deformable convolution v2 (Zhu et al., 2019) is what CenterNet puts in its ResNet and DLA
upsampling paths (CenterNet Sec. 5, "Implementation details"); it lives in
:mod:`minicenternet.models.dcn` (plain PyTorch, no extension to compile) and is re-exported here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .dcn import ModulatedDeformConv2d

__all__ = ["ModulatedDeformConv2d", "fill_bilinear", "conv3x3"]


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
