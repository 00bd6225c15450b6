"""The server decoding JPEGs in each batch on the model's device (``--decode-on-device``).

No GPU here: ``on`` runs the same code with torchvision's CPU decoder, so the header check in the
decode threads, the batched decoding in the inference thread and the per-image fallback all run
over real HTTP with real photos. The default (``auto``) on a CPU decodes in the decode threads.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest

from ssole_hub import FeatureExtractor

pytestmark = pytest.mark.slow


def _uri(data: bytes, media_type: str = "image/jpeg") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def _model_card(srv) -> dict:
    with srv.client() as c:
        return c.get("/v1/models").json()["data"][0]


def test_the_default_on_a_cpu_decodes_in_the_decode_threads_and_says_why(server):
    assert _model_card(server)["device_decoding"] == {
        "on": False, "reason": "the model runs on cpu"
    }  # fmt: skip


def test_jpegs_decoded_in_the_batch_embed_as_the_extractor_does_and_bad_ones_fail_alone(
    make_server, tiny_model, photo_jpegs, photos
):
    srv = make_server(decode_on_device="on", max_batch_size=8)
    assert _model_card(srv)["device_decoding"] == {"on": True, "reason": "asked"}
    reference = FeatureExtractor.from_pretrained(
        tiny_model, device="cpu", dtype="float32", device_decode=True
    )
    expected = reference.embed(photo_jpegs).numpy()
    cut = photo_jpegs[0][: len(photo_jpegs[0]) // 2]  # the header passes; the pixels do not

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            good = [c.post("/v1/embeddings", json={"input": [_uri(j)]}) for j in photo_jpegs]
            bad = c.post("/v1/embeddings", json={"input": [_uri(photo_jpegs[1]), _uri(cut)]})
            return await asyncio.gather(*good[:3], bad, *good[3:])

    responses = asyncio.run(main())
    assert responses[3].status_code == 400, responses[3].text
    error = responses[3].json()["error"]
    assert error["code"] == "invalid_image" and "input[1]" in error["message"]
    good = responses[:3] + responses[4:]
    for i, r in enumerate(good):
        assert r.status_code == 200, r.text
        got = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
        assert np.abs(got - expected[i]).max() <= 1e-5
    with srv.client() as c:
        metrics = c.get("/metrics").text
    assert 'ssole_decode_errors_total{code="invalid_image"} 1.0' in metrics
    assert "\nssole_decoding_images 0.0\n" in metrics
