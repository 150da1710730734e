"""The stacked Hourglass-104 of CornerNet and CenterNet, with heads on every stack.

An hourglass (Newell et al., 2016, "Stacked Hourglass Networks") halves the resolution level by
level and doubles it back, adding at every level a skip branch kept at that level's resolution.
CornerNet (Sec. 3.5) builds Hourglass-104 from residual blocks; CenterNet (Sec. 4) keeps it:

* stem: 7x7 stride-2 conv-BN-ReLU (128 channels), then a stride-2 residual block (256): stride 4.
* two 5-level hourglasses, channels 256, 256, 384, 384, 384, 512, residual blocks 2, 2, 2, 2, 2,
  4. A level (:class:`HourglassModule`) returns ``up1(x)`` (residual blocks at its resolution)
  plus the nearest-neighbour 2x upsampling of ``low3(low2(low1(x)))``: ``low1`` goes down with
  a stride-2 residual block (no max-pooling), ``low2`` is the next level (at the bottom, the 4
  residual blocks of 512 channels), ``low3`` returns to the level's channels. A 3x3 conv-BN-ReLU
  follows each hourglass.
* between stacks (:class:`InterStackMerge`): 1x1 conv-BN of the stack's input plus 1x1 conv-BN
  of its features, ReLU, a residual block; the result feeds the next hourglass.
* heads on every stack: intermediate supervision (Newell et al. Sec. 3.3), the loss averaging
  over the stacks. Unlike Newell et al., predictions are not added back into the network, and
  only the last stack predicts at test time (CornerNet Sec. 3.5): ``eval()`` runs its heads only.

CornerNet trains the network from scratch (Sec. 4.1), CenterNet starts from ExtremeNet's
weights; none exist for ImageNet, so ``pretrained`` takes a local file. The ``wh`` and ``reg``
heads start at PyTorch's default initialisation, as in the official Hourglass code (the ResNet
and DLA heads start near zero, as theirs).

Parameters with the CenterNet heads for 80 classes:

    part                                  HOURGLASS_104   HOURGLASS_SMALL
    stem                                        938,112            16,912
    2 hourglasses + their 3x3 convs         185,449,472           910,208
    inter-stack merge                         1,312,768            20,736
    heads (2 stacks x hm, wh, reg)            3,583,656            61,032
    total (the official: 191,284,008)       191,284,008         1,008,888
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from .heads import CenterNetHeads
from .weights import load_matching, read_state_dict

__all__ = [
    "HourglassConfig", "HOURGLASS_104", "HOURGLASS_SMALL", "Residual", "HourglassModule", "InterStackMerge",
    "HourglassBackbone", "HourglassNet", "HourglassCenterNet", "load_model_weights", "hourglass104",
]


@dataclass(frozen=True)
class HourglassConfig:
    """Sizes of a stacked hourglass; the number of levels is ``len(channels) - 1``.

    Args:
        stacks: number of hourglasses.
        channels: channels of each level, outermost first; ``channels[0]`` is also the width of
            the stem's output and of the features handed to the heads.
        residuals: residual blocks per level (``up1``, ``low1`` and ``low3`` each get
            ``residuals[i]``; the innermost ``residuals[-1]`` sit at the bottom).
        stem_channels: width of the stem's 7x7 convolution.
        head_channels: width of the heads' 3x3 convolution.
    """

    stacks: int = 2
    channels: tuple[int, ...] = (256, 256, 384, 384, 384, 512)
    residuals: tuple[int, ...] = (2, 2, 2, 2, 2, 4)
    stem_channels: int = 128
    head_channels: int = 256

    def __post_init__(self) -> None:
        one_count_per_level = len(self.channels) >= 2 and len(self.residuals) == len(self.channels)
        if not one_count_per_level or min(self.stacks, *self.residuals) < 1:
            raise ValueError(f"need >= 1 level, one residual count per level and counts >= 1; got {self}")

    @property
    def levels(self) -> int:
        return len(self.channels) - 1


HOURGLASS_104 = HourglassConfig()
HOURGLASS_SMALL = HourglassConfig(
    stacks=2, channels=(32, 32, 48, 64), residuals=(1, 1, 1, 2), stem_channels=16, head_channels=32
)  # the same network at CPU-lesson size: 3 levels, so inputs are padded to a multiple of 32


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """``k x k`` convolution (no bias), BN, ReLU; ``same`` padding, so the size is divided by ``stride``."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the skip (identity, or 1x1 conv-BN where the stride or
    the channels change), ReLU.

    Shape:
        ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x), inplace=True)


