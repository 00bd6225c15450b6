"""The forward-pass backends and the order ``auto`` tries them in.

``torch`` runs :class:`~ssole_hub.models.SSOLEModel` eagerly (:mod:`ssole_hub.runtimes.eager`);
the ONNX backends run a hub folder's ONNX files on OpenVINO (:mod:`ssole_hub.runtimes.openvino`):

- ``onnx``: ``onnx/model.onnx`` at float32 precision;
- ``onnx-bf16``: ``onnx/model.onnx`` at bfloat16 inference precision (OpenVINO keeps float32 on
  CPUs without bfloat16 support);
- ``onnx-int8``: ``onnx/model_int8.onnx``, its quantized layers in int8, the rest in float32.

Each ONNX backend is checked against float32 torch at export (:mod:`ssole_hub.hub.onnx_export`)
with the limits below; ``auto`` takes only backends that passed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch

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
    "choose_backend",
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


def choose_backend(
    backend: str,
    device: torch.device,
    guarded: Callable[[], Sequence[Backend]] = tuple,
    name: str = "the model",
) -> Backend:
    """Resolve ``backend`` on ``device``; ``"auto"`` means: torch off the CPU; on a CPU the first
    backend of :data:`BACKEND_PREFERENCE` among ``guarded()`` (the ONNX backends whose file the
    model has and that passed their check at export; called only then), else torch. Logs the
    choice, naming the model ``name``.

    Raises:
        ValueError: an unknown backend, or an ONNX backend on a non-CPU device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        passed = set(guarded()) if device.type == "cpu" else set()
        chosen = next(b for b in BACKEND_PREFERENCE if b in passed or b == "torch")
        log.info("backend auto: using %s for %s on %s", chosen, name, device)
        return chosen
    if backend != "torch" and device.type != "cpu":
        raise ValueError(f"backend {backend!r} runs on the CPU only, not on {device}")
    return backend  # type: ignore[return-value]
