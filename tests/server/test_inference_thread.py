"""The inference thread: one forward pass for requests that differ only in ``normalize``, run
with every intra-op thread the machine gives."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from server.backend import load_backend
from server.service import MACHINE_THREADS

pytestmark = pytest.mark.slow


class GatedBackend:
    """The real backend; each forward pass signals that it started, then waits for ``gate``.

    Not a mock: every image goes through the real decoder and model; the gate only lets the
    test decide when the inference thread makes progress.
    """

    def __init__(self, inner, gate: threading.Event) -> None:
        self.inner, self.gate, self.entered = inner, gate, threading.Event()
        self.dimensions, self.prepare, self.warmup = inner.dimensions, inner.prepare, inner.warmup
        self.backend_name = inner.backend_name
        self.backend_timings = inner.backend_timings

    def infer(self, items, key):
        self.entered.set()
        self.gate.wait(timeout=60)
        return self.inner.infer(items, key)


def _metric(srv, name: str) -> float:
    with srv.client() as c:
        text = c.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return 0.0


def _wait(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_requests_differing_only_in_normalize_share_one_forward_pass(
    make_server, extractors, photo_jpegs
):
    gate, backends = threading.Event(), []

    def loader(settings):
        backends.append(GatedBackend(load_backend(settings), gate))
        return backends[-1]

    srv = make_server(loader=loader, max_batch_size=8, max_batch_wait_ms=0, warmup=False)
    image = "data:image/jpeg;base64," + base64.b64encode(photo_jpegs[1]).decode()

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            # The first request takes the model; the gate holds it inside its forward pass.
            first = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": [image]}))
            await asyncio.to_thread(_wait, backends[0].entered.is_set)
            unit, raw = (
                asyncio.ensure_future(
                    c.post("/v1/embeddings", json={"input": [image], "normalize": flag})
                )
                for flag in (True, False)
            )
            # Both wait in the queue while the model is busy, then leave in one batch.
            await asyncio.to_thread(_wait, lambda: _metric(srv, "ssole_queue_depth") == 2)
            gate.set()
            return await asyncio.gather(first, unit, raw)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert _metric(srv, "ssole_batch_size_count") == 2  # the first request's, then one for both
    assert _metric(srv, "ssole_batch_size_sum") == 3
    got_unit, got_raw = (
        np.array(r.json()["data"][0]["embedding"], dtype=np.float32) for r in responses[1:]
    )
    want_unit = extractors("backbone", True).embed(photo_jpegs[1:2]).numpy()[0]
    want_raw = extractors("backbone", False).embed(photo_jpegs[1:2]).numpy()[0]
    assert np.abs(got_unit - want_unit).max() <= 1e-5
    assert np.abs(got_raw - want_raw).max() <= 1e-5
    assert abs(np.linalg.norm(got_raw) - 1) > 1e-2  # the raw row really is not unit-norm


def test_the_forward_pass_uses_every_intra_op_thread_after_decoding(make_server, photo_jpegs):
    """Decode threads run torch single-threaded; a thread that never sets its own count would
    inherit their 1. The inference thread must still run with the machine's count."""
    seen: list[int] = []

    class Recording:
        def __init__(self, inner) -> None:
            self.inner = inner
            self.dimensions, self.prepare, self.warmup = (
                inner.dimensions, inner.prepare, inner.warmup,
            )  # fmt: skip
            self.backend_name = inner.backend_name
            self.backend_timings = inner.backend_timings

        def infer(self, items, key):
            seen.append(torch.get_num_threads())
            return self.inner.infer(items, key)

    srv = make_server(loader=lambda s: Recording(load_backend(s)))  # 2 decode threads
    image = "data:image/jpeg;base64," + base64.b64encode(photo_jpegs[0]).decode()
    with srv.client() as c:
        for _ in range(3):  # the decode threads exist (and set 1) before the later passes
            assert c.post("/v1/embeddings", json={"input": [image] * 2}).status_code == 200
    assert seen and set(seen) == {MACHINE_THREADS}


def test_warmup_times_every_power_of_two_up_to_the_largest_batch(tiny_model):
    """What the batcher's target size is chosen from (``efficient_batch``)."""
    from server.settings import ServerSettings

    backend = load_backend(ServerSettings(model=tiny_model, device="cpu", backend="torch"))
    timings = backend.warmup(12)
    assert sorted(timings) == [1, 2, 4, 8, 12]
    assert all(ms > 0 for ms in timings.values())
