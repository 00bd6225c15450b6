"""Writing and checking hub folders: :func:`export_hub_folder` and :func:`validate_hub_folder`.

The folder format is :mod:`ssole_hub.hub.folder`; publishing is :mod:`ssole_hub.hub.publish`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.models import get_pretrained_cfg, is_model
from torch import nn

from ssole_hub.errors import HubFolderError
from ssole_hub.file_modes import give_umask_mode
from ssole_hub.hub.checkpoint import ModelCheckpoint, load_model_checkpoint
from ssole_hub.hub.compact import FIT_COMMAND, PCA_RECORD, read_pca
from ssole_hub.hub.decode_check import decoding_record
from ssole_hub.hub.fetch import local_fetch
from ssole_hub.hub.folder import (
    CONFIG_FILE,
    EXPORTED_CFG_KEYS,
    HUB_FOLDER_FORMAT,
    MODEL_CARD_FILE,
    PROJECTOR_FILE,
    SSOLE_FILE,
    WEIGHTS_FILE,
    build_projector,
    drop_classifier,
    load_checked,
    read_backbone,
    read_json,
    read_projector,
)
from ssole_hub.hub.model_card import render_model_card
from ssole_hub.hub.model_stats import measure_model_stats
from ssole_hub.models import HUB_ORG
from ssole_hub.pca import PCA_FILE
from ssole_hub.runtimes.backends import ONNX_FILES
from ssole_hub.runtimes.openvino import check_session, open_session
from ssole_hub.version import __version__

__all__ = ["HubFolder", "export_hub_folder", "validate_hub_folder"]


@dataclass
class HubFolder:
    """What :func:`validate_hub_folder` found in a valid hub folder."""

    path: Path
    architecture: str
    timm_architecture: str
    num_features: int
    pretrained_cfg: dict[str, Any]
    projector_config: dict[str, Any] | None
    metadata: dict[str, Any] = field(default_factory=dict)
    eval_results: dict[str, Any] = field(default_factory=dict)
    onnx_files: list[str] = field(default_factory=list)
    pca: dict[str, Any] | None = None
    """The record of its fitted PCA (``ssole.json``'s ``"pca"``), or ``None``."""

    def __str__(self) -> str:
        proj = (
            "no projector"
            if self.projector_config is None
            else f"projector {self.projector_config['in_dim']}->{self.projector_config['out_dim']}"
        )
        return (
            f"valid hub folder {self.path}: {self.architecture} (timm {self.timm_architecture}), "
            f"{self.num_features} features, {proj}"
            + (f", ONNX {', '.join(self.onnx_files)}" if self.onnx_files else "")
            + (
                f", PCA of {self.pca['output']} to 1..{self.pca['max_dimensions']} dimensions"
                if self.pca
                else ""
            )
        )


def _timm_architecture(arch: str) -> str:
    """The vanilla timm name for an SSOLE architecture (``ssole_resnet18`` -> ``resnet18``)."""
    if not is_model(arch):
        raise HubFolderError(
            f"unknown architecture {arch!r}: timm {timm.__version__} has no such model"
        )
    vanilla = arch.removeprefix("ssole_")
    if vanilla != arch and not is_model(vanilla):
        raise HubFolderError(f"architecture {arch!r} has no vanilla timm equivalent {vanilla!r}")
    return vanilla


def _arch_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise HubFolderError(
            f"cannot tell the timm architecture of {type(model).__name__}: it has no "
            "pretrained_cfg['architecture'] (build it with timm.create_model)"
        )
    return arch


def _checkpoint_from_model(model: nn.Module, metadata: Mapping[str, Any] | None) -> ModelCheckpoint:
    """Wrap a live encoder (``.backbone`` + ``.projector``) or a bare timm backbone for export."""
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    backbone = getattr(inner, "backbone", inner)
    projector = getattr(inner, "projector", None)
    arch = _arch_of(backbone)
    cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
    return ModelCheckpoint(
        arch=arch,
        backbone={k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        projector=(
            {k: v.detach().cpu() for k, v in projector.state_dict().items()} if projector else {}
        ),
        projector_config=dict(projector.config) if projector is not None else {},
        pretrained_cfg={k: v for k, v in cfg.items() if k in EXPORTED_CFG_KEYS},
        metadata=dict(metadata or {}),
    )


def _exported_pretrained_cfg(arch: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    base = get_pretrained_cfg(arch)
    base_cfg = base.to_dict() if base else {}
    # The tag names a released recipe: only the checkpoint itself can claim one.
    cfg = {k: v for k, v in base_cfg.items() if k in EXPORTED_CFG_KEYS and k != "tag"}
    cfg.update({k: v for k, v in overrides.items() if k in EXPORTED_CFG_KEYS})
    if tuple(cfg.get("input_size", ())) != tuple(base_cfg.get("input_size", ())):
        cfg.pop("pool_size", None)  # timm's pool size holds for the default input size only
    cfg["num_classes"] = 0
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if v is not None}


def _save_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses views and shared storage; a contiguous copy per tensor is always valid.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})


