"""Device choice and mixed precision, in one place for training and inference.

Mixed precision is a speed choice, and on a CPU it only pays where the hardware computes bf16
natively (AVX-512 BF16 or AMX). Elsewhere oneDNN emulates bf16 and a convolution runs about ten
times slower than in fp32 (benchmarks/README.md). :func:`resolve_amp` therefore decides
``amp="auto"`` once per process and device: CUDA yes, MPS no; a CPU only when oneDNN reports bf16
support, the CPU has native bf16 instructions, and one convolution measured both ways is faster
in bf16.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AmpChoice", "default_device", "resolve_amp", "autocast", "fused_adam"]

AmpSetting = bool | str  # True, False or "auto"


def default_device() -> torch.device:
    """``cuda`` if available, else ``mps``, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class AmpChoice:
    """The outcome of :func:`resolve_amp`: whether to autocast, in which dtype, and why."""

    enabled: bool
    dtype: torch.dtype | None
    reason: str

    def describe(self) -> str:
        """One line for the start of a run, e.g. ``mixed precision: bf16 (native AVX-512 BF16 ...)``."""
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "off (fp32)")
        return f"mixed precision: {name if self.enabled else 'off (fp32)'} ({self.reason})"


_CPU_DECISION: dict[str, AmpChoice] = {}


def _native_cpu_bf16() -> str | None:
    """The CPU's native bf16 instruction set as oneDNN may use it, or ``None``."""
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None  # also where ONEDNN_MAX_CPU_ISA caps oneDNN below bf16
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX-512 BF16"
    return None


def _conv_seconds(dtype: torch.dtype | None, repeats: int = 2) -> float:
    """Best time of one 3x3 convolution (forward + backward), ``(8, 128, 32, 32)`` channels-last:
    a layer of ResNet-18 at a 256 input. Runs with autograd on even when the first caller is
    inside ``torch.inference_mode()`` or ``torch.no_grad()`` (a ``Detector`` predicting)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _timed_conv(dtype, repeats)


def _timed_conv(dtype: torch.dtype | None, repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 128, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w.requires_grad_(True)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms oneDNN's kernel cache
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = F.conv2d(x, w, padding=1)
        out.float().sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def _decide_cpu() -> AmpChoice:
    isa = _native_cpu_bf16()
    if isa is None:
        capability = torch.backends.cpu.get_cpu_capability()
        return AmpChoice(False, None, f"this CPU ({capability}) has no native bf16: emulated bf16 is slower than fp32")
    bf16, fp32 = _conv_seconds(torch.bfloat16), _conv_seconds(None)
    timing = f"one 3x3 conv: {1000 * bf16:.2f} ms bf16 against {1000 * fp32:.2f} ms fp32"
    if bf16 < fp32:
        return AmpChoice(True, torch.bfloat16, f"native {isa}; {timing}")
    return AmpChoice(False, None, f"native {isa}, but {timing}")


def resolve_amp(device: torch.device | str, amp: AmpSetting = "auto") -> AmpChoice:
    """Decide whether to run under autocast on ``device``.

    Args:
        device: where the network runs.
        amp: ``True`` forces autocast (bf16 on a CPU and on GPUs that support it, fp16 on older
            GPUs: train with a ``GradScaler`` then), ``False`` turns it off, ``"auto"`` decides:
            on for CUDA, off for MPS and other devices, and on a CPU only where bf16 is native
            and measured faster (decided once per process; the measurement takes well under a
            second).
    """
    device = torch.device(device)
    if amp not in (True, False, "auto"):
        raise ValueError(f"amp must be True, False or 'auto', got {amp!r}")
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if device.type == "cpu" else None
    if amp is False or dtype is None:
        reason = "switched off" if amp is False else f"no autocast on {device.type}"
        return AmpChoice(False, None, reason)
    if amp is True:
        return AmpChoice(True, dtype, "switched on")
    if device.type == "cuda":
        return AmpChoice(True, dtype, "CUDA")
    if "cpu" not in _CPU_DECISION:
        _CPU_DECISION["cpu"] = _decide_cpu()
    return _CPU_DECISION["cpu"]


def autocast(device: torch.device | str, amp: AmpSetting = "auto") -> contextlib.AbstractContextManager:
    """``torch.autocast`` as :func:`resolve_amp` decides for ``device``, else a no-op context."""
    device = torch.device(device)
    choice = resolve_amp(device, amp)
    if not choice.enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=choice.dtype)


def fused_adam(device: torch.device | str) -> bool | None:
    """``True`` where PyTorch has a fused Adam kernel for ``device`` (CUDA and CPU), ``None``
    (the default implementation) elsewhere. Same update rule, fewer kernel launches; the
    measured gain is in benchmarks/README.md."""
    return True if torch.device(device).type in ("cuda", "cpu") else None
