"""Shared fixtures: real photos from scikit-image, encoded as real JPEG/PNG files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


def _photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    img = Image.fromarray(np.asarray(arr))
    return img.convert("RGB")


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Real photographs bundled with scikit-image, as RGB PIL images of mixed sizes."""
    return [_photo(n) for n in PHOTO_NAMES]


@pytest.fixture(scope="session")
def photo_jpegs(photos) -> list[bytes]:
    """The same photos encoded as JPEG bytes."""
    out = []
    for img in photos:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out