def residuals(in_channels: int, out_channels: int, count: int, stride: int = 1) -> nn.Sequential:
    """``count`` residual blocks; the first one changes the channels and applies the stride."""
    blocks = [Residual(in_channels, out_channels, stride)]
    blocks += [Residual(out_channels, out_channels) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


class HourglassModule(nn.Module):
    """One hourglass, built recursively: one level here, the inner levels in ``low2``.

    Shape:
        ``(B, channels[0], H, W) -> (B, channels[0], H, W)``, ``H, W`` divisible by
        ``2 ** (len(channels) - 1)``.
    """

    def __init__(self, channels: tuple[int, ...], counts: tuple[int, ...]) -> None:
        super().__init__()
        outer, inner = channels[0], channels[1]
        self.up1 = residuals(outer, outer, counts[0])  # skip branch at this resolution
        self.low1 = residuals(outer, inner, counts[0], stride=2)  # down one level
        if len(channels) > 2:
            self.low2: nn.Module = HourglassModule(channels[1:], counts[1:])
        else:
            self.low2 = residuals(inner, inner, counts[1])  # the bottom of the hourglass
        self.low3 = nn.Sequential(  # back to this level's channels, still at the lower resolution
            *[Residual(inner, inner) for _ in range(counts[0] - 1)], Residual(inner, outer)
        )

    def forward(self, x: Tensor) -> Tensor:
        low = self.low3(self.low2(self.low1(x)))  # (B, outer, H/2, W/2)
        return self.up1(x) + F.interpolate(low, scale_factor=2, mode="nearest")


class InterStackMerge(nn.Module):
    """Input of the next hourglass (CornerNet Sec. 3.5): ``Residual(ReLU(BN(1x1(x)) + BN(1x1(features))))``.

    Shape:
        ``x`` (the previous hourglass's input) and ``features`` (its output after the 3x3
        conv), both ``(B, C, H/4, W/4)`` -> ``(B, C, H/4, W/4)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inputs = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.features = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.residual = Residual(channels, channels)

    def forward(self, x: Tensor, features: Tensor) -> Tensor:
        return self.residual(F.relu(self.inputs(x) + self.features(features), inplace=True))


class HourglassBackbone(nn.Module):
    """Stem, stacked hourglasses (each with its 3x3 conv-BN-ReLU) and the merges between them.

    Shape:
        ``(B, 3, H, W)``, ``H, W`` divisible by ``4 * 2 ** config.levels`` -> a list of
        ``config.stacks`` feature maps ``(B, channels[0], H/4, W/4)``, one per stack.
    """

    stride = 4  # of the stem, and so of the features

    def __init__(self, config: HourglassConfig = HOURGLASS_104) -> None:
        super().__init__()
        width = self.out_channels = config.channels[0]
        self.stem = nn.Sequential(
            conv_bn_relu(3, config.stem_channels, 7, stride=2), Residual(config.stem_channels, width, stride=2)
        )
        stacks = range(config.stacks)
        self.hourglasses = nn.ModuleList(HourglassModule(config.channels, config.residuals) for _ in stacks)
        self.convs = nn.ModuleList(conv_bn_relu(width, width, 3) for _ in stacks)
        self.merges = nn.ModuleList(InterStackMerge(width) for _ in stacks[1:])

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.stem(images)
        features = []
        for index, (hourglass, conv) in enumerate(zip(self.hourglasses, self.convs, strict=True)):
            features.append(conv(hourglass(x)))
            if index < len(self.merges):
                x = self.merges[index](x, features[-1])
        return features


def load_model_weights(model: nn.Module, source: bool | str | Path) -> None:
    """Load a whole model's ``state_dict`` from a local file (or a minicenternet checkpoint's ``"model"``).

    ``FileNotFoundError`` without a file; ``ValueError`` for ``True`` (no ImageNet weights exist),
    an unreadable file, or weights that do not fit ``model`` (naming the first mismatching keys).
    """
    if source is True:
        raise ValueError(
            "there are no ImageNet weights for Hourglass-104 (CornerNet trains it from scratch, CenterNet "
            "starts from ExtremeNet); pass pretrained=False, or the path of a saved state_dict"
        )
    load_matching(model, read_state_dict(source), source)


class HourglassNet(nn.Module):
    """A stacked hourglass with one set of heads per stack; the task is in ``make_heads``.

    Args:
        make_heads: called once per stack with the feature channels; returns a module mapping
            ``(B, C, H/4, W/4)`` features to a dict of outputs.
        config: the network's sizes, :data:`HOURGLASS_104` or :data:`HOURGLASS_SMALL`.
        pretrained: ``False``, or the path of a whole model's ``state_dict``.

    Shape:
        ``(B, 3, H, W)``, ``H, W`` divisible by ``pad_multiple`` -> in training mode a list of
        ``config.stacks`` output dicts (intermediate supervision), in eval mode the last one alone.
    """

    pad_multiple = 128  # Hourglass-104's; each model sets its own, 4 * 2 ** levels (32 for SMALL)

    def __init__(
        self,
        make_heads: Callable[[int], nn.Module],
        config: HourglassConfig = HOURGLASS_104,
        pretrained: bool | str | Path = False,
    ) -> None:
        super().__init__()
        self.num_stacks = config.stacks
        self.pad_multiple = HourglassBackbone.stride * 2**config.levels
        self.backbone = HourglassBackbone(config)
        self.heads = nn.ModuleList(make_heads(self.backbone.out_channels) for _ in range(config.stacks))
        if pretrained:
            load_model_weights(self, pretrained)

    def forward(self, images: Tensor) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        height, width = images.shape[-2:]
        if height % self.pad_multiple or width % self.pad_multiple:
            raise ValueError(f"input size {height}x{width} is not a multiple of pad_multiple={self.pad_multiple}")
        features = self.backbone(images)
        if self.training:
            return [heads(feature) for heads, feature in zip(self.heads, features, strict=True)]
        return self.heads[-1](features[-1])


class HourglassCenterNet(HourglassNet):
    """CenterNet on Hourglass-104 (CenterNet Sec. 4): ``hm``, ``wh`` and ``reg`` heads on each stack.

    Args:
        num_classes: ``C``.
        pretrained: ``False``, or the path of a whole model's ``state_dict`` (same ``C``).
        config: :data:`HOURGLASS_104` (heads 256 wide, as the official code) or :data:`HOURGLASS_SMALL`.

    Example::

        >>> model = HourglassCenterNet(num_classes=5, config=HOURGLASS_SMALL).eval()
        >>> {k: tuple(v.shape) for k, v in model(torch.zeros(1, 3, 64, 96)).items()}
        {'hm': (1, 5, 16, 24), 'wh': (1, 2, 16, 24), 'reg': (1, 2, 16, 24)}
    """

    task = "centernet"

    def __init__(
        self, num_classes: int = 80, pretrained: bool | str | Path = False, config: HourglassConfig = HOURGLASS_104
    ) -> None:
        make_heads = partial(
            CenterNetHeads, num_classes=num_classes, head_channels=config.head_channels, regression_init="default"
        )
        super().__init__(make_heads, config, pretrained)


def hourglass104(
    num_classes: int = 80, pretrained: bool | str | Path = False, small: bool = False
) -> HourglassCenterNet:
    """Hourglass-104 CenterNet, or with ``small=True`` the same network at :data:`HOURGLASS_SMALL` size."""
    return HourglassCenterNet(num_classes, pretrained, HOURGLASS_SMALL if small else HOURGLASS_104)
