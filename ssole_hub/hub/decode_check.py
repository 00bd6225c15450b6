"""The guard of reduced-DCT JPEG decoding: on by default only where it keeps the embeddings.

A JPEG much larger than a model's input can be decoded at 1/2, 1/4 or 1/8 of its size by libjpeg
(``draft_size`` of :func:`ssole_hub.images.decode_image`): several times less decoding and
resizing work, but slightly different pixels. Exporting a hub folder runs
:func:`check_reduced_decoding` on its model (:func:`decoding_record`, kept in ``ssole.json`` as
``reduced_decoding``), and :class:`~ssole_hub.FeatureExtractor` decodes at a reduced scale by
default only where that record passed. The check compares the backbone's embeddings of real
photos decoded both ways:

- the **guard photos** are scikit-image's bundled photos (those of the ONNX guard) as JPEGs
  whose shorter side is 2 or 4 times the model's resize size (alternately), so that libjpeg
  reduces them at 1/2 and at 1/4;
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ssole_hub.device_decode import DeviceDecoder
from ssole_hub.hub.onnx_export import NEIGHBOUR_K, SKIMAGE_PHOTOS, neighbour_agreement
from ssole_hub.images import decode_image
from ssole_hub.preprocessing import resolve_preprocessing
from ssole_hub.runtimes.backends import NEIGHBOUR_AGREEMENT_LIMIT

__all__ = [
    "MIN_COSINE",
    "MIN_REDUCED",
    "DecodeCheck",
    "check_device_decoding",
    "check_reduced_decoding",
    "compare_embeddings",
    "decoding_record",
    "guard_jpegs",
    "resize_side",
    "scaled_jpegs",
]

MIN_COSINE = 0.99
"""Smallest cosine between a guard photo's embeddings from reduced and from full decoding (the
int8 backend's limit)."""
SCALES = (2, 4)
"""The guard photos' shorter sides, as multiples of the model's resize size (alternately)."""
MIN_REDUCED = 5
"""Fewest guard photos that must have been decoded at a reduced scale for the guard to pass
(the ONNX guard's neighbour agreement is measured from 5 photos on, too)."""


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


def scaled_jpegs(photos: Sequence[Image.Image], side: int) -> tuple[bytes, ...]:
    """``photos`` as JPEG files (quality 90), resized so that their shorter sides are
    :data:`SCALES` times ``side`` in turn."""
    out = []
    for i, photo in enumerate(photos):
        img = photo.convert("RGB")
        factor = SCALES[i % len(SCALES)] * side / min(img.size)
        size = (math.ceil(img.width * factor), math.ceil(img.height * factor))
        buf = io.BytesIO()
        img.resize(size, Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return tuple(out)


@functools.cache
def guard_jpegs(side: int) -> tuple[bytes, ...]:
    """scikit-image's photos (:data:`~ssole_hub.hub.onnx_export.SKIMAGE_PHOTOS`) as
    :func:`scaled_jpegs`.

    Raises:
        ImportError: scikit-image is not installed.
    """
    from skimage import data

    return scaled_jpegs([Image.fromarray(np.asarray(getattr(data, n)())) for n in SKIMAGE_PHOTOS],
                        side)  # fmt: skip


def check_reduced_decoding(
    embed: Callable[[torch.Tensor], torch.Tensor],
    transform: Callable[[Image.Image], torch.Tensor],
    draft_size: int,
    jpegs: Sequence[bytes] | None = None,
) -> DecodeCheck | None:
    """Compare ``embed`` (a batch of preprocessed images to embeddings) on the guard photos
    (or ``jpegs``) decoded in full and at a reduced DCT scale keeping ``draft_size``; ``None``
    without scikit-image (nothing real to check)."""
    try:
        jpegs = jpegs or guard_jpegs(draft_size)
    except ImportError:
        return None
    full = [decode_image(j) for j in jpegs]
    reduced = [decode_image(j, draft_size=draft_size) for j in jpegs]
    n_reduced = sum(a.size != b.size for a, b in zip(full, reduced, strict=True))
    min_cosine, agreement = compare_embeddings(
        embed, [transform(img) for img in full], [transform(img) for img in reduced]
    )
    # Photos too small to be reduced for this model prove nothing: at least MIN_REDUCED must be.
    passed = (
        n_reduced >= MIN_REDUCED
        and min_cosine >= MIN_COSINE
        and agreement >= NEIGHBOUR_AGREEMENT_LIMIT
    )
    return DecodeCheck(draft_size, len(jpegs), n_reduced, round(min_cosine, 6),
                       round(agreement, 4), passed)  # fmt: skip


def compare_embeddings(
    embed: Callable[[torch.Tensor], torch.Tensor],
    reference: Sequence[torch.Tensor],
    candidate: Sequence[torch.Tensor],
) -> tuple[float, float]:
    """The smallest cosine between each photo's two embeddings, and the neighbour agreement
    (:func:`~ssole_hub.hub.onnx_export.neighbour_agreement`), of the same photos preprocessed
    two ways (``(3, H, W)`` tensors, on any device)."""
    with torch.inference_mode():
        ref = embed(torch.stack(list(reference))).float().cpu()
        cand = embed(torch.stack(list(candidate))).float().cpu()
    min_cosine = float(F.cosine_similarity(ref, cand, dim=1).min())
    k = min(NEIGHBOUR_K, (len(reference) - 1) // 2)
    return min_cosine, neighbour_agreement(ref, cand, k)


def check_device_decoding(
    embed: Callable[[torch.Tensor], torch.Tensor],
    transform: Callable[[Image.Image], torch.Tensor],
    decoder: DeviceDecoder,
    side: int,
    jpegs: Sequence[bytes] | None = None,
) -> dict[str, Any] | None:
    """The guard of JPEG decoding on the device: the guard photos (JPEGs 2 and 4 times
    ``side``; or ``jpegs``) embedded after CPU decoding and ``transform``, and after
    ``decoder``'s device decoding and preprocessing; passed at :data:`MIN_COSINE` and the
    backends' neighbour agreement limit. ``None`` without scikit-image (nothing real to
    check)."""
    try:
        jpegs = jpegs or guard_jpegs(side)
    except ImportError:
        return None
    on_device = decoder.preprocess([decoder.admit(j) for j in jpegs])
    if not all(isinstance(t, torch.Tensor) for t in on_device):
        return {"photos": len(jpegs), "passed": False, "error": "a guard photo failed to decode"}
    reference = [transform(decode_image(j)).to(decoder.device) for j in jpegs]
    min_cosine, agreement = compare_embeddings(embed, reference, on_device)
    passed = min_cosine >= MIN_COSINE and agreement >= NEIGHBOUR_AGREEMENT_LIMIT
    return {"photos": len(jpegs), "min_cosine": round(min_cosine, 6),
            "neighbour_agreement": round(agreement, 4), "passed": passed,
            "min_cosine_limit": MIN_COSINE,
            "neighbour_agreement_limit": NEIGHBOUR_AGREEMENT_LIMIT}  # fmt: skip


def decoding_record(
    backbone: nn.Module, pretrained_cfg: Mapping[str, Any]
) -> dict[str, Any] | None:
    """:func:`check_reduced_decoding` for a timm ``backbone`` fed as ``pretrained_cfg`` says,
    as the hub folder's ``ssole.json`` records it; ``None`` without scikit-image."""
    config, transform = resolve_preprocessing(pretrained_cfg)
    check = check_reduced_decoding(backbone.eval(), transform, resize_side(config))
    return None if check is None else check.to_dict()
