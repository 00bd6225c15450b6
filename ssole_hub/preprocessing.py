"""The project's one preprocessing resolver: a model's ``pretrained_cfg`` to timm's eval transform.

The extractor, ``ssole-hub extract``, the server, evaluation and training's kNN monitor all get
their resize, crop and normalisation from :func:`resolve_preprocessing`, so a model is always fed
exactly what its hub folder's ``config.json`` says it was trained on.

timm's usual eval transform (resize the shorter side, centre crop, to tensor, normalise) runs as
:class:`CropResize`: one resample of only the part of the image the crop keeps, then one
conversion to a normalised tensor, for about a third less CPU. It samples the image at the same
points with the same filter as timm's steps; Pillow may resample the rows and the columns in the
other order, which rounds the intermediate image differently, so values differ from timm's by a
mean of 0.01-0.05 levels of 255 (up to about 10 on single values) and embeddings keep a cosine
above 0.99999 (BENCHMARKS.md). Any other pipeline, and any input that is not an RGB PIL image, runs
through timm's transform itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config, resolve_model_data_config
from timm.data.transforms import MaybeToTensor
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping

__all__ = ["CropResize", "Preprocessing", "resolve_preprocessing"]

Transform = Callable[[Any], torch.Tensor]

# Pillow's convolution resamplers, whose resize(box=...) samples a box exactly as a full resize.
_BOX_RESAMPLERS = (
    InterpolationMode.BOX,
    InterpolationMode.BILINEAR,
    InterpolationMode.HAMMING,
    InterpolationMode.BICUBIC,
    InterpolationMode.LANCZOS,
)


class Preprocessing(NamedTuple):
    """A model's data config and the eval transform built from it."""

    config: dict[str, Any]
    """timm's data config: ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``,
    ``mean``, ``std``."""
    transform: Transform
    """RGB PIL image to a normalised ``(3, H, W)`` float tensor (possibly a channels-last view)."""


class CropResize:
    """timm's centre-crop eval transform in one resample: ``Resize(resize_side)``,
    ``CenterCrop(crop)``, ``ToTensor``, ``Normalize(mean, std)``.

    Pillow resamples only the box of the source image that the crop keeps, to the crop's size:
    ``Image.resize(box=...)`` places each output pixel at the same source position, with the
    same filter support, as resizing the whole image and cropping (see the module docstring for
    how far the values agree). The result is a ``(3, H, W)`` view of height-width-channel memory,
    the layout the model runs in (channels last).

    Args:
        resize_side: the shorter side after resizing (torchvision's ``Resize(int)``).
        crop: ``(height, width)`` of the centre crop, at most ``resize_side`` each.
        interpolation: one of Pillow's convolution resamplers (box to Lanczos).
        mean, std: per-channel normalisation of values in [0, 1].
        reference: the equivalent step-by-step transform, for inputs other than RGB PIL images.
    """

    def __init__(
        self,
        resize_side: int,
        crop: tuple[int, int],
        interpolation: InterpolationMode,
        mean: Sequence[float],
        std: Sequence[float],
        reference: Transform,
    ) -> None:
        if max(crop) > resize_side or interpolation not in _BOX_RESAMPLERS:
            raise ValueError(
                f"no one-resample form of a {crop} crop of {resize_side} px with {interpolation}"
            )
        self.resize_side, self.crop, self.interpolation = resize_side, crop, interpolation
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.reference = reference

    def __call__(self, img: Any) -> torch.Tensor:
        """A normalised ``(3, H, W)`` float32 tensor of ``img``'s centre crop."""
        if not isinstance(img, Image.Image) or img.mode != "RGB":
            return self.reference(img)
        height, width = self.crop
        out = img.resize((width, height), pil_modes_mapping[self.interpolation], self.box(img.size))
        # The same arithmetic as ToTensor and Normalize, on height-width-channel values.
        x = torch.from_numpy(np.array(out)).to(torch.float32).div_(255)
        return x.sub_(self.mean).div_(self.std).permute(2, 0, 1)

    def box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The source box ``(left, top, right, bottom)`` that the crop keeps from an image of
        ``size`` (width, height), as torchvision's ``Resize`` and ``CenterCrop`` compute it."""
        width, height = size
        short, long = sorted(size)
        resized_long = int(self.resize_side * long / short)
        if width <= height:
            resized = (self.resize_side, resized_long)
        else:
            resized = (resized_long, self.resize_side)
        crop_h, crop_w = self.crop
        top = round((resized[1] - crop_h) / 2.0)
        left = round((resized[0] - crop_w) / 2.0)
        sx, sy = width / resized[0], height / resized[1]
        return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resize_side={self.resize_side}, crop={self.crop}, "
            f"interpolation={self.interpolation.value}, mean={self.mean.tolist()}, "
            f"std={self.std.tolist()})"
        )


def resolve_preprocessing(model_or_cfg: nn.Module | Mapping[str, Any]) -> Preprocessing:
    """The data config and eval transform of a model (its backbone's ``pretrained_cfg``) or of a
    ``pretrained_cfg`` mapping, through timm's own resolution (run as :class:`CropResize` where
    timm builds the usual centre-crop pipeline)."""
    if isinstance(model_or_cfg, nn.Module):
        config = resolve_model_data_config(getattr(model_or_cfg, "backbone", model_or_cfg))
    else:
        config = resolve_data_config(pretrained_cfg=dict(model_or_cfg))
    timm_transform = create_transform(**config, is_training=False)
    return Preprocessing(config, _one_resample(timm_transform) or timm_transform)


def _one_resample(pipeline: Transform) -> CropResize | None:
    """:class:`CropResize` for timm's ``Resize(int)``, ``CenterCrop``, ``MaybeToTensor``,
    ``Normalize`` pipeline; ``None`` for any other."""
    steps = getattr(pipeline, "transforms", None)
    kinds = (transforms.Resize, transforms.CenterCrop, MaybeToTensor, transforms.Normalize)
    if not (
        isinstance(steps, list)
        and len(steps) == len(kinds)
        and all(type(s) is k for s, k in zip(steps, kinds, strict=True))
    ):
        return None
    resize, crop, _, normalize = steps
    size = resize.size if isinstance(resize.size, int) else list(resize.size)
    if isinstance(size, list) and len(size) == 1:
        size = size[0]
    if not isinstance(size, int) or resize.max_size is not None or normalize.inplace:
        return None
    try:
        return CropResize(
            size, tuple(crop.size), resize.interpolation, normalize.mean, normalize.std, pipeline
        )
    except ValueError:
        return None
