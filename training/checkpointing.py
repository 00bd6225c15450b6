"""Training checkpoints: atomic writes, keep-last-K, finding the newest, and RNG state capture.

A checkpoint is the model part of :func:`ssole_hub.hub.checkpoint.model_checkpoint_state` plus the
training state (optimizer, scaler, schedule, epoch / step position, RNG states of every rank).
Everything is a tensor, dict, list, string or number, so it loads with ``weights_only=True``; the
export side reads the model part with :func:`ssole_hub.hub.checkpoint.load_model_checkpoint`.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssole_hub.file_modes import give_umask_mode

__all__ = [
    "capture_rng_state",
    "checkpoint_name",
    "latest_checkpoint",
    "load_training_checkpoint",
    "prune_checkpoints",
    "restore_rng_state",
    "save_atomic",
]

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_name(global_step: int) -> str:
    """File name of the checkpoint taken after ``global_step`` steps."""
    return f"step_{global_step:08d}.pt"


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``: a crash
    mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        give_umask_mode(tmp)  # mkstemp made it 0600; a checkpoint is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _step_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints in ``folder``; returns those deleted."""
    old = [p for _, p in _step_checkpoints(Path(folder))[:-keep]] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The step checkpoint with the most steps in ``folder``, or None."""
    found = _step_checkpoints(Path(folder))
    return found[-1][1] if found else None


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a full training checkpoint on CPU, safely (``weights_only=True``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not a training checkpoint of this project.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable checkpoint: {exc}") from exc
    needed = ("model", "optimizer", "global_step", "epoch", "step_in_epoch")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint (lacks {', '.join(missing)})")
    return state


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy) as tensors and lists."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
