"""CenterNet on DLA-34 (CenterNet Sec. 4, "DLA-34"; figure 6(d) of "Objects as Points").

The trunk is Deep Layer Aggregation (Yu et al., 2018, "Deep Layer Aggregation"): six levels of
16, 32, 64, 128, 256 and 512 channels at strides 1, 2, 4, 8, 16 and 32. Levels 0 and 1 are plain
3x3 convolutions after a 7x7 stem; levels 2-5 are *hierarchical deep aggregation* (HDA) trees of
residual basic blocks of depth 1, 2, 2 and 1, whose *root* nodes merge the outputs of a tree's
children (and, for levels 3-5, the level's own downsampled input) with a 1x1 convolution.

The neck is the up path of DLA for dense prediction (DLA Sec. 4) as CenterNet changes it (its
figure 6(d)): *iterative deep aggregation* (IDA) merges each level into the next finer one after a
3x3 projection and a depth-wise transposed convolution started as a bilinear upsampler, each merge
a node (3x3 conv + BN + ReLU). ``DLAUp`` runs three IDA passes over levels 2-5 (to strides 16, 8,
then 4, each pass re-merging all coarser levels); ``IDAUp`` then merges the pass outputs at strides
4, 8 and 16 into one 64-channel stride-4 map, on which the heads sit. CenterNet's changes: these
extra skip connections into the stride-4 map, and every projection and node a 3x3 DCNv2 (a plain
3x3 convolution with ``dcn=False``).

Parameters with the defaults (80 classes, DCN, heads 256 wide), exactly those of the official
model less the ImageNet classifier ``fc`` (a 512 -> 1000 1x1 convolution, 513,000 parameters, not
used for detection): trunk 15,270,832; neck 3,940,336 (``DLAUp`` 3,515,012, ``IDAUp`` 425,324);
heads 464,724; total 19,675,892. With ``dcn=False`` each of the 16 neck convolutions loses its
offset/mask convolution (``27 * (9 * in_channels + 1)`` parameters, 638,064 in all): neck
3,302,272, total 19,037,828. :data:`DLA_SMALL` with 64-wide heads (``dla34(small=True)``): trunk
3,011,096, neck 1,150,160 (830,912 without DCN), heads 60,948; total 4,222,204 (3,902,956).

ImageNet weights (the official ``dla34-ba72cf86.pth``, a ``state_dict`` of the trunk) load key
for key: the trunk's module names are those of the official ``DLA`` class (``base_layer.0``,
``level0.0``, ``level1.0``, ``level2.tree1.conv1``, ``level2.root.conv``, ``level3.project.0``,
``level3.tree2.root.bn``, ...); in :class:`DLACenterNet` a file key ``k`` becomes ``trunk.k``, and
``fc.weight`` / ``fc.bias`` are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .heads import CenterNetHeads
from .layers import conv3x3, fill_bilinear
from .weights import load_matching, read_state_dict

__all__ = ["DLA", "DLA34", "DLA_SMALL", "DLACenterNet", "DLAConfig", "dla34", "load_dla_weights"]


@dataclass(frozen=True)
class DLAConfig:
    """Trunk shape: ``depths`` are the convolutions of levels 0-1 and the tree depths of levels
    2-5; ``channels`` the widths of levels 0-5 (the neck and heads work at ``channels[2]``)."""

    depths: tuple[int, int, int, int, int, int] = (1, 1, 1, 2, 2, 1)
    channels: tuple[int, int, int, int, int, int] = (16, 32, 64, 128, 256, 512)


DLA34 = DLAConfig()
DLA_SMALL = DLAConfig(depths=(1, 1, 1, 1, 1, 1), channels=(8, 16, 32, 64, 128, 256))  # CPU lessons, tests


def _conv_level(in_channels: int, out_channels: int, kernel: int, convs: int = 1, stride: int = 1) -> nn.Sequential:
    """``convs`` times conv (the first one strided) + BN + ReLU, flat in one ``nn.Sequential``."""
    layers: list[nn.Module] = []
    for i in range(convs):
        conv = nn.Conv2d(
            out_channels if i else in_channels, out_channels, kernel, 1 if i else stride, kernel // 2, bias=False
        )
        layers += [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Residual block (two 3x3 convolutions + BN); the shortcut is given by the enclosing tree."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, shortcut: Tensor | None = None) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + (x if shortcut is None else shortcut))


class Root(nn.Module):
    """Aggregation node (DLA Sec. 3.3, no residual in DLA-34): 1x1 conv + BN + ReLU of the concatenation."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        return self.relu(self.bn(self.conv(torch.cat(inputs, 1))))


