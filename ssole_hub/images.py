"""The one image decoder of SSOLE Hub: bytes or a path in, an upright 8-bit RGB image out.

Every caller (:class:`~ssole_hub.FeatureExtractor`, ``ssole-hub extract``, the HTTP server and
evaluation) decodes through :func:`decode_image`, so they all see the same pixels and refuse the
same bad inputs:

- the encoded size is checked before anything is parsed (``max_bytes``);
- the pixel count is read from the header and checked *before* the pixels are decoded
  (``max_pixels``), so a decompression bomb costs a few bytes of parsing, not gigabytes of memory;
- only common raster formats are opened (:data:`SAFE_FORMATS`): no PostScript (which would run
  Ghostscript), no scientific containers;
- EXIF orientation is applied, animated images give their first frame, and every common mode
  (``1``, ``L``, ``LA``, ``P`` with transparency, ``RGBA``, ``CMYK``, ``YCbCr``, 16-bit
  greyscale) becomes RGB; transparent pixels are composited over a background colour (white).

Failures raise :class:`ImageDecodeError` or one of its subclasses, each naming what was wrong:

================================  ====================================================  =========
exception                         raised for                                            HTTP
================================  ====================================================  =========
:class:`ImageTooLargeError`       more bytes than ``max_bytes``, more pixels than          413
                                  ``max_pixels``
:class:`UnsupportedImageError`    not an image, or a format / mode outside what is         415
                                  supported
:class:`CorruptImageError`        empty, truncated or damaged data in a known format       400
================================  ====================================================  =========

All of them derive from :class:`ValueError`, so ``except ValueError`` catches bad input too.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "SAFE_FORMATS",
    "CorruptImageError",
    "ImageDecodeError",
    "ImageSource",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "decode_image",
    "is_image_path",
    "list_images",
    "open_image",
    "to_rgb",
]

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
"""Largest encoded input accepted by default: 32 MiB."""

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest decoded frame accepted by default (width x height): 64 megapixels, e.g. 9800 x 6500.
Kept below Pillow's own bomb threshold (``PIL.Image.MAX_IMAGE_PIXELS``) so that our limit, with
our error, is the one that applies."""

SAFE_FORMATS: tuple[str, ...] = (
    "JPEG",
    "PNG",
    "GIF",
    "WEBP",
    "AVIF",
    "BMP",
    "TIFF",
    "PPM",
    "QOI",
    "TGA",
    "JPEG2000",
)
"""Pillow format names :func:`decode_image` opens (those this Pillow build has); MPO camera
files open as JPEG."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".mpo",
        ".png",
        ".apng",
        ".gif",
        ".webp",
        ".avif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".qoi",
        ".tga",
        ".jp2",
        ".j2k",
    }
)
"""File name extensions (lower case) treated as images when a folder is scanned."""

ImageSource = bytes | bytearray | memoryview | str | os.PathLike
"""What :func:`decode_image` reads: encoded bytes, or the path of an image file."""

WHITE = (255, 255, 255)

# What Pillow's plugins raise on damaged data (its own fuzzing finds all of these escaping); to a
# caller they all mean the same thing: the file is broken.
_PILLOW_DAMAGE = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
)


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image (the base of this module's errors)."""


class ImageTooLargeError(ImageDecodeError):
    """The input has more encoded bytes or more pixels than the configured limit."""


class UnsupportedImageError(ImageDecodeError):
    """The input is not an image, or is in a format or mode this decoder does not accept."""


class CorruptImageError(ImageDecodeError):
    """The input is empty, truncated or damaged although its format was recognised."""


# Signatures that only files of that format start with. BMP's ``BM`` and the Netpbm ``P1``..``P6``
# are left out: two letters that ordinary text also starts with.
_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    "QOI": (b"qoif",),
    "JPEG2000": (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  \r\n\x87\n"),
}


