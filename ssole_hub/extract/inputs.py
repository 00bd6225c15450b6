"""What ``ssole-hub extract`` reads: image files, webdataset tar shards and parquet files.

Every input is cut into *input shards*, the unit of output and of resumption: output shard ``k``
holds the records of input shard ``k``, in their order. Each record keeps a stable id:

- image files (a folder, a list file or a list of paths): chunks of ``shard_size`` files; the id
  is the path as recorded (relative to the folder or list file);
- webdataset tars (a brace pattern such as ``shards/data-{000..009}.tar``, or a list): one shard
  per tar; the id is ``<tar>/<key>``, ``<tar>`` being the tar's path relative to the folder all
  the tars share (its file name when they share one), so ids stay unique across tars;
- parquet files (a pattern or a list): one shard per file; the id is the ``id_column`` value, as
  a string; a null id becomes ``<file>#<row>`` (``<file>`` named as tars are, ``<row>`` the row's
  0-based index in the file), with a warning.

Ids may hold any character, line breaks included (the output records them as JSON strings).

Both engines read tars and parquet files through :meth:`TarShards.records` /
:meth:`ParquetFiles.records` here (the Ray engine in Ray tasks, :mod:`ssole_hub.extract.ray`), so they
give the same shards, ids and errors. An input file that cannot be read (empty, not a tar or
parquet file, truncated) raises :class:`UnreadableInputError` naming it: its shard is listed as
failed, never embedded in part, and the other shards go on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tarfile
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ssole_hub.images import ImageDecodeError, list_images

__all__ = [
    "WEBDATASET_IMAGE_SUFFIXES",
    "ImageFiles",
    "InputSource",
    "MissingImageError",
    "ParquetFiles",
    "Record",
    "TarShards",
    "UnreadableInputError",
    "error_entry",
    "expand_braces",
    "image_bytes",
    "input_error_entry",
    "open_input",
    "relative_names",
    "webdataset_key",
]

InputKind = Literal["files", "webdataset", "parquet"]

WEBDATASET_IMAGE_SUFFIXES: tuple[str, ...] = (
    "jpg",
    "jpeg",
    "png",
    "webp",
    "avif",
    "bmp",
    "gif",
    "tif",
    "tiff",
    "ppm",
)
"""Member suffixes searched, in this order, for a webdataset sample's image (the first one the
sample has is embedded), unless an ``image_column`` names the suffix."""

PARQUET_IMAGE_COLUMN = "image"
PARQUET_ID_COLUMN = "id"


class MissingImageError(ImageDecodeError):
    """A record holds no image: a webdataset sample without an image member, a null cell."""


class UnreadableInputError(OSError):
    """A whole input file (a tar, a parquet file) cannot be read; the message names it."""


class Record(NamedTuple):
    """One record to embed: its id and its image (a file path, encoded bytes, or why none)."""

    id: str
    data: Path | bytes | MissingImageError


def error_entry(record_id: str, error: str, message: str) -> dict[str, str]:
    """The errors-file line of a record that could not be embedded: its id, the error's name
    (e.g. ``CorruptImageError``) and message. Both engines write it."""
    return {"id": record_id, "error": error, "message": message}


def input_error_entry(path: str, message: str) -> dict[str, str]:
    """The errors-file line of an input file that could not be read (none of its records are in
    the output): its path as given, ``UnreadableInputError`` and why. Both engines write it."""
    return {"input": path, "error": UnreadableInputError.__name__, "message": message}


def image_bytes(value: Any) -> bytes | None:
    """The encoded image in a table cell: bytes, or a ``{"bytes": ...}`` struct (the Hugging Face
    datasets image layout); ``None`` when the cell holds neither."""
    if isinstance(value, Mapping):
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return None


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``{000..009}`` (zero-padded ranges) and ``{a,b}`` (choices).

    >>> expand_braces("data-{00..02}.tar")
    ['data-00.tar', 'data-01.tar', 'data-02.tar']

    Raises:
        ValueError: a range whose ends are not integers.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.lstrip("-").isdigit() and hi.lstrip("-").isdigit()):
            raise ValueError(f"brace range {{{body}}} in {pattern!r} must be two integers")
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for c in choices for p in expand_braces(head + c + tail)]


def webdataset_key(member: str) -> tuple[str, str] | tuple[None, None]:
    """``(key, suffix)`` of a tar member name under the webdataset convention (the key is the
    name up to the first dot of its last part); ``(None, None)`` for a name without a dot."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", member)
    return (match.group(1), match.group(2)) if match else (None, None)


def relative_names(files: Sequence[str]) -> list[str]:
    """Each file's path relative to the folder all of them share (its file name when they share
    one): how a tar or parquet file is named in ids and markers."""
    folders = [os.path.dirname(os.path.abspath(f)) for f in files]
    common = os.path.commonpath(folders)
    return [Path(os.path.relpath(os.path.abspath(f), common)).as_posix() for f in files]