class Tree(nn.Module):
    """Hierarchical deep aggregation (DLA Sec. 3.2): a tree of ``2^depth`` blocks.

    A depth-1 tree is two blocks and a root over both outputs; a deeper tree is two subtrees, the
    second one taking the first one's output along to its root. With ``level_root`` the root also
    takes the (max-pooled) input of the level. The first block has the stride; its shortcut is the
    max-pooled input, projected by a 1x1 conv + BN when the width changes.

    Depth-2 trees also hold a ``project`` that the official code computes and never uses (the
    subtree makes its own shortcut): it is kept, frozen, only so that ImageNet checkpoints load.

    Shape:
        ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``.
    """

    def __init__(
        self,
        depth: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        level_root: bool = False,
        root_channels: int = 0,
    ) -> None:
        super().__init__()
        root_channels = (root_channels or 2 * out_channels) + (in_channels if level_root else 0)
        if depth == 1:
            self.tree1 = BasicBlock(in_channels, out_channels, stride)
            self.tree2 = BasicBlock(out_channels, out_channels)
            self.root = Root(root_channels, out_channels)
        else:
            self.tree1 = Tree(depth - 1, in_channels, out_channels, stride)
            self.tree2 = Tree(depth - 1, out_channels, out_channels, root_channels=root_channels + out_channels)
        self.depth, self.level_root = depth, level_root
        self.downsample = nn.MaxPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.project = nn.Identity()
        if in_channels != out_channels:
            conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            self.project = nn.Sequential(conv, nn.BatchNorm2d(out_channels))
        if depth > 1:  # the unused projection: kept for the checkpoint keys, frozen so DDP need not look for it
            self.project.requires_grad_(False)

    def forward(self, x: Tensor, children: list[Tensor] | None = None) -> Tensor:
        children = list(children or [])
        bottom = self.downsample(x)
        if self.level_root:
            children.append(bottom)
        if self.depth == 1:
            x1 = self.tree1(x, self.project(bottom))
            return self.root([self.tree2(x1), x1, *children])
        x1 = self.tree1(x)
        return self.tree2(x1, [*children, x1])


class DLA(nn.Module):
    """The DLA trunk (DLA-34 of DLA Sec. 4 with the default config), without its classifier.

    Shape:
        ``(B, 3, H, W)`` -> the six levels ``[(B, channels[i], H / 2^i, W / 2^i) for i in 0..5]``.
    """

    def __init__(self, config: DLAConfig = DLA34) -> None:
        super().__init__()
        depths, channels = config.depths, config.channels
        self.base_layer = _conv_level(3, channels[0], 7)
        self.level0 = _conv_level(channels[0], channels[0], 3, depths[0])
        self.level1 = _conv_level(channels[0], channels[1], 3, depths[1], stride=2)
        self.level2 = Tree(depths[2], channels[1], channels[2], 2)
        self.level3 = Tree(depths[3], channels[2], channels[3], 2, level_root=True)
        self.level4 = Tree(depths[4], channels[3], channels[4], 2, level_root=True)
        self.level5 = Tree(depths[5], channels[4], channels[5], 2, level_root=True)

    def forward(self, images: Tensor) -> list[Tensor]:
        levels, x = [], self.base_layer(images)
        for level in (self.level0, self.level1, self.level2, self.level3, self.level4, self.level5):
            x = level(x)
            levels.append(x)
        return levels


