"""The model side of the server: :class:`~ssole_hub.FeatureExtractor` behind two calls.

``prepare`` (decode + preprocess one image, thread-safe, CPU) runs in the decode pool before an
image is queued; ``infer`` (one forward pass on a batch) runs in the batcher's worker thread.
Decoding, preprocessing and model loading all come from ``ssole_hub``; nothing is re-implemented
here. One model is loaded once and shared by the (output, normalize) variants it serves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Protocol

import numpy as np
import torch

from server.settings import ServerSettings
from ssole_hub import FeatureExtractor, HubFolderError, load_model

__all__ = [
    "BackendLoader",
    "EmbeddingBackend",
    "ExtractorBackend",
    "init_decode_thread",
    "load_backend",
]

log = logging.getLogger("server")


class EmbeddingBackend(Protocol):
    """What the HTTP layer and the batcher need from a model."""

    dimensions: dict[str, int]
    """Embedding size per available output (``backbone``, and ``projector`` if present)."""

    def prepare(self, data: bytes) -> torch.Tensor:
        """Decode and preprocess one encoded image; raises ``ssole_hub.images`` errors."""
        ...

    def infer(self, items: list[torch.Tensor], key: Hashable) -> list[np.ndarray]:
        """Embed preprocessed images; ``key`` is ``(output, normalize)``."""
        ...

    def warmup(self, batch_size: int) -> None:
        """Run forward passes so that the first request does not pay for kernel selection."""
        ...


BackendLoader = Callable[[ServerSettings], EmbeddingBackend]
"""Builds the backend from the settings (blocking; the app runs it in a thread at start-up)."""


class ExtractorBackend:
    """Serves one loaded model through :class:`FeatureExtractor` s that share its weights.

    Args:
        extractors: ``{(output, normalize): FeatureExtractor}``, all built on the same model;
            must include ``("backbone", True)``.

    Raises:
        ValueError: if the backbone variant is missing.
    """

    def __init__(self, extractors: dict[tuple[str, bool], FeatureExtractor]) -> None:
        if ("backbone", True) not in extractors:
            raise ValueError("an ExtractorBackend needs the ('backbone', True) extractor")
        self._extractors = extractors
        self._base = extractors[("backbone", True)]
        self.dimensions = {output: fx.dim for (output, _), fx in extractors.items()}

    def prepare(self, data: bytes) -> torch.Tensor:
        """Decode ``data`` with the extractor's limits and apply the model's eval transform."""
        return self._base.transform(self._base.load_image(data))

    def infer(self, items: list[torch.Tensor], key: Hashable) -> list[np.ndarray]:
        """One forward pass over ``items``; returns one float32 vector per item, in order."""
        out = self._extractors[key].embed_tensor(torch.stack(items))
        return list(out.numpy())

    def warmup(self, batch_size: int) -> None:
        """Forward passes at batch size 1 and ``batch_size`` through each network served."""
        # Variants differing only in normalisation share a network: warm each network once.
        for (_, normalize), fx in self._extractors.items():
            if normalize:
                for n in sorted({1, batch_size}):
                    fx.warmup(n)


def init_decode_thread() -> None:
    """Make torch single-threaded in the calling (decode) thread.

    The decode pool is the parallelism of preprocessing; letting each of its threads also fork
    intra-op threads for small tensor ops oversubscribes the cores that the forward pass needs
    (torch's thread count is per thread, so the inference thread keeps its own).
    """
    torch.set_num_threads(1)


def load_backend(settings: ServerSettings) -> ExtractorBackend:
    """Load ``settings.model`` once, with its projector when it has one.

    Raises:
        ValueError, FileNotFoundError, ssole_hub.hub.HubFolderError: from the model loader.
    """
    device = None if settings.device == "auto" else settings.device
    try:
        model = load_model(settings.model, with_projector=True)
    except (HubFolderError, FileNotFoundError) as exc:
        log.warning("serving %s without a projector (%s)", settings.model, exc)
        model = load_model(settings.model)
    outputs = ["backbone", "projector"] if hasattr(model, "projector") else ["backbone"]
    # Four light wrappers around one set of weights: normalisation stays inside FeatureExtractor.
    extractors = {
        (output, normalize): FeatureExtractor(
            model,
            model_id=settings.model_id,
            device=device,
            dtype=settings.dtype,
            output=output,
            normalize=normalize,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
        )
        for output in outputs
        for normalize in (True, False)
    }
    return ExtractorBackend(extractors)
