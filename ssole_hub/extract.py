"""Batch feature extraction for whole datasets: ``ssole-hub extract`` and :func:`extract_dataset`.

The input (image files, webdataset tars or parquet files; see :mod:`ssole_hub.extract_inputs`) is
cut into input shards. Each finished shard is written atomically to the output folder with a
done-marker, and at the end ``_errors.jsonl`` and ``_manifest.json`` (model id, preprocessing,
dims, counts, shard list) are written (see :mod:`ssole_hub.extract_output` for the layout). An
input file that cannot be read (an empty, garbage or truncated tar or parquet file) is listed as
failed, like an unreadable image, and the other shards go on. A run that is interrupted (killed,
preempted) resumes by skipping finished shards, and so does a run whose input list gained files
or lost or replaced failed ones (see :func:`fingerprint`). Two engines write the same output:

- ``plain`` (here): records are decoded by :mod:`ssole_hub.images` in DataLoader worker processes
  while the model runs on earlier batches. Under ``torchrun`` rank ``r`` of ``W`` takes shards
  ``r, r + W, r + 2W, ...`` (on ``cuda:LOCAL_RANK`` when there is a GPU); the output folder must
  be shared by all ranks (multi-node: a shared file system). When every rank is done, rank 0
  writes the manifest.
- ``ray`` (:mod:`ssole_hub.ray`): Ray Data reads the input and runs
  :class:`ssole_hub.ray.Embedder` actors on a Ray cluster; the driver writes the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ssole_hub.extract_inputs import (
    ImageFiles,
    InputSource,
    Record,
    UnreadableInputError,
    error_entry,
    input_error_entry,
    list_images,
    open_input,
)
from ssole_hub.extract_output import (
    ERRORS_FILE,
    FILE_FORMATS,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    FileFormat,
    check_output,
    pending_shards,
    read_embeddings,
    relocate_shards,
    write_failed_shard,
    write_manifest,
    write_shard,
)
from ssole_hub.extractor import FeatureExtractor
from ssole_hub.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
)
from ssole_hub.models import Output
from ssole_hub.version import __version__

__all__ = [
    "ERRORS_FILE",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "Engine",
    "extract_dataset",
    "list_images",
    "read_embeddings",
    "summary",
]

Engine = Literal["plain", "ray"]

# Ranks wait for the slowest one before rank 0 writes the manifest; a shard can take long.
_BARRIER_TIMEOUT = timedelta(hours=12)


class Options(NamedTuple):
    """What a run writes, besides the model: part of its fingerprint."""

    output: Output
    normalize: bool
    file_format: FileFormat


class _Batch(NamedTuple):
    """Records of one shard for one forward pass; ``last``: the shard's final batch; ``failure``
    (on a last batch): why the shard's input file could not be read."""

    shard: int
    records: list[Record]
    last: bool
    failure: dict[str, str] | None = None


def _batches(source: InputSource, pending: list[int], batch_size: int) -> Iterator[_Batch]:
    # Read lazily in the main process (file paths, or tar members and parquet cells as bytes);
    # batches never straddle two shards, so a shard is complete when its last batch arrives.
    for k in pending:
        batch: list[Record] = []
        try:
            for record in source.records(k):
                if len(batch) == batch_size:
                    yield _Batch(k, batch, False)
                    batch = []
                batch.append(record)
        except UnreadableInputError as exc:
            yield _Batch(k, [], True, input_error_entry(source.files[k], str(exc)))
            continue
        yield _Batch(k, batch, True)


class _DecodeBatches(Dataset):
    """Decodes and preprocesses a batch of records; a bad one becomes an error entry."""

    def __init__(self, fx: FeatureExtractor) -> None:
        self.transform = fx.transform
        self.decode_options = fx.decode_options

    def __getitems__(self, batch: _Batch):
        ids, tensors, errors = [], [], []
        for record in batch.records:
            try:
                if isinstance(record.data, Exception):
                    raise record.data
                tensors.append(self.transform(decode_image(record.data, **self.decode_options)))
                ids.append(record.id)
            except (ImageDecodeError, OSError) as exc:
                errors.append(error_entry(record.id, type(exc).__name__, str(exc)))
        images = torch.stack(tensors) if tensors else torch.empty(0)
        return batch.shard, batch.last, len(batch.records), ids, images, errors, batch.failure


