"""Forward passes over a hub folder's ONNX files for :class:`~ssole_hub.FeatureExtractor`.

A hub folder may carry ``onnx/model.onnx`` (float32) and ``onnx/model_int8.onnx`` (static int8),
written by :func:`ssole_hub.onnx_export.export_onnx`. Each has one input ``images``
``(batch, 3, H, W)`` and the outputs ``backbone`` and, when the folder has a projector,
``projector``. OpenVINO runs them on the CPU: in float32 it is level with ONNX Runtime, and it
alone has a bfloat16 path and an int8 faster than its float32 (``bench/backends.py``,
BENCHMARKS.md), so ONNX Runtime is used only to quantize at export. Three backends run the two files:

- ``onnx``: ``model.onnx`` at float32 precision;
- ``onnx-bf16``: ``model.onnx`` at bfloat16 inference precision (OpenVINO keeps float32 on CPUs
  without bfloat16 support);
- ``onnx-int8``: ``model_int8.onnx``, its quantized layers in int8, the rest in float32.

:class:`OnnxModel` runs one of them with the call shape of :class:`~ssole_hub.models.SSOLEModel`
(``model(images, output)``), so the extractor keeps one code path; preprocessing stays the one
resolver's, from the folder's ``config.json``. ``openvino`` is imported only here, and only when a
file is opened, so ``import ssole_hub`` works without it (install the ``[onnx]`` extra).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import queue
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ssole_hub.hub.fetch import Fetch, check_repo_id, hub_fetch, local_fetch
from ssole_hub.hub.folder import CONFIG_FILE, SSOLE_FILE, HubFolderError, read_json
from ssole_hub.models import OUTPUTS, Output

__all__ = [
    "BACKENDS",
    "BACKEND_FILES",
    "BACKEND_PREFERENCE",
    "EXPORT_COMMAND",
    "FIDELITY_LIMITS",
    "INPUT_NAME",
    "NEIGHBOUR_AGREEMENT_LIMIT",
    "ONNX_FILES",
    "PRECISIONS",
    "Backend",
    "OnnxModel",
    "choose_backend",
    "guarded_backends",
    "open_session",
]

log = logging.getLogger("ssole_hub")

Backend = Literal["torch", "onnx", "onnx-bf16", "onnx-int8"]
"""What runs the forward pass: eager torch, or OpenVINO on an ONNX file at one precision."""
BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-bf16", "onnx-int8", "auto")
"""Every value ``backend=`` accepts; ``auto`` picks one (see :func:`choose_backend`)."""
BACKEND_PREFERENCE: tuple[Backend, ...] = ("onnx-int8", "onnx-bf16", "onnx", "torch")
"""The order ``auto`` tries on a CPU, fastest first, as measured by ``bench/backends.py`` on a
2-core AVX512-BF16 CPU (BENCHMARKS.md)."""

ONNX_FILES: dict[str, str] = {"onnx": "onnx/model.onnx", "onnx-int8": "onnx/model_int8.onnx"}
"""The ONNX files a hub folder may carry: float32 and static int8."""
BACKEND_FILES: dict[str, str] = {
    "onnx": ONNX_FILES["onnx"],
    "onnx-bf16": ONNX_FILES["onnx"],
    "onnx-int8": ONNX_FILES["onnx-int8"],
}
"""The file each ONNX backend runs."""
PRECISIONS: dict[str, str] = {"onnx": "f32", "onnx-bf16": "bf16", "onnx-int8": "f32"}
"""OpenVINO's inference precision hint per backend (int8 layers stay int8 under ``f32``)."""
FIDELITY_LIMITS: dict[str, float] = {"onnx": 0.9999, "onnx-bf16": 0.999, "onnx-int8": 0.99}
"""Smallest cosine to float32 eager torch each backend must keep, on every image and output."""
NEIGHBOUR_AGREEMENT_LIMIT = 0.9
"""Smallest mean share of each guard photo's nearest neighbours (cosine, among the guard photos)
that a backend must find as float32 torch does: a retrieval-level check, because a cosine
threshold alone let an int8 file through that lost 4 kNN points (BENCHMARKS.md)."""
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
    for backend in BACKEND_PREFERENCE[:-1]:
        figures = (record.get("backends") or {}).get(backend) or {}
        if not figures.get("passed"):
            continue
        try:
            fetch(BACKEND_FILES[backend])
        except FileNotFoundError:
            continue
        found.append(backend)
    return found


def choose_backend(backend: str, model: str | os.PathLike | Any, device: torch.device) -> Backend:
    """Resolve ``backend`` for ``model`` on ``device``; ``"auto"`` means: torch on CUDA; on a CPU
    the first backend of :data:`BACKEND_PREFERENCE` that the folder has and that passed its
    fidelity check at export (:func:`guarded_backends`), else torch. Logs the choice.

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


def open_session(path: Path, what: str, threads: int | None = None, precision: str = "f32") -> Any:
    """``path`` compiled by OpenVINO for the CPU at ``precision`` (``"f32"`` or ``"bf16"``), with
    ``threads`` inference threads (default torch's count in the calling thread, so the server's
    ``inference_threads`` holds).

    Raises:
        ImportError: openvino is not installed (names the ``[onnx]`` extra).
        HubFolderError: the file is truncated, corrupt or not an ONNX model (names it).
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise ImportError("ONNX backends need openvino: pip install 'ssole-hub[onnx]'") from exc
    config = {
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY",
    }
    try:
        with _own_signal_stack():
            return ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses for unreadable models
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubFolderError(f"{what}: {path} is not a loadable ONNX model ({reason})") from exc


