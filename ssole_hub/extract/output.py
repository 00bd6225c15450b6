"""What ``ssole-hub extract`` writes, whichever engine ran, and :func:`read_embeddings`.

One layout for every file format. Output shard ``k`` holds the embedded records of input shard
``k`` (a tar, a parquet file, or ``shard_size`` image files), in their order:

- ``embeddings-00000.npy`` / ``.safetensors`` (tensor ``"embeddings"``): ``(n, dim)`` float32,
  with ``ids-00000.jsonl``: the n record ids in row order, one JSON string per line (ASCII-only
  JSON, so any id round-trips, line breaks included);
- or ``embeddings-00000.parquet``: columns ``id`` (string) and ``embedding`` (fixed-size list of
  float32), the ids inside.

Bookkeeping goes under names that start with ``_``, which Arrow, pandas and Spark skip: a
``--format parquet`` folder reads as one table (``pyarrow.parquet.read_table(out)``).

- ``_shards/00000.json``: shard ``k``'s marker, written last: ``"done"`` (a re-run skips the
  shard) or ``"failed"`` (its input file could not be read; a re-run tries it again), and
  ``_shards/errors-00000.jsonl``, its errors;
- ``_errors.jsonl`` (the errors of every shard) and ``_manifest.json`` (model, preprocessing,
  counts, failed inputs, repeated ids, shard list), written when every shard is done or failed.

A line of an errors file is ``{"id", "error", "message"}`` for a record that could not be
embedded, or ``{"input", "error": "UnreadableInputError", "message"}`` for an input file that
could not be read (none of its records are in the output). Every file is written atomically,
through a hidden ``.NAME.tmp`` file.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "ERRORS_FILE",
    "FILE_FORMATS",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "SHARDS_DIR",
    "FileFormat",
    "check_output",
    "earlier_backend",
    "pending_shards",
    "read_embeddings",
    "relocate_shards",
    "write_failed_shard",
    "write_manifest",
    "write_shard",
]

MANIFEST_FORMAT = "ssole-hub/embeddings/3"
MANIFEST_FILE = "_manifest.json"
ERRORS_FILE = "_errors.jsonl"
SHARDS_DIR = "_shards"
FileFormat = Literal["npy", "safetensors", "parquet"]
FILE_FORMATS: tuple[str, ...] = ("npy", "safetensors", "parquet")
DUPLICATE_EXAMPLES = 10
"""How many repeated ids the manifest lists (it counts them all)."""

_STAGE = "moving"  # under SHARDS_DIR: finished shards on their way to a new position
_DATA_FILE = re.compile(r"^(?:embeddings-(\d+)\.(?:npy|safetensors|parquet)|ids-(\d+)\.jsonl)$")
_SHARD_FILE = re.compile(r"^(?:(\d+)\.json|errors-(\d+)\.jsonl)$")
_OLD_LAYOUT = re.compile(r"^(?:manifest\.json|shard-\d+\.json)$")


def shard_files(k: int, file_format: FileFormat) -> dict[str, str | None]:
    """The paths (relative to the output folder) of output shard ``k``; ``ids`` is ``None`` for
    parquet, whose ids are inside."""
    return {
        "embeddings": f"embeddings-{k:05d}.{file_format}",
        "ids": None if file_format == "parquet" else f"ids-{k:05d}.jsonl",
        "errors": f"{SHARDS_DIR}/errors-{k:05d}.jsonl",
        "marker": f"{SHARDS_DIR}/{k:05d}.json",
    }


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one; the
    temporary file is hidden (``.NAME.tmp``), so table readers skip a leftover one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def encode_ids(ids: list[str]) -> bytes:
    """An ids file: one JSON string per line. JSON escapes every line break and, being ASCII,
    every other character, so a line of the file is exactly one id."""
    return "".join(json.dumps(i) + "\n" for i in ids).encode()


def decode_ids(data: bytes, where: Path) -> list[str]:
    """The ids of an ids file (see :func:`encode_ids`).

    Raises:
        ValueError: a line is not a JSON string, or the last line is cut off.
    """
    lines = data.split(b"\n")
    if lines[-1]:
        raise ValueError(f"{where} is damaged: its last line is cut off")
    ids = []
    for n, line in enumerate(lines[:-1], 1):
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, str):
            raise ValueError(f"{where} is damaged: line {n} is not a JSON string")
        ids.append(value)
    return ids


def _encode(emb: np.ndarray, ids: list[str], file_format: FileFormat) -> bytes:
    if file_format == "safetensors":
        from safetensors.numpy import save

        return save({"embeddings": np.ascontiguousarray(emb)})
    buf = io.BytesIO()
    if file_format == "parquet":
        from ssole_hub.extract.inputs import pyarrow_parquet

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
    *,
    name: str,
    backend: str,
) -> None:
    """Write output shard ``k`` of input shard ``name``: ``emb`` (``(len(ids), dim)`` float32),
    ``ids`` in row order, ``errors``, and last its ``"done"`` marker (which also names the
    ``backend`` that computed it)."""
    if emb.shape[0] != len(ids):
        raise ValueError(f"shard {k}: {emb.shape[0]} embeddings for {len(ids)} ids")
    files = shard_files(k, file_format)
    (out / SHARDS_DIR).mkdir(exist_ok=True)
    write_atomic(out / files["embeddings"], _encode(emb, ids, file_format))
    if files["ids"] is not None:
        write_atomic(out / files["ids"], encode_ids(ids))
    write_atomic(out / files["errors"], "".join(json.dumps(e) + "\n" for e in errors).encode())
    marker = {
        "shard": k,
        "input": name,
        "status": "done",
        "fingerprint": fingerprint,
        "backend": backend,
        "count": len(ids),
        "num_errors": len(errors),
        **{key: files[key] for key in ("embeddings", "ids", "errors")},
    }
    write_atomic(out / files["marker"], json.dumps(marker, indent=1).encode())


def write_failed_shard(
    out: Path,
    k: int,
    error: dict[str, str],
    file_format: FileFormat,
    fingerprint: str,
    *,
    name: str,
) -> None:
    """Record that input shard ``k`` (``name``) could not be read (``error``: its
    :func:`~ssole_hub.extract.inputs.input_error_entry`): no rows of it are kept (a leftover of
    an earlier attempt is removed), and a ``"failed"`` marker, which a re-run retries."""
    files = shard_files(k, file_format)
    (out / SHARDS_DIR).mkdir(exist_ok=True)
    for key in ("embeddings", "ids"):
        if files[key] is not None:
            (out / files[key]).unlink(missing_ok=True)
    write_atomic(out / files["errors"], (json.dumps(error) + "\n").encode())
    marker = {
        "shard": k,
        "input": name,
        "status": "failed",
        "fingerprint": fingerprint,
        "count": 0,
        "num_errors": 0,
        "embeddings": None,
        "ids": None,
        "errors": files["errors"],
        "error": error,
    }
    write_atomic(out / files["marker"], json.dumps(marker, indent=1).encode())
    print(f"warning: {error['message']}; none of its records are embedded", file=sys.stderr)


def read_marker(out: Path, k: int) -> dict[str, Any] | None:
    """Shard ``k``'s marker, or ``None`` when there is none."""
    path = out / SHARDS_DIR / f"{k:05d}.json"
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a marker is written atomically; an unreadable one means "not finished"
    return marker if isinstance(marker, dict) else None


