"""OpenVINO sessions over ONNX files, called like :class:`~ssole_hub.models.SSOLEModel`.

A hub folder may carry ``onnx/model.onnx`` (float32) and ``onnx/model_int8.onnx`` (static int8),
written by :func:`ssole_hub.hub.onnx_export.export_onnx`. Each has one input ``images``
``(batch, 3, H, W)`` and the outputs ``backbone`` and, when the folder has a projector,
``projector``. OpenVINO runs them on the CPU: in float32 it is level with ONNX Runtime, and it
alone has a bfloat16 path and an int8 faster than its float32 (``bench/backends.py``,
BENCHMARKS.md), so ONNX Runtime is used only to quantize at export.

:class:`OnnxModel` runs one file with the call shape of :class:`~ssole_hub.models.SSOLEModel`
(``model(images, output)``), so the extractor keeps one code path; a folder's file is opened by
:func:`ssole_hub.hub.load.load_onnx_model`. ``openvino`` is imported only here, and only when a
file is opened, so ``import ssole_hub`` works without it (install the ``[onnx]`` extra).
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssole_hub.errors import HubFolderError
from ssole_hub.models import OUTPUTS, Output
from ssole_hub.runtimes.backends import INPUT_NAME, Backend
from ssole_hub.runtimes.signal_stack import own_signal_stack

__all__ = ["OnnxModel", "check_session", "open_session", "session_precision"]


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
        with own_signal_stack():
            return ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses for unreadable models
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubFolderError(f"{what}: {path} is not a loadable ONNX model ({reason})") from exc


def session_precision(session: Any) -> str:
    """The inference precision OpenVINO really uses for ``session`` on this CPU: ``"f32"`` or
    ``"bf16"`` (a ``bf16`` hint stays ``f32`` on CPUs without bfloat16 support)."""
    import openvino as ov

    return "bf16" if session.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16 else "f32"


class OnnxModel:
    """One ONNX file of a hub folder, run by OpenVINO on the CPU, called like
    :class:`~ssole_hub.models.SSOLEModel`: ``model(images, output)`` -> ``(n, dims[output])``.

    Open a folder's file with :func:`ssole_hub.hub.load.load_onnx_model`. Outputs are raw (normalisation stays the extractor's).
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