def _unbatched(batch):
    return batch


def fingerprint(fx: FeatureExtractor, options: Options, source: InputSource) -> str:
    """What a run's shards must share to be resumed together: model, backend, preprocessing,
    options (output, normalize, file format) and how the input is read (its kind, the tar image
    suffix or parquet columns; for image files the whole path list and shard size).

    Which tar or parquet files are read is not part of it: each shard's marker names its input
    file instead (:func:`ssole_hub.extract_output.check_output`), so a re-run resumes after an
    unreadable file was fixed or dropped from the list, or files were added, while an output
    folder of another model, preprocessing, option or input kind, or one holding shards of
    files that are not in the list, is refused."""
    run = {
        "model_id": fx.model_id,
        "backend": fx.backend,
        "output": options.output,
        "normalize": options.normalize,
        "data_config": fx.data_config,
        "draft_size": fx.decode_options.get("draft_size"),
        "file_format": options.file_format,
        "input": source.fingerprint(),
    }
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resumable_shards(
    out: Path,
    shards: list[int],
    options: Options,
    run_fingerprint: str,
    source: InputSource,
    *,
    rank: int = 0,
    world: int = 1,
) -> list[int]:
    """Create ``out``, move finished shards whose position in the input list changed, and return
    the shards of ``shards`` still to do, saying what is skipped. Every rank of a job calls it
    (rank 0 moves the shards between two barriers).

    Raises:
        ValueError: ``out`` holds shards of a different extraction.
    """
    names = source.shard_names
    moves = check_output(out, names, run_fingerprint)
    if moves:  # every rank sees the same markers, so all or none of them wait here
        if world > 1:
            _barrier()
        if rank == 0:
            relocate_shards(out, moves, options.file_format)
        if world > 1:
            _barrier()
    pending = pending_shards(out, shards, names, run_fingerprint)
    whose = f" of rank {rank}" if world > 1 else ""
    if len(pending) < len(shards):
        print(
            f"resuming {out}: {len(shards) - len(pending)} of {len(shards)} shards{whose} are "
            "already finished and are skipped",
            file=sys.stderr,
        )
    return pending


def manifest_header(
    fx: FeatureExtractor,
    options: Options,
    inputs: Any,
    source: InputSource,
    run_fingerprint: str,
    **engine: Any,
) -> dict[str, Any]:
    """The manifest's description of a run (``engine``: how it ran, e.g. ``world_size``)."""
    return {
        "model_id": fx.model_id,
        "output": options.output,
        "normalize": options.normalize,
        "dim": fx.dims[options.output],
        "dtype": "float32",
        "compute_dtype": str(fx.dtype).removeprefix("torch."),
        "backend": fx.backend,
        "preprocessing": {**fx.data_config, "draft_size": fx.decode_options.get("draft_size")},
        "input": os.fspath(inputs) if isinstance(inputs, str | os.PathLike) else None,
        "input_kind": source.kind,
        "shard_size": source.shard_size if isinstance(source, ImageFiles) else None,
        **engine,
        "fingerprint": run_fingerprint,
        "ssole_hub_version": __version__,
    }


def summary(manifest: dict[str, Any], out: str | os.PathLike) -> str:
    """The line ``ssole-hub extract`` prints at the end: counts, unreadable input files (named)
    and repeated ids."""
    line = (
        f"embedded {manifest['num_embedded']} of {manifest['num_inputs']} images "
        f"({manifest['dim']}-d) into {out}; skipped {manifest['num_errors']} unreadable (listed "
        f"in {manifest['errors_file']})"
    )
    failed = manifest["failed_inputs"]
    if failed:
        named = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        line += (
            f"; {len(failed)} input file(s) could not be read, so none of their records are in "
            f"the output: {named} (why: {manifest['errors_file']}; fix or remove them and run "
            "again to resume)"
        )
    if manifest["num_duplicate_ids"]:
        line += (
            f"; {manifest['num_duplicate_ids']} id(s) belong to more than one row, e.g. "
            f"{manifest['duplicate_ids'][0]!r} (duplicate_ids in {MANIFEST_FILE})"
        )
    return line


