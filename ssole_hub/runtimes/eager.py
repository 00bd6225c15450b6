"""The ``torch`` backend: eager PyTorch on any device, in the compute dtype asked for.

:class:`~ssole_hub.extractor.FeatureExtractor` runs a private eval-mode copy of the model
(:func:`inference_model`) on :func:`default_device` in :func:`resolve_dtype`'s dtype.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ssole_hub.models import SSOLEModel

__all__ = ["default_device", "inference_model", "resolve_dtype"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The compute dtype: ``None`` / ``"auto"`` means bfloat16 on a CUDA device that supports it
    (float16 on older GPUs) and float32 elsewhere.

    Raises:
        ValueError: an unknown dtype name, or a dtype that is not a float type.
    """
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def default_device(device: torch.device | str | None) -> torch.device:
    """``device``, or CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_model(model: nn.Module) -> SSOLEModel:
    """A private eval-mode copy of ``model`` as an :class:`SSOLEModel`; ``model`` is untouched."""
    if not isinstance(model, SSOLEModel):
        projector = getattr(model, "projector", None)
        backbone = getattr(model, "backbone", None)
        model = SSOLEModel(backbone, projector) if backbone is not None else SSOLEModel(model)
    return copy.deepcopy(model).eval().requires_grad_(False)
