"""Serving behaviour over real HTTP: batching under load, back-pressure, readiness, API keys,
clients that go away, and the Prometheus metrics that show it."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.backend import load_backend

pytestmark = pytest.mark.slow


def uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Samples of /metrics as ``{(name, sorted labels): value}``."""
    with server.client() as c:
        r = c.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


class PausedBackend:
    """The real backend, with forward passes held until ``gate`` opens.

    Not a mock: every image still goes through the real decoder and model; the pause only lets
    a test decide when the single inference worker makes progress.
    """

    def __init__(self, inner, gate: threading.Event) -> None:
        self.inner = inner
        self.gate = gate
        self.dimensions = inner.dimensions
        self.backend_name = inner.backend_name
        self.backend_timings = inner.backend_timings
        self.reduced_decoding = inner.reduced_decoding
        self.prepare = inner.prepare
        self.warmup = inner.warmup

    def infer(self, items, key):
        self.gate.wait(timeout=60)
        return self.inner.infer(items, key)


def test_64_concurrent_requests_all_succeed_in_batches(server, extractors, photo_jpegs):
    expected = extractors().embed(photo_jpegs).numpy()
    before = scrape(server)

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        "/v1/embeddings", json={"input": [uri(photo_jpegs[i % len(photo_jpegs)])]}
                    )
                    for i in range(64)
                )
            )

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 64
    for i, r in enumerate(responses):
        got = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
        assert np.abs(got - expected[i % len(photo_jpegs)]).max() <= 1e-5
    after = scrape(server)

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    batches = delta("ssole_batch_size_count")
    singles = delta("ssole_batch_size_bucket", (("le", "1.0"),))
    assert delta("ssole_batch_size_sum") == 64
    assert batches < 64 and singles < batches  # some batches held more than one image
    assert delta("ssole_requests_total", (("route", "/v1/embeddings"), ("status", "200"))) == 64
    assert delta("ssole_images_total") == 64


def test_flooded_small_queue_answers_503_with_retry_after_and_recovers(make_server, photo_jpegs):
    gate = threading.Event()
    srv = make_server(
        loader=lambda s: PausedBackend(load_backend(s), gate),
        max_queue=4,
        max_items=2,
        max_batch_size=1,
        warmup=False,
    )
    body = {"input": [uri(photo_jpegs[0])]}

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            tasks = [asyncio.ensure_future(c.post("/v1/embeddings", json=body)) for _ in range(16)]
            # Nothing is computed while the gate is shut: everything beyond the queue is
            # turned away at once, the rest waits.
            while sum(t.done() for t in tasks) < 16 - 5:
                await asyncio.sleep(0.02)
            gate.set()
            responses = await asyncio.gather(*tasks)
            later = await c.post("/v1/embeddings", json=body)
            return responses, later

    responses, later = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}
    assert statuses.count(200) >= 4
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
    assert later.status_code == 200
    samples = scrape(srv)
    assert samples[("ssole_rejected_total", (("reason", "queue_full"),))] == statuses.count(503)
    assert samples[("ssole_queue_depth", ())] == 0


def test_ready_is_503_until_the_model_is_loaded_and_warmed(make_server, photo_jpegs):
    gate = threading.Event()

    def slow_loader(settings):
        gate.wait(timeout=60)
        return load_backend(settings)

    srv = make_server(loader=slow_loader, wait=False)
    with srv.client() as c:
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "model_not_ready"
        r = c.post("/v1/embeddings", json={"input": [uri(photo_jpegs[0])]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert c.get("/v1/models").json()["data"][0]["ready"] is False
        gate.set()
        srv.wait_ready()
        assert c.get("/ready").json() == {"status": "ready"}
        assert c.post("/v1/embeddings", json={"input": [uri(photo_jpegs[0])]}).status_code == 200


def test_api_key_is_required_on_v1_routes_only(make_server, photo_jpegs):
    srv = make_server(api_key="s3cret-key")
    body = {"input": [uri(photo_jpegs[0])]}
    with srv.client() as c:
        r = c.post("/v1/embeddings", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "invalid" in r.json()["error"]["message"]
        r = c.post(
            "/v1/embeddings/upload", files=[("files", ("a.jpg", photo_jpegs[0], "image/jpeg"))]
        )
        assert r.status_code == 401
        assert c.get("/v1/models").status_code == 401
        ok = c.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert c.get(path).status_code == 200


def test_work_of_a_client_that_went_away_is_dropped(make_server, photo_jpegs):
    gate = threading.Event()
    srv = make_server(
        loader=lambda s: PausedBackend(load_backend(s), gate), max_batch_size=1, warmup=False
    )
    body = httpx.Request("POST", f"{srv.url}/v1/embeddings", json={"input": [uri(photo_jpegs[0])]})
    raw = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body.read())}\r\n\r\n"
    ).encode() + body.read()
    port = int(srv.url.rsplit(":", 1)[1])
    images_before = scrape(srv).get(("ssole_images_total", ()), 0)

    def depth():
        return scrape(srv)[("ssole_queue_depth", ())]

    holder = socket.create_connection(("127.0.0.1", port))  # its image sits inside infer
    holder.sendall(raw)
    time.sleep(0.3)
    leaver = socket.create_connection(("127.0.0.1", port))  # its image waits in the queue
    leaver.sendall(raw)
    wait_until(lambda: depth() == 1)
    leaver.close()
    wait_until(lambda: depth() == 0)
    gate.set()
    holder.settimeout(60)
    assert holder.recv(64).startswith(b"HTTP/1.1 200")
    holder.close()
    assert scrape(srv).get(("ssole_images_total", ()), 0) - images_before == 1


