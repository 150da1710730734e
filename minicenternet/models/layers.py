"""Building blocks shared by the models: deformable convolution, upsampling, corner pooling.

Deformable convolution v2 (Zhu et al., 2019) is what CenterNet puts in its ResNet and DLA
upsampling paths (CenterNet Sec. 5, "Implementation details"); it lives in
:mod:`minicenternet.models.dcn` (plain PyTorch, no extension to compile) and is re-exported here.
CornerNet's corner pooling (:func:`corner_pool`) is a cumulative maximum, so it needs no extension
either.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .dcn import ModulatedDeformConv2d

__all__ = ["ModulatedDeformConv2d", "fill_bilinear", "conv3x3", "CORNER_POOL_DIRECTIONS", "corner_pool"]

# direction -> (dimension of (B, C, H, W) scanned, whether the scan runs from the far end backwards)
_CORNER_POOL_SCANS = {"top": (2, True), "left": (3, True), "bottom": (2, False), "right": (3, False)}
CORNER_POOL_DIRECTIONS = tuple(_CORNER_POOL_SCANS)


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


def corner_pool(x: Tensor, direction: str) -> Tensor:
    """Corner pooling (CornerNet Sec. 3.4, Eq. 6 and Fig. 6): a running maximum along a row or column.

    The directions carry the names of the reference code's ``TopPool``, ``LeftPool``,
    ``BottomPool`` and ``RightPool``; for ``x`` of shape ``(B, C, H, W)``:

    * ``"top"``: ``out[..., i, j] = max(x[..., i:, j])``, the location and everything below it
      (the scan runs from the bottom row upwards);
    * ``"left"``: ``out[..., i, j] = max(x[..., i, j:])``, the location and everything to its right;
    * ``"bottom"``: ``out[..., i, j] = max(x[..., :i + 1, j])``, the location and everything above;
    * ``"right"``: ``out[..., i, j] = max(x[..., i, :j + 1])``, the location and everything to its left.

    A top-left corner sums ``"top"`` and ``"left"`` pooling of two feature maps (Eq. 6: ``t_ij`` the
    maximum of ``f_t`` from row ``i`` down to ``H``, ``l_ij`` of ``f_l`` from column ``j`` right to
    ``W``): the corner lies above and left of the object, so it looks down and right for it. A
    bottom-right corner sums ``"bottom"`` and ``"right"``.

    Computed by ``torch.cummax`` (on the flipped tensor for ``"top"`` and ``"left"``): plain PyTorch,
    any device and dtype ``cummax`` supports, differentiable. The gradient of each output goes to
    the one input position that holds its maximum. Where several positions tie for the maximum,
    the reference's C++ backward (a strict ``>`` while it scans) sends it to the tied position
    farthest from the output, the first one its scan met; ``cummax`` returns the last index that
    reaches the maximum (it compares with ``>=``), so here the gradient goes to the tied position
    nearest the output. In CornerNet the pooled maps come out of a ReLU: ties are, in practice,
    zeros of that ReLU (two positive float activations are almost never equal), and the ReLU passes
    no gradient at 0 wherever the tie sends it, so both rules give the same parameter gradients.

    Args:
        x: ``(B, C, H, W)`` features.
        direction: ``"top"``, ``"left"``, ``"bottom"`` or ``"right"``.

    Returns:
        ``(B, C, H, W)``, the running maxima.
    """
    if direction not in _CORNER_POOL_SCANS:
        raise ValueError(f"corner_pool direction must be one of {CORNER_POOL_DIRECTIONS}, got {direction!r}")
    if x.dim() != 4:
        raise ValueError(f"corner_pool expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    dim, backwards = _CORNER_POOL_SCANS[direction]
    if backwards:
        return x.flip(dim).cummax(dim).values.flip(dim)
    return x.cummax(dim).values
