"""Convert checkpoints trained outside this project into hub folders.

Two layouts are read, each with ``torch.load(..., weights_only=True)`` only:

- ``ssole-official``: a PyTorch Lightning checkpoint of the official SSOLE code
  (https://github.com/husthuaan/ssole). Its ``state_dict`` holds a torchvision ResNet under
  ``encoder.encoder.`` whose classifier ``fc`` was replaced by the projector: one ``Linear``
  (config ``mlp: false``), or ``mlp_layers`` linear layers with a ReLU between them (``fc.0``,
  ``fc.2``, ``fc.4``), where ``mlp_bn: true`` makes each hidden layer a bias-free ``Linear`` then
  a ``BatchNorm1d`` (``fc.0``, ``fc.1``, ``fc.3``, ``fc.4``, ``fc.6``). Those are the module
  indices of :class:`~ssole_hub.models.SSOLEProjector`, so projector keys only lose their prefix.
- ``torchvision``: the state dict of a torchvision ResNet (what most self-supervised code saves);
  its ImageNet classifier ``fc`` is dropped, and the converted folder records that it was.

timm's ResNet names its parameters exactly as torchvision does, so backbone keys only lose their
prefix. Every key must fit: missing, unexpected and misshapen keys are named in the error.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models import get_pretrained_cfg

from ssole_hub.hub.checkpoint import ModelCheckpoint
from ssole_hub.hub.export import export_hub_folder
from ssole_hub.models import SSOLEProjector

__all__ = [
    "ARCHITECTURES",
    "SOURCES",
    "ConversionError",
    "Source",
    "convert_checkpoint",
    "load_external_checkpoint",
]

Source = Literal["ssole-official", "torchvision"]
SOURCES: tuple[Source, ...] = ("ssole-official", "torchvision")
ARCHITECTURES = ("resnet18", "resnet50")
"""The ResNets both the official code and this project build (timm names)."""

OFFICIAL_PREFIX = "encoder.encoder."
"""Where the Lightning module (``self.encoder``) keeps the ResNet (``SSOLEEncoder.encoder``)."""
CLASSIFIER = "fc."
_PREPROCESSING_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
_SHOWN = 5  # keys named per problem in an error


class ConversionError(ValueError):
    """A checkpoint cannot be converted: unreadable, or its weights do not fit the layout."""


def _short(keys: Iterable[Any]) -> str:
    keys = [str(k) for k in keys]
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _unpickling_error(path: Path, exc: pickle.UnpicklingError) -> ConversionError:
    """What ``weights_only`` loading refused: an object to unpickle, or a file that is no pickle."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
    if found is None:
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)", str(exc))
        detail = reason.group(1) if reason else str(exc).splitlines()[0]
        return ConversionError(f"{path} is not a readable torch checkpoint ({detail})")
    return ConversionError(
        f"{path} cannot be read safely: it needs the Python object {found.group(1)} to be "
        "unpickled, which could run arbitrary code; only files of tensors, dicts, lists, strings "
        "and numbers are read (torch.load with weights_only=True). If you trust its origin, load "
        "it with weights_only=False and torch.save only its weights (for a Lightning "
        "checkpoint: {'state_dict': checkpoint['state_dict']})"
    )


def _read_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that say what the file needed."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, exc) from exc
    except Exception as exc:  # torch raises assorted types for files that are not checkpoints
        raise ConversionError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def _state_dict(raw: Any, path: Path, source: Source) -> dict[str, torch.Tensor]:
    """The flat ``name -> tensor`` dict of ``raw``, the object the file held."""
    if source == "ssole-official":
        if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
            found = _short(raw) if isinstance(raw, dict) else type(raw).__name__
            bare = (
                isinstance(raw, dict)
                and bool(raw)
                and all(isinstance(v, torch.Tensor) for v in raw.values())
            )
            hint = "; a bare state dict converts with source 'torchvision' (--from torchvision)"
            raise ConversionError(
                f"{path} is not a Lightning checkpoint: it has no 'state_dict' (found {found})"
                + (hint if bare else "")
            )
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw:
        raise ConversionError(f"{path} holds no state dict (found {type(raw).__name__})")
    other = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if other:
        hint = (
            " (a Lightning checkpoint? source 'ssole-official' (--from ssole-official) reads those)"
            if source == "torchvision"
            else ""
        )
        raise ConversionError(f"{path} is not a state dict: {_short(other)} are not tensors{hint}")
    return raw


