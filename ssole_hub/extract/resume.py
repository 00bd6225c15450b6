"""What both extraction engines share: the fingerprint that decides whether an output folder can be
resumed, the shards still to do, and the manifest's description of a run and its summary line."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ssole_hub.extract.inputs import ImageFiles, InputSource
from ssole_hub.extract.output import (
    MANIFEST_FILE,
    FileFormat,
    check_output,
    pending_shards,
    relocate_shards,
)
from ssole_hub.extractor import FeatureExtractor
from ssole_hub.models import Output
from ssole_hub.pca import PCA
from ssole_hub.version import __version__

__all__ = ["Options", "fingerprint", "manifest_header", "resumable_shards", "summary"]


class Options(NamedTuple):
    """What a run writes, besides the model: part of its fingerprint (``dimensions``: a compact
    embedding of that size from the model's PCA, see :meth:`FeatureExtractor.embed`)."""

    output: Output
    normalize: bool
    file_format: FileFormat
    dimensions: int | None = None


def fingerprint(fx: FeatureExtractor, options: Options, source: InputSource) -> str:
    """What a run's shards must share to be resumed together: model, backend, preprocessing,
    options (output, normalize, file format, and ``dimensions`` with the PCA that gives them) and
    how the input is read (its kind, the tar image suffix or parquet columns; for image files
    the whole path list and shard size).

    Which tar or parquet files are read is not part of it: each shard's marker names its input
    file instead (:func:`ssole_hub.extract.output.check_output`), so a re-run resumes after an
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
    if fx.device_decoding["on"]:  # absent otherwise, as below
        run["device_decoding"] = True
    if options.dimensions is not None:  # absent otherwise: earlier runs' fingerprints hold
        run.update(dimensions=options.dimensions, pca=fx.pca.digest() if fx.pca else None)
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
    barrier: Callable[[], None] | None = None,
) -> list[int]:
    """Create ``out``, move finished shards whose position in the input list changed, and return
    the shards of ``shards`` still to do, saying what is skipped. Every rank of a job calls it
    (rank 0 moves the shards between two calls of ``barrier``, which a job of ``world > 1``
    ranks must give).

    Raises:
        ValueError: ``out`` holds shards of a different extraction.
    """
    names = source.shard_names
    moves = check_output(out, names, run_fingerprint)
    if moves:  # every rank sees the same markers, so all or none of them wait here
        if world > 1 and barrier is not None:
            barrier()
        if rank == 0:
            relocate_shards(out, moves, options.file_format)
        if world > 1 and barrier is not None:
            barrier()
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
    """The manifest's description of a run (``engine``: how it ran, e.g. ``world_size``);
    ``dim`` is the rows' width, ``dimensions`` the compact size asked for (with its ``pca``:
    digest, images, whitening, variance kept), or ``None``."""
    pca = fx.pca if options.dimensions is not None else None
    return {
        "model_id": fx.model_id,
        "output": options.output,
        "normalize": options.normalize,
        "dim": fx.check_options(options.output, options.normalize, options.dimensions),
        "dimensions": options.dimensions,
        **({"pca": _pca_summary(pca, options.dimensions)} if pca else {}),
        "dtype": "float32",
        "compute_dtype": str(fx.dtype).removeprefix("torch."),
        "backend": fx.backend,
        "backend_timings": fx.backend_timings,
        "preprocessing": {
            **fx.data_config,
            "draft_size": fx.decode_options.get("draft_size"),
            "device_decoding": fx.device_decoding["on"],
        },
        "input": os.fspath(inputs) if isinstance(inputs, str | os.PathLike) else None,
        "input_kind": source.kind,
        "shard_size": source.shard_size if isinstance(source, ImageFiles) else None,
        **engine,
        "fingerprint": run_fingerprint,
        "ssole_hub_version": __version__,
    }


def _pca_summary(pca: PCA, k: int) -> dict[str, Any]:
    return {
        "digest": pca.digest(),
        "images": pca.images,
        "whiten": pca.whiten,
        "variance_kept": round(pca.variance_kept(k), 4),
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