@pytest.fixture(scope="module")
def backbone_only_dir(tmp_path_factory):
    """A real hub folder exported from a bare timm backbone: no projector in it."""
    import timm
    import torch

    from ssole_hub import export_hub_folder

    torch.manual_seed(1)
    backbone = timm.create_model(
        "ssole_resnet18",
        pretrained=False,
        num_classes=0,
        pretrained_cfg_overlay={"input_size": (3, 64, 64), "crop_pct": 1.0},
    )
    return export_hub_folder(backbone, tmp_path_factory.mktemp("models") / "backbone-only")


def test_model_without_projector_serves_the_backbone_and_refuses_projector(
    make_server, backbone_only_dir, photo_jpegs
):
    srv = make_server(model=f"local-dir:{backbone_only_dir}")
    with srv.client() as c:
        assert c.get("/v1/models").json()["data"][0]["dimensions"] == {"backbone": 512}
        ok = c.post("/v1/embeddings", json={"input": [uri(photo_jpegs[0])]})
        assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 512
        r = c.post("/v1/embeddings", json={"input": [uri(photo_jpegs[0])], "output": "projector"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "output_unavailable"
    assert "projector" in r.json()["error"]["message"]


def test_model_that_fails_to_load_reports_it_on_health_and_ready(make_server, tmp_path):
    srv = make_server(model=f"local-dir:{tmp_path / 'missing'}", wait=False)
    with srv.client() as c:
        wait_until(lambda: c.get("/health").status_code == 503)
        for path in ("/health", "/ready"):
            error = c.get(path).json()["error"]
            assert error["code"] == "model_load_failed" and "missing" in error["message"]


REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_server_logs_the_backend_auto_chose_and_the_loaded_model(
    tiny_model_dir, tmp_path, zygote
):
    """The real ``python -m server`` in a new process (a child of the zygote,
    ``tests/zygote.py``, which has imported none of the project, logging included): its own
    INFO lines (which backend ``auto`` chose, the model loaded and ready) reach stderr beside
    uvicorn's."""
    port = _free_port()
    model = f"local-dir:{tiny_model_dir}"
    args = ["--model", model, "--port", str(port), "--device", "cpu", "--no-warmup"]
    stderr_path = tmp_path / "stderr.txt"
    server = zygote.start("module", "server", args, REPO_ROOT, dict(os.environ), stderr=stderr_path)
    url = f"http://127.0.0.1:{port}/ready"
    client = httpx.Client(timeout=5)  # one client: httpx.get costs ~23 ms of CPU a call

    def ready() -> bool:
        assert server.poll() is None, stderr_path.read_text()
        try:
            return client.get(url).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, timeout_s=120)
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=30)
    lines = stderr_path.read_text().splitlines()
    chose = f"INFO:     ssole_hub: backend auto: using torch for {model} on cpu ("
    assert any(line.startswith(chose) for line in lines), lines
    assert any(line.startswith(f"INFO:     server: loaded {model}: outputs") for line in lines)
    assert any(
        line.startswith("INFO:     server: model 'tiny-ssole' ready") and "backend torch" in line
        for line in lines
    ), lines
    assert any(f"Uvicorn running on http://127.0.0.1:{port}" in line for line in lines), lines
