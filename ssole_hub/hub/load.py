"""The project's one model loader, :func:`load_model`, and the loader of a hub folder's ONNX
forward passes, :func:`load_onnx_model`.

:func:`load_model` takes registered names (``ssole_resnet18``, ``ssole_resnet18.in100_m4``),
``hf-hub:ORG/NAME``, ``local-dir:PATH``, a hub folder path, or a training checkpoint, and returns
eval-mode models whose ``pretrained_cfg`` drives timm's preprocessing resolution.
:func:`guarded_backends` says which ONNX backends a folder offers (its file is there and passed
its check at export), and :func:`load_onnx_model` opens one as an
:class:`~ssole_hub.runtimes.openvino.OnnxModel`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import timm
from timm.models import get_pretrained_cfg, is_model, split_model_name_tag
from torch import nn

from ssole_hub.errors import HubFolderError
from ssole_hub.hub.checkpoint import load_model_checkpoint
from ssole_hub.hub.compact import read_pca
from ssole_hub.hub.fetch import Fetch, check_repo_id, hub_fetch, local_fetch
from ssole_hub.hub.folder import (
    CHECKPOINT_SUFFIXES,
    CONFIG_FILE,
    EXPORTED_CFG_KEYS,
    SSOLE_FILE,
    WEIGHTS_FILE,
    build_projector,
    built_with,
    drop_classifier,
    has_projector,
    read_backbone,
    read_json,
    read_projector,
    read_safetensors,
)
from ssole_hub.models import SSOLEModel, SSOLEProjector
from ssole_hub.pca import PCA
from ssole_hub.runtimes.backends import (
    BACKEND_FILES,
    EXPORT_COMMAND,
    ONNX_BACKENDS,
    PRECISIONS,
    Backend,
)
from ssole_hub.runtimes.openvino import OnnxModel, open_session

__all__ = [
    "guarded_backends",
    "load_model",
    "load_onnx_model",
    "load_pca",
    "reduced_decoding_record",
]

log = logging.getLogger("ssole_hub")


def _known_names() -> list[str]:
    return sorted(timm.list_pretrained("ssole_*"))


def _is_checkpoint(path: Path) -> bool:
    return path.suffix in CHECKPOINT_SUFFIXES


def load_model(
    model: str | os.PathLike[str],
    *,
    pretrained: bool = True,
    with_projector: bool | None = False,
) -> nn.Module:
    """Load an SSOLE model: the one model loader of this project.

    Args:
        model: one of
            - a registered name, ``ssole_resnet18`` or with a tag ``ssole_resnet18.in100_m4``
              (weights from the tag's Hub repo ``<SSOLE_HUB_ORG>/<name>.<tag>``);
            - ``hf-hub:ORG/NAME`` (optionally ``@revision``): a published hub folder;
            - ``local-dir:PATH`` or a plain folder path: a hub folder on disk;
            - a training checkpoint (``.pt``, ``.pth``, ``.ckpt``).
        pretrained: load the weights (else the architecture and preprocessing only, random init).
        with_projector: ``True`` also loads the SSOLE projector (an error if the source has
            none); ``None`` loads it when the source has one.

    Returns:
        An eval-mode timm backbone whose forward gives pooled features and whose
        ``.pretrained_cfg`` drives ``timm.data.resolve_model_data_config``; with
        ``with_projector`` ``True`` or ``None``, a :class:`~ssole_hub.models.SSOLEModel`
        wrapping it (its ``projector`` is ``None`` when ``None`` found no projector).

    Raises:
        ValueError: for an unknown name or tag, or a malformed Hub repo id.
        FileNotFoundError: for a missing folder, file, checkpoint or Hub repo;
            :class:`~ssole_hub.hub.fetch.HubUnavailableError` (a ``FileNotFoundError``), at once,
            when Hub weights are not cached and cannot be downloaded, naming the ways out.
        HubFolderError: for unreadable or truncated files, unknown architectures or shape mismatches.
    """
    name = os.fspath(model)
    source, _, ref = name.partition(":")
    if source == "hf-hub" and ref:
        repo_id, _, revision = ref.partition("@")
        check_repo_id(repo_id)
        fetch = hub_fetch(repo_id, revision or None)
        built = read_backbone(fetch, name, pretrained)
    elif source == "local-dir" and ref:
        return load_model(Path(ref), pretrained=pretrained, with_projector=with_projector)
    elif (
        isinstance(model, os.PathLike)
        or os.sep in name
        or name.endswith(CHECKPOINT_SUFFIXES)
        or Path(name).exists()
    ):
        path = Path(name)
        if _is_checkpoint(path) or path.is_file():
            return _load_checkpoint_model(path, pretrained, with_projector)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no hub folder or checkpoint at {path} (for a Hub repo write hf-hub:{name})"
            )
        fetch = local_fetch(path)
        built = read_backbone(fetch, f"local-dir:{path}", pretrained)
    else:
        built, fetch = _load_registered(name, pretrained)
    built.eval()
    if with_projector is False:
        return built
    if fetch is None:
        return SSOLEModel(built, SSOLEProjector(built.num_features)).eval()
    if with_projector is None and not has_projector(fetch):
        return SSOLEModel(built, None).eval()
    projector, ssole = read_projector(fetch, built.num_features, pretrained)
    return SSOLEModel(built, projector, ssole.get("metadata")).eval()


def _load_registered(name: str, pretrained: bool) -> tuple[nn.Module, Fetch | None]:
    arch, tag = split_model_name_tag(name)
    if not is_model(arch) or (tag and name not in timm.list_pretrained(f"{arch}.*")):
        raise ValueError(
            f"unknown model {name!r}; use one of {', '.join(_known_names())}, "
            "hf-hub:ORG/NAME, local-dir:PATH, a hub folder or a training checkpoint"
        )
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0), None
    cfg = get_pretrained_cfg(name)
    hub_id = cfg.hf_hub_id if cfg else None
    if not hub_id:
        raise ValueError(
            f"{name!r} has no published weights (no Hub repo in its pretrained config)"
        )
    filename = cfg.hf_hub_filename or WEIGHTS_FILE
    if not filename.endswith(".safetensors"):
        raise ValueError(
            f"{name!r} points at {filename}; published weights are read only from safetensors"
        )
    repo_id, _, revision = hub_id.partition("@")
    fetch = hub_fetch(repo_id, revision or None)
    # Fetch before building the model, so a missing download fails fast.
    state = read_safetensors(fetch(filename), f"{hub_id}/{filename}")
    backbone = built_with(
        lambda: timm.create_model(name, pretrained=False, num_classes=0),
        drop_classifier(state, cfg.classifier),
        f"{hub_id}/{filename}",
    )
    return backbone, fetch


def _load_checkpoint_model(path: Path, pretrained: bool, with_projector: bool | None) -> nn.Module:
    ckpt = load_model_checkpoint(path)
    if not is_model(ckpt.arch):
        raise HubFolderError(f"{path}: unknown architecture {ckpt.arch!r}")
    overlay = {k: v for k, v in ckpt.pretrained_cfg.items() if k in EXPORTED_CFG_KEYS}
    # A checkpoint is not the published recipe: do not point back at the tag's Hub repo.
    overlay.update(hf_hub_id=None, hf_hub_filename=None, tag=overlay.get("tag"))

    def build() -> nn.Module:
        return timm.create_model(
            ckpt.arch, pretrained=False, num_classes=0, pretrained_cfg_overlay=overlay
        )

    def weights(backbone: nn.Module) -> dict[str, Any]:
        return drop_classifier(ckpt.backbone, backbone.pretrained_cfg.get("classifier"))

    what = f"{path} backbone weights"
    backbone = built_with(build, weights if pretrained else None, what).eval()
    if with_projector is False:
        return backbone
    if not ckpt.projector_config:
        if with_projector is None:
            return SSOLEModel(backbone, None, ckpt.metadata).eval()
        raise HubFolderError(f"{path} has no projector_config")
    projector = build_projector(
        ckpt.projector_config,
        ckpt.projector if pretrained else None,
        backbone.num_features,
        f"{path} projector",
    )
    return SSOLEModel(backbone, projector, ckpt.metadata).eval()


def _fetch_for(model: str | os.PathLike) -> Fetch | None:
    """A fetch for a hub folder or ``hf-hub:`` repo; ``None`` for other model sources."""
    name = os.fspath(model)
    source, _, ref = name.partition(":")
    if source == "hf-hub" and ref:
        repo_id, _, revision = ref.partition("@")
        check_repo_id(repo_id)
        return hub_fetch(repo_id, revision or None)
    path = Path(ref if source == "local-dir" and ref else name)
    return local_fetch(path) if path.is_dir() else None


def guarded_backends(model: str | os.PathLike) -> list[Backend]:
    """The ONNX backends whose file ``model`` (a hub folder or ``hf-hub:`` repo) has and whose
    fidelity check, recorded in ``ssole.json`` at export, passed; in :data:`ONNX_BACKENDS`
    order. Empty for names, checkpoints, folders without ONNX files, and without OpenVINO."""
    fetch = _fetch_for(model)
    if fetch is None:
        return []
    if importlib.util.find_spec("openvino") is None:
        log.info("openvino is not installed: the ONNX files of %s are not used", model)
        return []
    try:
        record = read_json(fetch(SSOLE_FILE), SSOLE_FILE).get("onnx") or {}
    except FileNotFoundError:
        return []
    found: list[Backend] = []
    for backend in ONNX_BACKENDS:
        figures = (record.get("backends") or {}).get(backend) or {}
        if not figures.get("passed"):
            continue
        try:
            fetch(BACKEND_FILES[backend])
        except FileNotFoundError:
            continue
        found.append(backend)
    return found


def reduced_decoding_record(model: str | os.PathLike) -> dict[str, Any] | None:
    """The reduced-decoding guard's record in the ``ssole.json`` of ``model`` (a hub folder or
    ``hf-hub:`` repo), written at export (:mod:`ssole_hub.hub.decode_check`); ``None`` for
    names, checkpoints and folders exported without one."""
    fetch = _fetch_for(model)
    if fetch is None:
        return None
    try:
        return read_json(fetch(SSOLE_FILE), SSOLE_FILE).get("reduced_decoding")
    except FileNotFoundError:
        return None


def load_pca(model: str | os.PathLike) -> PCA | None:
    """The PCA fitted for ``model`` (a hub folder or ``hf-hub:`` repo whose ``ssole.json``
    records one, :mod:`ssole_hub.hub.compact`); ``None`` for names, checkpoints and folders
    without one.

    Raises:
        HubFolderError: the recorded PCA file is missing, unreadable or not the one recorded.
    """
    fetch = _fetch_for(model)
    if fetch is None:
        return None
    try:
        return read_pca(fetch)
    except FileNotFoundError:  # no ssole.json
        return None


def load_onnx_model(model: str | os.PathLike, backend: Backend) -> OnnxModel:
    """Open ``backend``'s file of ``model`` (a hub folder, ``local-dir:PATH`` or ``hf-hub:``).

    Raises:
        FileNotFoundError: the folder lacks the file (names the export command).
        ValueError: ``model`` is not a hub folder or Hub repo.
        HubFolderError: the file is unreadable or does not fit ``config.json``.
    """
    fetch = _fetch_for(model)
    if fetch is None:
        raise ValueError(
            f"backend {backend!r} needs a hub folder or hf-hub: repo with ONNX files; "
            f"{os.fspath(model)!r} is neither (write one with `{EXPORT_COMMAND}`)"
        )
    name = BACKEND_FILES[backend]
    try:
        path = fetch(name)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{os.fspath(model)} has no {name} for backend {backend!r}; write it with "
            f"`{EXPORT_COMMAND}` (int8 needs --calibration)"
        ) from exc
    config = read_json(fetch(CONFIG_FILE), CONFIG_FILE)
    session = open_session(path, name, precision=PRECISIONS[backend])
    onnx_model = OnnxModel(session, backend, dict(config["pretrained_cfg"]), path)
    if onnx_model.precision != PRECISIONS[backend]:
        log.warning(
            "%s runs at %s on this CPU (no bfloat16 support)", backend, onnx_model.precision
        )
    return onnx_model
