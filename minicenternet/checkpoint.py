"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled classes),
so ``torch.load(..., weights_only=True)`` can read it and a crash mid-write never leaves a
truncated file behind: the data goes to a temporary file in the same folder, is flushed to disk,
then renamed over the target in one step.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "save_checkpoint", "load_checkpoint", "load_run_checkpoint", "check_same_model", "MODEL_KEYS", "rng_state",
    "restore_rng_state",
]

MODEL_KEYS = ("arch", "task", "num_classes", "dcn")  # what must agree for a state_dict to fit a model


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only=True raises on pickled Python objects
        raise ValueError(
            f"{path}: not a minicenternet checkpoint (it holds Python objects that a safe weights_only load refuses)"
        ) from err
    except Exception as err:
        raise ValueError(f"{path}: not a minicenternet checkpoint (truncated, corrupt or not a PyTorch file)") from err


def load_run_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint of a training run (``best.pt``, ``last.pt``): :func:`load_checkpoint`, then a
    clear error if it lacks the model or the ``model_config`` that says how to rebuild it."""
    state = load_checkpoint(path, map_location)
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise ValueError(f"{path}: not a minicenternet training checkpoint (no 'model' and 'model_config' entries)")
    return state


def check_same_model(stored: dict[str, Any], wanted: dict[str, Any], path: str | Path) -> None:
    """Raise a ``ValueError`` naming every difference of :data:`MODEL_KEYS` between a
    checkpoint's ``model_config`` and the model a run wants, instead of the size-mismatch
    traceback ``load_state_dict`` would give. A key missing from ``stored`` (a checkpoint from
    before the key existed) takes its default: task ``"centernet"``."""
    stored = {"task": "centernet", **stored}
    differences = [
        f"{key} {stored.get(key)!r} in the checkpoint, {wanted.get(key)!r} here"
        for key in MODEL_KEYS if stored.get(key) != wanted.get(key)
    ]
    if differences:
        raise ValueError(
            f"{path}: the checkpoint holds a different model: {'; '.join(differences)} "
            f"(resume with the settings it was trained with: --arch {stored.get('arch')} --task {stored['task']})"
        )


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's and (if in use) the current CUDA device's global
    generators, as lists, numbers and tensors, so that a ``weights_only`` load reads them back."""
    version, internal, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the generator states taken by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
