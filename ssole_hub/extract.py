"""Batch feature extraction for whole datasets: ``ssole-hub extract`` and :func:`extract_dataset`.

The input (a folder scanned recursively, a text file of paths, or a list of paths) is cut into
shards of ``shard_size`` consecutive images. Images are decoded by :mod:`ssole_hub.images` in
DataLoader worker processes while the model runs on earlier batches. Each finished shard is written
atomically to the output folder:

- ``embeddings-00000.npy`` (or ``.safetensors``, tensor ``"embeddings"``): ``(n, dim)`` float32;
- ``paths-00000.txt``: the n embedded paths, one per line, row order;
- ``errors-00000.jsonl``: the unreadable files of the shard (``path``, ``error``, ``message``);
- ``shard-00000.json``: written last; marks the shard finished.

A run that is interrupted (killed, preempted) resumes by skipping finished shards. Under
``torchrun`` rank ``r`` of ``W`` takes shards ``r, r + W, r + 2W, ...`` (on ``cuda:LOCAL_RANK``
when there is a GPU); the output folder must be shared by all ranks (multi-node: a shared file
system). When every rank is done, rank 0 merges the errors into ``errors.jsonl`` and writes
``manifest.json`` (model id, preprocessing, dims, counts, shard list).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ssole_hub.extractor import FeatureExtractor
from ssole_hub.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    is_image_path,
)
from ssole_hub.models import Output
from ssole_hub.version import __version__

__all__ = ["MANIFEST_FILE", "MANIFEST_FORMAT", "extract_dataset", "list_images", "read_embeddings"]

MANIFEST_FORMAT = "ssole-hub/embeddings/1"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.jsonl"
FileFormat = Literal["npy", "safetensors"]

# Ranks wait for the slowest one before rank 0 writes the manifest; a shard can take long.
_BARRIER_TIMEOUT = timedelta(hours=12)


def list_images(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], Path]:
    """The images to extract, in a fixed order, and the folder their paths are relative to.

    Args:
        inputs: a folder (scanned recursively for image extensions, hidden entries skipped,
            sorted), a text file with one path per line (blank lines and ``#`` comments
            skipped; relative paths are relative to the file's folder), or a list of paths
            (relative to the current directory).

    Returns:
        ``(paths, root)``: paths as they are recorded in the output, and the folder that relative
        ones are resolved against.

    Raises:
        FileNotFoundError: ``inputs`` does not exist.
        ValueError: no images were found.
    """
    if isinstance(inputs, str | os.PathLike):
        src = Path(inputs)
        if src.is_dir():
            root = src
            paths = sorted(
                p.relative_to(src).as_posix()
                for p in src.rglob("*")
                if p.is_file()
                and is_image_path(p)
                and not any(part.startswith(".") for part in p.relative_to(src).parts)
            )
        elif src.is_file():
            root = src.parent
            lines = (line.strip() for line in src.read_text().splitlines())
            paths = [line for line in lines if line and not line.startswith("#")]
        else:
            raise FileNotFoundError(f"input {src} is neither a folder nor a list of paths")
    else:
        root = Path.cwd()
        paths = [os.fspath(p) for p in inputs]
    # One path per line in the paths files: a name with a line break cannot be recorded.
    unrecordable = [p for p in paths if "\n" in p or "\r" in p]
    if unrecordable:
        warnings.warn(
            f"skipping {len(unrecordable)} file name(s) with line breaks, e.g. {unrecordable[0]!r}",
            stacklevel=2,
        )
        paths = [p for p in paths if p not in set(unrecordable)]
    if not paths:
        raise ValueError(f"no images found in {inputs}")
    return paths, root


class _ImageFiles(Dataset):
    """Decodes and preprocesses one file per item; a bad file becomes an error entry, not a crash."""

    def __init__(self, paths: list[str], root: Path, fx: FeatureExtractor) -> None:
        self.paths = paths
        self.root = root
        self.transform = fx.transform
        self.decode_options = fx.decode_options

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, dict[str, str] | None]:
        try:
            img = decode_image(self.root / self.paths[i], **self.decode_options)
            return i, self.transform(img), None
        except (ImageDecodeError, OSError) as exc:
            return (
                i,
                None,
                {"path": self.paths[i], "error": type(exc).__name__, "message": str(exc)},
            )


class _Options(NamedTuple):
    """What a run writes, besides the model: part of its fingerprint."""

    output: Output
    normalize: bool
    file_format: FileFormat


def _collate(items):
    good = [(i, x) for i, x, err in items if err is None]
    index = torch.tensor([i for i, _ in good], dtype=torch.long)
    batch = torch.stack([x for _, x in good]) if good else torch.empty(0)
    return [i for i, _, _ in items], index, batch, [err for _, _, err in items if err is not None]


def _names(k: int, file_format: FileFormat) -> dict[str, str]:
    return {
        "embeddings": f"embeddings-{k:05d}.{file_format}",
        "paths": f"paths-{k:05d}.txt",
        "errors": f"errors-{k:05d}.jsonl",
        "marker": f"shard-{k:05d}.json",
    }


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _encode_embeddings(emb: np.ndarray, file_format: FileFormat) -> bytes:
    if file_format == "safetensors":
        from safetensors.numpy import save

        return save({"embeddings": np.ascontiguousarray(emb)})
    import io

    buf = io.BytesIO()
    np.save(buf, emb)
    return buf.getvalue()


def _read_marker(out: Path, k: int, file_format: FileFormat) -> dict[str, Any] | None:
    path = out / _names(k, file_format)["marker"]
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a marker is written atomically; an unreadable one means "not finished"


def _fingerprint(fx: FeatureExtractor, options: _Options, paths: list[str], shard_size: int) -> str:
    run = {
        "model_id": fx.model_id,
        "backend": fx.backend,
        "output": options.output,
        "normalize": options.normalize,
        "data_config": fx.data_config,
        "draft_size": fx.decode_options.get("draft_size"),
        "shard_size": shard_size,
        "file_format": options.file_format,
        "paths": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
) -> dict[str, Any]:
    """Embed every image of ``inputs`` into sharded files under ``out_dir``; resumable.

    Args:
        model: a model name / ``hf-hub:`` / ``local-dir:`` / folder / checkpoint (anything
            :func:`ssole_hub.load_model` takes), a built ``nn.Module``, or a
            :class:`~ssole_hub.FeatureExtractor` (then ``device``, ``dtype``, ``compile`` and
            the limits are its own).
        inputs: a folder, a text file of paths, or a list of paths (see :func:`list_images`).
        out_dir: output folder, created if needed; reused to resume an interrupted run.
        batch_size: images per forward pass.
        num_workers: decoding processes per rank; default: the CPU cores of this rank, at most 8.
        shard_size: images per output shard (the unit of resumption).
        file_format: ``"npy"`` or ``"safetensors"``.
        output, normalize: as :meth:`FeatureExtractor.embed`.
        device, dtype, compile: as :meth:`FeatureExtractor.from_pretrained`; under ``torchrun``
            the default device is ``cuda:LOCAL_RANK`` when CUDA is available.
        max_bytes, max_pixels: decoder limits; larger files are skipped and listed as errors.
        fast_decode: decode large JPEGs at a reduced scale (see
            :meth:`FeatureExtractor.from_pretrained`); recorded in the manifest.
        backend: ``"torch"``, ``"onnx"``, ``"onnx-int8"`` or ``"auto"`` (see
            :meth:`FeatureExtractor.from_pretrained`); the one used is in the manifest.
        progress: show a progress bar (rank 0).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``); on ranks other than 0, a
        summary of this rank's work.

    Raises:
        ValueError: bad arguments, no images, or ``out_dir`` holds shards of a different run.
        FileNotFoundError: ``inputs`` or the model does not exist.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    if file_format not in ("npy", "safetensors"):
        raise ValueError(f"file_format must be 'npy' or 'safetensors', got {file_format!r}")
    paths, root = list_images(inputs)
    rank, world, local_rank, created_group = _distributed()
    try:
        if isinstance(model, FeatureExtractor):
            fx = model
        else:
            if device is None and torch.cuda.is_available():
                device = f"cuda:{local_rank}"
            fx = FeatureExtractor.from_pretrained(
                model,
                device=device,
                dtype=dtype,
                with_projector=output == "projector",
                compile=compile,
                max_bytes=max_bytes,
                max_pixels=max_pixels,
                fast_decode=fast_decode,
                backend=backend,
            )
        options = _Options(output, normalize, file_format)
        if output not in fx.dims:
            raise ValueError(f"output {output!r} is not available; the model has {list(fx.dims)}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fingerprint = _fingerprint(fx, options, paths, shard_size)
        num_shards = (len(paths) + shard_size - 1) // shard_size
        mine = list(range(rank, num_shards, world))
        pending = []
        for k in mine:
            marker = _read_marker(out, k, file_format)
            if marker is None:
                pending.append(k)
            elif marker.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{out} holds shards of a different extraction (model, options or input list "
                    "differ); use an empty output folder"
                )
        if len(pending) < len(mine):
            whose = f" of rank {rank}" if world > 1 else ""
            print(
                f"resuming {out}: {len(mine) - len(pending)} of {len(mine)} shards{whose} are "
                "already finished and are skipped",
                file=sys.stderr,
            )
        workers = _default_workers() if num_workers is None else num_workers
        _run_shards(
            fx,
            options,
            paths,
            root,
            out,
            pending,
            shard_size,
            batch_size,
            workers,
            fingerprint,
            progress and rank == 0,
        )
        if world > 1:
            _barrier()
        if rank != 0:
            return {"rank": rank, "shards": mine, "extracted": pending}
        manifest = _write_manifest(
            fx, options, inputs, paths, out, num_shards, shard_size, fingerprint, world
        )
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
    options: _Options,
    paths: list[str],
    root: Path,
    out: Path,
    pending: list[int],
    shard_size: int,
    batch_size: int,
    num_workers: int,
    fingerprint: str,
    progress: bool,
) -> None:
    if not pending:
        return
    # Batches never straddle two shards, so a shard is complete when its last batch arrives.
    batches = []
    sizes = {}
    for k in pending:
        lo, hi = k * shard_size, min((k + 1) * shard_size, len(paths))
        sizes[k] = hi - lo
        batches += [list(range(i, min(i + batch_size, hi))) for i in range(lo, hi, batch_size)]
    loader = DataLoader(
        _ImageFiles(paths, root, fx),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=fx.device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    acc: dict[str, list] = {"seen": [], "index": [], "emb": [], "errors": []}
    with tqdm(total=sum(sizes.values()), disable=not progress, unit="img", desc="extract") as bar:
        for seen, index, batch, errors in loader:
            k = seen[0] // shard_size
            acc["seen"] += seen
            acc["index"].append(index)
            acc["errors"] += errors
            if len(index):
                acc["emb"].append(fx.embed_tensor(batch, options.output, options.normalize))
            bar.update(len(seen))
            if len(acc["seen"]) == sizes[k]:
                dim = fx.dims[options.output]
                _write_shard(out, k, paths, acc, dim, options.file_format, fingerprint)
                acc = {"seen": [], "index": [], "emb": [], "errors": []}


def _write_shard(
    out: Path,
    k: int,
    paths: list[str],
    acc: dict[str, list],
    dim: int,
    file_format: FileFormat,
    fingerprint: str,
) -> None:
    names = _names(k, file_format)
    emb = torch.cat(acc["emb"]).numpy() if acc["emb"] else np.empty((0, dim), np.float32)
    index = torch.cat(acc["index"]).tolist()
    _write_atomic(out / names["embeddings"], _encode_embeddings(emb, file_format))
    _write_atomic(out / names["paths"], "".join(f"{paths[i]}\n" for i in index).encode())
    errors = "".join(json.dumps(e) + "\n" for e in acc["errors"])
    _write_atomic(out / names["errors"], errors.encode())
    marker = {
        "shard": k,
        "count": len(index),
        "num_errors": len(acc["errors"]),
        "fingerprint": fingerprint,
        **{key: names[key] for key in ("embeddings", "paths", "errors")},
    }
    _write_atomic(out / names["marker"], json.dumps(marker, indent=1).encode())


def _write_manifest(
    fx: FeatureExtractor,
    options: _Options,
    inputs: Any,
    paths: list[str],
    out: Path,
    num_shards: int,
    shard_size: int,
    fingerprint: str,
    world: int,
) -> dict[str, Any]:
    shards = []
    errors = []
    for k in range(num_shards):
        marker = _read_marker(out, k, options.file_format)
        if marker is None:
            raise RuntimeError(f"shard {k} of {out} is not finished; was a rank stopped early?")
        shards.append(
            {key: marker[key] for key in ("embeddings", "paths", "errors", "count", "num_errors")}
        )
        errors.append((out / marker["errors"]).read_text())
    _write_atomic(out / ERRORS_FILE, "".join(errors).encode())
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_id": fx.model_id,
        "output": options.output,
        "normalize": options.normalize,
        "dim": fx.dims[options.output],
        "dtype": "float32",
        "compute_dtype": str(fx.dtype).removeprefix("torch."),
        "backend": fx.backend,
        "preprocessing": {**fx.data_config, "draft_size": fx.decode_options.get("draft_size")},
        "input": os.fspath(inputs) if isinstance(inputs, str | os.PathLike) else None,
        "file_format": options.file_format,
        "num_inputs": len(paths),
        "num_embedded": sum(s["count"] for s in shards),
        "num_errors": sum(s["num_errors"] for s in shards),
        "errors_file": ERRORS_FILE,
        "shard_size": shard_size,
        "world_size": world,
        "fingerprint": fingerprint,
        "ssole_hub_version": __version__,
        "shards": shards,
    }
    _write_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=1, default=list).encode())
    return manifest


def read_embeddings(out_dir: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read a finished extraction: ``(embeddings (n, dim) float32, paths)`` in input order.

    Raises:
        FileNotFoundError: ``out_dir`` has no manifest (the run is not finished).
        ValueError: the manifest is of another format.
    """
    out = Path(out_dir)
    if not (out / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{out} has no {MANIFEST_FILE}; is the extraction finished?")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{out / MANIFEST_FILE} is not a {MANIFEST_FORMAT} manifest")
    arrays, paths = [], []
    for shard in manifest["shards"]:
        file = out / shard["embeddings"]
        if manifest["file_format"] == "safetensors":
            from safetensors.numpy import load_file

            arrays.append(load_file(file)["embeddings"])
        else:
            arrays.append(np.load(file))
        paths += (out / shard["paths"]).read_text().splitlines()
    emb = np.concatenate(arrays) if arrays else np.empty((0, manifest["dim"]), np.float32)
    return emb, paths
