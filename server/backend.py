"""The model side of the server: one :class:`~ssole_hub.FeatureExtractor` behind two calls.

``prepare`` (decode + preprocess one image, thread-safe, CPU) runs in the decode pool before an
image is queued; ``infer`` (one forward pass on a batch) runs in the batcher's inference thread.
Decoding, preprocessing, model loading and normalisation all come from ``ssole_hub``; nothing is
re-implemented here. The batch key is the output alone: requests that differ only in
``normalize`` or ``dimensions`` share a forward pass, and each row is normalised or projected
(``FeatureExtractor.postprocess``) afterwards.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from server.settings import ServerSettings
from ssole_hub import FeatureExtractor, Output
from ssole_hub.device_decode import DEVICE_DECODE_CHOICES, EncodedJPEG
from ssole_hub.runtimes.backends import ms_per_image

__all__ = [
    "BackendLoader",
    "EmbeddingBackend",
    "ExtractorBackend",
    "Prepared",
    "load_backend",
]

log = logging.getLogger("server")

Image = torch.Tensor | EncodedJPEG
"""A decoded image: preprocessed ``(3, H, W)``, or a JPEG whose header passed, which the batch
decodes on the model's device (:mod:`ssole_hub.device_decode`)."""

Prepared = tuple[Image, bool, int | None]
"""One queued item: the image, whether its embedding is normalised, and its compact size
(``dimensions``, or ``None`` for the full embedding)."""


class EmbeddingBackend(Protocol):
    """What the HTTP layer and the batcher need from a model."""

    dimensions: dict[str, int]
    """Embedding size per available output (``backbone``, and ``projector`` if present)."""

    backend_name: str
    """What runs the forward pass (``torch``, ``onnx``, ``onnx-bf16``, ``onnx-int8``), shown by
    ``/v1/models``."""

    backend_timings: dict[str, float]
    """Milliseconds per image of each backend ``auto`` timed at load (empty when fixed)."""

    reduced_decoding: bool
    """Whether large JPEGs are decoded at a reduced DCT scale (``ssole_hub``'s guarded
    default), shown by ``/v1/models``."""

    device_decoding: dict[str, Any]
    """Whether JPEGs are decoded on the model's device, why, and the guard's figures
    (:attr:`ssole_hub.FeatureExtractor.device_decoding`), shown by ``/v1/models``."""

    pca: dict[str, Any] | None
    """The sizes ``dimensions`` offers (output, max_dimensions, whiten, images, variance_kept),
    shown by ``/v1/models``; ``None`` without a fitted PCA."""

    def check(self, output: Output, normalize: bool, dimensions: int | None) -> None:
        """Raise ``ValueError`` (saying how to fit a PCA) for options the model cannot give."""
        ...

    def prepare(self, data: bytes) -> Image:
        """Decode and preprocess one encoded image, or only check the header of a JPEG decoded
        on the device; raises ``ssole_hub.images`` errors."""
        ...

    def infer(self, items: list[Prepared], key: Output) -> list[np.ndarray | Exception]:
        """Embed images with the output ``key``: one float32 vector per item, or the decoding
        error of a JPEG that neither the device nor the CPU could decode."""
        ...

    def warmup(self, batch_size: int) -> dict[int, float] | None:
        """Run forward passes so that the first request does not pay for kernel selection;
        returns the forward pass's milliseconds per image at batch sizes up to ``batch_size``
        (what the batcher's target size is chosen from), or ``None`` if not timed."""
        ...


BackendLoader = Callable[[ServerSettings], EmbeddingBackend]
"""Builds the backend from the settings (blocking; the app runs it in a thread at start-up)."""