def _markers(out: Path) -> dict[int, dict[str, Any]]:
    folder = out / SHARDS_DIR
    found = {}
    for path in folder.glob("*.json") if folder.is_dir() else ():
        match = _SHARD_FILE.match(path.name)
        marker = read_marker(out, int(match.group(1))) if match and match.group(1) else None
        if marker is not None:
            found[int(match.group(1))] = marker
    return found


def earlier_backend(out: Path) -> str | None:
    """The backend that computed the finished shards already in ``out`` (None when there are
    none): a resumed ``backend="auto"`` run keeps it rather than timing the backends again, whose
    choice could differ and would make the finished shards unusable."""
    done = [m for _, m in sorted(_markers(out).items()) if m.get("status") == "done"]
    return next((m["backend"] for m in done if m.get("backend")), None)


def check_output(out: Path, names: list[str], fingerprint: str) -> dict[int, int]:
    """Create ``out``, check that its shards can be resumed, and return the finished shards that
    must move (``{old position: new position}``) because the input list changed.

    The rule: ``fingerprint`` (see :func:`ssole_hub.extract.fingerprint`) covers what decides a
    shard's content besides which input it is: model, backend, preprocessing, output, normalize,
    file format, the kind of input and how its records are read (for image files also the whole
    path list and shard size, since their shards are slices of it). Each marker records its
    input shard's name (a tar or parquet file's path relative to the folder the inputs share).
    A marker of another fingerprint is refused, and so is a finished shard whose input is not in
    ``names`` (its rows would stay in the output). An input list may therefore gain files, and
    lose or replace files that never finished (unreadable ones): finished shards are kept, and
    moved when their position changed, never recomputed.

    Raises:
        ValueError: ``out`` holds shards of a different extraction, or an earlier layout.
    """
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(p.name for p in out.iterdir() if _OLD_LAYOUT.match(p.name))
    if old:
        raise ValueError(
            f"{out} holds the output of an earlier ssole-hub version ({old[0]}), in another "
            "layout; use an empty output folder"
        )
    position = {name: k for k, name in enumerate(names)}
    moves, claimed = {}, set()
    for j, marker in sorted(_markers(out).items()):
        if marker.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out} holds shards of a different extraction (model, preprocessing, options "
                "or kind of input differ); use an empty output folder"
            )
        if marker.get("status") != "done":
            continue  # a failed shard left nothing to keep
        k = position.get(marker.get("input"))
        if k is None or k in claimed:
            raise ValueError(
                f"{out} holds a finished shard of {marker.get('input')!r}, which is not (or "
                "twice) among the inputs: the output of other inputs; use an empty output folder"
            )
        claimed.add(k)
        if k != j:
            moves[j] = k
    return moves


