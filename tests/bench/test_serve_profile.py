"""``bench/serve.py``'s stage profile: where an image's CPU goes, through the server's own code."""

from __future__ import annotations

import base64
import importlib
import json
import sys
from pathlib import Path

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