def _signature_format(data: bytes) -> str | None:
    """The format whose signature ``data`` starts with (or, cut short, is the start of), or None.

    Pillow calls a file "unidentified" when its plugin fails while reading the header, so a PNG or
    JPEG cut off inside its header would otherwise pass for "not an image at all".
    """
    for fmt, signatures in _SIGNATURES.items():
        for sig in signatures:
            if data.startswith(sig) or (len(data) >= 4 and sig.startswith(data)):
                return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def _read_limited(source: ImageSource, max_bytes: int) -> tuple[bytes, str]:
    """Return the encoded bytes and a name for messages; refuses inputs over ``max_bytes``."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        name = "input"
        exact = True
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        name = str(path)
        # Read one byte past the limit instead of trusting stat(): the file may be a pipe or
        # may grow while it is read.
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        exact = False
    else:
        raise TypeError(
            f"decode_image takes bytes or a path, got {type(source).__name__}; "
            "use to_rgb() for PIL images"
        )
    if len(data) > max_bytes:
        size = f"{len(data)} bytes" if exact else f"more than {max_bytes} bytes"
        raise ImageTooLargeError(f"{name} is too large: {size}, the limit is {max_bytes} bytes")
    if not data:
        raise CorruptImageError(f"{name} is empty (0 bytes)")
    return data, name


def _safe_formats() -> list[str]:
    Image.init()
    return [f for f in SAFE_FORMATS if f in Image.OPEN]


def open_image(
    source: ImageSource,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, bytes, str]:
    """Open ``source`` and check it as :func:`decode_image` does, reading only its header: the
    encoded size, the format, the pixel count. Returns the open (not yet decoded) PIL image, the
    encoded bytes and a name for messages. Raises what :func:`decode_image` raises for the same
    input."""
    data, name = _read_limited(source, max_bytes)
    try:
        img = Image.open(io.BytesIO(data), formats=_safe_formats())
    except UnidentifiedImageError as exc:
        fmt = _signature_format(data)
        if fmt is not None:
            raise CorruptImageError(
                f"{name} is a damaged or truncated {fmt} ({len(data)} bytes; its header could not "
                "be read)"
            ) from exc
        raise UnsupportedImageError(
            f"{name} is not a supported image (starts with {data[:8]!r}); "
            f"accepted formats: {', '.join(_safe_formats())}"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name} has too many pixels: {exc}") from exc
    except _PILLOW_DAMAGE as exc:
        fmt = _signature_format(data)
        what = f"a {fmt}" if fmt else "an image"
        raise CorruptImageError(f"{name} is {what} with a damaged header: {exc}") from exc

    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name} is too large: {width}x{height} = {width * height} pixels, "
            f"the limit is {max_pixels} pixels"
        )
    if width < 1 or height < 1:
        raise CorruptImageError(f"{name} has an empty size {width}x{height}")
    return img, data, name


def decode_image(
    source: ImageSource,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode ``source`` (encoded bytes or a file path) into an upright 8-bit RGB PIL image.

    Args:
        source: the encoded image, or the path of an image file.
        max_bytes: refuse inputs with more encoded bytes than this.
        max_pixels: refuse images whose first frame has more pixels (width x height) than this;
            checked from the header, before decoding.
        background: colour that transparent pixels are composited over.
        draft_size: opt-in speed-up for large JPEGs: let libjpeg decode at the smallest DCT
            scale (1/2, 1/4 or 1/8) whose shorter side stays at least ``draft_size`` pixels.
            Several times less work for photos much larger than the model input, but the pixels
            differ slightly from a full decode; ``None`` (default) always decodes in full.

    Returns:
        A fully loaded ``PIL.Image.Image`` in mode ``RGB``, EXIF orientation applied; the first
        frame of an animated image.

    Raises:
        ImageTooLargeError: over ``max_bytes`` or ``max_pixels``.
        UnsupportedImageError: not an image, or a format or mode that is not supported.
        CorruptImageError: empty, truncated or damaged data.
        FileNotFoundError: ``source`` is a path that does not exist (other ``OSError`` s from
            reading the file pass through too).
        TypeError: ``source`` is neither bytes nor a path.
    """
    img, _, name = open_image(source, max_bytes=max_bytes, max_pixels=max_pixels)
    fmt, (width, height) = img.format, img.size
    try:
        if draft_size is not None and fmt in ("JPEG", "MPO") and min(width, height) > draft_size:
            scale = draft_size / min(width, height)
            img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        # Animated files open on their first frame; load() decodes only that one.
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name} has too many pixels: {exc}") from exc
    except _PILLOW_DAMAGE as exc:
        raise CorruptImageError(f"{name} ({fmt}) could not be decoded: {exc}") from exc
    return to_rgb(img, background=background)


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    # Pillow's own convert("L") clips 16-bit values at 255 (a white image); scale instead, which
    # maps 0..65535 onto 0..255 the way 16-bit PNG/TIFF readers do (x * 255 / 65535, rounded).
    arr = np.asarray(img, dtype=np.uint32) if img.mode != "F" else np.asarray(img)
    if img.mode == "F":
        # Float images carry no agreed range; treat them like Pillow does, as 0..255.
        arr8 = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    else:
        arr8 = ((np.clip(arr, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(arr8, mode="L")


def to_rgb(img: Image.Image, *, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert an already-open PIL image of any common mode to 8-bit ``RGB``.

    Transparency (an alpha channel, or a palette/greyscale transparent colour) is composited over
    ``background``; 16-bit greyscale is scaled to 8 bits rather than clipped; CMYK and YCbCr use
    Pillow's conversions. EXIF orientation is *not* applied here (:func:`decode_image` does it).

    Raises:
        UnsupportedImageError: a mode that has no conversion to RGB.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _sixteen_bit_to_l(img).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    )
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            canvas.alpha_composite(rgba)
            return canvas.convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImageError(f"image mode {mode!r} cannot be converted to RGB") from exc


def is_image_path(path: str | os.PathLike, extensions: Sequence[str] | None = None) -> bool:
    """Whether ``path`` has an image file extension (:data:`IMAGE_EXTENSIONS` by default)."""
    exts = IMAGE_EXTENSIONS if extensions is None else {e.lower() for e in extensions}
    return Path(path).suffix.lower() in exts


def list_images(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], Path]:
    """The images to extract, in a fixed order, and the folder their paths are relative to.

    Args:
        inputs: a folder (scanned recursively for image extensions, hidden entries skipped,
            sorted), a text file with one path per line (blank lines and ``#`` comments
            skipped; relative paths are relative to the file's folder; only ``\\n`` ends a
            line), or a list of paths (relative to the current directory).

    Returns:
        ``(paths, root)``: paths as they are recorded in the output, and the folder that relative
        ones are resolved against.

    Raises:
        FileNotFoundError: ``inputs`` does not exist.
        ValueError: no images were found.
    """
    if isinstance(inputs, str | os.PathLike):
        src = Path(inputs)
        if src.is_dir():
            root = src
            paths = sorted(
                p.relative_to(src).as_posix()
                for p in src.rglob("*")
                if p.is_file()
                and is_image_path(p)
                and not any(part.startswith(".") for part in p.relative_to(src).parts)
            )
        elif src.is_file():
            root = src.parent
            lines = (line.strip() for line in src.read_text().split("\n"))
            paths = [line for line in lines if line and not line.startswith("#")]
        elif not src.exists():
            raise FileNotFoundError(f"input {src} does not exist")
        else:
            raise FileNotFoundError(f"input {src} is neither a folder nor a list of paths")
    else:
        root = Path.cwd()
        paths = [os.fspath(p) for p in inputs]
    if not paths:
        raise ValueError(f"no images found in {inputs}")
    return paths, root
