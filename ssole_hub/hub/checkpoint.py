"""The training-checkpoint format shared by ``training/`` (which writes it) and the hub export.

A checkpoint is a ``torch.save``d dict that loads with ``torch.load(..., weights_only=True)``
(tensors, dicts, lists, strings and numbers only: no pickled classes). Its model part:

- ``format``: :data:`CHECKPOINT_FORMAT`;
- ``arch``: the timm name of the backbone, e.g. ``"ssole_resnet18"``;
- ``model``: the :class:`~ssole_hub.models.SSOLEModel` state dict (``backbone.*`` keys with
  timm names, ``projector.*`` keys), unwrapped from DDP and ``torch.compile``;
- ``projector_config``: the :class:`~ssole_hub.models.SSOLEProjector` keyword arguments;
- ``pretrained_cfg``: preprocessing the model was trained for (``input_size``, ``mean``, ``std``,
  ``interpolation``, ``crop_pct``), merged over the architecture's default;
- ``metadata``: dataset, epochs, views, the resolved training config, evaluation results, code version.

Training adds its own keys beside these (optimizer, scaler, schedule, RNG states, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "ModelCheckpoint",
    "load_model_checkpoint",
    "model_checkpoint_state",
]

CHECKPOINT_FORMAT = "ssole-hub/checkpoint/1"


class CheckpointError(ValueError):
    """A file is not a readable SSOLE training checkpoint."""


@dataclass
class ModelCheckpoint:
    """The model part of a training checkpoint, split into what export needs."""

    arch: str
    backbone: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor]
    projector_config: dict[str, Any]
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def _unwrap(module: nn.Module) -> nn.Module:
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


def model_checkpoint_state(
    encoder: nn.Module,
    arch: str,
    projector_config: dict[str, Any],
    pretrained_cfg: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the model part of a checkpoint from an encoder (DDP / compiled wrappers are removed).

    Returns a dict to ``update`` a training checkpoint with; tensors are detached CPU copies.
    """
    state = {k: v.detach().cpu().clone() for k, v in _unwrap(encoder).state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "model": state,
        "projector_config": dict(projector_config),
        "pretrained_cfg": dict(pretrained_cfg or {}),
        "metadata": dict(metadata or {}),
    }


def load_model_checkpoint(path: str | Path) -> ModelCheckpoint:
    """Read the model part of a training checkpoint without unpickling arbitrary objects.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file is not a readable checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(
            f"{path} is not an SSOLE checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    missing = [k for k in ("arch", "model", "projector_config") if k not in raw]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    model = raw["model"]
    return ModelCheckpoint(
        arch=raw["arch"],
        backbone={
            k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")
        },
        projector={
            k.removeprefix("projector."): v for k, v in model.items() if k.startswith("projector.")
        },
        projector_config=dict(raw["projector_config"]),
        pretrained_cfg=dict(raw.get("pretrained_cfg") or {}),
        metadata=dict(raw.get("metadata") or {}),
    )
