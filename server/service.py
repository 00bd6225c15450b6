"""The embedding service behind the routes: model start-up, the decode pool and the batcher.

:class:`EmbeddingService` owns everything that outlives a request. Its :meth:`~EmbeddingService.
embed` is the one pipeline both embedding routes use: check limits, decode each image in the
decode pool (a bad image fails only its own request), queue the decoded images with the
batcher, and wait for their vectors while watching for a client that goes away.

Threads: the decode threads run torch single-threaded (they are the parallelism of decoding);
the inference thread runs with ``inference_threads`` intra-op threads. Each sets its count with
:func:`use_intra_op_threads`: torch initialises a thread's count lazily, on its first parallel
operation, from whatever count any thread set last, so a count set before that first operation
is silently replaced (before, the forward pass ran on the decode threads' 1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request

from server.backend import BackendLoader, EmbeddingBackend, Image, load_backend
from server.batcher import (
    BatcherClosedError,
    BatchTiming,
    DynamicBatcher,
    QueueFullError,
    efficient_batch,
)
from server.errors import APIError
from server.inputs import image_error
from server.metrics import ServerMetrics
from server.settings import ServerSettings
from ssole_hub import Output

__all__ = [
    "LOADING_RETRY_AFTER_S",
    "MACHINE_THREADS",
    "Embedded",
    "EmbeddingService",
    "use_intra_op_threads",
]

log = logging.getLogger("server")

LOADING_RETRY_AFTER_S = 5
"""Seconds a client is told to wait while the model loads."""

MACHINE_THREADS = torch.get_num_threads()
"""torch's intra-op default here (one per physical core), read at import, before any decode
thread lowers the count that new threads inherit."""


def use_intra_op_threads(n: int) -> None:
    """Run torch ops of the calling thread with ``n`` intra-op threads, for good."""
    torch.get_num_threads()  # runs the thread's lazy initialisation now, so it cannot undo n
    torch.set_num_threads(n)


@dataclass
class Embedded:
    """One request's vectors and where its time went."""

    vectors: list[Any]
    timing: BatchTiming
    decode_s: float
    total_s: float


