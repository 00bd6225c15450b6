"""The server on the ONNX backends (OpenVINO): same API, same shapes, values within each guard."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssole_hub import FeatureExtractor, export_onnx
from ssole_hub.runtimes.backends import FIDELITY_LIMITS

BACKENDS = ("onnx", "onnx-bf16", "onnx-int8")


def uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def onnx_model_dir(tiny_model_dir, photo_jpegs, tmp_path_factory) -> Path:
    """A copy of the tiny model folder with both ONNX files, int8 calibrated on real photos."""
    root = tmp_path_factory.mktemp("onnx-model")
    photos = root / "photos"
    photos.mkdir()
    for i, jpeg in enumerate(photo_jpegs):
        (photos / f"photo{i}.jpg").write_bytes(jpeg)
    folder = Path(shutil.copytree(tiny_model_dir, root / "tiny-ssole"))
    export_onnx(folder, calibration=photos)
    return folder


@pytest.fixture(scope="module", params=BACKENDS)
def onnx_server(request, make_server, onnx_model_dir):
    """A server of the tiny model on one ONNX backend, and that backend's offline extractor."""
    backend = request.param
    srv = make_server(model=f"local-dir:{onnx_model_dir}", backend=backend, max_batch_size=8)
    fx = FeatureExtractor.from_pretrained(onnx_model_dir, backend=backend, device="cpu")
    return backend, srv, fx


def test_models_shows_the_backend_in_use(onnx_server):
    backend, srv, _ = onnx_server
    with srv.client() as c:
        card = c.get("/v1/models").json()["data"][0]
    assert card["backend"] == backend
    assert card["dimensions"] == {"backbone": 512, "projector": 32}
    assert card["backend_timings"] == {}  # given, not chosen by timing


def test_models_shows_what_auto_timed_and_serves_the_fastest(make_server, onnx_model_dir):
    srv = make_server(model=f"local-dir:{onnx_model_dir}", backend="auto", max_batch_size=8)
    with srv.client() as c:
        card = c.get("/v1/models").json()["data"][0]
    timings = card["backend_timings"]
    assert set(timings) == {*BACKENDS, "torch"} and all(ms > 0 for ms in timings.values())
    assert card["backend"] == min(timings, key=timings.get)


@pytest.mark.parametrize("output", ["backbone", "projector"])
@pytest.mark.parametrize("normalize", [True, False])
def test_embeddings_match_the_offline_extractor_and_torch(
    onnx_server, extractors, photo_jpegs, output, normalize
):
    backend, srv, fx = onnx_server
    body = {"input": [uri(j) for j in photo_jpegs], "output": output, "normalize": normalize}
    with srv.client() as c:
        r = c.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    assert got.shape == (len(photo_jpegs), fx.dims[output])
    offline = fx.embed(photo_jpegs, output=output, normalize=normalize).numpy()
    np.testing.assert_allclose(got, offline, atol=1e-4, rtol=1e-4)
    norms = np.linalg.norm(got, axis=1)
    assert np.allclose(norms, 1, atol=1e-5) == normalize
    reference = extractors(output, normalize).embed(photo_jpegs).numpy()
    cosine = (got * reference).sum(1) / (norms * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= FIDELITY_LIMITS[backend]


def test_a_bad_image_is_a_400_naming_it(onnx_server, photo_jpegs):
    _, srv, _ = onnx_server
    truncated = photo_jpegs[1][: len(photo_jpegs[1]) // 2]
    body = {"input": [uri(photo_jpegs[0]), uri(truncated)]}
    with srv.client() as c:
        r = c.post("/v1/embeddings", json=body)
        ok = c.post("/v1/embeddings", json={"input": [uri(photo_jpegs[0])]})
    assert r.status_code == 400
    assert "input[1]" in r.json()["error"]["message"]
    assert ok.status_code == 200
