"""CornerNet (Law & Deng, 2018) on the stacked Hourglass: corner pooling modules and corner heads.

CornerNet detects a box as a pair of corners (Sec. 3.1). On each stack's features, for each
corner type, a prediction module (Sec. 3.4, Fig. 7) builds features where a corner lies:

* two 3x3 conv-BN-ReLU branches (128 channels in the official model), pooled in the corner's two
  directions by :func:`~minicenternet.models.layers.corner_pool` (top-left: ``"top"`` and
  ``"left"``; bottom-right: ``"bottom"`` and ``"right"``) and summed (Eq. 6);
* a 3x3 conv-BN back to the input width, plus a 1x1 conv-BN shortcut of the input, ReLU (the
  paper's modified residual block);
* a 3x3 conv-BN-ReLU.

On these features three heads, each 3x3 conv (256, with bias) -> ReLU -> 1x1 conv
(:func:`~minicenternet.models.heads.make_head`): the corner heatmaps (``C`` channels, Sec. 3.2;
the last bias -2.19, a 0.1 prior probability, as the official code and CenterNet start), the
embeddings (1 channel, Sec. 3.3, associative embedding) and the offsets (2 channels, Eq. 2). The
embedding and offset heads keep PyTorch's default initialisation, as the official code. The
heatmaps run in fp32 under autocast, as CenterNet's (see :mod:`minicenternet.models.heads`).

The backbone, the stacking and the intermediate supervision are :class:`HourglassNet`'s: heads on
both stacks in training, the last stack's alone in evaluation (Sec. 3.5).

Parameters for 80 classes (HOURGLASS_SMALL: pooling branches ``head_channels // 2`` = 16 wide):

    part                                       HOURGLASS_104   HOURGLASS_SMALL
    backbone (stem, hourglasses, merges)         187,700,352           947,856
    corner modules (2 stacks x tl, br)             6,168,576            97,280
    heads (2 stacks x tl, br x hm, emb, off)       7,166,284           121,932
    total (the official: 201,035,212)            201,035,212         1,167,068
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from .heads import HM_PRIOR_BIAS, make_head, run_in_fp32
from .hourglass import HOURGLASS_104, HourglassConfig, HourglassNet, conv_bn_relu
from .layers import corner_pool

__all__ = ["CORNER_DIRECTIONS", "CornerPoolModule", "CornerHeads", "CornerNetHeads", "HourglassCornerNet"]

# corner type -> the two pooling directions of its prediction module (Sec. 3.4)
CORNER_DIRECTIONS = {"tl": ("top", "left"), "br": ("bottom", "right")}


def conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """``k x k`` convolution (no bias, ``same`` padding) and BN, no activation."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