@cache
def _backbone_shapes(arch: str) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return {k: v.shape for k, v in model.state_dict().items()}


def _fit_problems(
    expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], prefix: str
) -> list[str]:
    """What keeps ``found`` from fitting ``expected``; keys are named with ``prefix``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{prefix}{k} {tuple(found[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in found and found[k].shape != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_short(prefix + k for k in missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected keys: {_short(prefix + k for k in unexpected)}"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} keys of the wrong shape: {_short(mismatched)}")
    return problems


def _check_backbone(
    backbone: Mapping[str, torch.Tensor], arch: str, prefix: str, path: Path
) -> None:
    problems = _fit_problems(_backbone_shapes(arch), backbone, prefix)
    if not problems:
        return
    fits = [a for a in ARCHITECTURES if not _fit_problems(_backbone_shapes(a), backbone, "")]
    hint = f"; they fit {fits[0]}: pass arch={fits[0]!r} (--arch {fits[0]})" if fits else ""
    raise ConversionError(
        f"{path}: the backbone weights do not fit {arch}: " + "; ".join(problems) + hint
    )


def _official_projector(
    fc: Mapping[str, torch.Tensor], batch_norm: bool, path: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The projector config and state (SSOLEProjector keys) of the official ``fc`` weights."""
    prefix = OFFICIAL_PREFIX + CLASSIFIER
    if set(fc) == {"weight", "bias"}:  # ``mlp: false``: the projector is one Linear
        out_dim, in_dim = fc["weight"].shape
        config = dict(in_dim=in_dim, hidden_dim=out_dim, out_dim=out_dim, depth=1)
        return {**config, "batch_norm": False}, {f"0.{k}": v for k, v in fc.items()}
    indexed = {k: int(k.split(".")[0]) for k in fc if re.fullmatch(r"\d+\.\w+", k)}
    linears = {i: fc[k] for k, i in indexed.items() if k.endswith(".weight") and fc[k].ndim == 2}
    if not linears:
        raise ConversionError(
            f"{path}: no projector linear layers under {prefix} (found {_short(prefix + k for k in fc)})"
        )
    # The last module with weights is the output Linear; a hidden layer spans 2 or 3 modules.
    depth = max(indexed.values()) // (3 if batch_norm else 2) + 1
    first, last = linears[min(linears)], linears[max(linears)]
    config = dict(
        in_dim=first.shape[1],
        hidden_dim=first.shape[0],
        out_dim=last.shape[0],
        depth=depth,
        batch_norm=batch_norm and depth > 1,
    )
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SSOLEProjector(**config).state_dict().items()}
    problems = _fit_problems(expected, fc, prefix)
    if problems:
        has_bn = any(k.endswith("running_var") for k in fc)
        hint = (
            "; the projector has BatchNorm layers: pass projector_bn=True (--projector-bn)"
            if has_bn and not batch_norm
            else "; the projector has no BatchNorm layers: pass projector_bn=False (no --projector-bn)"
            if batch_norm and not has_bn
            else ""
        )
        raise ConversionError(
            f"{path}: the projector weights do not fit a {config['depth']}-layer SSOLE "
            f"projector{' with BatchNorm' if batch_norm else ''}: " + "; ".join(problems) + hint
        )
    return config, dict(fc)


