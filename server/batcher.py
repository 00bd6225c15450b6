"""Dynamic batching: a bounded queue of decoded items feeding one inference worker.

Requests put already-decoded items on the queue (so a bad image never reaches a batch). One
worker task takes up to ``max_batch_size`` items that share a key (e.g. the requested output),
waiting at most ``max_wait_s`` after the oldest item arrived, runs ``infer`` on them in a
dedicated thread (one per device: forward passes never overlap), and hands each request its
results in order. A full queue raises :class:`QueueFullError` at once instead of letting latency
grow without bound, and the items of a request whose caller was cancelled (a client that went
away) are dropped before they are computed.

This module knows nothing about HTTP or images: ``infer`` is any callable
``(items: list, key) -> sequence of one result per item``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from server.metrics import ServerMetrics

__all__ = ["BatchTiming", "BatcherClosedError", "DynamicBatcher", "QueueFullError"]

InferFn = Callable[[list[Any], Hashable], Sequence[Any]]


class QueueFullError(Exception):
    """The queue cannot take the request's items now; retry after ``retry_after_s`` seconds."""

    def __init__(self, depth: int, capacity: int, wanted: int, retry_after_s: int) -> None:
        super().__init__(
            f"inference queue is full ({depth} of {capacity} images waiting, this request "
            f"needs {wanted}); retry after {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class BatcherClosedError(Exception):
    """The batcher is not running (not started yet, or shutting down)."""


@dataclass
class BatchTiming:
    """Where a request's time went inside the batcher, in seconds."""

    queue_s: float = 0.0
    """Longest wait of any of its items between enqueue and the start of its forward pass."""
    inference_s: float = 0.0
    """Total duration of the forward passes its items were part of."""
    batch_sizes: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Entry:
    payload: Any
    key: Hashable
    future: asyncio.Future
    enqueued_at: float


class DynamicBatcher:
    """Queue items from many requests and run them through ``infer`` in batches.

    Args:
        infer: called in the worker thread with up to ``max_batch_size`` payloads that share a
            key; returns one result per payload, in order.
        max_batch_size: most items per ``infer`` call.
        max_wait_s: longest time the oldest queued item waits for more items to arrive.
        max_queue: most items waiting (not yet in a forward pass); more raises
            :class:`QueueFullError`.
        metrics: optional metrics to record queue depth, queue time, batch size and duration.

    Raises:
        ValueError: if a size or the wait is out of range.
    """

    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: ServerMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(
                f"max_batch_size and max_queue must be >= 1, got {max_batch_size}, {max_queue}"
            )
        if not (max_wait_s >= 0 and math.isfinite(max_wait_s)):
            raise ValueError(f"max_wait_s must be a finite number >= 0, got {max_wait_s}")
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._pending: deque[_Entry] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Seconds per item of recent forward passes, to tell rejected clients when to come back.
        self._seconds_per_item = 0.0

    @property
    def depth(self) -> int:
        """Items waiting for a forward pass."""
        return len(self._pending)

    @property
    def running(self) -> bool:
        """Whether the worker is accepting and processing items."""
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the worker task on the running event loop (idempotent)."""
        if self.running:
            return
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker = asyncio.create_task(self._run(), name="dynamic-batcher")

    async def stop(self) -> None:
        """Stop the worker; items still queued fail with :class:`BatcherClosedError`."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._pending:
            entry = self._pending.popleft()
            if not entry.future.done():
                entry.future.set_exception(BatcherClosedError("server is shutting down"))
        self._set_depth()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def check_capacity(self, n_items: int) -> None:
        """Raise :class:`QueueFullError` if ``n_items`` more items would not fit right now.

        Lets a caller reject before spending time on decoding; :meth:`submit` checks again.
        """
        if self.depth + n_items > self.max_queue:
            raise QueueFullError(self.depth, self.max_queue, n_items, self._retry_after(n_items))

    async def submit(
        self, payloads: Sequence[Any], key: Hashable = None
    ) -> tuple[list[Any], BatchTiming]:
        """Queue ``payloads`` and wait for their results, returned in the same order.

        Cancelling the awaiting task drops those of its items that have not been computed.

        Raises:
            QueueFullError: if the items do not fit in the queue (nothing was queued).
            BatcherClosedError: if the batcher is not running.
            Exception: whatever ``infer`` raised for a batch holding one of the items.
        """
        if not self.running:
            raise BatcherClosedError("the inference worker is not running")
        if not payloads:
            return [], BatchTiming()
        self.check_capacity(len(payloads))
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        entries = [_Entry(p, key, loop.create_future(), now) for p in payloads]
        self._pending.extend(entries)
        self._set_depth()
        assert self._arrived is not None
        self._arrived.set()
        try:
            outcomes = await asyncio.gather(*(e.future for e in entries))
        except BaseException:
            self._drop(entries)
            raise
        timing = BatchTiming()
        seen_batches: set[int] = set()
        results = []
        for result, started_at, duration, batch_id, batch_size in outcomes:
            timing.queue_s = max(timing.queue_s, started_at - now)
            if batch_id not in seen_batches:
                seen_batches.add(batch_id)
                timing.inference_s += duration
                timing.batch_sizes.append(batch_size)
            results.append(result)
        return results, timing

    def _drop(self, entries: list[_Entry]) -> None:
        for e in entries:
            if not e.future.done():
                e.future.cancel()
        dropped = set(map(id, entries))
        if any(id(e) in dropped for e in self._pending):
            self._pending = deque(e for e in self._pending if id(e) not in dropped)
            self._set_depth()

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._pending))

    def _retry_after(self, n_items: int) -> int:
        backlog = self.depth + n_items - self.max_queue
        return max(1, math.ceil(backlog * self._seconds_per_item))

    def _matching(self, key: Hashable) -> int:
        return sum(1 for e in self._pending if e.key == key)

    def _take_batch(self) -> list[_Entry]:
        """Remove and return up to ``max_batch_size`` live entries sharing the oldest one's key."""
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()
        if not self._pending:
            return []
        key = self._pending[0].key
        batch: list[_Entry] = []
        keep: deque[_Entry] = deque()
        while self._pending:
            e = self._pending.popleft()
            if e.future.done():
                continue
            if e.key == key and len(batch) < self.max_batch_size:
                batch.append(e)
            else:
                keep.append(e)
                if len(batch) == self.max_batch_size:
                    break
        keep.extend(self._pending)
        self._pending = keep
        self._set_depth()
        return batch

    async def _wait_for_batch(self) -> None:
        """Return when a full batch is queued or the oldest item has waited ``max_wait_s``."""
        assert self._arrived is not None
        while True:
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            oldest = self._pending[0]
            remaining = oldest.enqueued_at + self.max_wait_s - time.perf_counter()
            if remaining <= 0 or self._matching(oldest.key) >= self.max_batch_size:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batch_id = 0
        while True:
            await self._wait_for_batch()
            batch = self._take_batch()
            if not batch:
                continue
            batch_id += 1
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._infer, [e.payload for e in batch], batch[0].key
                )
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"infer returned {len(results)} results for {len(batch)} items"
                    )
            except Exception as exc:
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(exc)
                continue
            duration = time.perf_counter() - started
            self._record(batch, started, duration)
            for e, result in zip(batch, results, strict=True):
                if not e.future.done():
                    e.future.set_result((result, started, duration, batch_id, len(batch)))

    def _record(self, batch: list[_Entry], started: float, duration: float) -> None:
        per_item = duration / len(batch)
        # An exponential average follows load changes within a few batches.
        self._seconds_per_item = (
            per_item
            if self._seconds_per_item == 0
            else 0.8 * self._seconds_per_item + 0.2 * per_item
        )
        if self._metrics is None:
            return
        self._metrics.batch_size.observe(len(batch))
        self._metrics.inference_time.observe(duration)
        self._metrics.images.inc(len(batch))
        for e in batch:
            self._metrics.queue_time.observe(started - e.enqueued_at)
