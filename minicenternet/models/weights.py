"""Reading weight files into a model: one set of checks and error messages for every backbone."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["read_state_dict", "load_matching"]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The ``state_dict`` saved in ``path`` (read with ``weights_only=True``); a minicenternet
    checkpoint gives its ``"model"``. ``FileNotFoundError`` / ``ValueError`` name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable state_dict file ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    return state


def load_matching(module: nn.Module, state: dict[str, Tensor], source: object, ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``: every key must match by name and shape, except those that
    start with a prefix in ``ignore`` (left out on both sides, e.g. an ImageNet classifier
    ``fc.``). ``ValueError`` names ``source`` and the first missing, unexpected and misshapen keys."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights in {source} do not fit this {type(module).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {shapes[:5]}"
        )
    module.load_state_dict(state, strict=not ignore)
