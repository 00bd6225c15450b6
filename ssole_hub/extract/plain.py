"""The ``plain`` extraction engine: this machine, or the ranks of a ``torchrun`` job.

Records are decoded by :mod:`ssole_hub.images` in DataLoader worker processes while the model runs
on earlier batches. Under ``torchrun`` rank ``r`` of ``W`` takes shards ``r, r + W, r + 2W, ...``
(on ``cuda:LOCAL_RANK`` when there is a GPU); the output folder must be shared by all ranks
(multi-node: a shared file system). When every rank is done, rank 0 writes the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ssole_hub.device_decode import EncodedJPEG, admit_jpeg
from ssole_hub.extract.inputs import (
    ImageFiles,
    InputSource,
    Record,
    UnreadableInputError,
    error_entry,
    input_error_entry,
)
from ssole_hub.extract.output import write_failed_shard, write_manifest, write_shard
from ssole_hub.extract.resume import Options, fingerprint, manifest_header, resumable_shards
from ssole_hub.extractor import FeatureExtractor
from ssole_hub.images import ImageDecodeError, decode_image

__all__ = ["extract_plain"]

# Ranks wait for the slowest one before rank 0 writes the manifest; a shard can take long.
_BARRIER_TIMEOUT = timedelta(hours=12)


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
    """Decodes and preprocesses a batch of records; a bad one becomes an error entry. With
    decoding on the device (:attr:`FeatureExtractor.device_decoder`), JPEGs only have their
    headers checked here, and the main process decodes them on the device."""

    def __init__(self, fx: FeatureExtractor) -> None:
        self.transform = fx.transform
        self.decode_options = fx.decode_options
        self.on_device = fx.device_decoder is not None
        self.limits = {k: fx.decode_options[k] for k in ("max_bytes", "max_pixels")}

    def _prepare(self, data: Any) -> torch.Tensor | EncodedJPEG:
        jpeg = admit_jpeg(data, **self.limits) if self.on_device else None
        return jpeg or self.transform(decode_image(data, **self.decode_options))

    def __getitems__(self, batch: _Batch):
        ids, images, errors = [], [], []
        for record in batch.records:
            try:
                if isinstance(record.data, Exception):
                    raise record.data
                images.append(self._prepare(record.data))
                ids.append(record.id)
            except (ImageDecodeError, OSError) as exc:
                errors.append(error_entry(record.id, type(exc).__name__, str(exc)))
        if not self.on_device:
            images = torch.stack(images) if images else torch.empty(0)
        return batch.shard, batch.last, len(batch.records), ids, images, errors, batch.failure


def _on_device(
    fx: FeatureExtractor, ids: list[str], prepared: list[torch.Tensor | EncodedJPEG]
) -> tuple[list[str], torch.Tensor, list[dict[str, str]]]:
    """A batch whose JPEGs are decoded on the device: its ids, images and error entries."""
    kept, tensors, errors = [], [], []
    for record_id, done in zip(ids, fx.finish_batch(prepared), strict=True):
        if isinstance(done, Exception):
            errors.append(error_entry(record_id, type(done).__name__, str(done)))
        else:
            kept.append(record_id)
            tensors.append(done)
    return kept, torch.stack(tensors) if tensors else torch.empty(0), errors


def _unbatched(batch):
    return batch


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


def _gloo_group() -> dist.ProcessGroup | None:
    """The default group if it is gloo's, else a gloo side group: a collective on the caller's
    NCCL group would need a device, a gloo one does not."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo", timeout=_BARRIER_TIMEOUT)


def _barrier() -> None:
    dist.barrier(group=_gloo_group())


def _extractor(
    model: str | os.PathLike | torch.nn.Module, device: Any, load: dict[str, Any], world: int
) -> FeatureExtractor:
    """The run's extractor. Under torchrun, ``backend="auto"`` is timed by rank 0 alone and
    every rank takes its choice: ranks that chose apart would write shards of two backends."""
    if load["backend"] != "auto" or world == 1:
        return FeatureExtractor.from_pretrained(model, device=device, **load)
    fx = (
        FeatureExtractor.from_pretrained(model, device=device, **load)
        if dist.get_rank() == 0
        else None
    )
    chosen = [fx.backend if fx is not None else None]
    dist.broadcast_object_list(chosen, src=0, group=_gloo_group())
    if fx is not None:
        return fx
    return FeatureExtractor.from_pretrained(model, device=device, **{**load, "backend": chosen[0]})


def extract_plain(
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
            fx = _extractor(model, device, load, world)
        fx.check_options(options.output, options.normalize, options.dimensions)
        run_fingerprint = fingerprint(fx, options, source)
        mine = list(range(rank, source.num_shards, world))
        pending = resumable_shards(
            out, mine, options, run_fingerprint, source, rank=rank, world=world, barrier=_barrier
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
    dim = fx.check_options(options.output, options.normalize, options.dimensions)
    ids, emb, errors = [], [], []
    with tqdm(total=total, disable=not progress, unit="img", desc="extract") as bar:
        for k, last, count, batch_ids, images, batch_errors, failure in loader:
            if isinstance(images, list):  # JPEGs to decode on the device
                batch_ids, images, more = _on_device(fx, batch_ids, images)
                batch_errors += more
            ids += batch_ids
            errors += batch_errors
            if batch_ids:
                emb.append(
                    fx.embed_tensor(images, options.output, options.normalize, options.dimensions)
                )
            bar.update(count)
            if not last:
                continue
            name = source.shard_names[k]
            if failure is not None:  # the rows read before the damage are dropped with it
                write_failed_shard(out, k, failure, options.file_format, run_fingerprint, name=name)
            else:
                rows = torch.cat(emb).numpy() if emb else np.empty((0, dim), np.float32)
                write_shard(
                    out, k, ids, rows, errors, options.file_format, run_fingerprint,
                    name=name, backend=fx.backend,
                )  # fmt: skip
            ids, emb, errors = [], [], []
