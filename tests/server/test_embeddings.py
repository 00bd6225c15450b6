"""Both embedding endpoints over real HTTP agree with the offline FeatureExtractor."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def vectors(response) -> np.ndarray:
    body = response.json()
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    first = body["data"][0]["embedding"]
    if isinstance(first, str):
        return np.stack(
            [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["data"]]
        )
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


@pytest.mark.parametrize(
    ("output", "normalize"), [("backbone", True), ("backbone", False), ("projector", True)]
)
def test_both_endpoints_match_feature_extractor(server, extractors, photo_jpegs, output, normalize):
    expected = extractors(output, normalize).embed(photo_jpegs).numpy()
    with server.client() as c:
        js = c.post(
            "/v1/embeddings",
            json={
                "input": [data_uri(j) for j in photo_jpegs],
                "output": output,
                "normalize": normalize,
            },
        )
        up = c.post(
            "/v1/embeddings/upload",
            files=[("files", (f"{i}.jpg", j, "image/jpeg")) for i, j in enumerate(photo_jpegs)],
            data={"output": output, "normalize": str(normalize).lower()},
        )
    assert js.status_code == 200, js.text
    assert up.status_code == 200, up.text
    for response in (js, up):
        got = vectors(response)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5
        body = response.json()
        assert body["object"] == "list" and body["model"] == "tiny-ssole"
        assert body["usage"]["images"] == len(photo_jpegs)
        for header in ("x-queue-time", "x-inference-time", "x-total-time"):
            assert float(response.headers[header]) >= 0


def test_base64_encoding_and_bare_base64_input(server, extractors, photo_jpegs):
    expected = extractors().embed(photo_jpegs[:2]).numpy()
    with server.client() as c:
        r = c.post(
            "/v1/embeddings",
            json={
                "input": [base64.b64encode(j).decode() for j in photo_jpegs[:2]],
                "encoding_format": "base64",
                "model": "tiny-ssole",
            },
        )
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["data"][0]["embedding"], str)
    assert np.abs(vectors(r) - expected).max() <= 1e-5


def test_single_string_input_gives_one_embedding(server, extractors, photo_jpegs):
    with server.client() as c:
        r = c.post("/v1/embeddings", json={"input": data_uri(photo_jpegs[0])})
    assert r.status_code == 200, r.text
    got = vectors(r)
    assert got.shape == (1, 512)
    assert np.abs(got[0] - extractors().embed(photo_jpegs[:1]).numpy()[0]).max() <= 1e-5


def test_models_lists_the_served_model_with_its_dimensions(server, tiny_model_dir):
    with server.client() as c:
        body = c.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "tiny-ssole" and card["ready"] is True
    assert card["dimensions"] == {"backbone": 512, "projector": 32}
    # The folder's export-time decoding guard decides, and the card says what it decided.
    guard = json.loads((tiny_model_dir / "ssole.json").read_text())["reduced_decoding"]
    assert card["reduced_decoding"] is guard["passed"]
    # The batch size aimed at is the largest timed within 5% of the cheapest per image at
    # start-up, up to the maximum.
    timings = {int(n): ms for n, ms in card["batch_timings"].items()}
    assert set(timings) == {1, 2, 4, 8}
    least = min(timings.values())
    assert card["batch_size"] == max(n for n, ms in timings.items() if ms <= 1.05 * least)
