"""Dynamic batching: a bounded queue of decoded items feeding one inference thread.

Requests put already-decoded items on the queue (so a bad image never reaches a batch). One
inference thread forms the batches itself and runs them back to back: it takes up to
``max_batch_size`` items that share a key (the requested output), waiting at most ``max_wait_s``
after the oldest item arrived, runs ``infer`` on them, and hands the results to the event loop.

Batches aim at ``target_size`` items: the largest batch size whose forward pass cost at most
:data:`BATCH_TOLERANCE` more per item than the cheapest when timed at start-up
(:func:`efficient_batch`; at most ``max_batch_size``). The thread takes at most that many at a
time, since larger batches cost more per item where they do (torch on a CPU: 12.8 ms per image
at batch 8 against 14.4 at 64, on 2 cores). Items still being decoded are announced
(:meth:`DynamicBatcher.announce`) before their decoding starts; while any are announced and the
batch is smaller than its target, the thread waits for them (from when the model is free), at
most as long as a forward pass of the target size has recently taken: otherwise, under steady
load, batches alternate between the one or two items decoded while the previous pass ran and the
rest, and a small batch costs more per item (ResNet-18 in torch on 2 cores: 30 CPU ms per image
alone, 20 at batch 8).
The thread never waits on the event loop, so a busy loop (parsing bodies, writing responses)
does not leave the model idle while items are queued. A full queue raises
:class:`QueueFullError` at once instead of letting latency grow without bound, and the items of a
request whose caller was cancelled (a client that went away) are dropped before they are computed.

This module knows nothing about HTTP or images: ``infer`` is any callable
``(items: list, key) -> sequence of one result per item``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.metrics import ServerMetrics

__all__ = [
    "BATCH_TOLERANCE",
    "BatchTiming",
    "BatcherClosedError",
    "DynamicBatcher",
    "QueueFullError",
    "efficient_batch",
]


BATCH_TOLERANCE = 0.05
"""How much more per item than the cheapest batch size a larger batch may cost at start-up and
still be the target: about how much those timings move from one start to the next."""


def efficient_batch(ms_per_item: dict[int, float], tolerance: float = BATCH_TOLERANCE) -> int:
    """The largest batch size whose time per item is within ``tolerance`` (a fraction) of the
    least (``ms_per_item``: batch size to milliseconds per item).

    The start-up timing covers the forward pass alone. Serving a batch costs more than that, and
    the smaller the batch the more per item: ResNet-18 in torch on 2 CPU cores (``bench/serve.py
    --backend torch --fixed-batches 4 8 16 32 64``) served 0.86-0.90 of the offline bound in
    batches of 4 and 0.92-0.99 in batches of 8 to 64, while its forward pass cost 27.5, 26.3,
    27.5, 28.1 and 29.2 CPU ms per image at 4, 8, 16, 32 and 64. A larger target costs no
    latency at low load (a batch waits only for items already being decoded), so of the sizes
    that time about as well, the largest is taken, and where the curve is flat near its least,
    timing noise alone does not move the target down to a size that serves worse."""
    least = min(ms_per_item.values())
    return max(n for n, ms in ms_per_item.items() if ms <= least * (1 + tolerance))


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
    dropped: bool = False  # set on the loop when its caller went away; read by the thread


@dataclass
class _Batch:
    entries: list[_Entry]
    batch_id: int
    started: float
    duration: float = 0.0
    results: Sequence[Any] = ()
    error: Exception | None = None


class DynamicBatcher:
    """Queue items from many requests and run them through ``infer`` in batches.

    Args:
        infer: called in the inference thread with up to ``max_batch_size`` payloads that share
            a key; returns one result per payload, in order.
        max_batch_size: most items per ``infer`` call.
        max_wait_s: longest time the oldest queued item waits for more items to arrive; 0 runs
            whatever is queued as soon as the model is free.
        max_queue: most items waiting (not yet in a forward pass); more raises
            :class:`QueueFullError`.
        metrics: optional metrics to record queue depth, queue time, batch size and duration.
        thread_init: called once in the inference thread before its first batch (e.g. to set
            torch's intra-op thread count there).
        target_size: the batch size aimed at: most items per ``infer`` call, and how many a
            batch waits for while items are announced (see the module docstring); default
            ``max_batch_size``, and never more.

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
        thread_init: Callable[[], None] | None = None,
        target_size: int | None = None,
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
        self.target_size = min(target_size or max_batch_size, max_batch_size)
        self._metrics = metrics
        self._thread_init = thread_init
        self._pending: deque[_Entry] = deque()
        self._announced = 0  # items being decoded that will be submitted (or withdrawn)
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Seconds per item of recent forward passes, to tell rejected clients when to come back.
        self._seconds_per_item = 0.0

    @property
    def depth(self) -> int:
        """Items waiting for a forward pass."""
        return len(self._pending)

    @property
    def announced(self) -> int:
        """Items announced (being decoded) and not yet submitted or withdrawn."""
        return self._announced

    @property
    def running(self) -> bool:
        """Whether the inference thread is accepting and processing items."""
        return self._thread is not None and self._thread.is_alive() and not self._closing

    async def start(self) -> None:
        """Start the inference thread, delivering results to the running event loop."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the inference thread; items still queued fail with :class:`BatcherClosedError`."""
        with self._cond:
            self._closing = True
            left, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for entry in left:
            if not entry.future.done():
                entry.future.set_exception(BatcherClosedError("server is shutting down"))
        self._set_depth()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def check_capacity(self, n_items: int) -> None:
        """Raise :class:`QueueFullError` if ``n_items`` more items would not fit right now.

        Lets a caller reject before spending time on decoding; :meth:`submit` checks again.
        """
        if self.depth + n_items > self.max_queue:
            raise QueueFullError(self.depth, self.max_queue, n_items, self._retry_after(n_items))

    def announce(self, n_items: int) -> None:
        """Tell the batcher that ``n_items`` more items are being prepared: a batch below its
        target size waits for them (see the module docstring). Every announced item must later be
        either submitted with ``announced=True`` or :meth:`withdraw` n."""
        with self._cond:
            self._announced += n_items
        self._set_announced()

    def withdraw(self, n_items: int) -> None:
        """Take back ``n_items`` announced items that will not be submitted (their decoding
        failed or their caller went away)."""
        with self._cond:
            self._announced = max(0, self._announced - n_items)
            self._cond.notify()
        self._set_announced()

    def submit(
        self, payloads: Sequence[Any], key: Hashable = None, *, announced: bool = False
    ) -> Awaitable[tuple[list[Any], BatchTiming]]:
        """Queue ``payloads`` now and return an awaitable of their results, in the same order.

        The items are on the queue when this returns, before anything is awaited.
        ``announced=True`` says they were announced with :meth:`announce` (they are counted off,
        even when this raises). Cancelling the awaiting task drops those of its items that have
        not been computed.

        Raises:
            QueueFullError: if the items do not fit in the queue (nothing was queued).
            BatcherClosedError: if the batcher is not running.

        The awaitable raises whatever ``infer`` raised for a batch holding one of the items.
        """
        if announced:
            self.withdraw(len(payloads))
        if not self.running:
            raise BatcherClosedError("the inference worker is not running")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        entries = [_Entry(p, key, loop.create_future(), now) for p in payloads]
        if entries:
            with self._cond:
                self.check_capacity(len(payloads))
                self._pending.extend(entries)
                self._cond.notify()
            self._set_depth()
        return self._results(entries, now)

    async def _results(
        self, entries: list[_Entry], submitted: float
    ) -> tuple[list[Any], BatchTiming]:
        try:
            outcomes = await asyncio.gather(*(e.future for e in entries))
        except BaseException:
            self._drop(entries)
            raise
        timing = BatchTiming()
        seen_batches: set[int] = set()
        for started_at, duration, batch_id, batch_size in (o[1:] for o in outcomes):
            timing.queue_s = max(timing.queue_s, started_at - submitted)
            if batch_id not in seen_batches:
                seen_batches.add(batch_id)
                timing.inference_s += duration
                timing.batch_sizes.append(batch_size)
        return [o[0] for o in outcomes], timing

    def _drop(self, entries: list[_Entry]) -> None:
        with self._cond:
            for e in entries:
                e.dropped = True
                if not e.future.done():
                    e.future.cancel()
            self._pending = deque(e for e in self._pending if not e.dropped)
        self._set_depth()

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._pending))

    def _set_announced(self) -> None:
        if self._metrics is not None:
            self._metrics.decoding.set(self._announced)

    def _retry_after(self, n_items: int) -> int:
        backlog = self.depth + n_items - self.max_queue
        return max(1, math.ceil(backlog * self._seconds_per_item))

    # --- the inference thread ---------------------------------------------------------------

    def _work(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        batch_id = 0
        while True:
            entries = self._next_batch()
            if entries is None:
                return
            batch_id += 1
            batch = _Batch(entries, batch_id, time.perf_counter())
            try:
                batch.results = self._infer([e.payload for e in entries], entries[0].key)
                if len(batch.results) != len(entries):
                    raise RuntimeError(
                        f"infer returned {len(batch.results)} results for {len(entries)} items"
                    )
            except Exception as exc:
                batch.error = exc
            batch.duration = time.perf_counter() - batch.started
            self._record(batch)
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _next_batch(self) -> list[_Entry] | None:
        """Block until a batch is due: at its target size, or its oldest item waited
        ``max_wait_s`` and, while items are announced, up to a target-size batch's recent forward
        time since the model could have started on it (it was free and the item was queued)."""
        free_since = time.perf_counter()
        with self._cond:
            while not self._closing:
                while self._pending and self._pending[0].dropped:
                    self._pending.popleft()
                if not self._pending:
                    self._cond.wait()
                    continue
                oldest = self._pending[0]
                if self._matching(oldest.key) >= self.target_size:
                    return self._take_batch()
                deadline = oldest.enqueued_at + self.max_wait_s
                if self._announced > 0:
                    could_start = max(free_since, oldest.enqueued_at)
                    deadline = max(
                        deadline, could_start + self._seconds_per_item * self.target_size
                    )
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    return self._take_batch()
                self._cond.wait(remaining)
            return None

    def _matching(self, key: Hashable) -> int:
        return sum(1 for e in self._pending if e.key == key and not e.dropped)

    def _take_batch(self) -> list[_Entry]:
        """Remove and return up to ``target_size`` live entries sharing the oldest one's key."""
        key = self._pending[0].key
        batch: list[_Entry] = []
        keep: deque[_Entry] = deque()
        while self._pending and len(batch) < self.target_size:
            e = self._pending.popleft()
            if e.dropped:
                continue
            (batch if e.key == key else keep).append(e)
        keep.extend(self._pending)
        self._pending = keep
        self._set_depth()
        return batch

    def _deliver(self, batch: _Batch) -> None:
        """On the event loop: resolve the futures of a finished batch."""
        for i, e in enumerate(batch.entries):
            if e.future.done():
                continue
            if batch.error is not None:
                e.future.set_exception(batch.error)
            else:
                outcome = (batch.results[i], batch.started, batch.duration, batch.batch_id)
                e.future.set_result((*outcome, len(batch.entries)))

    def _record(self, batch: _Batch) -> None:
        per_item = batch.duration / len(batch.entries)
        # An exponential average follows load changes within a few batches.
        self._seconds_per_item = (
            per_item
            if self._seconds_per_item == 0
            else 0.8 * self._seconds_per_item + 0.2 * per_item
        )
        if self._metrics is None or batch.error is not None:
            return
        self._metrics.batch_size.observe(len(batch.entries))
        self._metrics.inference_time.observe(batch.duration)
        self._metrics.images.inc(len(batch.entries))
        for e in batch.entries:
            self._metrics.queue_time.observe(batch.started - e.enqueued_at)