def _node(in_channels: int, out_channels: int, dcn: bool) -> nn.Sequential:
    """3x3 DCNv2 (or plain) convolution + BN + ReLU: every projection and aggregation of the neck."""
    return nn.Sequential(conv3x3(in_channels, out_channels, dcn), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def bilinear_up(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Depth-wise transposed convolution (kernel ``2 f``, stride ``f``, padding ``f / 2``, no bias)
    started as a per-channel bilinear upsampler: ``(B, C, H, W) -> (B, C, f H, f W)``."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, factor, factor // 2, groups=channels, bias=False)
    fill_bilinear(up, "reference")  # the weight is (C, 1, k, k): this fills every channel
    return up


class IDAUp(nn.Module):
    """Iterative deep aggregation upwards: ``x[i]`` (``in_channels[i]`` channels, ``factors[i]``
    times coarser than ``x[0]``) is projected to ``out_channels``, upsampled to the resolution of
    ``x[0]`` and merged with the previous result by a node.

    Shape:
        ``[x0 (B, out_channels, H, W), x1, ...] -> [x0, y1, y2, ...]`` all ``(B, out_channels, H, W)``;
        ``y_i = node_i(up_i(proj_i(x_i)) + y_{i-1})``, ``y_0 = x0``.
    """

    def __init__(self, out_channels: int, in_channels: list[int], factors: list[int], dcn: bool) -> None:
        super().__init__()
        self.proj = nn.ModuleList(_node(c, out_channels, dcn) for c in in_channels[1:])
        self.up = nn.ModuleList(bilinear_up(out_channels, f) for f in factors[1:])
        self.node = nn.ModuleList(_node(out_channels, out_channels, dcn) for _ in in_channels[1:])

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        out = [features[0]]
        for x, proj, up, node in zip(features[1:], self.proj, self.up, self.node, strict=True):
            out.append(node(up(proj(x)) + out[-1]))
        return out


class DLAUp(nn.Module):
    """CenterNet's DLA up path: IDA from the coarsest level down, one finer level per pass.

    Pass ``i`` upsamples every level coarser than level ``n - 2 - i`` to its resolution and width
    and aggregates them in order, so the last (deepest) feature goes through all passes.

    Shape:
        ``[(B, channels[i], H / 2^i, W / 2^i)]`` for the ``n`` levels ->
        ``[(B, channels[i], H / 2^i, W / 2^i)]``, element ``i`` being the output of the pass
        that ended at level ``i`` (the last element is the input's last level).
    """

    def __init__(self, channels: list[int], dcn: bool) -> None:
        super().__init__()
        idas, in_channels, scales = [], list(channels), [2**i for i in range(len(channels))]
        for start in range(len(channels) - 2, -1, -1):
            idas.append(IDAUp(channels[start], in_channels[start:], [s // scales[start] for s in scales[start:]], dcn))
            in_channels[start + 1 :] = [channels[start]] * (len(channels) - start - 1)
            scales[start + 1 :] = [scales[start]] * (len(channels) - start - 1)
        self.ida = nn.ModuleList(idas)

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        out = [levels[-1]]
        for start, ida in zip(range(len(levels) - 2, -1, -1), self.ida, strict=True):
            levels = levels[:start] + ida(levels[start:])
            out.insert(0, levels[-1])
        return out


def load_dla_weights(trunk: DLA, path: str | Path) -> None:
    """Load an ImageNet DLA ``state_dict`` file (the official ``dla34-ba72cf86.pth``) into ``trunk``.

    ``fc.*`` (the classifier) is dropped; every other key must match by name and shape.
    Raises ``FileNotFoundError`` or ``ValueError`` naming the file (and the first bad keys).
    """
    load_matching(trunk, read_state_dict(path), path, ignore=("fc.",))


class DLACenterNet(nn.Module):
    """DLA-34 CenterNet: trunk, ``DLAUp`` over levels 2-5, ``IDAUp`` to stride 4, heads.

    Args:
        num_classes: ``C``.
        pretrained: ``False``, or the path of a local ImageNet DLA ``state_dict`` (see
            :func:`load_dla_weights`); ``True`` raises, as there is nothing to download from.
        dcn: DCNv2 (``True``) or plain 3x3 convolutions in the neck.
        head_channels: width of the heads' 3x3 convolution (256 in the official DLA model).
        config: :data:`DLA34` or a smaller trunk such as :data:`DLA_SMALL`.

    Shape:
        ``(B, 3, H, W)`` with ``H, W`` divisible by ``pad_multiple`` (32) -> ``{"hm": (B, C, H/4,
        W/4), "wh": (B, 2, H/4, W/4), "reg": (B, 2, H/4, W/4)}``.

    Example::

        >>> model = DLACenterNet(num_classes=5, dcn=False, head_channels=64, config=DLA_SMALL)
        >>> {k: tuple(v.shape) for k, v in model(torch.zeros(1, 3, 128, 128)).items()}
        {'hm': (1, 5, 32, 32), 'wh': (1, 2, 32, 32), 'reg': (1, 2, 32, 32)}
    """

    task = "centernet"

    pad_multiple = 32  # the stride of level 5

    def __init__(
        self,
        num_classes: int = 80,
        pretrained: bool | str | Path = False,
        dcn: bool = True,
        head_channels: int = 256,
        config: DLAConfig = DLA34,
    ) -> None:
        super().__init__()
        if pretrained is True:
            raise ValueError(
                "DLA-34 ImageNet weights cannot be downloaded by minicenternet (torchvision has no DLA). On a "
                "machine with a network, get the DLA authors' state_dict dla34-ba72cf86.pth "
                "(http://dl.yf.io/dla/models/imagenet/dla34-ba72cf86.pth), copy it here and pass its path: "
                "pretrained='dla34-ba72cf86.pth' (or --pretrained dla34-ba72cf86.pth)"
            )
        self.trunk = DLA(config)
        if pretrained:
            load_dla_weights(self.trunk, pretrained)
        channels = list(config.channels[2:])  # levels 2-5: strides 4, 8, 16, 32
        self.dla_up = DLAUp(channels, dcn)
        self.ida_up = IDAUp(channels[0], channels[:3], [1, 2, 4], dcn)
        self.heads = CenterNetHeads(channels[0], num_classes, head_channels, regression_init="zero_bias")

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.dla_up(self.trunk(images)[2:])
        return self.heads(self.ida_up(features[:3])[-1])


def dla34(
    num_classes: int = 80, pretrained: bool | str | Path = False, dcn: bool = True, small: bool = False
) -> DLACenterNet:
    """DLA-34 CenterNet as in the paper, or with ``small=True`` the :data:`DLA_SMALL` trunk and
    64-wide heads (the same code; for CPU lessons and tests)."""
    if small:
        return DLACenterNet(num_classes, pretrained, dcn, head_channels=64, config=DLA_SMALL)
    return DLACenterNet(num_classes, pretrained, dcn)
