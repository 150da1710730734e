"""CenterNet on a ResNet trunk (CenterNet Sec. 4: "ResNet ... with three up-convolutional layers").

torchvision's ResNet-18 or ResNet-101 without its pooling and classifier gives a stride-32 map
(512 or 2048 channels). Three stages bring it back to stride 4; each is a 3x3 modulated
deformable convolution (or a plain 3x3 convolution with ``dcn=False``) that changes the channels
to 256, 128 and 64, BN, ReLU, then a 4x4 stride-2 transposed convolution initialised to bilinear
upsampling, BN, ReLU. The CenterNet heads sit on the final 64-channel map.
"""

from __future__ import annotations

from pathlib import Path

import torchvision
from torch import Tensor, nn

from .heads import CenterNetHeads
from .layers import conv3x3, fill_bilinear
from .weights import load_matching, read_state_dict

__all__ = ["TRUNKS", "ResNetCenterNet", "load_trunk_weights"]

TRUNKS = {  # arch -> (torchvision factory, weights enum name, trunk output channels)
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights", 512),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights", 2048),
}
UP_CHANNELS = (256, 128, 64)


def _up_stage(in_channels: int, out_channels: int, dcn: bool, up_init: str) -> nn.Sequential:
    up = nn.ConvTranspose2d(out_channels, out_channels, 4, stride=2, padding=1, bias=False)
    fill_bilinear(up, up_init)
    return nn.Sequential(
        conv3x3(in_channels, out_channels, dcn),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        up,
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def load_trunk_weights(trunk: nn.Module, source: str | Path | bool, arch: str) -> None:
    """Load ImageNet weights into a torchvision ResNet.

    Args:
        trunk: the torchvision ResNet.
        source: a path to a saved ``state_dict`` (read with ``weights_only=True``; the ``fc.``
            keys, if present, are ignored), or ``True`` for torchvision's ``IMAGENET1K_V1``
            weights (downloaded by torchvision into its cache, so that needs a network once).
        arch: ``"resnet18"`` or ``"resnet101"``.
    """
    if source is True:
        weights = getattr(torchvision.models, TRUNKS[arch][1]).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as err:  # no network: urllib, socket and hash errors alike
            raise RuntimeError(
                f"could not get torchvision's {TRUNKS[arch][1]}.IMAGENET1K_V1 weights ({type(err).__name__}: {err}). "
                f"Offline, save them on a machine with a network: torch.save(torchvision.models.{arch}"
                f"(weights='IMAGENET1K_V1').state_dict(), '{arch}.pt'), copy the file over and pass "
                f"--pretrained {arch}.pt (or pretrained='{arch}.pt')"
            ) from err
    else:
        state = read_state_dict(source)
    load_matching(trunk, state, source, ignore=("fc.",))


class ResNetCenterNet(nn.Module):
    """ResNet-18/101 CenterNet.

    Args:
        arch: ``"resnet18"`` or ``"resnet101"``.
        num_classes: ``C``.
        pretrained: ``False``, ``True`` (torchvision's ImageNet weights) or a path to a trunk
            ``state_dict``.
        dcn: deformable (DCNv2) or plain 3x3 convolutions in the upsampling stages.
        head_channels: width of the heads' 3x3 convolution (64 in the paper for ResNet).
        up_init: initialisation of the transposed convolutions, see
            :func:`~minicenternet.models.layers.fill_bilinear`: ``"reference"`` (the official
            code, quirk included) or ``"identity"`` (a true per-channel bilinear upsampler).

    Shape:
        ``(B, 3, H, W)`` with ``H, W`` divisible by ``pad_multiple`` (32) -> dict of
        ``(B, *, H/4, W/4)`` maps.

    Example::

        >>> model = ResNetCenterNet("resnet18", num_classes=5, dcn=False)
        >>> {k: tuple(v.shape) for k, v in model(torch.zeros(1, 3, 128, 128)).items()}
        {'hm': (1, 5, 32, 32), 'wh': (1, 2, 32, 32), 'reg': (1, 2, 32, 32)}
    """

    task = "centernet"

    pad_multiple = 32  # inputs are padded to a multiple of the trunk's stride (the paper: 32 for ResNet)

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 80,
        pretrained: bool | str | Path = False,
        dcn: bool = True,
        head_channels: int = 64,
        up_init: str = "reference",
    ) -> None:
        super().__init__()
        if arch not in TRUNKS:
            raise ValueError(f"unknown ResNet arch {arch!r}; choose from {sorted(TRUNKS)}")
        factory, _, trunk_channels = TRUNKS[arch]
        trunk = factory(weights=None)
        if pretrained:
            load_trunk_weights(trunk, pretrained, arch)
        self.trunk = nn.Sequential(
            trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        )
        stages, channels = [], trunk_channels
        for out_channels in UP_CHANNELS:
            stages.append(_up_stage(channels, out_channels, dcn, up_init))
            channels = out_channels
        self.upsample = nn.Sequential(*stages)
        self.heads = CenterNetHeads(channels, num_classes, head_channels)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.heads(self.upsample(self.trunk(images)))