class _SignalStack(ctypes.Structure):
    """Linux's ``stack_t``."""

    _fields_ = [
        ("ss_sp", ctypes.c_void_p),
        ("ss_flags", ctypes.c_int),
        ("ss_size", ctypes.c_size_t),
    ]


@contextlib.contextmanager
def _own_signal_stack() -> Iterator[None]:
    """Keep the calling thread's alternate signal stack as it was.

    OpenVINO's CPU plugin (2026.4) gives the thread that compiles a model an alternate signal
    stack and can free that memory later. The next signal the thread takes (a child process
    exiting is enough) is then written to freed memory and the process dies with SIGSEGV, which
    happened in training after ``validate_hub_folder``. Restoring the thread's own setting
    afterwards leaves OpenVINO's handlers on the ordinary stack (Linux only; a no-op elsewhere).
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before = _SignalStack()
    libc.sigaltstack(None, ctypes.byref(before))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(before), None)


def session_precision(session: Any) -> str:
    """The inference precision OpenVINO really uses for ``session`` on this CPU: ``"f32"`` or
    ``"bf16"`` (a ``bf16`` hint stays ``f32`` on CPUs without bfloat16 support)."""
    import openvino as ov

    return "bf16" if session.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16 else "f32"


class OnnxModel:
    """One ONNX file of a hub folder, run by OpenVINO on the CPU, called like
    :class:`~ssole_hub.models.SSOLEModel`: ``model(images, output)`` -> ``(n, dims[output])``.

    Build it with :meth:`from_folder`. Outputs are raw (normalisation stays the extractor's).
    Each call takes an inference request of its own from a pool (made on first need, then
    reused), so calls from several threads are safe.

    Attributes:
        backend: ``"onnx"``, ``"onnx-bf16"`` or ``"onnx-int8"``.
        output_dims: embedding width per output the file has.
        pretrained_cfg: the folder's ``config.json`` ``pretrained_cfg`` (preprocessing).
        path: the ONNX file.
        precision: the inference precision in use on this CPU (``"f32"`` or ``"bf16"``).
    """

    def __init__(
        self, session: Any, backend: Backend, pretrained_cfg: dict[str, Any], path: Path
    ) -> None:
        self.session = session
        self.backend = backend
        self.pretrained_cfg = pretrained_cfg
        self.path = path
        self.output_dims: dict[Output, int] = check_session(session, path, pretrained_cfg)
        self.precision = session_precision(session)
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

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
        onnx_model = cls(session, backend, dict(config["pretrained_cfg"]), path)
        if onnx_model.precision != PRECISIONS[backend]:
            log.warning(
                "%s runs at %s on this CPU (no bfloat16 support)", backend, onnx_model.precision
            )
        return onnx_model

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
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self.session.create_infer_request()
        try:
            request.infer({INPUT_NAME: x})
            return torch.from_numpy(request.get_tensor(output).data.copy())
        finally:
            self._requests.put(request)


def check_session(session: Any, path: Path, pretrained_cfg: dict[str, Any]) -> dict[Output, int]:
    """Check a compiled model's input and outputs against the folder's preprocessing; returns
    the width of each output.

    Raises:
        HubFolderError: a wrong input name or shape, no ``backbone`` output, or unknown outputs.
    """
    inputs = session.inputs
    expected = [int(v) for v in pretrained_cfg.get("input_size", ())]
    shape = _dims(inputs[0].get_partial_shape()) if len(inputs) == 1 else None
    if shape is None or inputs[0].get_any_name() != INPUT_NAME or shape[1:] != expected:
        found = [(i.get_any_name(), str(i.get_partial_shape())) for i in inputs]
        raise HubFolderError(
            f"{path}: expected one input {INPUT_NAME!r} of shape (batch, {expected}), found {found}"
        )
    dims: dict[Output, int] = {}
    for out in session.outputs:
        name, shape = out.get_any_name(), _dims(out.get_partial_shape())
        if name not in OUTPUTS or shape is None or len(shape) != 2 or shape[1] is None:
            raise HubFolderError(
                f"{path}: unexpected output {name!r} of shape {out.get_partial_shape()}"
            )
        dims[name] = shape[1]
    if "backbone" not in dims:
        raise HubFolderError(f"{path}: has no 'backbone' output (found {list(dims)})")
    return dims


def _dims(shape: Any) -> list[int | None] | None:
    """An OpenVINO partial shape as a list (``None`` for a dynamic dimension); ``None`` for a
    dynamic rank."""
    if not shape.rank.is_static:
        return None
    return [d.get_length() if d.is_static else None for d in shape]