def _distributed() -> tuple[int, int, int, bool]:
    """``(rank, world_size, local_rank, created)``; joins the torchrun job if there is one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0, False
    # Extraction needs no tensor collectives, only a barrier before the manifest is written; gloo
    # (CPU) does that on every machine, GPU or not, without NCCL's short watchdog timeouts.
    dist.init_process_group("gloo", timeout=_BARRIER_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True


def _barrier() -> None:
    if dist.get_backend() == "gloo":
        dist.barrier()
    else:
        # A barrier on the caller's NCCL group would need a device; a gloo side group does not.
        dist.barrier(group=dist.new_group(backend="gloo", timeout=_BARRIER_TIMEOUT))


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
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    compile: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fast_decode: bool = False,
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
            :func:`ssole_hub.extract_inputs.open_input`).
        out_dir: output folder, created if needed; reused to resume an interrupted run.
        batch_size: images per forward pass.
        num_workers: plain engine: decoding processes per rank; default: the CPU cores of this
            rank, at most 8.
        shard_size: images per output shard for image files (the unit of resumption); a tar or
            parquet file is one shard.
        file_format: ``"npy"``, ``"safetensors"`` or ``"parquet"``.
        output, normalize: as :meth:`FeatureExtractor.embed`.
        device, dtype, compile: as :meth:`FeatureExtractor.from_pretrained`; under ``torchrun``
            the default device is ``cuda:LOCAL_RANK`` when CUDA is available. The Ray engine's
            workers use their own GPU when they are given one.
        max_bytes, max_pixels: decoder limits; larger files are skipped and listed as errors.
        fast_decode: decode large JPEGs at a reduced scale (see
            :meth:`FeatureExtractor.from_pretrained`); recorded in the manifest.
        backend: ``"torch"``, ``"onnx"``, ``"onnx-int8"`` or ``"auto"`` (see
            :meth:`FeatureExtractor.from_pretrained`); the one used is in the manifest.
        progress: show a progress bar (rank 0).
        image_column, id_column: parquet: the encoded-image and id columns (default ``image``,
            ``id``); webdataset: ``image_column`` is the image member's suffix.
        engine: ``"plain"`` (this machine, or ``torchrun`` ranks) or ``"ray"`` (a Ray cluster,
            :func:`ssole_hub.ray.extract_with_ray`; needs the ``[ray]`` extra).
        ray_address, num_gpus_per_worker, concurrency, num_cpus_per_worker: Ray engine only (see
            :func:`ssole_hub.ray.extract_with_ray`).

    Returns:
        The manifest (also written to ``out_dir/_manifest.json``; :func:`summary` words it);
        on ranks other than 0, a summary of this rank's work.

    Raises:
        ValueError: bad arguments, no images, or ``out_dir`` holds shards of a different
            extraction (see :func:`fingerprint`). An input file that cannot be read is not an
            error: it is listed in ``_errors.jsonl`` and the manifest's ``failed_inputs``.
        FileNotFoundError: ``inputs`` or the model does not exist.
        ImportError: ``engine="ray"`` without Ray, or parquet without pyarrow.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    if engine not in ("plain", "ray"):
        raise ValueError(f"engine must be 'plain' or 'ray', got {engine!r}")
    ray_only = {"ray_address": ray_address, "num_gpus_per_worker": num_gpus_per_worker}
    ray_only.update(concurrency=concurrency, num_cpus_per_worker=num_cpus_per_worker)
    if engine == "plain" and any(v is not None for v in ray_only.values()):
        raise ValueError(
            f"{', '.join(k for k, v in ray_only.items() if v is not None)} need engine='ray'"
        )
    source = open_input(
        inputs, shard_size=shard_size, image_column=image_column, id_column=id_column
    )
    options = Options(output, normalize, file_format)
    load = dict(
        dtype=dtype,
        with_projector=output == "projector",
        compile=compile,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        fast_decode=fast_decode,
        backend=backend,
    )
    run = (model, inputs, source, Path(out_dir), options, load)
    if engine == "ray":
        if isinstance(model, FeatureExtractor):
            raise ValueError(
                "the Ray engine loads the model on each worker: pass its name, "
                "folder or module, not a FeatureExtractor"
            )
        from ssole_hub.ray import extract_with_ray

        return extract_with_ray(*run, batch_size=batch_size, progress=progress, **ray_only)
    return _extract_plain(*run, device, batch_size, num_workers, progress)


def _extract_plain(
    model: str | os.PathLike | torch.nn.Module | FeatureExtractor,
    inputs: Any,
    source: InputSource,
    out: Path,
    options: Options,
    load: dict[str, Any],
    device: torch.device | str | None,
    batch_size: int,
    num_workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    rank, world, local_rank, created_group = _distributed()
    try:
        if isinstance(model, FeatureExtractor):
            fx = model
        else:
            if device is None and torch.cuda.is_available():
                device = f"cuda:{local_rank}"
            fx = FeatureExtractor.from_pretrained(model, device=device, **load)
        if options.output not in fx.dims:
            raise ValueError(
                f"output {options.output!r} is not available; the model has {list(fx.dims)}"
            )
        run_fingerprint = fingerprint(fx, options, source)
        mine = list(range(rank, source.num_shards, world))
        pending = resumable_shards(
            out, mine, options, run_fingerprint, source, rank=rank, world=world
        )
        workers = _default_workers() if num_workers is None else num_workers
        _run_shards(
            fx,
            options,
            source,
            out,
            pending,
            batch_size,
            workers,
            run_fingerprint,
            progress and rank == 0,
        )
        if world > 1:
            _barrier()
        if rank != 0:
            return {"rank": rank, "shards": mine, "extracted": pending}
        header = manifest_header(
            fx, options, inputs, source, run_fingerprint, engine="plain", world_size=world
        )
        manifest = write_manifest(out, header, source.shard_names, options.file_format)
    finally:
        if created_group:
            dist.destroy_process_group()
    return manifest


def _default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_rank = (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, per_rank))


def _run_shards(
    fx: FeatureExtractor,
    options: Options,
    source: InputSource,
    out: Path,
    pending: list[int],
    batch_size: int,
    num_workers: int,
    run_fingerprint: str,
    progress: bool,
) -> None:
    if not pending:
        return
    loader = DataLoader(
        _DecodeBatches(fx),
        batch_sampler=_batches(source, pending, batch_size),
        num_workers=num_workers,
        collate_fn=_unbatched,
        pin_memory=fx.device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    total = sum(len(source.ids(k)) for k in pending) if isinstance(source, ImageFiles) else None
    dim = fx.dims[options.output]
    ids, emb, errors = [], [], []
    with tqdm(total=total, disable=not progress, unit="img", desc="extract") as bar:
        for k, last, count, batch_ids, images, batch_errors, failure in loader:
            ids += batch_ids
            errors += batch_errors
            if batch_ids:
                emb.append(fx.embed_tensor(images, options.output, options.normalize))
            bar.update(count)
            if not last:
                continue
            name = source.shard_names[k]
            if failure is not None:  # the rows read before the damage are dropped with it
                write_failed_shard(out, k, failure, options.file_format, run_fingerprint, name=name)
            else:
                rows = torch.cat(emb).numpy() if emb else np.empty((0, dim), np.float32)
                write_shard(
                    out, k, ids, rows, errors, options.file_format, run_fingerprint, name=name
                )
            ids, emb, errors = [], [], []
