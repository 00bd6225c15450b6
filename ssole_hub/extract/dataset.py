"""Batch feature extraction for whole datasets: ``ssole-hub extract`` and :func:`extract_dataset`.

The input (image files, webdataset tars or parquet files; see :mod:`ssole_hub.extract.inputs`) is
cut into input shards. Each finished shard is written atomically to the output folder with a
done-marker, and at the end ``_errors.jsonl`` and ``_manifest.json`` (model id, preprocessing,
dims, counts, shard list) are written (see :mod:`ssole_hub.extract.output` for the layout). An
input file that cannot be read (an empty, garbage or truncated tar or parquet file) is listed as
failed, like an unreadable image, and the other shards go on. A run that is interrupted (killed,
preempted) resumes by skipping finished shards, and so does a run whose input list gained files
or lost or replaced failed ones (see :func:`fingerprint`). Two engines write the same output:

- ``plain`` (:mod:`ssole_hub.extract.plain`): this machine, or the ranks of a ``torchrun`` job;
- ``ray`` (:mod:`ssole_hub.extract.ray`): Ray tasks read the input and
  :class:`ssole_hub.extract.ray.Embedder` actors embed it on a Ray cluster; the driver writes the
  shards.

What both share (fingerprint, resume, manifest) is :mod:`ssole_hub.extract.resume`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ssole_hub.extract.inputs import open_input
from ssole_hub.extract.output import FILE_FORMATS, FileFormat, earlier_backend
from ssole_hub.extract.plain import extract_plain
from ssole_hub.extract.ray import extract_with_ray
from ssole_hub.extract.resume import Options
from ssole_hub.extractor import FeatureExtractor
from ssole_hub.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ssole_hub.models import Output

__all__ = ["Engine", "extract_dataset"]

Engine = Literal["plain", "ray"]


def extract_dataset(
    model: str | os.PathLike | torch.nn.Module | FeatureExtractor,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    shard_size: int = 10_000,
    file_format: FileFormat = "npy",
    output: Output = "backbone",
    normalize: bool = True,
    dimensions: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    compile: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fast_decode: bool | None = None,
    device_decode: bool | None = None,
    backend: str = "torch",
    progress: bool = True,
    image_column: str | None = None,
    id_column: str | None = None,
    engine: Engine = "plain",
    ray_address: str | None = None,
    num_gpus_per_worker: float | None = None,
    concurrency: int | None = None,
    num_cpus_per_worker: float | None = None,
) -> dict[str, Any]:
    """Embed every record of ``inputs`` into sharded files under ``out_dir``; resumable.

    Args:
        model: a model name / ``hf-hub:`` / ``local-dir:`` / folder / checkpoint (anything
            :func:`ssole_hub.load_model` takes), a built ``nn.Module``, or (plain engine) a
            :class:`~ssole_hub.FeatureExtractor` (then ``device``, ``dtype``, ``compile`` and
            the limits are its own).
        inputs: a folder of images, a text file of paths, webdataset tars or parquet files (a
            path, a brace pattern such as ``"shards/data-{000..009}.tar"`` or a list; see
            :func:`ssole_hub.extract.inputs.open_input`).
        out_dir: output folder, created if needed; reused to resume an interrupted run.
        batch_size: images per forward pass.
        num_workers: plain engine: decoding processes per rank; default: the CPU cores of this
            rank, at most 8.
        shard_size: images per output shard for image files (the unit of resumption); a tar or
            parquet file is one shard.
        file_format: ``"npy"``, ``"safetensors"`` or ``"parquet"``.
        output, normalize, dimensions: as :meth:`FeatureExtractor.embed` (``dimensions``: a
            compact embedding from the model's fitted PCA, ``ssole-hub fit-pca``); recorded in
            the manifest and part of the fingerprint.
        device, dtype, compile: as :meth:`FeatureExtractor.from_pretrained`; under ``torchrun``
            the default device is ``cuda:LOCAL_RANK`` when CUDA is available. The Ray engine's
            workers use their own GPU when they are given one.
        max_bytes, max_pixels: decoder limits; larger files are skipped and listed as errors.
        fast_decode: decode large JPEGs at a reduced DCT scale: ``None`` (default) where the
            model passes the guard, ``True`` always, ``False`` never (see
            :meth:`FeatureExtractor.from_pretrained`); recorded in the manifest.
        device_decode: decode JPEGs on the model's device in each batch (nvjpeg on a GPU):
            ``None`` (default) on a GPU where the guard passes, ``True`` wherever torchvision
            can, ``False`` never (see :meth:`FeatureExtractor.from_pretrained`); recorded in
            the manifest.
        backend: ``"torch"``, ``"onnx"``, ``"onnx-int8"`` or ``"auto"`` (see
            :meth:`FeatureExtractor.from_pretrained`); the one used is in the manifest.
        progress: show a progress bar (rank 0).
        image_column, id_column: parquet: the encoded-image and id columns (default ``image``,
            ``id``); webdataset: ``image_column`` is the image member's suffix.
        engine: ``"plain"`` (this machine, or ``torchrun`` ranks) or ``"ray"`` (a Ray cluster,
            :func:`ssole_hub.extract.ray.extract_with_ray`; needs the ``[ray]`` extra).
        ray_address, num_gpus_per_worker, concurrency, num_cpus_per_worker: Ray engine only (see
            :func:`ssole_hub.extract.ray.extract_with_ray`).

    Returns:
        The manifest (also written to ``out_dir/_manifest.json``; :func:`~ssole_hub.extract.resume.summary` words it);
        on ranks other than 0, a summary of this rank's work.

    Raises:
        ValueError: bad arguments (``dimensions`` the model has no PCA for, with how to fit
            one), no images, or ``out_dir`` holds shards of a different
            extraction (see :func:`~ssole_hub.extract.resume.fingerprint`). An input file that cannot be read is not an
            error: it is listed in ``_errors.jsonl`` and the manifest's ``failed_inputs``.
        FileNotFoundError: ``inputs`` or the model does not exist.
        ImportError: ``engine="ray"`` without Ray, or parquet without pyarrow.
    """
    ray_only = {"ray_address": ray_address, "num_gpus_per_worker": num_gpus_per_worker}
    ray_only.update(concurrency=concurrency, num_cpus_per_worker=num_cpus_per_worker)
    _check_arguments(batch_size, shard_size, file_format, engine, ray_only)
    source = open_input(
        inputs, shard_size=shard_size, image_column=image_column, id_column=id_column
    )
    options = Options(output, normalize, file_format, dimensions)
    if backend == "auto":  # a resumed run keeps the backend of its finished shards
        backend = earlier_backend(Path(out_dir)) or backend
    load = dict(
        dtype=dtype,
        with_projector=output == "projector",
        compile=compile,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        fast_decode=fast_decode,
        device_decode=device_decode,
        backend=backend,
    )
    run = (model, inputs, source, Path(out_dir), options, load)
    if engine == "ray":
        if isinstance(model, FeatureExtractor):
            raise ValueError(
                "the Ray engine loads the model on each worker: pass its name, "
                "folder or module, not a FeatureExtractor"
            )
        return extract_with_ray(*run, batch_size=batch_size, progress=progress, **ray_only)
    return extract_plain(*run, device, batch_size, num_workers, progress)


def _check_arguments(
    batch_size: int, shard_size: int, file_format: str, engine: str, ray_only: dict[str, Any]
) -> None:
    """Raise ``ValueError`` naming the first argument of :func:`extract_dataset` that is wrong."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    if engine not in ("plain", "ray"):
        raise ValueError(f"engine must be 'plain' or 'ray', got {engine!r}")
    if engine == "plain" and any(v is not None for v in ray_only.values()):
        raise ValueError(
            f"{', '.join(k for k, v in ray_only.items() if v is not None)} need engine='ray'"
        )