def _split_official(
    state: Mapping[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(backbone, fc)`` of an official ``state_dict``, keys relative to the ResNet / its fc."""
    foreign = [k for k in state if not k.startswith(OFFICIAL_PREFIX)]
    if foreign:
        raise ConversionError(
            f"{path}: {len(foreign)} unexpected keys outside {OFFICIAL_PREFIX}: {_short(foreign)}"
        )
    resnet = {k.removeprefix(OFFICIAL_PREFIX): v for k, v in state.items()}
    backbone = {k: v for k, v in resnet.items() if not k.startswith(CLASSIFIER)}
    fc = {k.removeprefix(CLASSIFIER): v for k, v in resnet.items() if k.startswith(CLASSIFIER)}
    if not fc:
        raise ConversionError(
            f"{path}: no projector ({OFFICIAL_PREFIX}{CLASSIFIER}*); the official code always has "
            "one. A bare ResNet state dict converts with source 'torchvision' (--from torchvision)"
        )
    return backbone, fc


def _torchvision_preprocessing(arch: str) -> dict[str, Any]:
    """The evaluation preprocessing of torchvision's ResNets (timm's ``<arch>.tv_in1k``)."""
    cfg = get_pretrained_cfg(f"{arch}.tv_in1k").to_dict()
    return {k: cfg[k] for k in _PREPROCESSING_KEYS}


def _lightning_progress(raw: Mapping[str, Any]) -> dict[str, int]:
    return {k: raw[k] for k in ("epoch", "global_step") if isinstance(raw.get(k), int)}


def load_external_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    source: Source,
    arch: str,
    projector_bn: bool = False,
) -> ModelCheckpoint:
    """Read an official SSOLE (Lightning) or torchvision ResNet checkpoint as this project's
    :class:`~ssole_hub.hub.checkpoint.ModelCheckpoint`, ready for :func:`export_hub_folder`.

    Args:
        checkpoint: the file; read with ``torch.load(..., weights_only=True)``.
        source: ``"ssole-official"`` or ``"torchvision"`` (see the module docstring).
        arch: ``"resnet18"`` or ``"resnet50"``.
        projector_bn: the official projector has BatchNorm (the official config's ``mlp_bn``).

    The official code's preprocessing is this project's recipe (``ssole_<arch>``: its mean,
    std 0.228); a torchvision state dict gets torchvision's (bilinear, crop 0.875, ImageNet mean
    and std). ``metadata["converted_from"]`` records the source, file name, Lightning epoch and
    step, and the keys dropped (a torchvision classifier).

    Raises:
        FileNotFoundError: if the file does not exist.
        ConversionError: for a file that needs arbitrary unpickling or is not a checkpoint, a
            layout other than ``source``, or weights that do not fit ``arch`` (naming the keys).
        ValueError: for an unknown ``source`` or ``arch``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    path = Path(checkpoint)
    raw = _read_weights_only(path)
    state = _state_dict(raw, path, source)
    origin: dict[str, Any] = {"source": source, "file": path.name}
    if source == "ssole-official":
        backbone, fc = _split_official(state, path)
        _check_backbone(backbone, arch, OFFICIAL_PREFIX, path)
        projector_config, projector = _official_projector(fc, projector_bn, path)
        return ModelCheckpoint(
            arch=f"ssole_{arch}",
            backbone=backbone,
            projector=projector,
            projector_config=projector_config,
            metadata={"method": "ssole", "converted_from": {**origin, **_lightning_progress(raw)}},
        )
    dropped = sorted(k for k in state if k in (f"{CLASSIFIER}weight", f"{CLASSIFIER}bias"))
    backbone = {k: v for k, v in state.items() if k not in dropped}
    _check_backbone(backbone, arch, "", path)
    return ModelCheckpoint(
        arch=arch,
        backbone=backbone,
        projector={},
        projector_config={},
        pretrained_cfg=_torchvision_preprocessing(arch),
        metadata={"converted_from": {**origin, "dropped_keys": dropped}},
    )


def convert_checkpoint(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    source: Source,
    arch: str,
    projector_bn: bool = False,
    overwrite: bool = False,
    repo_id: str | None = None,
) -> Path:
    """Convert an official SSOLE or torchvision ResNet checkpoint into a hub folder; returns its
    path. The folder is the one :func:`~ssole_hub.hub.export_hub_folder` writes: the backbone
    with timm keys, ``config.json`` for vanilla timm, and the projector (official checkpoints).

    Args:
        checkpoint, source, arch, projector_bn: as for :func:`load_external_checkpoint`.
        out_dir, overwrite, repo_id: as for :func:`~ssole_hub.hub.export_hub_folder`.

    Raises:
        FileNotFoundError, ConversionError, ValueError: see :func:`load_external_checkpoint`.
        FileExistsError: if ``out_dir`` exists and ``overwrite`` is false.
    """
    ckpt = load_external_checkpoint(checkpoint, source=source, arch=arch, projector_bn=projector_bn)
    return export_hub_folder(ckpt, out_dir, overwrite=overwrite, repo_id=repo_id)
