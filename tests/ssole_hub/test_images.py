"""The safe image decoder: every common mode and orientation to the expected RGB, bad input refused.

All odd images are made with Pillow from scikit-image's real photos.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from ssole_hub.images import (
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    to_rgb,
)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def astronaut(photos) -> Image.Image:
    return photos[0]


@pytest.fixture(scope="module")
def chelsea(photos) -> Image.Image:
    """A non-square photo (451 x 300), so a wrong rotation changes the shape."""
    return photos[2]


def test_rgb_png_decodes_to_the_same_pixels(astronaut):
    out = decode_image(_encode(astronaut, "PNG"))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(astronaut))


def test_path_and_bytes_decode_alike(tmp_path, photo_jpegs):
    path = tmp_path / "photo.jpg"
    path.write_bytes(photo_jpegs[1])
    assert np.array_equal(np.asarray(decode_image(path)), np.asarray(decode_image(photo_jpegs[1])))
    assert np.array_equal(np.asarray(decode_image(str(path))), np.asarray(decode_image(path)))


def test_greyscale_becomes_replicated_rgb(astronaut):
    grey = astronaut.convert("L")
    out = np.asarray(decode_image(_encode(grey, "PNG")))
    assert out.shape == (*grey.size[::-1], 3)
    for c in range(3):
        assert np.array_equal(out[..., c], np.asarray(grey))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(photos):
    camera = np.asarray(photos[4].convert("L"))
    # x * 257 maps 0..255 exactly onto 0..65535, so the 8-bit result must equal the original.
    sixteen = Image.fromarray(camera.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    out = np.asarray(decode_image(_encode(sixteen, "PNG")))
    assert np.array_equal(out[..., 0], camera)
    assert np.array_equal(out[..., 2], camera)
    # Pillow's own convert clips every value above 255 to white; ours keeps the picture.
    assert out.std() > 20


def test_cmyk_jpeg_and_tiff_decode_to_the_photo(astronaut):
    cmyk = astronaut.convert("CMYK")
    exact = decode_image(_encode(cmyk, "TIFF"))
    assert np.array_equal(np.asarray(exact), np.asarray(astronaut))
    lossy = decode_image(_encode(cmyk, "JPEG", quality=95))
    assert lossy.mode == "RGB"
    assert np.abs(_arr(lossy) - _arr(astronaut)).mean() < 4


def test_rgba_is_composited_over_white(astronaut):
    rgb = np.asarray(astronaut)
    h, w = rgb.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    out = _arr(decode_image(_encode(rgba, "PNG")))
    a = alpha[..., None].astype(np.float64) / 255
    expected = rgb * a + 255 * (1 - a)
    assert np.abs(out - expected).max() <= 1
    assert (out[:, 0] == 255).all()  # fully transparent column is the background


def test_la_is_composited_over_white(astronaut):
    grey = np.asarray(astronaut.convert("L"))
    alpha = np.zeros_like(grey)
    alpha[:, : grey.shape[1] // 2] = 255
    la = Image.fromarray(np.dstack([grey, alpha]), mode="LA")
    out = np.asarray(decode_image(_encode(la, "PNG")))
    half = grey.shape[1] // 2
    assert np.array_equal(out[:, :half, 1], grey[:, :half])
    assert (out[:, half:] == 255).all()


def test_palette_with_transparency_is_composited_over_white(chelsea):
    pal = chelsea.quantize(colors=32)
    index = np.asarray(pal)
    transparent = int(np.bincount(index.ravel()).argmax())
    out = np.asarray(decode_image(_encode(pal, "PNG", transparency=transparent)))
    palette = np.array(pal.getpalette()[: 3 * 32], dtype=np.uint8).reshape(-1, 3)
    expected = palette[index]
    expected[index == transparent] = 255
    assert np.array_equal(out, expected)
    assert (index == transparent).any()


def test_animated_gif_gives_its_first_frame(photos):
    first = photos[1].quantize(colors=64)
    second = photos[3].resize(photos[1].size).quantize(colors=64)
    gif = _encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(gif)), "n_frames", 1) == 2
    out = _arr(decode_image(gif))
    assert np.array_equal(out, _arr(first.convert("RGB")))
    assert np.abs(out - _arr(second.convert("RGB"))).mean() > 10


# EXIF orientation -> the transpose that *stores* an upright photo so that a viewer applying the
# tag shows it upright again (the inverse of what the viewer applies).
_STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(_STORE))
def test_exif_orientation_is_applied(chelsea, orientation):
    stored = chelsea if _STORE[orientation] is None else chelsea.transpose(_STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(_encode(stored, "JPEG", quality=95, exif=exif))
    assert out.size == chelsea.size
    assert np.abs(_arr(out) - _arr(chelsea)).mean() < 4


def test_to_rgb_converts_an_open_pil_image_without_touching_rgb(astronaut):
    assert to_rgb(astronaut) is astronaut
    assert to_rgb(astronaut.convert("1")).mode == "RGB"


# --- refusals ------------------------------------------------------------------------------


def _png_with_header_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite a real PNG's IHDR to claim another size (the IDAT keeps the small image's data)."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    chunk = b"IHDR" + ihdr
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


@pytest.mark.parametrize("side", [9_000, 30_000], ids=["over-our-limit", "over-pillow-limit"])
def test_bomb_header_is_refused_before_decoding(astronaut, side):
    bomb = _png_with_header_size(_encode(astronaut, "PNG"), side, side)
    # Decoding would fail with a truncation error (the data is for 512 x 512); a size error
    # proves the refusal came from the header alone.
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(bomb)


def test_real_decompression_bomb_is_refused(astronaut):
    side = 9_000
    assert side * side > DEFAULT_MAX_PIXELS
    canvas = Image.new("RGB", (side, side))
    canvas.paste(astronaut)
    bomb = _encode(canvas, "PNG")
    del canvas
    assert len(bomb) < 2_000_000  # tiny file, 243 MB when decoded
    with pytest.raises(ImageTooLargeError, match=f"{side}x{side}"):
        decode_image(bomb)


def test_pixel_limit_is_configurable(astronaut):
    png = _encode(astronaut, "PNG")
    with pytest.raises(ImageTooLargeError, match="512x512"):
        decode_image(png, max_pixels=512 * 512 - 1)
    assert decode_image(png, max_pixels=512 * 512).size == (512, 512)


def test_byte_limit_applies_to_bytes_and_paths(tmp_path, photo_jpegs):
    data = photo_jpegs[0]
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(data, max_bytes=len(data) - 1)
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(path, max_bytes=1000)
    assert decode_image(path, max_bytes=len(data)).mode == "RGB"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_corrupt(astronaut, fmt):
    data = _encode(astronaut, fmt)
    with pytest.raises(CorruptImageError, match=fmt):
        decode_image(data[: len(data) * 6 // 10])


@pytest.mark.parametrize(
    ("fmt", "keep"),
    [
        ("PNG", 4),
        ("PNG", 12),
        ("PNG", 30),
        ("JPEG", 12),
        ("JPEG", 20),
        ("GIF", 12),
        ("TIFF", 12),
        ("WEBP", 12),
        ("WEBP", 30),
    ],
)
def test_image_cut_off_inside_its_header_is_corrupt_not_unsupported(astronaut, fmt, keep):
    # Pillow reports these as "unidentified"; their signature says what they were meant to be.
    with pytest.raises(CorruptImageError, match=fmt):
        decode_image(_encode(astronaut, fmt)[:keep])


def test_empty_input_and_empty_file_are_corrupt(tmp_path):
    with pytest.raises(CorruptImageError, match="empty"):
        decode_image(b"")
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(CorruptImageError, match=r"empty\.jpg is empty"):
        decode_image(path)


@pytest.mark.parametrize(
    "data",
    [
        b"This is a plain text file, not a picture.\n" * 3,
        # PostScript is an image format to Pillow, which would run Ghostscript on it.
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
    ],
    ids=["text", "postscript", "pdf"],
)
def test_non_images_are_unsupported(data):
    with pytest.raises(UnsupportedImageError, match="not a supported image"):
        decode_image(data)


def test_errors_are_this_packages_not_pillows(photo_jpegs):
    bad = [b"not an image", b"", photo_jpegs[0][:500]]
    for data in bad:
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data)
        assert not isinstance(info.value, UnidentifiedImageError | OSError)
        assert isinstance(info.value, ValueError)


def test_missing_file_and_wrong_type_raise_standard_errors(tmp_path, astronaut):
    with pytest.raises(FileNotFoundError):
        decode_image(tmp_path / "missing.jpg")
    with pytest.raises(TypeError, match="to_rgb"):
        decode_image(astronaut)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "WEBP"])
def test_damaged_bytes_raise_only_decode_errors(chelsea, fmt):
    """Seeded random byte flips, mostly in the headers: never another exception, never a hang."""
    original = _encode(chelsea.quantize(64) if fmt == "GIF" else chelsea, fmt)
    rng = np.random.default_rng(0)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(60):
        data = bytearray(original)
        for _ in range(rng.integers(1, 8)):
            data[rng.integers(min(len(data), 300))] = rng.integers(256)
        try:
            assert decode_image(bytes(data)).mode == "RGB"
            outcomes["decoded"] += 1
        except ImageDecodeError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def test_draft_size_decodes_large_jpegs_at_a_reduced_scale_only(photos):
    big = photos[5].resize((2000, 1744))
    jpeg = _encode(big, "JPEG", quality=95)
    full = decode_image(jpeg)
    small = decode_image(jpeg, draft_size=256)
    assert full.size == (2000, 1744)
    assert small.size == (500, 436)  # 1/4 scale: 1/8 would make the shorter side 218 < 256
    # The reduced decode is a good downscale of the same picture.
    reference = _arr(full.resize(small.size, Image.Resampling.BOX))
    assert np.abs(_arr(small) - reference).mean() < 3
    assert decode_image(_encode(big, "PNG"), draft_size=256).size == (2000, 1744)