def _code_version() -> dict[str, str]:
    return {
        "ssole_hub": __version__,
        "timm": timm.__version__,
        "torch": torch.__version__,
    }


def export_hub_folder(
    source: str | os.PathLike[str] | ModelCheckpoint | nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    eval_results: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write a hub folder for a training checkpoint or a model; returns the folder's path.

    Besides the weights and ``config.json`` it writes ``ssole.json`` (training metadata,
    evaluation results, code version and the model's measured size and cost,
    :func:`~ssole_hub.hub.model_stats.measure_model_stats`) and the model card rendered from it.

    Args:
        source: a training checkpoint path, a :class:`~ssole_hub.hub.checkpoint.ModelCheckpoint`, an
            encoder with ``.backbone`` (timm) and ``.projector`` (:class:`SSOLEProjector`), such as
            :class:`~ssole_hub.models.SSOLEModel`, or a bare timm backbone (no projector exported).
        out_dir: the folder to write; must not exist unless ``overwrite``.
        overwrite: replace an existing folder.
        eval_results: measured results (``{"knn_top1": 71.3, ...}``, may nest per dataset); they
            update those in the checkpoint's ``metadata["eval_results"]``.
        metadata: extra training metadata, merged over the checkpoint's.
        repo_id: the Hub repo the folder is meant for (used in the model card's examples);
            defaults to ``<SSOLE_HUB_ORG>/<folder name>``.
        license, datasets, tags: model card front matter; ``datasets`` defaults to the
            checkpoint's ``metadata["dataset"]``.

    Raises:
        FileExistsError: if ``out_dir`` exists and ``overwrite`` is false.
        FileNotFoundError, ssole_hub.hub.checkpoint.CheckpointError: for an unreadable checkpoint.
        HubFolderError: for an unknown architecture or weights that do not fit it.
    """
    ckpt = _read_source(source, metadata)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    timm_arch = _timm_architecture(ckpt.arch)
    pretrained_cfg = _exported_pretrained_cfg(ckpt.arch, ckpt.pretrained_cfg)
    backbone_state = drop_classifier(ckpt.backbone, pretrained_cfg.get("classifier"))
    meta = {**ckpt.metadata, **(metadata or {})}
    results = {**meta.pop("eval_results", {}), **(eval_results or {})}

    backbone, projector_config = _checked_model(ckpt, timm_arch, backbone_state)
    config = {
        "architecture": timm_arch,
        "num_classes": 0,
        "num_features": backbone.num_features,
        "global_pool": "avg",
        "pretrained_cfg": pretrained_cfg,
    }
    ssole = {
        "format": HUB_FOLDER_FORMAT,
        "architecture": ckpt.arch,
        "timm_architecture": timm_arch,
        "num_features": backbone.num_features,
        "projector_config": projector_config,
        "model_stats": measure_model_stats(backbone, pretrained_cfg["input_size"]).to_dict(),
        "reduced_decoding": decoding_record(backbone, pretrained_cfg),
        "metadata": meta,
        "eval_results": results,
        "code_version": _code_version(),
    }
    dataset = meta.get("dataset")
    if datasets is None and isinstance(dataset, str) and not os.path.isabs(dataset):
        datasets = [dataset]
    card = render_model_card(
        ssole,
        repo_id=repo_id or f"{HUB_ORG}/{out.name}",
        license=license,
        datasets=datasets,
        tags=tags,
        hub_tag=pretrained_cfg.get("tag"),
    )
    files = {CONFIG_FILE: config, SSOLE_FILE: ssole, MODEL_CARD_FILE: card}
    _write_folder(out, backbone_state, ckpt.projector if projector_config else None, files)
    return out


def _checked_model(
    ckpt: ModelCheckpoint, timm_arch: str, backbone_state: Mapping[str, torch.Tensor]
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The vanilla timm backbone with ``backbone_state`` loaded (which checks that the weights
    fit; it gives ``num_features`` and is measured), and the projector's config once its weights
    were checked too (``None`` without a projector)."""
    backbone = timm.create_model(timm_arch, pretrained=False, num_classes=0)
    load_checked(backbone, backbone_state, f"{ckpt.arch} backbone weights")
    projector_config = dict(ckpt.projector_config) if ckpt.projector else None
    if projector_config is not None:
        build_projector(projector_config, ckpt.projector, backbone.num_features, "projector")
    return backbone, projector_config


def _read_source(
    source: str | os.PathLike[str] | ModelCheckpoint | nn.Module,
    metadata: Mapping[str, Any] | None,
) -> ModelCheckpoint:
    if isinstance(source, ModelCheckpoint):
        return source
    if isinstance(source, nn.Module):
        return _checkpoint_from_model(source, metadata)
    return load_model_checkpoint(source)


def _write_folder(
    out: Path,
    backbone: Mapping[str, torch.Tensor],
    projector: Mapping[str, torch.Tensor] | None,
    files: Mapping[str, Any],
) -> None:
    """Write the weights and ``files`` (name -> JSON object or text) as the folder ``out``.

    They are written next to the destination, then swapped in, so a failed export never leaves
    half a folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_safetensors(backbone, tmp / WEIGHTS_FILE)
        if projector is not None:
            _save_safetensors(projector, tmp / PROJECTOR_FILE)
        for name, content in files.items():
            if not isinstance(content, str):
                content = json.dumps(content, indent=2, default=str) + "\n"
            (tmp / name).write_text(content)
        give_umask_mode(tmp)  # mkdtemp made it 0700; others must be able to read an export
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_onnx_files(path: Path, backbone: nn.Module, projector_config: Any) -> list[str]:
    """Open each ONNX file the folder has; its input must fit ``config.json`` and its outputs
    the backbone's features and the projector's width (no projector output without one)."""
    expected = {"backbone": backbone.num_features}
    if projector_config:
        expected["projector"] = int(projector_config["out_dim"])
    found = []
    for name in ONNX_FILES.values():
        if not (path / name).is_file():
            continue
        session = open_session(path / name, name, threads=1)
        dims = check_session(session, path / name, dict(backbone.pretrained_cfg))
        if dims != expected:
            raise HubFolderError(f"{name} has outputs {dims}; the folder's config says {expected}")
        found.append(name)
    return found


def _check_pca(path: Path, ssole: dict[str, Any], output_dims: dict[str, int]) -> None:
    """A fitted PCA (``pca.safetensors``) loads, agrees with its record in ``ssole.json`` and
    fits the width of the output it was fitted on; a file without a record is refused too."""
    if ssole.get(PCA_RECORD):
        read_pca(local_fetch(path), output_dims)
    elif (path / PCA_FILE).exists():
        raise HubFolderError(
            f"{PCA_FILE} is there but {SSOLE_FILE} records no PCA; fit it again with "
            f"`{FIT_COMMAND}`, or remove the file"
        )


def validate_hub_folder(folder: str | os.PathLike[str]) -> HubFolder:
    """Check a hub folder completely: every file present and readable, ``config.json`` loads in
    timm, the weights fit the architecture (keys and shapes), the projector fits the backbone,
    the model card has the Hub front matter, any ONNX files (``onnx/``) load in OpenVINO
    with the input and output widths the config gives, and a fitted PCA (``pca.safetensors``)
    loads, fits the width of the output it was fitted on and agrees with its record in
    ``ssole.json``. Returns what it found.

    Raises:
        FileNotFoundError: if the folder or one of its files is missing.
        HubFolderError: for anything unreadable, unknown or mismatched.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"hub folder not found: {path}")
    fetch = local_fetch(path)
    ssole = read_json(fetch(SSOLE_FILE), SSOLE_FILE)
    backbone = read_backbone(fetch, f"local-dir:{path}", pretrained=True)
    projector_config = ssole.get("projector_config")
    output_dims = {"backbone": backbone.num_features}
    if projector_config:
        projector, _ = read_projector(fetch, backbone.num_features, pretrained=True)
        output_dims["projector"] = int(projector.config["out_dim"])
    _check_pca(path, ssole, output_dims)
    card = fetch(MODEL_CARD_FILE).read_text()
    for needle in ("library_name: timm", "pipeline_tag: image-feature-extraction"):
        if needle not in card.split("\n---", 1)[0]:
            raise HubFolderError(f"{MODEL_CARD_FILE} front matter lacks `{needle}`")
    return HubFolder(
        path=path,
        architecture=str(ssole.get("architecture", backbone.pretrained_cfg.get("architecture"))),
        timm_architecture=str(backbone.pretrained_cfg.get("architecture")),
        num_features=backbone.num_features,
        pretrained_cfg=dict(backbone.pretrained_cfg),
        projector_config=projector_config or None,
        metadata=dict(ssole.get("metadata") or {}),
        eval_results=dict(ssole.get("eval_results") or {}),
        onnx_files=_check_onnx_files(path, backbone, projector_config),
        pca=ssole.get(PCA_RECORD) or None,
    )
