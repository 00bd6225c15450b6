"""Extraction on a Ray cluster: :class:`Embedder` for Ray Data pipelines, and the ``ray`` engine
of ``ssole-hub extract`` (:func:`extract_with_ray`).

In your own Ray Data pipeline, three lines embed any dataset with an encoded-image column::

    from ssole_hub.extract.ray import Embedder
    ds = ray.data.read_parquet("images/")  # or read_webdataset / read_binary_files / read_images
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model": "hf-hub:ORG/NAME"},
                        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=64)

Each actor loads the model once, decodes through :func:`ssole_hub.images.decode_image` (size and
pixel limits included) and preprocesses with the model's own transform, as everywhere else. The
engine reads image files with Ray Data's ``read_binary_files``, and tars and parquet files with
the plain engine's own readers in Ray tasks (one per file, so an unreadable file fails its shard
only), and embeds in Ray Data actor pools; the scheduling is Ray's. Ray is imported only here,
and only when used: ``pip install 'ssole-hub[ray]'``.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ssole_hub.device_decode import EncodedJPEG
from ssole_hub.extract.inputs import (
    ImageFiles,
    InputSource,
    MissingImageError,
    ParquetFiles,
    TarShards,
    UnreadableInputError,
    error_entry,
    image_bytes,
    input_error_entry,
)
from ssole_hub.extract.output import write_failed_shard, write_manifest, write_shard
from ssole_hub.extract.resume import Options, fingerprint, manifest_header, resumable_shards
from ssole_hub.extractor import FeatureExtractor
from ssole_hub.models import Output
from ssole_hub.runtimes.eager import resolve_dtype

__all__ = ["Embedder", "check_ray_address", "extract_with_ray", "require_ray"]

CPUS_FOR_READING = 1
"""CPUs of each node the embedding actors leave unreserved, for Ray Data's listing and reading
tasks (Ray's default of 1 CPU each; they only read bytes, the actors decode)."""

CONNECT_TIMEOUT_S = 5.0
"""How long :func:`check_ray_address` waits for the cluster's address to accept a connection."""


def require_ray():
    """The ``ray`` module with Ray Data, or an ImportError naming the extra that installs it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(
            "the Ray engine needs Ray Data: pip install 'ssole-hub[ray]' (or 'ray[data]')"
        ) from exc
    return ray


class Embedder:
    """A Ray Data ``map_batches`` class: one :class:`~ssole_hub.FeatureExtractor` per actor.

    Input batches (``batch_format="numpy"``) need an image column: encoded bytes (as
    ``read_binary_files``, ``read_webdataset(decoder=None)`` or a parquet column give), a
    ``{"bytes": ...}`` struct, or ``uint8`` arrays (``read_images``). Output batches keep the other
    columns and add ``embedding`` (``(n, dim)`` float32), ``error`` (the exception name, ``""``
    when the row was embedded) and ``error_message``. A row that cannot be decoded gets a zero
    embedding and its error; it never fails the batch.

    ``__call__`` is asynchronous, so Ray Data hands an actor several batches at once: while the
    model runs on one batch (always in the same thread, one batch at a time), the next ones are
    decoded in a thread pool. Decoding never waits for the model, nor the model for decoding.

    Args:
        model: anything :meth:`FeatureExtractor.from_pretrained` takes.
        image_column: the image column, or several to try in order (the first non-empty cell of
            a row is used; e.g. a webdataset's ``("jpg", "png")``). These columns are dropped
            from the output.
        output, normalize, dimensions: as :meth:`FeatureExtractor.embed`.
        device: default: the actor's GPU when Ray gave it one, else the CPU.
        threads: decoding threads, and the forward pass's threads on a CPU; default: torch's
            (in a Ray actor, the CPUs it reserved: Ray sets ``OMP_NUM_THREADS``).
        **load: other :meth:`FeatureExtractor.from_pretrained` options (``dtype``, ``backend``,
            ``max_bytes``, ``max_pixels``, ``fast_decode``, ``compile``).
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        *,
        image_column: str | Sequence[str] = "image",
        output: Output = "backbone",
        normalize: bool = True,
        dimensions: int | None = None,
        device: torch.device | str | None = None,
        threads: int | None = None,
        **load: Any,
    ) -> None:
        threads = threads or torch.get_num_threads()
        torch.set_num_threads(threads)
        self.fx = FeatureExtractor.from_pretrained(
            model, device=device, with_projector=output == "projector", **load
        )
        self.image_columns = (image_column,) if isinstance(image_column, str) else image_column
        self.output = output
        self.normalize = normalize
        self.dimensions = dimensions
        self.width = self.fx.check_options(output, normalize, dimensions)
        self.decoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def _image(self, batch: dict[str, np.ndarray], i: int) -> Any:
        for column in self.image_columns:
            if column in batch:
                cell = batch[column][i]
                if isinstance(cell, np.ndarray) and cell.dtype == np.uint8:
                    return cell
                data = image_bytes(cell)
                if data is not None:
                    return data
        return MissingImageError(f"no image in column(s) {', '.join(self.image_columns)}")

    def _preprocess(self, image: Any) -> torch.Tensor | EncodedJPEG | Exception:
        try:
            if isinstance(image, Exception):
                raise image
            return self.fx.prepare(image)
        except (ValueError, TypeError, OSError) as exc:  # ImageDecodeError is a ValueError
            return exc

    def _embed(
        self, prepared: list[torch.Tensor | EncodedJPEG | Exception]
    ) -> tuple[np.ndarray, list]:
        """The batch's embeddings (zero rows for failures), and its images or their errors (a
        JPEG decoded on the device that failed there and on the CPU becomes its error)."""
        images = [x for x in prepared if not isinstance(x, Exception)]
        finished = iter(self.fx.finish_batch(images))
        done = [x if isinstance(x, Exception) else next(finished) for x in prepared]
        good = [i for i, x in enumerate(done) if isinstance(x, torch.Tensor)]
        emb = np.zeros((len(done), self.width), np.float32)
        if good:
            tensors = torch.stack([done[i] for i in good])
            asked = (self.output, self.normalize, self.dimensions)
            emb[good] = self.fx.embed_tensor(tensors, *asked).numpy()
        return emb, done

    async def __call__(self, batch: dict[str, np.ndarray]) -> AsyncIterator[dict[str, np.ndarray]]:
        """Embed one batch; see the class docstring for the columns."""
        loop = asyncio.get_running_loop()
        n = len(next(iter(batch.values()))) if batch else 0
        decoding = [
            loop.run_in_executor(self.decoders, self._preprocess, self._image(batch, i))
            for i in range(n)
        ]
        prepared = list(await asyncio.gather(*decoding))
        emb, done = await loop.run_in_executor(self.model_thread, self._embed, prepared)
        out = {k: v for k, v in batch.items() if k not in self.image_columns}
        out["embedding"] = emb
        bad = [x if isinstance(x, Exception) else None for x in done]
        out["error"] = np.array([type(e).__name__ if e else "" for e in bad], dtype=object)
        out["error_message"] = np.array([str(e) if e else "" for e in bad], dtype=object)
        yield out


# -- the engine -------------------------------------------------------------------------------

Locate = Callable[[dict[str, np.ndarray], int], tuple[int, str]]


def check_ray_address(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast when a Ray cluster's address (``HOST:PORT`` or ``ray://HOST:PORT``) does not
    accept a TCP connection within ``timeout`` seconds: ``ray.init`` would retry for minutes.
    ``None``, ``"auto"`` and ``"local"`` are left to Ray.

    Raises:
        ValueError: the address is not ``HOST:PORT``.
        ConnectionError: nothing listens there.
    """
    if address is None or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        raise ValueError(f"the Ray address {address!r} is not HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address} ({reason}); is Ray running there "
            "(ray start --head), and is the address right?"
        ) from None


def _read(ray, source: InputSource, pending: list[int], rows: int) -> tuple[Any, str, Locate]:
    """Ray Data's dataset of the pending shards' records, its image column, and (batch, row) ->
    (shard, record id)."""
    if isinstance(source, ImageFiles):
        where = {}
        for k in pending:
            for record_id in source.ids(k):
                where[os.path.abspath(source.root / record_id)] = (k, record_id)
        ds = ray.data.read_binary_files(list(where), include_paths=True, ignore_missing_paths=True)
        return ds, "bytes", lambda b, i: where[os.path.abspath(b["path"][i])]
    ds = ray.data.from_items([{"shard": k} for k in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        _read_shards,
        fn_kwargs={"source": source, "rows": rows},
        batch_size=1,
        batch_format="numpy",
        ray_remote_args_fn=_reading_task_options,
    )
    return ds, "image", lambda b, i: (int(b["shard"][i]), str(b["id"][i]))


def _reading_task_options() -> dict[str, Any]:
    """Reading tasks spread over the nodes, as Ray Data's readers do. (Given as a function, it
    also keeps Ray Data from fusing them into the embedding actors when their resources match:
    reading stays beside the actors, on the CPUs they leave for it, see ``CPUS_FOR_READING``.)"""
    return {"scheduling_strategy": "SPREAD"}


def _read_shards(
    batch: dict[str, np.ndarray], source: TarShards | ParquetFiles, rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """A Ray task's reading: the records of the shards in ``batch`` (one, as the engine asks),
    ``rows`` at a time, with the reader the plain engine uses. Columns: ``shard``, ``id``,
    ``image`` (bytes; empty when the record has none), ``read_error`` and ``read_message`` (why a
    record has no image, or why the whole input file could not be read: then ``input_failed`` is
    true, and ``id`` is the file's path)."""
    for k in (int(k) for k in batch["shard"]):
        chunk: list[tuple[str, bytes, str, str, bool]] = []
        try:
            for record in source.records(k):
                if isinstance(record.data, MissingImageError):
                    chunk.append(
                        (record.id, b"", type(record.data).__name__, str(record.data), False)
                    )
                else:
                    chunk.append((record.id, record.data, "", "", False))
                if len(chunk) == rows:
                    yield _columns(k, chunk)
                    chunk = []
        except UnreadableInputError as exc:
            chunk.append((source.files[k], b"", type(exc).__name__, str(exc), True))
        if chunk:
            yield _columns(k, chunk)


def _columns(k: int, chunk: list[tuple[str, bytes, str, str, bool]]) -> dict[str, np.ndarray]:
    ids, images, errors, messages, failed = zip(*chunk, strict=True)
    image_column = np.empty(len(chunk), dtype=object)
    image_column[:] = images
    return {
        "shard": np.full(len(chunk), k, np.int64),
        "id": np.array(ids, dtype=object),
        "image": image_column,
        "read_error": np.array(errors, dtype=object),
        "read_message": np.array(messages, dtype=object),
        "input_failed": np.array(failed, dtype=bool),
    }


class _ShardRows:
    """The embedded rows and errors of one shard, as they arrive from the actors; ``failure``:
    why the shard's input file could not be read."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.rows: list[np.ndarray] = []
        self.errors: list[dict[str, str]] = []
        self.seen: list[str] = []
        self.failure: dict[str, str] | None = None

    def add(self, record_id: str, row: np.ndarray | None, error: str, message: str) -> None:
        self.seen.append(record_id)
        if error:
            self.errors.append(error_entry(record_id, error, message))
        else:
            self.ids.append(record_id)
            self.rows.append(row)

    def add_row(self, batch: dict[str, np.ndarray], i: int, record_id: str) -> None:
        """Add row ``i`` of an embedded batch; the reader's verdict (``read_error``), when the
        batch has one, comes before the actor's."""
        if "read_error" in batch and batch["read_error"][i]:
            if batch["input_failed"][i]:
                self.failure = input_error_entry(record_id, batch["read_message"][i])
            else:
                self.add(record_id, None, batch["read_error"][i], batch["read_message"][i])
        else:
            self.add(record_id, batch["embedding"][i], batch["error"][i], batch["error_message"][i])

    def missing_files(self, expected: list[str]) -> None:
        """Files Ray's reader skipped (they do not exist) become errors, as in the plain engine."""
        left = deque(self.seen)
        unseen = defaultdict(int)
        for record_id in expected:
            if left and left[0] == record_id:
                left.popleft()
            else:
                unseen[record_id] += 1
        for record_id, times in unseen.items():
            message = f"{record_id} does not exist or cannot be read"
            self.errors += [error_entry(record_id, "FileNotFoundError", message)] * times


def _write_rows(
    batches: Iterator[dict[str, np.ndarray]],
    locate: Locate,
    pending: list[int],
    write: Callable[[int, _ShardRows], None],
) -> None:
    """Group the rows (in input order: ``preserve_order``) by shard; write each shard when the
    next one starts, and the shards no row came from (empty, or every file missing) in turn."""
    order = {k: n for n, k in enumerate(pending)}
    done = 0  # pending[:done] are written; pending[done] is the current shard
    current, rows = None, _ShardRows()
    for batch in batches:
        for i in range(len(batch["embedding"])):
            k, record_id = locate(batch, i)
            if k != current:
                if order[k] < done:
                    raise RuntimeError(f"Ray Data returned shard {k} out of order")
                for skipped in pending[done : order[k]]:
                    write(skipped, rows if skipped == current else _ShardRows())
                done, current, rows = order[k], k, _ShardRows()
            rows.add_row(batch, i, record_id)
    for k in pending[done:]:
        write(k, rows if k == current else _ShardRows())


def _shard_writer(
    out: Path, source: InputSource, options: Options, run_fingerprint: str, fx: FeatureExtractor
) -> Callable[[int, _ShardRows], None]:
    """``write(k, rows)``: write shard ``k`` from its rows as they came from the actors (a failed
    one as failed; image files Ray's reader skipped as missing)."""
    dim = fx.check_options(options.output, options.normalize, options.dimensions)

    def write(k: int, shard: _ShardRows) -> None:
        name, file_format = source.shard_names[k], options.file_format
        if shard.failure is not None:
            write_failed_shard(out, k, shard.failure, file_format, run_fingerprint, name=name)
            return
        if isinstance(source, ImageFiles):
            shard.missing_files(source.ids(k))
        emb = np.stack(shard.rows) if shard.rows else np.empty((0, dim), np.float32)
        write_shard(
            out, k, shard.ids, emb, shard.errors, file_format, run_fingerprint,
            name=name, backend=fx.backend,
        )  # fmt: skip

    return write


def _worker_dtype(dtype: torch.dtype | str | None, gpus: float) -> str:
    if gpus == 0 or dtype not in (None, "auto"):
        return str(resolve_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")
    return "auto (bfloat16 on CUDA, float16 on GPUs without bfloat16)"


def extract_with_ray(
    model: str | os.PathLike | torch.nn.Module,
    inputs: Any,
    source: InputSource,
    out: Path,
    options: Options,
    load: dict[str, Any],
    *,
    batch_size: int = 64,
    progress: bool = True,
    ray_address: str | None = None,
    num_gpus_per_worker: float | None = None,
    concurrency: int | None = None,
    num_cpus_per_worker: float | None = None,
) -> dict[str, Any]:
    """The ``ray`` engine of :func:`ssole_hub.extract_dataset` (call that instead).

    Reads ``source`` in Ray tasks (image files with Ray Data's ``read_binary_files``; each tar
    or parquet file with the plain engine's reader, so an unreadable one fails its own shard
    only), runs ``concurrency`` :class:`Embedder` actors (``num_gpus_per_worker`` GPUs each)
    through ``map_batches`` and writes each finished shard from this driver with the same
    writer, markers and manifest as the plain engine; finished shards are skipped, so a killed
    run resumes with nothing kept by Ray.

    Args:
        ray_address: the cluster to join (``ray.init(address=...)``); default: the one this
            process is connected to, else ``RAY_ADDRESS``, else a new local one.
        num_gpus_per_worker: GPUs per actor; default 1 when the cluster has GPUs, else 0.
        concurrency: number of actors; default: the cluster's GPUs / ``num_gpus_per_worker``,
            or one per node without GPUs.
        num_cpus_per_worker: CPUs reserved per actor, and its decoding threads (and forward
            pass threads on a CPU); default: its share of its node's CPUs, reserving all but
            ``CPUS_FOR_READING`` of them (see :func:`_resources`).

    Raises:
        ImportError: Ray is not installed.
        ValueError: bad resources (e.g. more GPUs per actor than any node has).
        ConnectionError: nothing answers at ``ray_address`` (or ``RAY_ADDRESS``).
    """
    ray = require_ray()
    started = not ray.is_initialized()
    if ray_address is not None or started:
        check_ray_address(ray_address or os.environ.get("RAY_ADDRESS"))
    if started:
        ray.init(address=ray_address, include_dashboard=False)
    try:
        actors = _resources(ray, num_gpus_per_worker, concurrency, num_cpus_per_worker)
        gpus = actors.gpus
        backend = "torch" if load["backend"] == "auto" and gpus > 0 else load["backend"]
        driver_load = {**load, "backend": backend, "dtype": "float32", "compile": False}
        fx = FeatureExtractor.from_pretrained(model, device="cpu", **driver_load)
        # ``auto`` on CPU actors: timed once, here, so that every actor runs the same backend.
        load = {**load, "backend": fx.backend}
        fx.check_options(options.output, options.normalize, options.dimensions)
        run_fingerprint = fingerprint(fx, options, source)
        shards = list(range(source.num_shards))
        pending = resumable_shards(out, shards, options, run_fingerprint, source)
        if pending:
            rows, locate = _embedded_rows(
                ray, source, pending, model, options, load, actors, batch_size, progress
            )
            write = _shard_writer(out, source, options, run_fingerprint, fx)
            _write_rows(rows, locate, pending, write)
        header = manifest_header(
            fx,
            options,
            inputs,
            source,
            run_fingerprint,
            engine="ray",
            ray_workers=actors.workers,
            num_gpus_per_worker=gpus,
            num_cpus_per_worker=actors.cpus,
            threads_per_worker=actors.threads,
        )
        header["compute_dtype"] = _worker_dtype(load["dtype"], gpus)
        return write_manifest(out, header, source.shard_names, options.file_format)
    finally:
        if started:
            ray.shutdown()


def _embedded_rows(
    ray: Any,
    source: InputSource,
    pending: list[int],
    model: Any,
    options: Options,
    load: dict[str, Any],
    actors: Resources,
    batch_size: int,
    progress: bool,
) -> tuple[Iterator[dict[str, np.ndarray]], Locate]:
    """The pending shards read by Ray Data's reader and embedded by a pool of :class:`Embedder`
    actors (``actors``: their GPUs, CPUs, threads and number), in input order; and how to find a
    row's shard and id."""
    ds, columns, locate = _read(ray, source, pending, batch_size)
    kwargs = {k: v for k, v in load.items() if k != "with_projector"}
    embedder = dict(
        model=model, image_column=columns, output=options.output, threads=actors.threads
    )
    asked = {"normalize": options.normalize, "dimensions": options.dimensions}
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={**embedder, **asked, **kwargs},
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=actors.gpus,
        num_cpus=actors.cpus,
        compute=ray.data.ActorPoolStrategy(size=actors.workers),
    )
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = progress
    return ds.iter_batches(batch_format="numpy", batch_size=None), locate


class Resources(NamedTuple):
    """What each embedding actor reserves and runs, and how many actors there are."""

    gpus: float
    cpus: float
    threads: int
    workers: int


def _resources(
    ray: Any, num_gpus: float | None, concurrency: int | None, num_cpus: float | None
) -> Resources:
    """The actors' resources: given ones are checked, missing ones fill the cluster.

    Defaults: with GPUs, 1 GPU per actor and one actor per GPU; without, one actor per node that
    has CPUs (a head node started with ``--num-cpus 0`` runs none). The actors of a node share
    its CPUs: each reserves its share of all but ``CPUS_FOR_READING`` of them, and runs as many
    threads as its share of all of them (so reading, which is light, runs beside the actors
    instead of waiting for a free CPU). A given ``num_cpus`` is both.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    largest = max((r.get("GPU", 0) for r in nodes), default=0)
    gpus = (1 if largest >= 1 else 0) if num_gpus is None else num_gpus
    bad_cpus = num_cpus is not None and num_cpus <= 0
    if gpus < 0 or (concurrency is not None and concurrency < 1) or bad_cpus:
        raise ValueError(
            "need num_gpus_per_worker >= 0, concurrency >= 1 and num_cpus_per_worker > 0, "
            f"got {gpus}, {concurrency}, {num_cpus}"
        )
    if gpus > largest:
        raise ValueError(
            f"the largest node of the Ray cluster has {largest:g} GPUs; an actor cannot have "
            f"{gpus:g}"
        )
    hosts = [r for r in nodes if r.get("CPU", 0) >= 1 and r.get("GPU", 0) >= gpus]
    if not hosts:
        raise ValueError(f"no node of the Ray cluster has a CPU and {gpus:g} GPUs for an actor")
    if gpus:
        per_node = min(int(r["GPU"] // gpus) for r in hosts)
        workers = concurrency or sum(int(r["GPU"] // gpus) for r in hosts)
    else:
        workers = concurrency or len(hosts)
        per_node = math.ceil(workers / len(hosts))
    if num_cpus is not None:
        return Resources(gpus, num_cpus, math.ceil(num_cpus), workers)
    node_cpus = min(r["CPU"] for r in hosts)
    cpus = max(0.0, node_cpus - CPUS_FOR_READING) / per_node
    return Resources(gpus, cpus, max(1, round(node_cpus / per_node)), workers)
