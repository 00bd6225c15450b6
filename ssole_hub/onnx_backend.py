"""ONNX Runtime forward passes for :class:`~ssole_hub.FeatureExtractor`: backends and files.

A hub folder may carry ``onnx/model.onnx`` (float32) and ``onnx/model_int8.onnx`` (static int8),
written by :func:`ssole_hub.onnx_export.export_onnx`. Each has one input ``images``
``(batch, 3, H, W)`` and the outputs ``backbone`` and, when the folder has a projector,
``projector``. :class:`OnnxModel` runs one of them with the call shape of
:class:`~ssole_hub.models.SSOLEModel` (``model(images, output)``), so the extractor keeps one code
path; preprocessing stays the one resolver's, from the folder's ``config.json``.

``onnx`` and ``onnxruntime`` are imported only here, and only when a file is opened, so
``import ssole_hub`` works without them (install the ``[onnx]`` extra for these backends).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ssole_hub.hub.fetch import Fetch, check_repo_id, hub_fetch, local_fetch
from ssole_hub.hub.folder import CONFIG_FILE, SSOLE_FILE, HubFolderError, read_json
from ssole_hub.models import OUTPUTS, Output

__all__ = [
    "BACKENDS",
    "BACKEND_PREFERENCE",
    "EXPORT_COMMAND",
    "FIDELITY_LIMITS",
    "INPUT_NAME",
    "ONNX_FILES",
    "Backend",
    "OnnxModel",
    "choose_backend",
    "guarded_backends",
    "open_session",
]

log = logging.getLogger("ssole_hub")

Backend = Literal["torch", "onnx", "onnx-int8"]
"""What runs the forward pass: eager torch, ONNX Runtime float32, or ONNX Runtime int8."""
BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-int8", "auto")
"""Every value ``backend=`` accepts; ``auto`` picks one (see :func:`choose_backend`)."""
BACKEND_PREFERENCE: tuple[Backend, ...] = ("onnx", "onnx-int8", "torch")
"""The order ``auto`` tries on a CPU, fastest first, as measured by ``bench/backends.py`` on a
2-core AVX-512 CPU (BENCHMARKS.md): at batch 32, float32 ONNX Runtime ran 2.0-4.5x eager torch,
its static int8 1.5-2.9x (slower than float32 there), torch with channels-last 1.4-1.7x."""

ONNX_FILES: dict[str, str] = {"onnx": "onnx/model.onnx", "onnx-int8": "onnx/model_int8.onnx"}
"""The hub folder file of each ONNX backend."""
FIDELITY_LIMITS: dict[str, float] = {"onnx": 0.9999, "onnx-int8": 0.99}
"""Smallest cosine to float32 eager torch each ONNX file must keep, on every image and output."""
INPUT_NAME = "images"
EXPORT_COMMAND = "ssole-hub export --out FOLDER --onnx --calibration PHOTOS"
"""The command that writes a folder's ONNX files (``--calibration`` adds the int8 file)."""


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
    fidelity check, recorded in ``ssole.json`` at export, passed; in :data:`BACKEND_PREFERENCE`
    order. Empty for names, checkpoints, folders without ONNX files, and without onnxruntime."""
    fetch = _fetch_for(model)
    if fetch is None:
        return []
    if importlib.util.find_spec("onnxruntime") is None:
        log.info("onnxruntime is not installed: the ONNX files of %s are not used", model)
        return []
    try:
        record = read_json(fetch(SSOLE_FILE), SSOLE_FILE).get("onnx") or {}
    except FileNotFoundError:
        return []
    found: list[Backend] = []
    for backend in BACKEND_PREFERENCE[:-1]:
        figures = (record.get("backends") or {}).get(backend) or {}
        if not figures.get("passed"):
            continue
        try:
            fetch(ONNX_FILES[backend])
        except FileNotFoundError:
            continue
        found.append(backend)
    return found


def choose_backend(backend: str, model: str | os.PathLike | Any, device: torch.device) -> Backend:
    """Resolve ``backend`` for ``model`` on ``device``; ``"auto"`` means: torch on CUDA; on a CPU
    the first of ``onnx``, ``onnx-int8``, ``torch`` that the folder has and that passed its
    fidelity check at export (:func:`guarded_backends`). Logs the choice.

    Raises:
        ValueError: an unknown backend, or an ONNX backend on a non-CPU device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cpu" or not isinstance(model, str | os.PathLike):
            chosen: Backend = "torch"
        else:
            chosen = ([*guarded_backends(model), "torch"])[0]
        log.info("backend auto: using %s for %s on %s", chosen, model, device)
        return chosen
    if backend != "torch" and device.type != "cpu":
        raise ValueError(f"backend {backend!r} runs on the CPU only, not on {device}")
    return backend  # type: ignore[return-value]


