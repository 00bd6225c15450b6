"""``bench/serve.py``'s stage profile: where an image's CPU goes, through the server's own code."""

from __future__ import annotations

import base64
import importlib
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import orjson
import timm

from ssole_hub import FeatureExtractor

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
serve = importlib.import_module("bench.serve")


def test_the_stage_profile_times_every_stage_of_real_requests(photo_jpegs):
    model = timm.create_model(
        "ssole_resnet18", num_classes=0, pretrained_cfg_overlay={"input_size": (3, 64, 64)}
    )
    fx = FeatureExtractor(model, device="cpu", fast_decode=False)
    bodies = [
        json.dumps({"input": ["data:image/jpeg;base64," + base64.b64encode(j).decode()]}).encode()
        for j in photo_jpegs[:3]
    ]
    profile = serve.stage_profile(fx, bodies, batch_size=4, repeats=1)
    assert list(profile) == list(serve.STAGES)
    assert all(ms > 0 for ms in profile.values())
    # Decoding reads the whole JPEG; parsing only copies and base64-decodes it.
    assert profile["decode"] > profile["parse"]


def test_the_response_body_round_trips_float32_vectors_exactly():
    from server.outputs import embeddings_body

    vectors = [np.random.default_rng(i).standard_normal(512).astype(np.float32) for i in range(3)]
    body = orjson.loads(embeddings_body(vectors, "m", "float"))
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, np.stack(vectors))  # shortest float32 forms, read back
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["usage"]["images"] == 3
    packed = orjson.loads(embeddings_body(vectors[:1], "m", "base64"))["data"][0]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(packed), "<f4"), vectors[0])


def test_the_naive_endpoint_embeds_as_the_extractor_does_under_the_benchmarks_load(
    photo_jpegs, tmp_path
):
    """The naive endpoint (``bench/serve.py --naive-server``; the GPU check runs the benchmark
    with ``--no-naive``) under uvicorn in a thread on a loopback port, driven by the benchmark's
    own closed-loop client; its row in the benchmark's table is computed from that run."""
    import asyncio
    import threading
    import time

    import uvicorn

    model = serve.random_model_folder(tmp_path, input_px=64)
    app = serve.naive_app(model, "cpu")
    port = serve.free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        url = f"http://127.0.0.1:{port}"
        bodies = [
            json.dumps({"input": ["data:image/jpeg;base64," + base64.b64encode(j).decode()]})
            for j in photo_jpegs[:2]
        ]
        run = asyncio.run(serve.closed_loop(url, [b.encode() for b in bodies], 2, 6))
        got = httpx.post(f"{url}/v1/embeddings", json=json.loads(bodies[0]), timeout=60).json()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert run["requests"] == 6 and run["errors"] == {} and run["images_per_s"] > 0
    expected = FeatureExtractor.from_pretrained(model, device="cpu").embed([photo_jpegs[0]])
    np.testing.assert_allclose(got["data"][0]["embedding"], expected[0].numpy(), atol=1e-5)

    level = run | {"images_per_cpu_s": 10.0, "machine_busy_cores": 1.0, "load_generator_cores": 0.1}
    rows = serve.level_rows({"server": [level], "naive": [level | {"images_per_s": 1.0}]},
                            bound=100.0, bound_cpu=20.0, batch_s=0.01)  # fmt: skip
    assert rows[0]["server_vs_naive"] == run["images_per_s"]
    assert rows[0]["naive_errors"] == {} and rows[0]["server_vs_bound_per_cpu_s"] == 0.5


def test_fixed_batch_servers_get_their_batch_size_and_no_start_up_timing():
    """``--fixed-batches``: each extra server's command line, as the server's own settings
    parser reads it, fixes the batch size and turns the start-up timing off; the main server's
    does neither."""
    from server.settings import settings_from_args

    args = serve.parse_args(["--backend", "torch", "--fixed-batches", "4", "16"])
    assert args.fixed_batches == [4, 16]
    fixed = serve.server_command(args, "local-dir:m", 8000, "torch", max_batch=4)
    main = serve.server_command(args, "local-dir:m", 8000, "torch")
    fixed_settings = settings_from_args(fixed[3:])
    main_settings = settings_from_args(main[3:])
    assert (fixed_settings.max_batch_size, fixed_settings.warmup) == (4, False)
    assert main_settings.max_batch_size == args.batch_size != 4 and main_settings.warmup
