"""Model factory: every backbone of the two papers behind one function, :func:`build_model`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .cornernet import HourglassCornerNet
from .dla import dla34
from .hourglass import HOURGLASS_104, HOURGLASS_SMALL, HourglassBackbone, hourglass104
from .resnet import ResNetCenterNet

__all__ = ["ARCHS", "PAPER_ARCHS", "SMALL_ARCHS", "TASKS", "CORNERNET_ARCHS", "build_model", "input_multiple"]

PAPER_ARCHS = ("resnet18", "resnet101", "dla34", "hourglass104")
SMALL_ARCHS = ("dla-small", "hourglass-small")  # the same code at CPU-lesson size, opt-in by name
ARCHS = PAPER_ARCHS + SMALL_ARCHS
TASKS = ("centernet", "cornernet")
CORNERNET_ARCHS = ("hourglass104", "hourglass-small")  # CornerNet is defined on the Hourglass only


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
        arch: one of :data:`ARCHS`: the paper's four backbones, or ``"dla-small"`` /
            ``"hourglass-small"``, the same networks with fewer channels (and levels) for CPU
            lessons and tests.
        task: one of :data:`TASKS`: ``"centernet"`` (every backbone) or ``"cornernet"`` (the
            Hourglass archs of :data:`CORNERNET_ARCHS`; see :mod:`minicenternet.models.cornernet`).
        num_classes: ``C``, the heatmap channels.
        pretrained: ``False``; ``True`` for torchvision's ImageNet trunk weights (ResNet); or the
            path of a local file: a trunk ``state_dict`` (ResNet; DLA: the original ImageNet
            DLA-34 checkpoint) or a whole model's (Hourglass).
        dcn: DCNv2 in the upsampling path (ResNet, DLA); ``False`` uses plain 3x3 convolutions.
            Hourglass has none.
        up_init: how the ResNet's transposed convolutions start: ``"reference"`` (the official
            code's bilinear fill, which reaches only output channel 0) or ``"identity"`` (every
            channel upsampled bilinearly); see :func:`minicenternet.models.layers.fill_bilinear`.

    Returns:
        An ``nn.Module`` mapping ``(B, 3, H, W)`` images (``H, W`` divisible by its
        ``pad_multiple``: 32, 128 for Hourglass-104) to the dict of head outputs at stride 4:
        ``{"hm": (B, C, H/4, W/4), "wh": (B, 2, H/4, W/4), "reg": (B, 2, H/4, W/4)}``, or for
        ``task="cornernet"`` ``{"tl_hm", "br_hm": (B, C, H/4, W/4), "tl_emb", "br_emb":
        (B, 1, H/4, W/4), "tl_off", "br_off": (B, 2, H/4, W/4)}``. Hourglass in training mode
        returns a list of such dicts, one per stack (intermediate supervision).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if task == "cornernet":
        if arch not in CORNERNET_ARCHS:
            raise ValueError(f"task 'cornernet' needs an Hourglass backbone, one of {CORNERNET_ARCHS}; got {arch!r}")
        config = HOURGLASS_SMALL if arch == "hourglass-small" else HOURGLASS_104
        return HourglassCornerNet(num_classes, pretrained, config)
    if arch in ("resnet18", "resnet101"):
        return ResNetCenterNet(arch, num_classes, pretrained=pretrained, dcn=dcn, up_init=up_init)
    if arch in ("dla34", "dla-small"):
        return dla34(num_classes, pretrained=pretrained, dcn=dcn, small=arch == "dla-small")
    return hourglass104(num_classes, pretrained=pretrained, small=arch == "hourglass-small")  # the rest of ARCHS


def input_multiple(arch: str) -> int:
    """The number an input side of ``arch`` must be a multiple of, the built model's
    ``pad_multiple``, known without building it: 32 for ResNet and DLA (their stride), the
    Hourglass's stride 4 times 2 per level (128 for Hourglass-104, 32 for the small one)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if arch in ("hourglass104", "hourglass-small"):
        config = HOURGLASS_SMALL if arch == "hourglass-small" else HOURGLASS_104
        return HourglassBackbone.stride * 2**config.levels
    return 32
