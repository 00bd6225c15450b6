"""The forward-pass backends, and how ``auto`` chooses one: by timing them where it runs.

``torch`` runs :class:`~ssole_hub.models.SSOLEModel` eagerly (:mod:`ssole_hub.runtimes.eager`);
the ONNX backends run a hub folder's ONNX files on OpenVINO (:mod:`ssole_hub.runtimes.openvino`):

- ``onnx``: ``onnx/model.onnx`` at float32 precision;
- ``onnx-bf16``: ``onnx/model.onnx`` at bfloat16 inference precision (OpenVINO keeps float32 on
  CPUs without bfloat16 support);
- ``onnx-int8``: ``onnx/model_int8.onnx``, its quantized layers in int8, the rest in float32.

Each ONNX backend is checked against float32 torch at export (:mod:`ssole_hub.hub.onnx_export`)
with the limits below; ``auto`` times only backends that passed. Which backend is fastest depends
on the CPU (int8 led bfloat16 on an AMD EPYC with AVX512-BF16, BENCHMARKS.md; other CPUs may
rank them otherwise), so ``auto`` measures on the machine it runs on (:func:`fastest_backend`) instead of
following a fixed order.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, TypeVar

import torch

__all__ = [
    "BACKENDS",
    "BACKEND_FILES",
    "EXPORT_COMMAND",
    "FIDELITY_LIMITS",
    "INPUT_NAME",
    "NEIGHBOUR_AGREEMENT_LIMIT",
    "ONNX_BACKENDS",
    "ONNX_FILES",
    "PRECISIONS",
    "TIMING_BATCH",
    "Backend",
    "candidate_backends",
    "fastest_backend",
    "ms_per_image",
]

Backend = Literal["torch", "onnx", "onnx-bf16", "onnx-int8"]
"""What runs the forward pass: eager torch, or OpenVINO on an ONNX file at one precision."""
BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-bf16", "onnx-int8", "auto")
"""Every value ``backend=`` accepts; ``auto`` picks one (see :func:`candidate_backends`)."""
TIMING_BATCH = 8
"""Images in the batch ``auto`` times each candidate backend on."""

ONNX_FILES: dict[str, str] = {"onnx": "onnx/model.onnx", "onnx-int8": "onnx/model_int8.onnx"}
"""The ONNX files a hub folder may carry: float32 and static int8."""
BACKEND_FILES: dict[str, str] = {
    "onnx": ONNX_FILES["onnx"],
    "onnx-bf16": ONNX_FILES["onnx"],
    "onnx-int8": ONNX_FILES["onnx-int8"],
}
"""The file each ONNX backend runs."""
ONNX_BACKENDS: tuple[Backend, ...] = tuple(BACKEND_FILES)  # type: ignore[assignment]
"""The OpenVINO backends, in the order they are listed and timed."""
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


def candidate_backends(
    backend: str, device: torch.device, guarded: Callable[[], Sequence[Backend]] = tuple
) -> tuple[Backend, ...]:
    """The backends ``backend`` may resolve to on ``device``: itself when named; for ``"auto"``,
    torch off the CPU, and on a CPU every backend of ``guarded()`` (the ONNX backends whose file
    the model has and that passed their check at export; called only then) and torch, to be
    timed by :func:`fastest_backend`.

    Raises:
        ValueError: an unknown backend, or an ONNX backend on a non-CPU device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        passed = set(guarded()) if device.type == "cpu" else set()
        return (*(b for b in ONNX_BACKENDS if b in passed), "torch")
    if backend != "torch" and device.type != "cpu":
        raise ValueError(f"backend {backend!r} runs on the CPU only, not on {device}")
    return (backend,)  # type: ignore[return-value]


K = TypeVar("K")


def ms_per_image(
    forward: Mapping[K, tuple[Callable[[], object], int]], rounds: int = 3
) -> dict[K, float]:
    """Time each ``forward()`` (one pass over a batch of the given number of images): one
    untimed pass each, then ``rounds`` rounds that take every one in turn, so that a burst of
    other load on the machine falls on all of them. Returns each one's median milliseconds per
    image."""
    for run, _ in forward.values():
        run()
    seconds: dict[K, list[float]] = {k: [] for k in forward}
    for _ in range(rounds):
        for key, (run, _) in forward.items():
            start = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - start)
    return {k: round(1000 * statistics.median(s) / forward[k][1], 3) for k, s in seconds.items()}


def fastest_backend(
    forward: Mapping[Backend, Callable[[], object]], images: int, rounds: int = 3
) -> tuple[Backend, dict[str, float]]:
    """Time each backend's ``forward()`` (one pass over the same batch of ``images``) with
    :func:`ms_per_image`. Returns the backend with the smallest median and each one's median
    milliseconds per image."""
    ms = ms_per_image({b: (run, images) for b, run in forward.items()}, rounds)
    return min(ms, key=ms.__getitem__), ms
