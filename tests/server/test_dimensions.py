"""OpenAI's ``dimensions`` over real HTTP: the official ``openai`` client and the upload form get
the extractor's compact embeddings; sizes share forward passes; a bad size gets the contract's
400 (saying how to fit a PCA) and the server goes on serving; ``/v1/models`` lists the sizes."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch

from server.backend import ExtractorBackend

pytestmark = pytest.mark.slow


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_the_openai_client_gets_the_extractors_compact_embeddings(
    pca_server, pca_extractor, photo_jpegs, encoding_format
):
    # None: the client's default, which asks for base64 and decodes it itself.
    result = _client(pca_server).embeddings.create(
        model=pca_server.settings.model_id,
        input=[_data_uri(j) for j in photo_jpegs[:3]],
        dimensions=128,
        **({"encoding_format": encoding_format} if encoding_format else {}),
    )
    if encoding_format == "base64":  # asked for explicitly, base64 rows come back as they are
        got = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in result.data])
    else:
        got = np.array([d.embedding for d in result.data], dtype=np.float32)
    want = pca_extractor.embed(photo_jpegs[:3], dimensions=128).numpy()
    assert got.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert np.abs(got - want).max() <= 1e-5
    assert [d.index for d in result.data] == [0, 1, 2] and result.usage.total_tokens == 3


def test_the_upload_form_takes_dimensions(pca_server, pca_extractor, photo_jpegs):
    files = [("files", (f"p{i}.jpg", j, "image/jpeg")) for i, j in enumerate(photo_jpegs[:2])]
    with pca_server.client() as c:
        r = c.post("/v1/embeddings/upload", files=files, data={"dimensions": "128"})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    want = pca_extractor.embed(photo_jpegs[:2], dimensions=128).numpy()
    assert got.shape == (2, 128) and np.abs(got - want).max() <= 1e-5


def test_models_lists_the_sizes_dimensions_offers(pca_server, server):
    with pca_server.client() as c:
        card = c.get("/v1/models").json()["data"][0]
    assert card["pca"]["output"] == "backbone" and card["pca"]["whiten"] is False
    assert (card["pca"]["max_dimensions"], card["pca"]["images"]) == (149, 150)
    assert list(card["pca"]["variance_kept"]) == ["149", "128", "64", "32"]
    with server.client() as c:
        assert c.get("/v1/models").json()["data"][0]["pca"] is None


@pytest.mark.parametrize(
    ("dimensions", "message"),
    [
        (0, "between 1 and 149"),
        (-8, "between 1 and 149"),
        (150, "fit it on more images"),
        (4096, "between 1 and 149"),
        ("128", "valid integer"),
        (12.5, "valid integer"),
        (True, "valid integer"),
        ([128], "valid integer"),
    ],
)
def test_a_bad_size_gets_400_and_the_next_request_is_served(
    pca_server, photo_jpegs, dimensions, message
):
    image = _data_uri(photo_jpegs[0])
    with pca_server.client() as c:
        r = c.post("/v1/embeddings", json={"input": [image], "dimensions": dimensions})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_dimensions")
        assert message in error["message"]
        for size in (64, None):
            r = c.post("/v1/embeddings", json={"input": [image], "dimensions": size})
            assert r.status_code == 200
            assert len(r.json()["data"][0]["embedding"]) == (size or 512)


@pytest.mark.parametrize(
    ("form", "message"),
    [({"dimensions": "0"}, "between 1 and 149"), ({"dimensions": "many"}, "valid integer")],
)
def test_the_upload_form_refuses_a_bad_size_the_same_way(pca_server, photo_jpegs, form, message):
    files = [("files", ("p.jpg", photo_jpegs[0], "image/jpeg"))]
    with pca_server.client() as c:
        r = c.post("/v1/embeddings/upload", files=files, data=form)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_dimensions"
    assert message in r.json()["error"]["message"]


def test_options_the_pca_cannot_give_get_400(pca_server, photo_jpegs):
    image = _data_uri(photo_jpegs[0])
    with pca_server.client() as c:
        for body, message in (
            ({"dimensions": 32, "output": "projector"}, "fitted on backbone embeddings"),
            ({"dimensions": 32, "normalize": False}, "always L2-normalised"),
        ):
            r = c.post("/v1/embeddings", json={"input": [image], **body})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_dimensions"
            assert message in r.json()["error"]["message"]


def test_a_model_without_a_pca_answers_400_with_how_to_fit_one(server, photo_jpegs):
    with pytest.raises(openai.BadRequestError) as info:
        _client(server).embeddings.create(
            model=server.settings.model_id, input=[_data_uri(photo_jpegs[0])], dimensions=128
        )
    error = info.value.body
    assert error["code"] == "invalid_dimensions"
    assert "has no fitted PCA" in error["message"]
    assert "ssole-hub fit-pca HUB_FOLDER --input IMAGES" in error["message"]
    with server.client() as c:  # full-size requests go on
        r = c.post("/v1/embeddings", json={"input": [_data_uri(photo_jpegs[0])]})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 512


def test_requests_of_different_sizes_share_one_forward_pass(pca_extractor, photo_jpegs):
    backend = ExtractorBackend(pca_extractor)
    images = [pca_extractor.preprocess_one(j) for j in photo_jpegs[:4]]
    asked = [(True, None), (False, None), (True, 128), (True, 32)]
    forward_passes = []
    embed_tensor = pca_extractor.embed_tensor

    def counted(*args, **kwargs):
        forward_passes.append(args[0].shape[0])
        return embed_tensor(*args, **kwargs)

    pca_extractor.embed_tensor = counted
    try:
        got = backend.infer([(x, *a) for x, a in zip(images, asked, strict=True)], "backbone")
    finally:
        del pca_extractor.embed_tensor
    assert forward_passes == [4]
    for vector, image, (normalize, dimensions) in zip(got, images, asked, strict=True):
        want = embed_tensor(image[None], "backbone", normalize, dimensions)[0]
        assert vector.shape == (dimensions or 512,)
        np.testing.assert_allclose(vector, want.numpy(), atol=1e-5)
    assert abs(np.linalg.norm(got[1]) - 1) > 1e-2  # the raw row stays raw
    assert isinstance(got[0], np.ndarray) and torch.from_numpy(got[2]).dtype == torch.float32
