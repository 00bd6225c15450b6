"""The hub folder format: its file names, and readers that fail with clear errors.

A hub folder holds one checkpoint in a form plain timm loads (see the architecture notes):

- ``model.safetensors``: the backbone state dict, timm key names, no classifier;
- ``config.json``: timm's schema, ``architecture`` a name vanilla timm knows (``resnet18``),
  ``num_classes`` 0, ``num_features``, ``pretrained_cfg`` (input size, crop, interpolation, mean, std);
- ``projector.safetensors`` and ``ssole.json``: the SSOLE projector and the training metadata,
  evaluation results and code version;
- ``README.md``: the model card (:mod:`ssole_hub.hub.model_card`);
- optionally ``onnx/model.onnx`` and ``onnx/model_int8.onnx`` (:mod:`ssole_hub.hub.onnx_export`).

The readers take a *fetch* function (:mod:`ssole_hub.hub.fetch`: file name -> local path), so a
folder on disk and a Hub repo are read by the same code. Weights are only ever read from
safetensors files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import timm
import torch
from timm.models import is_model
from torch import nn

from ssole_hub.errors import HubFolderError
from ssole_hub.hub.fetch import Fetch
from ssole_hub.models import SSOLEProjector

M = TypeVar("M", bound=nn.Module)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CONFIG_FILE",
    "EXPORTED_CFG_KEYS",
    "HUB_FILES",
    "HUB_FOLDER_FORMAT",
    "MODEL_CARD_FILE",
    "PROJECTOR_FILE",
    "SSOLE_FILE",
    "WEIGHTS_FILE",
    "build_projector",
    "built_with",
    "drop_classifier",
    "has_projector",
    "load_checked",
    "read_backbone",
    "read_json",
    "read_projector",
    "read_safetensors",
]

HUB_FOLDER_FORMAT = "ssole-hub/hub-folder/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PROJECTOR_FILE = "projector.safetensors"
SSOLE_FILE = "ssole.json"
MODEL_CARD_FILE = "README.md"
HUB_FILES = (WEIGHTS_FILE, CONFIG_FILE, PROJECTOR_FILE, SSOLE_FILE, MODEL_CARD_FILE)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")

# Preprocessing and model-description keys that config.json carries; source keys (hub id, url,
# file) are left out so the folder does not point back at where the weights came from.
EXPORTED_CFG_KEYS = (
    "tag",
    "input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "pool_size",
    "first_conv",
    "classifier",
    "license",
)


def drop_classifier(state: Mapping[str, torch.Tensor], classifier: str | None) -> dict[str, Any]:
    """Return ``state`` without the classifier head (``<classifier>.*`` keys): features only."""
    prefix = f"{classifier}." if classifier else None
    return {k: v for k, v in state.items() if not (prefix and k.startswith(prefix))}


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file; :class:`HubFolderError` naming ``what`` if it is truncated or corrupt."""
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
        raise HubFolderError(f"{what}: {path} is not a readable safetensors file ({exc})") from exc


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object; :class:`HubFolderError` naming ``what`` if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubFolderError(f"{what}: {path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise HubFolderError(f"{what}: {path} must hold a JSON object, found {type(data).__name__}")
    return data


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names every key that does not fit."""
    _check_fits(module, state, what)
    module.load_state_dict(state, strict=True)


def built_with(
    build: Callable[[], M],
    state: Mapping[str, torch.Tensor] | Callable[[M], Mapping[str, torch.Tensor]] | None,
    what: str,
) -> M:
    """``build()``, with ``state`` loaded as :func:`load_checked` loads it, but without first
    initialising the weights that ``state`` replaces (most of a ResNet-18's load time): the
    module is built on the meta device and the checked tensors become its own, cast to its
    dtypes. ``state`` may be a function of the built module (its config names what to drop);
    None: built as usual. A module with tensors outside its state dict (non-persistent buffers,
    which no file holds), or one whose constructor computes with tensors, is built on the CPU
    and loaded instead."""
    if state is None:
        return build()
    try:
        with torch.device("meta"):
            module = build()
        on_meta = not set(dict(module.named_buffers())) - set(module.state_dict())
    except (RuntimeError, NotImplementedError):  # e.g. ``.item()`` on a meta tensor
        on_meta = False
    if not on_meta:
        module = build()
    state = state(module) if callable(state) else state
    if not on_meta:
        load_checked(module, state, what)
        return module
    _check_fits(module, state, what)
    expected = module.state_dict()
    cast = {k: v.to(expected[k].dtype) for k, v in state.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    return module


def _check_fits(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`HubFolderError` naming every key of ``state`` that does not fit ``module``:
    missing, unexpected, or of another shape."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch for " + "; ".join(mismatched[:5]))
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if problems:
        raise HubFolderError(f"{what} do not fit {type(module).__name__}: " + "; ".join(problems))


def build_projector(
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor] | None,
    num_features: int,
    what: str,
) -> SSOLEProjector:
    """Build a projector from its config, check it fits the backbone, load ``state`` if given."""
    try:
        with torch.device("meta"):  # the config checked, nothing computed
            in_dim = SSOLEProjector(**config).config["in_dim"]
    except (TypeError, ValueError) as exc:
        raise HubFolderError(f"{what}: invalid projector_config {dict(config)} ({exc})") from exc
    if in_dim != num_features:
        raise HubFolderError(
            f"{what}: projector in_dim {in_dim} does not match the backbone's {num_features} "
            "features"
        )
    return built_with(lambda: SSOLEProjector(**config), state, f"{what} weights")


def read_backbone(fetch: Fetch, timm_name: str, pretrained: bool) -> nn.Module:
    """Build the backbone named by ``config.json`` (checked first) and load its weights."""
    config = read_json(fetch(CONFIG_FILE), CONFIG_FILE)
    arch = config.get("architecture")
    if not isinstance(arch, str) or not is_model(arch):
        raise HubFolderError(
            f"{CONFIG_FILE} names architecture {arch!r}, which timm {timm.__version__} does not know"
        )
    for key in ("mean", "std", "input_size"):
        if key not in (config.get("pretrained_cfg") or {}):
            raise HubFolderError(f"{CONFIG_FILE} lacks pretrained_cfg[{key!r}] (preprocessing)")

    # timm's own source prefixes parse config.json, so the model's pretrained_cfg is exactly what
    # vanilla timm gives; weights are loaded below, from safetensors only, with clear errors.
    def without_classifier(backbone: nn.Module) -> Mapping[str, torch.Tensor]:
        state = read_safetensors(fetch(WEIGHTS_FILE), WEIGHTS_FILE)
        return drop_classifier(state, backbone.pretrained_cfg.get("classifier"))

    return built_with(
        lambda: timm.create_model(timm_name, pretrained=False, num_classes=0),
        without_classifier if pretrained else None,
        WEIGHTS_FILE,
    )


def read_projector(
    fetch: Fetch, num_features: int, pretrained: bool
) -> tuple[SSOLEProjector, dict[str, Any]]:
    """Build the projector ``ssole.json`` describes (weights too if ``pretrained``); returns
    ``(projector, ssole_json)``."""
    ssole = read_json(fetch(SSOLE_FILE), SSOLE_FILE)
    config = ssole.get("projector_config")
    if not config:
        raise HubFolderError(f"{SSOLE_FILE} has no projector_config: this folder has no projector")
    state = read_safetensors(fetch(PROJECTOR_FILE), PROJECTOR_FILE) if pretrained else None
    return build_projector(config, state, num_features, PROJECTOR_FILE), ssole


def has_projector(fetch: Fetch) -> bool:
    """Whether the folder describes a projector (``projector_config`` in ``ssole.json``)."""
    try:
        ssole = read_json(fetch(SSOLE_FILE), SSOLE_FILE)
    except FileNotFoundError:
        return False
    return bool(ssole.get("projector_config"))
