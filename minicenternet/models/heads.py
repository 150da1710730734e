"""Prediction heads on the stride-4 feature map (CenterNet Sec. 4, "Implementation details").

Each head is a 3x3 convolution, a ReLU and a 1x1 convolution. The heatmap head's last bias is
``-2.19 = -log((1 - 0.1) / 0.1)``, so every pixel starts at a 0.1 object probability (the
focal-loss prior of RetinaNet, used by CenterNet). The size and offset heads start as each
official backbone starts them (``regression_init``): ``"small"``, weights ~ N(0, 0.001^2) and
biases 0 (our ResNet); ``"zero_bias"``, PyTorch's default weights and biases 0 (DLA-34);
``"default"``, PyTorch's defaults (Hourglass-104).

The heatmap head always runs in fp32, also under autocast: the heatmap goes into the 3x3
max-pool of decoding, and bf16 keeps only 8 bits of mantissa, so two neighbouring logits of one
smooth peak often round to the same value; both then survive the max-pool and one object gives
two detections. The head is a small part of the network's cost.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

__all__ = ["HM_PRIOR_BIAS", "make_head", "run_in_fp32", "CenterNetHeads"]

HM_PRIOR_BIAS = -2.19


def make_head(in_channels: int, head_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (``head_channels``) -> ReLU -> 1x1 conv (``out_channels``), all with bias."""
    return nn.Sequential(
        nn.Conv2d(in_channels, head_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(head_channels, out_channels, 1),
    )


def run_in_fp32(head: nn.Module, features: Tensor) -> Tensor:
    """``head(features)`` in fp32 with autocast off (CPU and CUDA), for the heatmap heads."""
    device_type = features.device.type
    fp32 = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()
    with fp32:
        return head(features.float())


class CenterNetHeads(nn.Module):
    """The three CenterNet heads: ``hm`` (C classes), ``wh`` (2: w, h) and ``reg`` (2: dx, dy).

    Shape:
        ``(B, in_channels, H/4, W/4)`` -> ``{"hm": (B, C, H/4, W/4), "wh": (B, 2, H/4, W/4),
        "reg": (B, 2, H/4, W/4)}``; ``hm`` holds fp32 logits, under autocast too.
    """

    def __init__(
        self, in_channels: int, num_classes: int, head_channels: int = 64, regression_init: str = "small"
    ) -> None:
        super().__init__()
        self.hm = make_head(in_channels, head_channels, num_classes)
        self.wh = make_head(in_channels, head_channels, 2)
        self.reg = make_head(in_channels, head_channels, 2)
        nn.init.constant_(self.hm[-1].bias, HM_PRIOR_BIAS)
        if regression_init not in ("small", "zero_bias", "default"):
            raise ValueError(f"regression_init must be 'small', 'zero_bias' or 'default', got {regression_init!r}")
        for head in (self.wh, self.reg) if regression_init != "default" else ():
            for conv in head[0::2]:
                if regression_init == "small":
                    nn.init.normal_(conv.weight, std=0.001)
                nn.init.zeros_(conv.bias)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {"hm": run_in_fp32(self.hm, features), "wh": self.wh(features), "reg": self.reg(features)}
