"""Model factory: every backbone of the two papers behind one function, :func:`build_model`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .resnet import ResNetCenterNet

__all__ = ["ARCHS", "build_model"]

ARCHS = ("resnet18", "resnet101", "dla34", "hourglass104")
_PENDING = {
    "dla34": "DLA-34 (iterative and hierarchical deep aggregation)",
    "hourglass104": "Hourglass-104",
}


def build_model(
    arch: str = "resnet18",
    task: str = "centernet",
    num_classes: int = 80,
    pretrained: bool | str | Path = False,
    dcn: bool = True,
    up_init: str = "reference",
) -> nn.Module:
    """Build a detector.

    Args:
        arch: one of :data:`ARCHS`.
        task: ``"centernet"`` (CornerNet joins with the Hourglass backbone).
        num_classes: ``C``, the heatmap channels.
        pretrained: ``False``; ``True`` for torchvision's ImageNet trunk weights; or the path of
            a local trunk ``state_dict``.
        dcn: DCNv2 in the upsampling path (ResNet, DLA); ``False`` uses plain 3x3 convolutions.
        up_init: how the ResNet's transposed convolutions start: ``"reference"`` (the official
            code's bilinear fill, which reaches only output channel 0) or ``"identity"`` (every
            channel upsampled bilinearly); see :func:`minicenternet.models.layers.fill_bilinear`.

    Returns:
        An ``nn.Module`` mapping ``(B, 3, H, W)`` images (``H, W`` divisible by 32) to the dict
        of head outputs at stride 4: ``{"hm": (B, C, H/4, W/4), "wh": (B, 2, H/4, W/4),
        "reg": (B, 2, H/4, W/4)}``.
    """
    if task != "centernet":
        raise ValueError(f"unknown task {task!r}; available: 'centernet'")
    if arch in ("resnet18", "resnet101"):
        return ResNetCenterNet(arch, num_classes, pretrained=pretrained, dcn=dcn, up_init=up_init)
    if arch in _PENDING:
        raise NotImplementedError(f"{_PENDING[arch]} is not implemented yet; available now: resnet18, resnet101")
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
