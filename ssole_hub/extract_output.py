"""What ``ssole-hub extract`` writes, whichever engine ran, and :func:`read_embeddings`.

Output shard ``k`` (the records of input shard ``k``, in order) is written atomically:

- ``embeddings-00000.npy`` / ``.safetensors`` (tensor ``"embeddings"``): ``(n, dim)`` float32,
  with ``ids-00000.txt``: the n record ids (file paths, ``<tar>/<key>`` or parquet ids), one
  per line, in row order;
- or ``embeddings-00000.parquet``: columns ``id`` (string) and ``embedding`` (fixed-size list of
  float32), the ids inside;
- ``errors-00000.jsonl``: the records of the shard that could not be embedded (``path``: the
  record id, ``error``, ``message``);
- ``shard-00000.json``: written last; marks the shard finished, so a re-run skips it.

When every shard is finished, ``errors.jsonl`` (all errors) and ``manifest.json`` are written.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "ERRORS_FILE",
    "FILE_FORMATS",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "FileFormat",
    "pending_shards",
    "read_embeddings",
    "write_manifest",
    "write_shard",
]

MANIFEST_FORMAT = "ssole-hub/embeddings/2"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.jsonl"
FileFormat = Literal["npy", "safetensors", "parquet"]
FILE_FORMATS: tuple[str, ...] = ("npy", "safetensors", "parquet")


def shard_files(k: int, file_format: FileFormat) -> dict[str, str | None]:
    """The file names of output shard ``k`` (``ids`` is ``None`` for parquet: ids are inside)."""
    return {
        "embeddings": f"embeddings-{k:05d}.{file_format}",
        "ids": None if file_format == "parquet" else f"ids-{k:05d}.txt",
        "errors": f"errors-{k:05d}.jsonl",
        "marker": f"shard-{k:05d}.json",
    }


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _encode(emb: np.ndarray, ids: list[str], file_format: FileFormat) -> bytes:
    if file_format == "safetensors":
        from safetensors.numpy import save

        return save({"embeddings": np.ascontiguousarray(emb)})
    buf = io.BytesIO()
    if file_format == "parquet":
        from ssole_hub.extract_inputs import pyarrow_parquet

        pq = pyarrow_parquet()
        import pyarrow as pa

        values = pa.array(np.ascontiguousarray(emb, np.float32).ravel(), pa.float32())
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(values, emb.shape[1]),
            }
        )
        pq.write_table(table, buf)
    else:
        np.save(buf, emb)
    return buf.getvalue()


def write_shard(
    out: Path,
    k: int,
    ids: list[str],
    emb: np.ndarray,
    errors: list[dict[str, str]],
    file_format: FileFormat,
    fingerprint: str,
) -> None:
    """Write output shard ``k``: ``emb`` (``(len(ids), dim)`` float32), ``ids`` in row order,
    ``errors``, and last its done-marker."""
    if emb.shape[0] != len(ids):
        raise ValueError(f"shard {k}: {emb.shape[0]} embeddings for {len(ids)} ids")
    names = shard_files(k, file_format)
    write_atomic(out / names["embeddings"], _encode(emb, ids, file_format))
    if names["ids"] is not None:
        write_atomic(out / names["ids"], "".join(f"{i}\n" for i in ids).encode())
    write_atomic(out / names["errors"], "".join(json.dumps(e) + "\n" for e in errors).encode())
    marker = {
        "shard": k,
        "count": len(ids),
        "num_errors": len(errors),
        "fingerprint": fingerprint,
        **{key: names[key] for key in ("embeddings", "ids", "errors")},
    }
    write_atomic(out / names["marker"], json.dumps(marker, indent=1).encode())


def read_marker(out: Path, k: int, file_format: FileFormat) -> dict[str, Any] | None:
    """Shard ``k``'s done-marker, or ``None`` when the shard is not finished."""
    path = out / shard_files(k, file_format)["marker"]
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a marker is written atomically; an unreadable one means "not finished"


def pending_shards(
    out: Path, shards: list[int], file_format: FileFormat, fingerprint: str
) -> list[int]:
    """The shards of ``shards`` that are not finished in ``out``.

    Raises:
        ValueError: a finished shard of ``out`` belongs to another extraction.
    """
    pending = []
    for k in shards:
        marker = read_marker(out, k, file_format)
        if marker is None:
            pending.append(k)
        elif marker.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out} holds shards of a different extraction (model, options or input list "
                "differ); use an empty output folder"
            )
    return pending


def write_manifest(
    out: Path, header: dict[str, Any], num_shards: int, file_format: FileFormat
) -> dict[str, Any]:
    """Merge the shards' errors into ``errors.jsonl`` and write ``manifest.json``: ``header``
    (model, preprocessing, options), the counts and the shard list. Returns the manifest.

    Raises:
        RuntimeError: a shard is not finished.
    """
    shards, errors = [], []
    for k in range(num_shards):
        marker = read_marker(out, k, file_format)
        if marker is None:
            raise RuntimeError(f"shard {k} of {out} is not finished; was a worker stopped early?")
        shards.append(
            {key: marker[key] for key in ("embeddings", "ids", "errors", "count", "num_errors")}
        )
        errors.append((out / marker["errors"]).read_text())
    write_atomic(out / ERRORS_FILE, "".join(errors).encode())
    embedded = sum(s["count"] for s in shards)
    failed = sum(s["num_errors"] for s in shards)
    manifest = {
        "format": MANIFEST_FORMAT,
        **header,
        "file_format": file_format,
        "num_inputs": embedded + failed,
        "num_embedded": embedded,
        "num_errors": failed,
        "errors_file": ERRORS_FILE,
        "shards": shards,
    }
    write_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=1, default=list).encode())
    return manifest


def _read_shard(out: Path, shard: dict[str, Any], file_format: str) -> tuple[np.ndarray, list]:
    file = out / shard["embeddings"]
    if file_format == "parquet":
        from ssole_hub.extract_inputs import pyarrow_parquet

        table = pyarrow_parquet().read_table(file)
        column = table.column("embedding").combine_chunks()
        width = column.type.list_size
        emb = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        return emb.astype(np.float32, copy=False), table.column("id").to_pylist()
    if file_format == "safetensors":
        from safetensors.numpy import load_file

        emb = load_file(file)["embeddings"]
    else:
        emb = np.load(file)
    return emb, (out / shard["ids"]).read_text().splitlines()


def read_embeddings(out_dir: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read a finished extraction in any file format: ``(embeddings (n, dim) float32, ids)``,
    in input order (ids: the file paths, ``<tar>/<key>`` or parquet ids).

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
    arrays, ids = [], []
    for shard in manifest["shards"]:
        emb, shard_ids = _read_shard(out, shard, manifest["file_format"])
        arrays.append(emb)
        ids += shard_ids
    emb = np.concatenate(arrays) if arrays else np.empty((0, manifest["dim"]), np.float32)
    return emb, ids