def relocate_shards(out: Path, moves: dict[int, int], file_format: FileFormat) -> None:
    """Move finished shards to their new positions (``moves`` from :func:`check_output`); one
    process only. A shard is first taken out of its old place, marker first, then put in its
    new one, marker last: after a crash a shard is where it belongs, or is not finished."""
    if not moves:
        return
    stage = out / SHARDS_DIR / _STAGE
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    keys = ("embeddings", "ids", "errors")
    for j, k in moves.items():
        marker = read_marker(out, j)
        os.replace(out / SHARDS_DIR / f"{j:05d}.json", stage / f"{k}.json")
        for key in keys:
            if marker[key]:
                os.replace(out / marker[key], stage / f"{k}.{key}")
    for k in moves.values():
        marker = json.loads((stage / f"{k}.json").read_text())
        files = shard_files(k, file_format)
        for key in keys:
            if marker[key]:
                os.replace(stage / f"{k}.{key}", out / files[key])
                marker[key] = files[key]
        marker["shard"] = k
        write_atomic(out / files["marker"], json.dumps(marker, indent=1).encode())
    shutil.rmtree(stage)
    print(
        f"resuming {out}: {len(moves)} finished shard(s) moved to their new place in the input "
        "list",
        file=sys.stderr,
    )


def _is_done(marker: dict[str, Any] | None, name: str, fingerprint: str) -> bool:
    return (
        marker is not None
        and marker.get("status") == "done"
        and marker.get("input") == name
        and marker.get("fingerprint") == fingerprint
    )


def pending_shards(out: Path, shards: list[int], names: list[str], fingerprint: str) -> list[int]:
    """The shards of ``shards`` (input shard ``k`` is named ``names[k]``) not done in ``out``;
    call :func:`check_output` (and :func:`relocate_shards`) first."""
    return [k for k in shards if not _is_done(read_marker(out, k), names[k], fingerprint)]


def _remove_stale(out: Path, num_shards: int) -> None:
    """Remove the shard files of positions past the last input shard (left when the input list
    lost files) and a crashed relocation's leftovers."""
    stale = []
    for folder, pattern in ((out, _DATA_FILE), (out / SHARDS_DIR, _SHARD_FILE)):
        for path in folder.iterdir() if folder.is_dir() else ():
            match = pattern.match(path.name)
            if match and int(next(g for g in match.groups() if g)) >= num_shards:
                stale.append(path)
    for path in stale:
        path.unlink()
    if stale:
        print(f"removed {len(stale)} file(s) of shards past the last input", file=sys.stderr)
    shutil.rmtree(out / SHARDS_DIR / _STAGE, ignore_errors=True)


def _read_ids(out: Path, shard: dict[str, Any], file_format: str) -> list[str]:
    if file_format == "parquet":
        from ssole_hub.extract.inputs import pyarrow_parquet

        table = pyarrow_parquet().read_table(out / shard["embeddings"], columns=["id"])
        return table.column("id").to_pylist()
    return decode_ids((out / shard["ids"]).read_bytes(), out / shard["ids"])