class CornerPoolModule(nn.Module):
    """The corner pooling part of a prediction module (Fig. 7): features in which a corner lies.

    ``conv(ReLU(BN(3x3(pool_1(b_1(x)) + pool_2(b_2(x)))) + BN(1x1(x))))``, ``b_k`` 3x3
    conv-BN-ReLU branches, ``pool_k`` :func:`corner_pool` in ``directions[k]``, ``conv`` a 3x3
    conv-BN-ReLU.

    Args:
        channels: width of the input and of the output (256 in the official model).
        directions: the two pooling directions, ``("top", "left")`` for top-left corners or
            ``("bottom", "right")`` for bottom-right ones.
        pool_channels: width of the two pooled branches (128 in the official model).

    Shape:
        ``(B, channels, H, W) -> (B, channels, H, W)``.
    """

    def __init__(self, channels: int, directions: tuple[str, str], pool_channels: int = 128) -> None:
        super().__init__()
        self.directions = tuple(directions)
        self.branches = nn.ModuleList(conv_bn_relu(channels, pool_channels, 3) for _ in self.directions)
        self.pooled = conv_bn(pool_channels, channels, 3)
        self.skip = conv_bn(channels, channels, 1)
        self.conv = conv_bn_relu(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled = sum(
            corner_pool(branch(x), direction) for branch, direction in zip(self.branches, self.directions, strict=True)
        )  # (B, pool_channels, H, W)
        return self.conv(F.relu(self.pooled(pooled) + self.skip(x), inplace=True))


class CornerHeads(nn.Module):
    """Prediction module of one corner type: corner pooling, then the heatmap, embedding and offset heads.

    Args:
        in_channels: width of the stack's features (256).
        num_classes: ``C``, the heatmap channels.
        directions: the corner's pooling directions (see :data:`CORNER_DIRECTIONS`).
        head_channels: width of each head's 3x3 convolution (256).
        pool_channels: width of the pooled branches (128).

    Shape:
        ``(B, in_channels, H, W)`` -> ``{"hm": (B, C, H, W), "emb": (B, 1, H, W), "off": (B, 2, H, W)}``;
        ``hm`` holds fp32 logits, under autocast too.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        directions: tuple[str, str],
        head_channels: int = 256,
        pool_channels: int = 128,
    ) -> None:
        super().__init__()
        self.pool = CornerPoolModule(in_channels, directions, pool_channels)
        self.hm = make_head(in_channels, head_channels, num_classes)
        self.emb = make_head(in_channels, head_channels, 1)
        self.off = make_head(in_channels, head_channels, 2)
        nn.init.constant_(self.hm[-1].bias, HM_PRIOR_BIAS)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        pooled = self.pool(features)
        return {"hm": run_in_fp32(self.hm, pooled), "emb": self.emb(pooled), "off": self.off(pooled)}


class CornerNetHeads(nn.Module):
    """The two prediction modules of CornerNet (top-left and bottom-right) on one stack's features.

    Args:
        in_channels: width of the stack's features (256).
        num_classes: ``C``.
        head_channels: width of the heads' 3x3 convolutions (256 in the official model).
        pool_channels: width of the corner pooling branches (128 in the official model).

    Shape:
        ``(B, in_channels, H, W)`` -> ``{"tl_hm", "br_hm": (B, C, H, W) logits, "tl_emb",
        "br_emb": (B, 1, H, W), "tl_off", "br_off": (B, 2, H, W)}``.
    """

    def __init__(self, in_channels: int, num_classes: int, head_channels: int = 256, pool_channels: int = 128) -> None:
        super().__init__()
        self.corners = nn.ModuleDict(
            {
                corner: CornerHeads(in_channels, num_classes, directions, head_channels, pool_channels)
                for corner, directions in CORNER_DIRECTIONS.items()
            }
        )

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        per_corner = {corner: heads(features) for corner, heads in self.corners.items()}
        return {f"{corner}_{name}": per_corner[corner][name] for name in ("hm", "emb", "off") for corner in per_corner}


class HourglassCornerNet(HourglassNet):
    """CornerNet on Hourglass-104 (CornerNet Sec. 3.5, 4.1): both prediction modules on each stack.

    Args:
        num_classes: ``C``.
        pretrained: ``False``, or the path of a whole model's ``state_dict`` (same ``C``).
        config: :data:`HOURGLASS_104` (heads 256 wide, pooling branches 128, as the official code)
            or :data:`HOURGLASS_SMALL`; the heads take ``config.head_channels``, the pooling
            branches half of it.

    Shape:
        ``(B, 3, H, W)``, ``H, W`` divisible by ``pad_multiple`` -> in training mode a list of one
        :class:`CornerNetHeads` dict per stack, in eval mode the last stack's dict, maps at ``H/4, W/4``.

    Example::

        >>> from minicenternet.models.hourglass import HOURGLASS_SMALL
        >>> model = HourglassCornerNet(num_classes=5, config=HOURGLASS_SMALL).eval()
        >>> {k: tuple(v.shape) for k, v in model(torch.zeros(1, 3, 64, 96)).items()}  # doctest: +NORMALIZE_WHITESPACE
        {'tl_hm': (1, 5, 16, 24), 'br_hm': (1, 5, 16, 24), 'tl_emb': (1, 1, 16, 24),
         'br_emb': (1, 1, 16, 24), 'tl_off': (1, 2, 16, 24), 'br_off': (1, 2, 16, 24)}
    """

    task = "cornernet"

    def __init__(
        self, num_classes: int = 80, pretrained: bool | str | Path = False, config: HourglassConfig = HOURGLASS_104
    ) -> None:
        make_heads = partial(
            CornerNetHeads,
            num_classes=num_classes,
            head_channels=config.head_channels,
            pool_channels=config.head_channels // 2,
        )
        super().__init__(make_heads, config, pretrained)