@dataclass(frozen=True)
class ImageFiles:
    """Image files cut into shards of ``shard_size`` consecutive paths."""

    paths: list[str]
    root: Path
    shard_size: int
    kind: InputKind = "files"

    @property
    def num_shards(self) -> int:
        return (len(self.paths) + self.shard_size - 1) // self.shard_size

    @cached_property
    def shard_names(self) -> list[str]:
        """What each shard's done-marker records: its slice of the path list."""
        size, n = self.shard_size, len(self.paths)
        return [f"images[{k * size}:{min(n, (k + 1) * size)}]" for k in range(self.num_shards)]

    def ids(self, k: int) -> list[str]:
        """The ids (recorded paths) of shard ``k``."""
        return self.paths[k * self.shard_size : (k + 1) * self.shard_size]

    def records(self, k: int) -> Iterator[Record]:
        """Shard ``k``'s files, in order; they are read where they are decoded."""
        for path in self.ids(k):
            yield Record(path, self.root / path)

    def fingerprint(self) -> dict[str, Any]:
        """The whole path list: shards are slices of it, so another list is another run."""
        digest = hashlib.sha256(json.dumps(self.paths).encode()).hexdigest()
        return {"kind": self.kind, "shard_size": self.shard_size, "paths": digest}


def _tar_header_watch() -> type[tarfile.TarInfo]:
    """A TarInfo class that remembers how reading the last header ended. ``tarfile`` stops
    without a word, as at the end of the archive, when a tar is cut at a member boundary or a
    later header is damaged; only an all-zero block (``EOFHeaderError``) is a real end."""

    class Watched(tarfile.TarInfo):
        last_error: Exception | None = None

        @classmethod
        def frombuf(cls, buf, encoding, errors):  # type: ignore[override]
            try:
                info = super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as exc:
                cls.last_error = exc
                raise
            cls.last_error = None
            return info

    return Watched


