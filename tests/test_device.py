"""Tests of minicenternet.device: the mixed-precision decision and the fp32 heatmap under autocast."""

from __future__ import annotations

import re

import pytest
import torch

import minicenternet.device as device_module
from minicenternet.decode import centernet_decode
from minicenternet.device import autocast, resolve_amp
from minicenternet.models import build_model
from minicenternet.models.heads import CenterNetHeads


@pytest.fixture
def fresh_decision(monkeypatch):
    """An empty per-process cache, and a counter of the conv timings taken."""
    monkeypatch.setattr(device_module, "_CPU_DECISION", {})
    calls = []
    return calls


def _fake_cpu(monkeypatch, calls, isa, bf16_ms, fp32_ms):
    monkeypatch.setattr(device_module, "_native_cpu_bf16", lambda: isa)

    def seconds(dtype, repeats=2):
        calls.append(dtype)
        return (bf16_ms if dtype is torch.bfloat16 else fp32_ms) / 1000

    monkeypatch.setattr(device_module, "_conv_seconds", seconds)


def test_cpu_without_native_bf16_stays_fp32_without_measuring(monkeypatch, fresh_decision):
    _fake_cpu(monkeypatch, fresh_decision, None, 1.0, 9.0)  # even a (fake) faster bf16 is not tried
    choice = resolve_amp("cpu")
    assert not choice.enabled and choice.dtype is None
    assert "no native bf16" in choice.reason and "off (fp32)" in choice.describe()
    assert fresh_decision == []
    assert isinstance(autocast("cpu"), type(autocast("cpu", False)))  # a no-op context


def test_cpu_with_native_bf16_measured_faster_uses_bf16_once(monkeypatch, fresh_decision):
    _fake_cpu(monkeypatch, fresh_decision, "AVX-512 BF16", 3.0, 6.0)
    choice = resolve_amp("cpu")
    assert choice.enabled and choice.dtype is torch.bfloat16
    assert "AVX-512 BF16" in choice.reason and "3.00 ms bf16 against 6.00 ms fp32" in choice.reason
    assert choice.describe().startswith("mixed precision: bf16")
    assert len(fresh_decision) == 2
    assert resolve_amp(torch.device("cpu"), "auto") is choice  # remembered: no second measurement
    assert len(fresh_decision) == 2
    with autocast("cpu"):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16


def test_cpu_with_native_bf16_measured_slower_stays_fp32(monkeypatch, fresh_decision):
    _fake_cpu(monkeypatch, fresh_decision, "AMX", 8.0, 5.0)
    choice = resolve_amp("cpu")
    assert not choice.enabled and "native AMX, but" in choice.reason


def test_explicit_settings_override_the_decision(monkeypatch, fresh_decision):
    _fake_cpu(monkeypatch, fresh_decision, None, 1.0, 1.0)
    forced = resolve_amp("cpu", True)
    assert forced.enabled and forced.dtype is torch.bfloat16 and forced.reason == "switched on"
    off = resolve_amp("cpu", False)
    assert not off.enabled and off.reason == "switched off"
    assert not resolve_amp("mps", True).enabled  # no autocast on MPS here
    assert fresh_decision == []
    with pytest.raises(ValueError, match="amp must be"):
        resolve_amp("cpu", "yes")


def test_real_cpu_decision_is_consistent_with_the_hardware():
    """Whatever this machine is, "auto" never picks bf16 where oneDNN has no native bf16."""
    choice = resolve_amp("cpu")
    if device_module._native_cpu_bf16() is None:
        assert not choice.enabled and "no native bf16" in choice.reason
    else:  # the measured times decide: "one 3x3 conv: A ms bf16 against B ms fp32"
        bf16, fp32 = (float(v) for v in re.findall(r"([\d.]+) ms", choice.reason))
        assert choice.enabled == (bf16 < fp32)


def test_the_cpu_measurement_works_when_first_asked_inside_inference_mode(fresh_decision):
    """A fresh process whose first "auto" question comes from a Detector (under inference mode)."""
    if device_module._native_cpu_bf16() is None:
        pytest.skip("this CPU has no native bf16: nothing is measured")
    with torch.inference_mode():
        choice = resolve_amp("cpu")
    assert "ms bf16 against" in choice.reason


def _smooth_peak_heads(height: int = 24, width: int = 24) -> tuple[CenterNetHeads, torch.Tensor]:
    """Heads whose class-0 heatmap logit equals input channel 0, fed a smooth bump.

    The bump is 3.5 - 0.004 d^2 around (11.3, 12.6), strictly decreasing away from its top, so in
    fp32 exactly one pixel is the maximum of its 3x3 neighbourhood. bf16 has a spacing of 1/64
    between 2 and 4: rounded to it, the top pixels become a plateau of equal logits.
    """
    heads = CenterNetHeads(in_channels=4, num_classes=3, head_channels=8)
    with torch.no_grad():
        hidden, last = heads.hm[0], heads.hm[2]
        hidden.weight.zero_(), hidden.bias.zero_(), last.weight.zero_()
        hidden.weight[0, 0, 1, 1] = 1.0  # hidden channel 0 = input channel 0 (positive, so ReLU passes it)
        last.weight[0, 0] = 1.0
        last.bias.copy_(torch.tensor([0.0, -10.0, -10.0]))
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    features = torch.zeros(1, 4, height, width)
    features[0, 0] = 3.5 - 0.004 * ((xs - 11.3) ** 2 + (ys - 12.6) ** 2)
    return heads, features


def test_a_smooth_peak_gives_one_detection_under_autocast():
    heads, features = _smooth_peak_heads()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = heads(features)
    assert out["hm"].dtype == torch.float32
    assert out["wh"].dtype == torch.bfloat16  # the other heads do run in bf16
    _, scores, classes = centernet_decode(out["hm"], out["wh"].float(), out["reg"].float(), K=20)
    confident = scores > 0.5
    assert int(confident.sum()) == 1 and int(classes[confident]) == 0
    # the same bump rounded to bf16 (what a bf16 head would see) is a plateau: many peaks
    rounded = features[:, :1].bfloat16().float()
    _, plateau_scores, _ = centernet_decode(rounded, out["wh"].float(), out["reg"].float(), K=20)
    assert int((plateau_scores > 0.5).sum()) > 1


def test_model_heatmap_is_fp32_under_autocast():
    model = build_model("resnet18", num_classes=3, dcn=False).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 64))
    assert out["hm"].dtype == torch.float32
