"""Device choice and mixed precision, in one place for training and inference."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["default_device", "autocast", "fused_adam"]


def default_device() -> torch.device:
    """``cuda`` if available, else ``mps``, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision for ``device``: bf16 on CPUs and on GPUs that support it, fp16 on older
    GPUs (train with a ``GradScaler`` then), full precision elsewhere or when not ``enabled``."""
    if not enabled or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def fused_adam(device: torch.device | str) -> bool | None:
    """``True`` where PyTorch has a fused Adam kernel for ``device`` (CUDA and CPU), ``None``
    (the default implementation) elsewhere. Same update rule; on this project's CPU one step over
    ResNet-18 CenterNet's 14.2 M parameters takes 12.6 ms fused against 65 ms with the default
    per-parameter loop, timed alone. Whole training runs were not clearly faster for it (11
    epochs: 11.0 min fused, 11.1 and 11.5 min without)."""
    return True if torch.device(device).type in ("cuda", "cpu") else None
