"""Every kind of bad (or merely unusual) input gets the right status and a clear error.

All images are real: scikit-image photos re-encoded as truncated, CMYK, 16-bit, palette,
animated, tiny, EXIF-rotated and decompression-bomb files.
"""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

pytestmark = pytest.mark.slow


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def uri(data: bytes, media_type: str = "image/jpeg") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def post_json(server, body=None, **kwargs) -> httpx.Response:
    with server.client() as c:
        if body is not None:
            return c.post("/v1/embeddings", json=body, **kwargs)
        return c.post("/v1/embeddings", **kwargs)


def post_files(server, parts, data=None) -> httpx.Response:
    with server.client() as c:
        return c.post("/v1/embeddings/upload", files=parts, data=data or {})


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code, error
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]


def embedding(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


# --- rejected inputs ------------------------------------------------------------------------


def test_truncated_jpeg_is_400_on_both_endpoints(server, photo_jpegs):
    cut = photo_jpegs[0][: len(photo_jpegs[0]) // 2]
    assert_error(post_json(server, {"input": [uri(cut)]}), 400, "invalid_image", "input[0]")
    r = post_files(server, [("files", ("cut.jpg", cut, "image/jpeg"))])
    assert_error(r, 400, "invalid_image", "files[0]", "cut.jpg")


def test_png_cut_off_inside_its_header_is_400_not_415(server, photos):
    cut = encode(photos[0], "PNG")[:30]
    r = post_json(server, {"input": [uri(cut, "image/png")]})
    assert_error(r, 400, "invalid_image", "input[0]", "truncated PNG")
    r = post_files(server, [("files", ("cut.png", cut, "image/png"))])
    assert_error(r, 400, "invalid_image", "files[0]", "cut.png")


def test_random_bytes_are_not_an_image(server):
    noise = np.random.default_rng(0).bytes(5000)
    assert_error(post_json(server, {"input": [uri(noise)]}), 415, "unsupported_media_type", "not")
    r = post_files(server, [("files", ("noise.bin", noise, "application/octet-stream"))])
    assert_error(r, 415, "unsupported_media_type", "files[0]")


def test_text_sent_as_an_image_is_415(server):
    text = b"this is a text file, not a photograph\n" * 10
    r = post_files(server, [("files", ("notes.txt", text, "text/plain"))])
    assert_error(r, 415, "unsupported_media_type", "text/plain")
    # Declared as an image, the bytes themselves give it away.
    r = post_files(server, [("files", ("notes.png", text, "image/png"))])
    assert_error(r, 415, "unsupported_media_type", "not a supported image")
    assert_error(post_json(server, {"input": uri(text)}), 415, "unsupported_media_type")


def test_empty_body_is_400(server):
    r = post_json(server, content=b"", headers={"content-type": "application/json"})
    assert_error(r, 400, "empty_body", "empty")


def test_invalid_json_is_400(server):
    r = post_json(server, content=b'{"input": [', headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json", "json")


def test_wrong_content_type_is_415(server, photo_jpegs):
    r = post_json(server, content=photo_jpegs[0], headers={"content-type": "image/jpeg"})
    assert_error(r, 415, "unsupported_media_type", "application/json")
    with server.client() as c:
        r = c.post("/v1/embeddings/upload", json={"input": []})
    assert_error(r, 415, "unsupported_media_type", "multipart/form-data")


def test_upload_without_files_is_422(server):
    r = post_files(server, {"normalize": (None, "true")})
    assert_error(r, 422, "validation_error", "files")


def test_schema_violations_are_422(server, photo_jpegs):
    good = uri(photo_jpegs[0])
    for body, word in [
        ({"input": [good], "encoding_format": "hex"}, "encoding_format"),
        ({"input": [good], "output": "logits"}, "output"),
        ({"input": []}, "input"),
        ({"input": [good], "normalise": True}, "normalise"),
        ({"images": [good]}, "input"),
    ]:
        assert_error(post_json(server, body), 422, "validation_error", word)


def test_too_many_items_is_413(server, photo_jpegs):
    n = server.settings.max_items + 1
    r = post_json(server, {"input": [uri(photo_jpegs[0])] * n})
    assert_error(r, 413, "too_many_items", str(n), str(server.settings.max_items))
    r = post_files(
        server, [("files", (f"{i}.jpg", photo_jpegs[0], "image/jpeg")) for i in range(n)]
    )
    assert_error(r, 413, "too_many_items")


def test_too_many_bytes_is_413(server):
    limit = server.settings.max_image_bytes
    big = np.random.default_rng(1).bytes(limit + 1000)
    assert_error(post_json(server, {"input": [uri(big)]}), 413, "image_too_large", str(limit))
    r = post_files(server, [("files", ("big.jpg", big, "image/jpeg"))])
    assert_error(r, 413, "image_too_large", str(limit))
    huge = b"x" * (server.settings.max_request_bytes + 1)
    r = post_files(server, [("files", ("huge.jpg", huge, "image/jpeg"))])
    assert_error(r, 413, "request_too_large", str(server.settings.max_request_bytes))


# Pillow warns while reading the header; the decoder then refuses the image by its own limit.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_before_decoding(server):
    side = 10_000  # 100 megapixels in a file of a few kilobytes
    bomb = encode(Image.new("1", (side, side)), "PNG", optimize=True)
    assert len(bomb) < 100_000
    r = post_files(server, [("files", ("bomb.png", bomb, "image/png"))])
    assert_error(r, 413, "image_too_large", "pixels", str(server.settings.max_image_pixels))


def test_bad_base64_is_400(server):
    r = post_json(server, {"input": ["data:image/png;base64,@@@not*base64@@@"]})
    assert_error(r, 400, "invalid_base64", "input[0]", "base64")
    r = post_json(server, {"input": ["data:image/png,rawbytes"]})
    assert_error(r, 400, "invalid_base64", "base64")


def test_wrong_data_uri_type_is_415(server):
    r = post_json(server, {"input": ["data:text/plain;base64,aGVsbG8="]})
    assert_error(r, 415, "unsupported_media_type", "text/plain")


def test_unknown_model_name_is_404_model_not_found(server, photo_jpegs):
    r = post_json(server, {"input": [uri(photo_jpegs[0])], "model": "gpt-4-vision"})
    assert_error(r, 404, "model_not_found", "gpt-4-vision", "tiny-ssole")
    assert r.json()["error"]["type"] == "not_found_error"
    r = post_files(server, [("files", ("a.jpg", photo_jpegs[0], "image/jpeg"))], {"model": "nope"})
    assert_error(r, 404, "model_not_found", "nope")


def test_unknown_route_and_method_use_the_error_shape(server):
    with server.client() as c:
        assert_error(c.get("/v2/nothing"), 404, "not_found")
        assert_error(c.get("/v1/embeddings"), 405, "method_not_allowed")


# --- unusual but valid images ----------------------------------------------------------------


def _odd_images(photos) -> dict[str, bytes]:
    photo = photos[1].resize((160, 120))
    arr16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    frames = [p.resize((96, 96)).convert("P", palette=Image.Palette.ADAPTIVE) for p in photos[:3]]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return {
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG", quality=90),
        "gray16.png": encode(Image.fromarray(arr16), "PNG"),
        "palette-transparent.png": encode(palette, "PNG", transparency=0),
        "animated.gif": gif.getvalue(),
        "one-pixel.png": encode(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG"),
    }


def test_unusual_valid_images_embed_like_the_extractor(server, extractors, photos):
    images = _odd_images(photos)
    assert Image.open(io.BytesIO(images["gray16.png"])).mode.startswith("I")
    assert Image.open(io.BytesIO(images["animated.gif"])).n_frames == 3
    expected = extractors().embed(list(images.values())).numpy()
    r = post_files(
        server, [("files", (n, b, "application/octet-stream")) for n, b in images.items()]
    )
    got = embedding(r)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-5
    # The GIF gives its first frame, not a blend or the last one.
    first = Image.open(io.BytesIO(images["animated.gif"])).convert("RGB")
    assert np.abs(got[3] - extractors().embed([first]).numpy()[0]).max() <= 1e-5


def test_exif_orientation_is_applied(server, extractors, photos):
    photo = photos[2]  # chelsea, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated_file = encode(photo, "JPEG", quality=95, exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(rotated_file)))
    assert upright.size == photo.size[::-1]
    got = embedding(post_json(server, {"input": [uri(rotated_file)]}))[0]
    assert np.abs(got - extractors().embed([rotated_file]).numpy()[0]).max() <= 1e-5
    # The server may decode at a reduced DCT scale (the extractor's guarded default), the PIL
    # images below are full size: close to the upright image, far from the sideways one.
    upright_error = np.abs(got - extractors().embed([upright.convert("RGB")]).numpy()[0]).max()
    sideways = extractors().embed([Image.open(io.BytesIO(rotated_file)).convert("RGB")]).numpy()[0]
    assert upright_error < 5e-3 and np.abs(got - sideways).max() > 10 * upright_error


# --- isolation -------------------------------------------------------------------------------


def test_bad_image_fails_only_its_request(server, extractors, photo_jpegs):
    expected = extractors().embed(photo_jpegs).numpy()
    cut = photo_jpegs[0][:1000]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            good = [c.post("/v1/embeddings", json={"input": [uri(j)]}) for j in photo_jpegs]
            bad = c.post("/v1/embeddings", json={"input": [uri(photo_jpegs[1]), uri(cut)]})
            mixed = [*good[:3], bad, *good[3:]]
            return await asyncio.gather(*mixed)

    responses = asyncio.run(main())
    assert_error(responses[3], 400, "invalid_image", "input[1]")
    good = responses[:3] + responses[4:]
    for i, r in enumerate(good):
        assert np.abs(embedding(r)[0] - expected[i]).max() <= 1e-5
    # The failed request's images were announced to the batcher, then taken back: no batch
    # waits for them.
    with server.client() as c:
        assert "\nssole_decoding_images 0.0\n" in c.get("/metrics").text