@dataclass(frozen=True)
class TarShards:
    """Webdataset tar files, one shard each; ``image_suffix`` picks the image member (default:
    the first of :data:`WEBDATASET_IMAGE_SUFFIXES` that a sample has)."""

    files: list[str]
    image_suffix: str | None = None
    kind: InputKind = "webdataset"

    @property
    def num_shards(self) -> int:
        return len(self.files)

    @cached_property
    def shard_names(self) -> list[str]:
        """Each tar's path relative to the folder all of them share: the prefix of its ids."""
        return relative_names(self.files)

    @property
    def image_columns(self) -> tuple[str, ...]:
        return (self.image_suffix,) if self.image_suffix else WEBDATASET_IMAGE_SUFFIXES

    def pick_image(self, sample: Mapping[str, Any]) -> bytes | MissingImageError:
        """The image member of one sample (suffix -> bytes), or why it has none."""
        for suffix in self.image_columns:
            data = image_bytes(sample.get(suffix))
            if data is not None:
                return data
        return MissingImageError(
            f"the sample has no image member (looked for .{', .'.join(self.image_columns)})"
        )

    def records(self, k: int) -> Iterator[Record]:
        """The samples of tar ``k`` in tar order, grouped by key (``<key>.<suffix>`` members).

        Raises:
            UnreadableInputError: the tar is empty, not a tar, truncated, or a header in it is
                damaged (the samples before it may have been yielded already).
        """
        path, name = self.files[k], self.shard_names[k]
        watch = _tar_header_watch()
        try:
            with tarfile.open(path, mode="r|*", tarinfo=watch) as stream:
                members = (
                    (member, stream.extractfile(member).read())
                    for member in stream
                    if member.isreg() and webdataset_key(member.name)[0] is not None
                )
                grouped = itertools.groupby(members, key=lambda m: webdataset_key(m[0].name)[0])
                for key, group in grouped:
                    sample = {webdataset_key(m.name)[1]: data for m, data in group}
                    yield Record(f"{name}/{key}", self.pick_image(sample))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise UnreadableInputError(
                f"{path} is not a readable tar file ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(watch.last_error, tarfile.EOFHeaderError):
            raise UnreadableInputError(
                f"{path} is truncated or damaged: it stops before its end-of-archive block "
                f"({type(watch.last_error).__name__}: {watch.last_error})"
            )

    def fingerprint(self) -> dict[str, Any]:
        """How samples are read; which tars are not part of it (see the done-markers)."""
        return {"kind": self.kind, "image": self.image_suffix}


@dataclass(frozen=True)
class ParquetFiles:
    """Parquet files with an encoded-image column and an id column, one shard per file."""

    files: list[str]
    image_column: str = PARQUET_IMAGE_COLUMN
    id_column: str = PARQUET_ID_COLUMN
    kind: InputKind = "parquet"

    @property
    def num_shards(self) -> int:
        return len(self.files)

    @cached_property
    def shard_names(self) -> list[str]:
        """Each file's path relative to the folder all of them share (null ids name it)."""
        return relative_names(self.files)

    def check_columns(self) -> None:
        """Raises ValueError naming a file that lacks the image or id column. A file whose schema
        cannot be read is left to the run, which lists it as unreadable."""
        pq = pyarrow_parquet()
        import pyarrow as pa

        for file in self.files:
            try:
                names = pq.read_schema(file).names
            except (pa.ArrowException, OSError):
                continue
            for column in (self.image_column, self.id_column):
                if column not in names:
                    raise ValueError(
                        f"{file} has no column {column!r} (its columns: {', '.join(names)}); "
                        "choose them with --image-column and --id-column"
                    )

    def records(self, k: int) -> Iterator[Record]:
        """The rows of file ``k``, in order, read a batch at a time; a null id becomes
        ``<file>#<row>``.

        Raises:
            UnreadableInputError: the file is not a readable parquet file, or lacks a column
                (the rows before the damage may have been yielded already).
        """
        pq = pyarrow_parquet()
        import pyarrow as pa

        path, columns, row, nulls = self.files[k], [self.id_column, self.image_column], 0, 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(columns=columns):
                ids, cells = (batch.column(c).to_pylist() for c in columns)
                for record_id, cell in zip(ids, cells, strict=True):
                    if record_id is None:
                        nulls += 1
                    data = image_bytes(cell)
                    yield Record(
                        f"{self.shard_names[k]}#{row}" if record_id is None else str(record_id),
                        data if data is not None else self.missing(),
                    )
                    row += 1
        except (pa.ArrowException, OSError, KeyError) as exc:
            raise UnreadableInputError(
                f"{path} is not a readable parquet file ({type(exc).__name__}: {exc})"
            ) from exc
        if nulls:
            warnings.warn(
                f"{path}: {nulls} null id(s) in column {self.id_column!r}, recorded as "
                f"'{self.shard_names[k]}#<row>'",
                stacklevel=2,
            )

    def missing(self) -> MissingImageError:
        return MissingImageError(f"the {self.image_column!r} cell holds no encoded image")

    def fingerprint(self) -> dict[str, Any]:
        """How rows are read; which files are not part of it (see the done-markers)."""
        return {"kind": self.kind, "columns": [self.image_column, self.id_column]}


InputSource = ImageFiles | TarShards | ParquetFiles


def pyarrow_parquet():
    """``pyarrow.parquet``, or an ImportError naming the extra that installs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            "parquet input and output need pyarrow: pip install 'ssole-hub[parquet]'"
        ) from exc
    return pq


def _kind_of(entries: list[str]) -> InputKind:
    suffixes = {Path(e).suffix.lower() for e in entries}
    if suffixes == {".tar"}:
        return "webdataset"
    if suffixes == {".parquet"}:
        return "parquet"
    if suffixes & {".tar", ".parquet"}:
        raise ValueError(
            f"an input list mixes tar, parquet and other files ({', '.join(sorted(suffixes))}); "
            "give one kind per run"
        )
    return "files"


def _refuse_repeats(entries: list[str]) -> None:
    """Raises ValueError naming a file listed twice: its shard and ids would be ambiguous."""
    seen: dict[str, str] = {}
    for entry in entries:
        key = os.path.abspath(entry)
        if key in seen:
            raise ValueError(f"{entry} is listed twice among the inputs (also as {seen[key]})")
        seen[key] = entry


def open_input(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    shard_size: int = 10_000,
    image_column: str | None = None,
    id_column: str | None = None,
) -> InputSource:
    """Recognise the input and cut it into shards.

    Args:
        inputs: a folder of images, a text file listing images, a ``.tar`` / ``.parquet`` path or
            brace pattern (``shards/data-{000..009}.tar``), or a list of image, tar or parquet
            paths (one kind per list).
        shard_size: images per shard for image files (a tar or parquet file is one shard).
        image_column: parquet: the encoded-image column (default ``image``); webdataset: the
            image member's suffix (default: see :data:`WEBDATASET_IMAGE_SUFFIXES`).
        id_column: parquet: the id column (default ``id``).

    Raises:
        FileNotFoundError: a folder, list file, tar or parquet file that does not exist.
        ValueError: no images, a list mixing kinds, a tar or parquet file listed twice, options
            that do not fit the input, or a parquet file without the named columns.
    """
    single = isinstance(inputs, str | os.PathLike)
    entries = [os.fspath(inputs)] if single else [os.fspath(p) for p in inputs]
    if single and not Path(entries[0]).exists():
        entries = expand_braces(entries[0])
    kind = _kind_of(entries) if entries else "files"
    if kind == "files":
        if image_column is not None or id_column is not None:
            raise ValueError("--image-column and --id-column apply to parquet and tar inputs")
        paths, root = list_images(inputs)
        return ImageFiles(paths, root, shard_size)
    missing = [e for e in entries if not Path(e).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} input file(s) do not exist, e.g. {missing[0]}")
    _refuse_repeats(entries)
    if kind == "webdataset":
        if id_column is not None:
            raise ValueError("--id-column applies to parquet input; tar ids are <tar>/<key>")
        return TarShards(entries, image_column)
    source = ParquetFiles(
        entries, image_column or PARQUET_IMAGE_COLUMN, id_column or PARQUET_ID_COLUMN
    )
    source.check_columns()
    return source
