"""The dynamic batcher on its own, driven by plain callables (no model, no HTTP)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.batcher import (
    BATCH_TOLERANCE,
    BatcherClosedError,
    DynamicBatcher,
    QueueFullError,
    efficient_batch,
)
from server.metrics import ServerMetrics


class Recorder:
    """An ``infer`` that squares numbers and remembers every batch it was given."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[tuple[list, object]] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, items: list, key: object) -> list:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        self.batches.append((list(items), key))
        return [x * x for x in items]


def run(coro):
    return asyncio.run(coro)


def test_results_come_back_in_order_for_every_request():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=4, max_wait_s=0.01, max_queue=100)
        await b.start()
        requests = [list(range(i, i + 1 + i % 3)) for i in range(20)]
        outs = await asyncio.gather(*(b.submit(r) for r in requests))
        await b.stop()
        return requests, outs, rec

    requests, outs, rec = run(main())
    for req, (results, timing) in zip(requests, outs, strict=True):
        assert results == [x * x for x in req]
        assert timing.inference_s > 0 and timing.batch_sizes
    assert all(len(items) <= 4 for items, _ in rec.batches)
    assert max(len(items) for items, _ in rec.batches) > 1


def test_items_with_different_keys_never_share_a_batch():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=8, max_wait_s=0.05, max_queue=100)
        await b.start()
        await asyncio.gather(
            *(b.submit([i], key="even" if i % 2 == 0 else "odd") for i in range(16))
        )
        await b.stop()
        return rec

    rec = run(main())
    for items, key in rec.batches:
        assert all((x % 2 == 0) == (key == "even") for x in items)


def test_full_queue_rejects_without_queueing_and_recovers():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate)
        metrics = ServerMetrics()
        b = DynamicBatcher(rec, max_batch_size=2, max_wait_s=0, max_queue=3, metrics=metrics)
        await b.start()
        first = asyncio.create_task(b.submit([1]))
        while not rec.entered.is_set():  # the worker holds item 1 inside infer
            await asyncio.sleep(0.001)
        queued = asyncio.create_task(b.submit([2, 3, 4]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError) as info:
            await b.submit([5])
        depth_when_full = b.depth
        gate.set()
        await asyncio.gather(first, queued)
        after, _ = await b.submit([6])
        await b.stop()
        return info.value, depth_when_full, after, rec

    err, depth_when_full, after, rec = run(main())
    assert err.retry_after_s >= 1 and "full" in str(err)
    assert depth_when_full == 3
    assert after == [36]
    assert 5 not in [x for items, _ in rec.batches for x in items]


def test_cancelled_request_is_dropped_before_inference():
    async def main():
        gate = threading.Event()
        rec = Recorder(gate)
        b = DynamicBatcher(rec, max_batch_size=1, max_wait_s=0, max_queue=10)
        await b.start()
        busy = asyncio.create_task(b.submit([1]))
        while not rec.entered.is_set():
            await asyncio.sleep(0.001)
        gone = asyncio.create_task(b.submit([7]))
        await asyncio.sleep(0.01)
        assert b.depth == 1
        gone.cancel()
        await asyncio.sleep(0.01)
        depth_after_cancel = b.depth
        gate.set()
        await busy
        await b.submit([2])
        await b.stop()
        return rec, depth_after_cancel

    rec, depth_after_cancel = run(main())
    assert depth_after_cancel == 0
    computed = [x for items, _ in rec.batches for x in items]
    assert 7 not in computed and computed == [1, 2]


def test_infer_failure_fails_only_that_batch():
    def infer(items, key):
        if key == "bad":
            raise RuntimeError("boom")
        return items

    async def main():
        b = DynamicBatcher(infer, max_batch_size=4, max_wait_s=0.01, max_queue=10)
        await b.start()
        good, bad = await asyncio.gather(
            b.submit([1, 2], key="good"), b.submit([3], key="bad"), return_exceptions=True
        )
        await b.stop()
        return good, bad

    good, bad = run(main())
    assert good[0] == [1, 2]
    assert isinstance(bad, RuntimeError) and "boom" in str(bad)


def test_submit_before_start_is_a_clear_error():
    async def main():
        b = DynamicBatcher(Recorder(), max_batch_size=1, max_wait_s=0, max_queue=1)
        with pytest.raises(BatcherClosedError):
            await b.submit([1])

    run(main())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_batch_size=0, max_wait_s=0, max_queue=1),
        dict(max_batch_size=1, max_wait_s=-1, max_queue=1),
        dict(max_batch_size=1, max_wait_s=float("nan"), max_queue=1),
        dict(max_batch_size=1, max_wait_s=0, max_queue=0),
    ],
)
def test_invalid_sizes_are_rejected(kwargs):
    with pytest.raises(ValueError, match="max_"):
        DynamicBatcher(Recorder(), **kwargs)


