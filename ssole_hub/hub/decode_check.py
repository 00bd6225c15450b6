"""The guard of reduced-DCT JPEG decoding: on by default only where it keeps the embeddings.

A JPEG much larger than a model's input can be decoded at 1/2, 1/4 or 1/8 of its size by libjpeg
(``draft_size`` of :func:`ssole_hub.images.decode_image`): several times less decoding and
resizing work, but slightly different pixels. :class:`~ssole_hub.FeatureExtractor` turns it on
by default only after :func:`check_reduced_decoding` has compared, for its own model, the
embeddings of real photos decoded both ways:

- the **guard photos** are scikit-image's bundled photos (those of the ONNX guard), each as a
  JPEG at its own size and at twice it, so that most of them are large enough to be reduced;
- the **smallest cosine** between each photo's two embeddings must be at least
  :data:`MIN_COSINE`, and the **neighbour agreement** (each photo's nearest neighbours among the
  photos, :func:`~ssole_hub.hub.onnx_export.neighbour_agreement`) at least
  :data:`~ssole_hub.runtimes.backends.NEIGHBOUR_AGREEMENT_LIMIT`, the backends' limit.

Without scikit-image there is nothing real to check, and decoding stays full.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ssole_hub.hub.onnx_export import NEIGHBOUR_K, SKIMAGE_PHOTOS, neighbour_agreement
from ssole_hub.images import decode_image
from ssole_hub.runtimes.backends import NEIGHBOUR_AGREEMENT_LIMIT

__all__ = ["MIN_COSINE", "DecodeCheck", "check_reduced_decoding", "guard_jpegs", "resize_side"]

MIN_COSINE = 0.99
"""Smallest cosine between a guard photo's embeddings from reduced and from full decoding (the
int8 backend's limit)."""


@dataclass(frozen=True)
class DecodeCheck:
    """What :func:`check_reduced_decoding` measured; ``passed`` turns reduced decoding on."""

    draft_size: int
    """The shorter side reduced decoding keeps at least (the model's resize size)."""
    photos: int
    """Guard photos decoded both ways."""
    reduced: int
    """How many of them were large enough to be decoded at a reduced scale."""
    min_cosine: float
    neighbour_agreement: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        """The figures as plain JSON values, with the limits they were held to."""
        limits = {"min_cosine_limit": MIN_COSINE,
                  "neighbour_agreement_limit": NEIGHBOUR_AGREEMENT_LIMIT}  # fmt: skip
        return {**asdict(self), **limits}


def resize_side(data_config: Mapping[str, Any]) -> int:
    """The shorter side timm's eval transform resizes to (``input_size / crop_pct``)."""
    side = max(data_config["input_size"][1:])
    return math.floor(side / data_config.get("crop_pct", 1.0))


@functools.cache
def guard_jpegs() -> tuple[bytes, ...]:
    """scikit-image's photos as JPEG files (quality 90), each at its own size and at twice it.

    Raises:
        ImportError: scikit-image is not installed.
    """
    from skimage import data

    out = []
    for name in SKIMAGE_PHOTOS:
        img = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
        for scale in (1, 2):
            sized = img.resize((img.width * scale, img.height * scale), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            sized.save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
    return tuple(out)


def check_reduced_decoding(
    embed: Callable[[torch.Tensor], torch.Tensor],
    transform: Callable[[Image.Image], torch.Tensor],
    draft_size: int,
) -> DecodeCheck | None:
    """Compare ``embed`` (a batch of preprocessed images to embeddings) on the guard photos
    decoded in full and at a reduced DCT scale keeping ``draft_size``; ``None`` without
    scikit-image (nothing real to check)."""
    try:
        jpegs = guard_jpegs()
    except ImportError:
        return None
    full = [decode_image(j) for j in jpegs]
    reduced = [decode_image(j, draft_size=draft_size) for j in jpegs]
    n_reduced = sum(a.size != b.size for a, b in zip(full, reduced, strict=True))
    with torch.inference_mode():
        reference = embed(torch.stack([transform(img) for img in full])).float()
        candidate = embed(torch.stack([transform(img) for img in reduced])).float()
    min_cosine = float(F.cosine_similarity(reference, candidate, dim=1).min())
    k = min(NEIGHBOUR_K, (len(jpegs) - 1) // 2)
    agreement = neighbour_agreement(reference, candidate, k)
    passed = min_cosine >= MIN_COSINE and agreement >= NEIGHBOUR_AGREEMENT_LIMIT
    return DecodeCheck(draft_size, len(jpegs), n_reduced, round(min_cosine, 6),
                       round(agreement, 4), passed)  # fmt: skip