class ExtractorBackend:
    """Serves one loaded model through one :class:`FeatureExtractor`.

    Args:
        extractor: the extractor; every output it has is served.
    """

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor
        self.dimensions: dict[str, int] = dict(extractor.dims)
        self.backend_name: str = extractor.backend
        self.backend_timings: dict[str, float] = dict(extractor.backend_timings)
        self.reduced_decoding = extractor.decode_options["draft_size"] is not None
        self.device_decoding: dict[str, Any] = dict(extractor.device_decoding)
        pca = extractor.pca
        self.pca: dict[str, Any] | None = (
            None
            if pca is None
            else {
                "output": pca.output,
                "max_dimensions": pca.max_dimensions,
                "whiten": pca.whiten,
                "images": pca.images,
                "variance_kept": {str(k): round(v, 4) for k, v in pca.variance_table().items()},
            }
        )

    def check(self, output: Output, normalize: bool, dimensions: int | None) -> None:
        """The extractor's own check (:meth:`FeatureExtractor.check_options`)."""
        self.extractor.check_options(output, normalize, dimensions)

    def prepare(self, data: bytes) -> Image:
        """Decode ``data`` with the extractor's limits and apply the model's eval transform; a
        JPEG decoded on the device only has its header checked here
        (:meth:`FeatureExtractor.prepare`)."""
        return self.extractor.prepare(data)

    def infer(self, items: list[Prepared], key: Output) -> list[np.ndarray | Exception]:
        """One forward pass over ``items``, then each group of rows that asked for the same
        ``normalize`` and ``dimensions`` made as asked; one float32 vector per item, in order,
        or the error of an image that could not be decoded (the others are computed)."""
        images = self.extractor.finish_batch([image for image, *_ in items])
        ok = [i for i, image in enumerate(images) if isinstance(image, torch.Tensor)]
        vectors: list[Any] = list(images)
        if not ok:
            return vectors
        raw = self.extractor.embed_tensor(
            torch.stack([images[i] for i in ok]), key, normalize=False
        )
        groups: dict[tuple[bool, int | None], list[int]] = defaultdict(list)
        for row, i in enumerate(ok):
            groups[items[i][1:]].append(row)
        for (normalize, dimensions), rows in groups.items():
            made = self.extractor.postprocess(raw[rows], key, normalize, dimensions).numpy()
            for row, vector in zip(rows, made, strict=True):
                vectors[ok[row]] = vector
        return vectors

    def warmup(self, batch_size: int) -> dict[int, float]:
        """The backbone's forward pass timed at batch sizes 1, 2, 4, ... up to ``batch_size``
        (after an untimed pass each, the median of three interleaved rounds:
        :func:`~ssole_hub.runtimes.backends.ms_per_image`): milliseconds per image at each. The
        projector, if served, gets untimed passes at batch sizes 1 and ``batch_size``.

        Three rounds, not two: with two, the median is the mean of two passes, and one disturbed
        pass moved a size's figure by up to 24% (ResNet-18 in torch on 2 CPU cores). The
        cheapest size still varies between starts (there: 8 in 21 of 26 starts, 4 in 3), which
        :func:`~server.batcher.efficient_batch` allows for. Warm-up up to batch 64 takes 7.5 s
        there instead of 5.8 (``bench/batch_pick.py``, BENCHMARKS.md)."""
        shape = self.extractor.data_config["input_size"]
        for n in sorted({1, batch_size}) if "projector" in self.dimensions else ():
            self.extractor.embed_tensor(torch.zeros(n, *shape), "projector")
        sizes = sorted({*(2**k for k in range(batch_size.bit_length())), batch_size})
        passes = {
            n: (functools.partial(self.extractor.embed_tensor, torch.zeros(n, *shape)), n)
            for n in sizes
        }  # embed_tensor returns on the CPU: each timed pass is finished
        return ms_per_image(passes, rounds=3)


def load_backend(settings: ServerSettings) -> ExtractorBackend:
    """Load ``settings.model`` once, with its projector when it has one, on ``settings.backend``
    (OpenVINO models take the calling thread's torch thread count: the inference threads).

    Raises:
        ValueError, FileNotFoundError, ssole_hub.HubFolderError: from the model loader.
    """
    extractor = FeatureExtractor.from_pretrained(
        settings.model,
        with_projector=None,
        model_id=settings.model_id,
        device=None if settings.device == "auto" else settings.device,
        dtype=settings.dtype,
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        backend=settings.backend,
        device_decode=DEVICE_DECODE_CHOICES[settings.decode_on_device],
    )
    log.info("loaded %s: outputs %s, backend %s", settings.model, extractor.dims, extractor.backend)
    return ExtractorBackend(extractor)