def _primed(rec: Recorder, seconds_per_item: float, **kwargs) -> DynamicBatcher:
    """A batcher whose recent forward passes took ``seconds_per_item`` each (what bounds the
    wait for announced items: one full batch's worth)."""
    b = DynamicBatcher(rec, max_wait_s=0, max_queue=100, **kwargs)
    b._seconds_per_item = seconds_per_item
    return b


def test_a_batch_waits_for_the_items_still_being_decoded():
    async def main():
        rec = Recorder()
        metrics = ServerMetrics()
        b = _primed(rec, 10.0, max_batch_size=8, metrics=metrics)  # up to 80 s for 8
        await b.start()
        b.announce(4)  # one request of 1 and one of 3 are being decoded
        first = b.submit([1], announced=True)
        await asyncio.sleep(0.05)  # without the announcement, [1] would run alone now
        assert rec.batches == [] and b.announced == 3
        rest = b.submit([2, 3, 4], announced=True)
        outs = await asyncio.wait_for(asyncio.gather(first, rest), timeout=30)
        gauge = metrics.decoding._value.get()
        await b.stop()
        return rec, outs, b.announced, gauge

    rec, outs, announced, gauge = run(main())
    assert rec.batches == [([1, 2, 3, 4], None)]
    assert outs[0][0] == [1] and outs[1][0] == [4, 9, 16]
    assert announced == 0 and gauge == 0


def test_withdrawn_items_release_the_wait_and_the_wait_is_bounded():
    async def main():
        rec = Recorder()
        b = _primed(rec, 10.0, max_batch_size=8)
        await b.start()
        b.announce(3)
        alone = b.submit([1], announced=True)
        await asyncio.sleep(0.05)
        assert rec.batches == []
        b.withdraw(2)  # their decoding failed: nothing more is coming
        await asyncio.wait_for(alone, timeout=30)  # not the 80 s the announcement allowed
        b._seconds_per_item = 0.001  # recent passes were fast: wait at most 8 ms
        b.announce(5)  # a decode that never finishes
        bounded = await asyncio.wait_for(b.submit([2]), timeout=30)
        await b.stop()
        return rec, bounded, b.announced

    rec, bounded, announced = run(main())
    assert rec.batches == [([1], None), ([2], None)]
    assert bounded[0] == [4] and announced == 5


def test_announced_items_are_counted_off_even_when_the_queue_refuses_them():
    async def main():
        b = DynamicBatcher(Recorder(), max_batch_size=1, max_wait_s=0, max_queue=2)
        await b.start()
        b.announce(3)
        with pytest.raises(QueueFullError):
            b.submit([1, 2, 3], announced=True)
        left = b.announced
        await b.stop()
        return left

    assert run(main()) == 0


def test_batches_hold_at_most_their_target_and_do_not_wait_once_they_reach_it():
    async def main():
        rec = Recorder()
        b = _primed(rec, 10.0, max_batch_size=8, target_size=2)  # would wait up to 80 s
        await b.start()
        b.announce(5)
        first = b.submit([1, 2, 3], announced=True)  # past the target: [1, 2] runs now
        await asyncio.sleep(0.05)
        seen = list(rec.batches)  # [3] waits for the 2 still announced
        b.withdraw(2)
        out = await asyncio.wait_for(first, timeout=30)
        await b.stop()
        return rec, out, seen

    rec, out, seen = run(main())
    assert seen == [([1, 2], None)] and out[0] == [1, 4, 9]
    assert rec.batches == [([1, 2], None), ([3], None)]


@pytest.mark.parametrize(
    ("ms_per_item", "expected"),
    [
        ({1: 18.1, 2: 14.9, 4: 13.4, 8: 12.8, 16: 13.2, 32: 14.0, 64: 14.4}, 16),  # torch, CPU
        ({1: 10.0, 2: 5.0, 4: 4.4, 8: 5.0, 16: 4.4, 32: 4.1, 64: 4.4}, 32),  # bfloat16
        ({1: 5.0, 2: 5.0}, 2),
        # fused torch, where noise made batch 4 the cheapest by a little
        ({1: 21.5, 2: 16.0, 4: 13.0, 8: 13.2, 16: 13.6, 32: 14.1, 64: 14.5}, 16),
        ({1: 10.0, 2: 10.5, 4: 20.0}, 2),  # exactly 5% more
        ({1: 10.0, 2: 10.6, 4: 20.0}, 1),  # just over
    ],
)
def test_the_target_is_the_largest_batch_within_the_tolerance_of_the_least(ms_per_item, expected):
    assert BATCH_TOLERANCE == 0.05
    assert efficient_batch(ms_per_item) == expected


def test_without_tolerance_the_target_is_the_cheapest_batch():
    flat = {2: 16.0, 4: 13.0, 8: 13.2, 16: 13.6, 32: 14.1, 64: 14.5}
    assert efficient_batch(flat, tolerance=0.0) == 4
    assert efficient_batch(flat, tolerance=0.1) == 32
