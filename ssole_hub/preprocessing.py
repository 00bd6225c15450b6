"""The project's one preprocessing resolver: a model's ``pretrained_cfg`` to timm's eval transform.

The extractor, ``ssole-hub extract``, the server, evaluation and training's kNN monitor all get
their resize, crop and normalisation from :func:`resolve_preprocessing`, so a model is always fed
exactly what its hub folder's ``config.json`` says it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config, resolve_model_data_config
from torch import nn

__all__ = ["Preprocessing", "resolve_preprocessing"]


class Preprocessing(NamedTuple):
    """A model's data config and the eval transform built from it."""

    config: dict[str, Any]
    """timm's data config: ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``,
    ``mean``, ``std``."""
    transform: Callable[[Image.Image], torch.Tensor]
    """RGB PIL image to a normalised ``(3, H, W)`` float tensor."""


def resolve_preprocessing(model_or_cfg: nn.Module | Mapping[str, Any]) -> Preprocessing:
    """The data config and eval transform of a model (its backbone's ``pretrained_cfg``) or of a
    ``pretrained_cfg`` mapping, through timm's own resolution."""
    if isinstance(model_or_cfg, nn.Module):
        config = resolve_model_data_config(getattr(model_or_cfg, "backbone", model_or_cfg))
    else:
        config = resolve_data_config(pretrained_cfg=dict(model_or_cfg))
    return Preprocessing(config, create_transform(**config, is_training=False))