def _repeated_ids(out: Path, shards: list[dict[str, Any]], file_format: str) -> list[str]:
    """The ids that more than one embedded row has, sorted. Python hashes of every id are
    compared first (8 bytes an id); only ids whose hash repeats are counted."""
    done = [s for s in shards if s["status"] == "done"]
    hashes = [np.fromiter(map(hash, _read_ids(out, s, file_format)), np.int64) for s in done]
    every = np.sort(np.concatenate(hashes)) if hashes else np.empty(0, np.int64)
    repeated_hashes = set(every[1:][every[1:] == every[:-1]].tolist())
    if not repeated_hashes:
        return []
    counts = Counter(
        i for s in done for i in _read_ids(out, s, file_format) if hash(i) in repeated_hashes
    )
    return sorted(i for i, n in counts.items() if n > 1)


def write_manifest(
    out: Path, header: dict[str, Any], names: list[str], file_format: FileFormat
) -> dict[str, Any]:
    """Merge the shards' errors into ``_errors.jsonl`` and write ``_manifest.json``: ``header``
    (model, preprocessing, options), the counts, the input files that could not be read, the
    repeated ids, and the shard list (input shard ``k`` is ``names[k]``). Returns the manifest;
    one process only.

    Raises:
        RuntimeError: a shard is neither done nor failed.
    """
    keys = ("input", "status", "embeddings", "ids", "errors", "count", "num_errors")
    shards, errors, failed = [], [], []
    for k, name in enumerate(names):
        marker = read_marker(out, k)
        if marker is None or marker.get("input") != name:
            raise RuntimeError(f"shard {k} of {out} is not finished; was a worker stopped early?")
        shards.append({key: marker[key] for key in keys})
        errors.append((out / marker["errors"]).read_bytes())
        if marker["status"] == "failed":
            failed.append(marker["error"]["input"])
    _remove_stale(out, len(names))
    write_atomic(out / ERRORS_FILE, b"".join(errors))
    repeated = _repeated_ids(out, shards, file_format)
    embedded = sum(s["count"] for s in shards)
    record_errors = sum(s["num_errors"] for s in shards)
    manifest = {
        "format": MANIFEST_FORMAT,
        **header,
        "file_format": file_format,
        "num_inputs": embedded + record_errors,
        "num_embedded": embedded,
        "num_errors": record_errors,
        "num_failed_inputs": len(failed),
        "failed_inputs": failed,
        "num_duplicate_ids": len(repeated),
        "duplicate_ids": repeated[:DUPLICATE_EXAMPLES],
        "errors_file": ERRORS_FILE,
        "shards": shards,
    }
    write_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=1, default=list).encode())
    return manifest


def _read_shard(out: Path, shard: dict[str, Any], file_format: str) -> tuple[np.ndarray, list]:
    file = out / shard["embeddings"]
    if file_format == "parquet":
        from ssole_hub.extract.inputs import pyarrow_parquet

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
    return emb, _read_ids(out, shard, file_format)


def read_embeddings(out_dir: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read a finished extraction in any file format: ``(embeddings (n, dim) float32, ids)``,
    in input order (ids: the file paths, ``<tar>/<key>`` or parquet ids). Input files that could
    not be read contribute nothing (they are listed in the manifest's ``failed_inputs``).

    Raises:
        FileNotFoundError: ``out_dir`` has no manifest (the run is not finished).
        ValueError: the manifest is of another format, or a shard's ids do not match its rows.
    """
    out = Path(out_dir)
    if not (out / MANIFEST_FILE).is_file():
        hint = "is the extraction finished?"
        if (out / "manifest.json").is_file():
            hint = "its manifest.json is from an earlier ssole-hub version: extract again"
        raise FileNotFoundError(f"{out} has no {MANIFEST_FILE}; {hint}")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{out / MANIFEST_FILE} is not a {MANIFEST_FORMAT} manifest")
    arrays, ids = [], []
    for shard in manifest["shards"]:
        if shard["status"] != "done":
            continue
        emb, shard_ids = _read_shard(out, shard, manifest["file_format"])
        if not emb.shape[0] == len(shard_ids) == shard["count"]:
            raise ValueError(
                f"{out / shard['embeddings']} has {emb.shape[0]} rows but "
                f"{shard['ids'] or 'its id column'} has {len(shard_ids)} ids (the manifest says "
                f"{shard['count']}): the output is damaged; extract again into an empty folder"
            )
        arrays.append(emb)
        ids += shard_ids
    emb = np.concatenate(arrays) if arrays else np.empty((0, manifest["dim"]), np.float32)
    return emb, ids