def open_session(path: Path, what: str, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for ``path`` with ``threads`` intra-op threads (default
    torch's count in the calling thread, so the server's ``inference_threads`` holds).

    Raises:
        ImportError: onnxruntime is not installed (names the ``[onnx]`` extra).
        HubFolderError: the file is truncated, corrupt or not an ONNX model (names it).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("ONNX backends need onnxruntime: pip install 'ssole-hub[onnx]'") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    # Idle intra-op threads sleep instead of spinning: they share the cores with image decoding
    # (measured in bench/serve.py: 1.76x the naive endpoint per CPU-second at concurrency 64,
    # against 1.54x with spinning).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own error types for unreadable models
        raise HubFolderError(f"{what}: {path} is not a loadable ONNX model ({exc})") from exc


class OnnxModel:
    """One ONNX file of a hub folder, run by ONNX Runtime on the CPU, called like
    :class:`~ssole_hub.models.SSOLEModel`: ``model(images, output)`` -> ``(n, dims[output])``.

    Build it with :meth:`from_folder`. Outputs are raw (normalisation stays the extractor's).

    Attributes:
        backend: ``"onnx"`` or ``"onnx-int8"``.
        output_dims: embedding width per output the file has.
        pretrained_cfg: the folder's ``config.json`` ``pretrained_cfg`` (preprocessing).
        path: the ONNX file.
    """

    def __init__(
        self, session: Any, backend: Backend, pretrained_cfg: dict[str, Any], path: Path
    ) -> None:
        self.session = session
        self.backend = backend
        self.pretrained_cfg = pretrained_cfg
        self.path = path
        self.output_dims: dict[Output, int] = check_session(session, path, pretrained_cfg)

    @classmethod
    def from_folder(cls, model: str | os.PathLike, backend: Backend) -> OnnxModel:
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
        name = ONNX_FILES[backend]
        try:
            path = fetch(name)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{os.fspath(model)} has no {name} for backend {backend!r}; write it with "
                f"`{EXPORT_COMMAND}` (int8 needs --calibration)"
            ) from exc
        config = read_json(fetch(CONFIG_FILE), CONFIG_FILE)
        return cls(open_session(path, name), backend, dict(config["pretrained_cfg"]), path)

    def __call__(self, images: torch.Tensor, output: Output) -> torch.Tensor:
        """Raw embeddings ``(n, dims[output])`` float32 of a preprocessed batch.

        Raises:
            ValueError: an output the file does not have.
        """
        if output not in self.output_dims:
            raise ValueError(
                f"output {output!r} is not in {self.path}; it has {list(self.output_dims)}"
            )
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        (out,) = self.session.run([output], {INPUT_NAME: x})
        return torch.from_numpy(out)


def check_session(session: Any, path: Path, pretrained_cfg: dict[str, Any]) -> dict[Output, int]:
    """Check an ONNX session's input and outputs against the folder's preprocessing; returns
    the width of each output.

    Raises:
        HubFolderError: a wrong input name or shape, no ``backbone`` output, or unknown outputs.
    """
    inputs = session.get_inputs()
    expected = [int(v) for v in pretrained_cfg.get("input_size", ())]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or list(inputs[0].shape[1:]) != expected:
        found = [(i.name, i.shape) for i in inputs]
        raise HubFolderError(
            f"{path}: expected one input {INPUT_NAME!r} of shape (batch, {expected}), found {found}"
        )
    dims: dict[Output, int] = {}
    for out in session.get_outputs():
        if out.name not in OUTPUTS or len(out.shape) != 2 or not isinstance(out.shape[1], int):
            raise HubFolderError(f"{path}: unexpected output {out.name!r} of shape {out.shape}")
        dims[out.name] = out.shape[1]
    if "backbone" not in dims:
        raise HubFolderError(f"{path}: has no 'backbone' output (found {list(dims)})")
    return dims