@dataclass
class EmbeddingService:
    """Model, decode pool and batcher of one server; see the module docstring.

    Args:
        settings: the server's settings.
        loader: builds the backend (default :func:`~server.backend.load_backend`).
        on_load_failure: called once if the model cannot be loaded (``python -m server`` stops).
    """

    settings: ServerSettings
    loader: BackendLoader = load_backend
    on_load_failure: Callable[[], None] | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics, init=False)
    created: int = field(default_factory=lambda: int(time.time()), init=False)
    backend: EmbeddingBackend | None = field(default=None, init=False)
    batcher: DynamicBatcher | None = field(default=None, init=False)
    batch_timings: dict[int, float] = field(default_factory=dict, init=False)
    """The forward pass's ms per image by batch size, timed at start-up (empty if not)."""
    load_error: str | None = field(default=None, init=False)
    _decode_pool: ThreadPoolExecutor | None = field(default=None, init=False)
    _loading: asyncio.Task | None = field(default=None, init=False)

    @property
    def ready(self) -> bool:
        """Loaded, warmed and accepting work."""
        return self.batcher is not None and self.batcher.running

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the decode pool and load the model in the background (``/health`` answers
        meanwhile)."""
        self._decode_pool = ThreadPoolExecutor(
            self.settings.decode_threads,
            thread_name_prefix="decode",
            initializer=use_intra_op_threads,
            initargs=(1,),
        )
        self._loading = asyncio.create_task(self._bring_up())

    async def stop(self) -> None:
        """Cancel loading, stop the batcher (queued work fails with 503) and the decode pool."""
        if self._loading is not None:
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.stop()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)

    async def _bring_up(self) -> None:
        s = self.settings
        threads = s.inference_threads or MACHINE_THREADS
        try:
            backend = await asyncio.to_thread(self._in_inference_threads, self.loader, s, threads)
            timings = None
            if s.warmup:
                timings = await asyncio.to_thread(
                    self._in_inference_threads, backend.warmup, s.max_batch_size, threads
                )
            self.batch_timings = timings or {}
            # On OpenVINO (its thread count is fixed at load) torch only stacks the batch here;
            # one torch thread keeps torch's idle pool from spinning against OpenVINO's.
            torch_threads = threads if backend.backend_name == "torch" else 1
            batcher = DynamicBatcher(
                backend.infer,
                max_batch_size=s.max_batch_size,
                max_wait_s=s.max_batch_wait_ms / 1000,
                max_queue=s.max_queue,
                metrics=self.metrics,
                thread_init=lambda: use_intra_op_threads(torch_threads),
                target_size=efficient_batch(timings) if timings else None,
            )
            await batcher.start()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load model %r: %s", s.model, self.load_error)
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        self.backend, self.batcher = backend, batcher
        log.info(
            "model %r ready: outputs %s, backend %s, %d inference threads, %d decode threads; "
            "batches of up to %d images (ms per image by batch size: %s)",
            s.model_id, backend.dimensions, backend.backend_name, threads, s.decode_threads,
            batcher.target_size, self.batch_timings or "not timed",
        )  # fmt: skip

    @staticmethod
    def _in_inference_threads(fn: Callable[..., Any], arg: Any, threads: int) -> Any:
        use_intra_op_threads(threads)
        return fn(arg)

    # --- the pipeline -----------------------------------------------------------------------

    def ready_parts(self) -> tuple[EmbeddingBackend, DynamicBatcher]:
        """The backend and batcher, or the 503 that says why there are none yet."""
        if self.backend is None or self.batcher is None or not self.batcher.running:
            if self.load_error:
                raise self.load_failed()
            raise APIError.unavailable(
                "model_not_ready", "model is loading; retry shortly", LOADING_RETRY_AFTER_S
            )
        return self.backend, self.batcher

    def load_failed(self) -> APIError:
        """The 503 answered once the model failed to load."""
        message = f"model failed to load: {self.load_error}"
        return APIError(503, "model_load_failed", message, type="server_error")

    def check_request(
        self,
        n_items: int,
        output: Output | None,
        normalize: bool = True,
        dimensions: int | None = None,
    ) -> tuple[Output, EmbeddingBackend, DynamicBatcher]:
        """Check a request's size, output, ``dimensions`` and the queue's room before any
        decoding; returns the output to compute, the backend and the batcher.

        Raises:
            APIError: 503 not ready / queue full, 422 no images, 413 too many, 400 no output or
                ``dimensions`` the model cannot give (no PCA, out of range: the message says
                how to fit one).
        """
        backend, batcher = self.ready_parts()
        if n_items == 0:
            raise APIError(422, "validation_error", "no images in the request")
        if n_items > self.settings.max_items:
            raise APIError.too_large(
                "too_many_items",
                f"{n_items} images in one request; the limit is {self.settings.max_items}",
            )
        chosen = output or self.settings.default_output
        if chosen not in backend.dimensions:
            raise APIError.bad_request(
                "output_unavailable",
                f"output {chosen!r} is not available for this model; available: "
                f"{', '.join(sorted(backend.dimensions))}",
            )
        if dimensions is not None:
            try:
                backend.check(chosen, normalize, dimensions)
            except ValueError as exc:
                raise APIError.bad_request("invalid_dimensions", str(exc)) from exc
        try:
            batcher.check_capacity(n_items)
        except QueueFullError as exc:
            raise self._queue_full(exc) from exc
        return chosen, backend, batcher

    def _queue_full(self, exc: QueueFullError) -> APIError:
        self.metrics.rejected.labels("queue_full").inc()
        return APIError.unavailable("queue_full", str(exc), exc.retry_after_s)

    async def embed(
        self,
        request: Request,
        items: Sequence[Callable[[], bytes]],
        names: Sequence[str],
        *,
        output: Output | None,
        normalize: bool,
        dimensions: int | None = None,
    ) -> Embedded | None:
        """Decode, queue and embed one request's ``items`` (thunks giving encoded bytes), as
        ``output``, ``normalize`` and ``dimensions`` ask.

        Returns ``None`` if the client went away before its vectors were computed.

        Raises:
            APIError: as :meth:`check_request`, or the first bad image's 400 / 413 / 415.
        """
        started = time.perf_counter()
        chosen, backend, batcher = self.check_request(len(items), output, normalize, dimensions)
        batcher.announce(len(items))  # a batch below its target size waits for these
        try:
            images = await self._decode(backend, items, names)
        except BaseException:
            batcher.withdraw(len(items))
            raise
        decode_s = time.perf_counter() - started
        payloads = [(x, normalize, dimensions) for x in images]
        work = self._submit(batcher, payloads, chosen)
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                # The client went away: drop its queued images instead of computing them.
                work.cancel()
        if work.cancelled():
            return None
        try:
            vectors, timing = work.result()
        except BatcherClosedError as exc:
            raise _not_running(exc) from exc
        self._raise_decode_errors(vectors, names)
        return Embedded(vectors, timing, decode_s, time.perf_counter() - started)

    def _submit(
        self, batcher: DynamicBatcher, payloads: list[Any], output: Output
    ) -> asyncio.Future:
        """Queue a request's decoded (announced) images now; the future gives their vectors."""
        try:
            return asyncio.ensure_future(batcher.submit(payloads, output, announced=True))
        except QueueFullError as exc:
            raise self._queue_full(exc) from exc
        except BatcherClosedError as exc:
            raise _not_running(exc) from exc

    def _raise_decode_errors(self, results: Sequence[Any], names: Sequence[str]) -> None:
        """The first image error in ``results`` (a JPEG the model's device and the CPU both
        failed to decode, in the batch) as its request's error."""
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                error = image_error(result, name)
                self.metrics.decode_errors.labels(error.code).inc()
                raise error

    async def _decode(
        self,
        backend: EmbeddingBackend,
        items: Sequence[Callable[[], bytes]],
        names: Sequence[str],
    ) -> list[Image]:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, _prepare, backend, get) for get in items),
            return_exceptions=True,
        )
        self._raise_decode_errors(results, names)
        return list(results)


def _not_running(exc: BatcherClosedError) -> APIError:
    return APIError.unavailable("model_not_ready", str(exc), LOADING_RETRY_AFTER_S)


def _prepare(backend: EmbeddingBackend, get_bytes: Callable[[], bytes]) -> Image:
    return backend.prepare(get_bytes())


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
