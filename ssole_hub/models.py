"""SSOLE ResNets registered with timm, the SSOLE projector and the multi-view encoder.

The backbones are timm's own ResNet-18/50 (state dicts interchangeable with ``resnet18`` /
``resnet50``), built with ``num_classes=0`` so they output pooled features. Their pretrained
configs live in one table, in timm's style, and point at Hugging Face Hub repos named
``<org>/<model>.<tag>``; the org comes from the ``SSOLE_HUB_ORG`` environment variable.

The builders are reached through timm only (``timm.create_model("ssole_resnet18", ...)``: timm's
defaults, random init and train mode unless asked otherwise); the package does not export them,
because ``torch.hub``'s ``ssole_resnet18`` (:mod:`ssole_hub.hub.torch_hub`) is a different thing:
pretrained weights, eval mode. With ``pretrained=True`` they fail at once, naming the ways out,
when the weights are neither cached nor downloadable: ``import ssole_hub`` puts one lookup in
front of timm's Hub downloads (:func:`ssole_hub.hub.fetch.fail_fast_timm_downloads`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, _create_resnet
from torch import nn

__all__ = [
    "HUB_ORG",
    "OUTPUTS",
    "RECIPE_MEAN",
    "RECIPE_STD",
    "Output",
    "SSOLEModel",
    "SSOLEProjector",
    "l2_normalize",
]

HUB_ORG = os.environ.get("SSOLE_HUB_ORG", "ssole-hub")
"""Hugging Face org (or user) that holds the published checkpoints (``SSOLE_HUB_ORG``)."""

RECIPE_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of the released SSOLE recipe's input normalisation."""
RECIPE_STD = (0.228, 0.224, 0.225)
"""Per-channel std of the released SSOLE recipe (0.228, not ImageNet's 0.229, as released)."""


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": RECIPE_MEAN,
        "std": RECIPE_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


_pretrained = {
    # The released SSOLE recipe: ImageNet-100, 4 views of 224 px, 100 epochs.
    "ssole_resnet18.in100_m4": _cfg(),
    # The ImageNet-1k recipe: ResNet-50, 8 views.
    "ssole_resnet50.in1k_m8": _cfg(),
}
# Every tag lives in its own Hub repo, ``<org>/<model>.<tag>``, and is read only from its
# safetensors file (timm would otherwise fall back to a pickled ``pytorch_model.bin``).
default_cfgs = generate_default_cfgs(
    {
        k: {**v, "hf_hub_id": f"{HUB_ORG}/{k}", "hf_hub_filename": "model.safetensors"}
        for k, v in _pretrained.items()
    }
)


def _create(
    variant: str, pretrained: bool, block: type[nn.Module], layers: list[int], **kwargs
) -> ResNet:
    kwargs.setdefault("num_classes", 0)
    return _create_resnet(variant, pretrained, **dict(block=block, layers=layers), **kwargs)


@register_model
def ssole_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 pre-trained with SSOLE; outputs 512-d pooled features."""
    return _create("ssole_resnet18", pretrained, BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def ssole_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 pre-trained with SSOLE; outputs 2048-d pooled features."""
    return _create("ssole_resnet50", pretrained, Bottleneck, [3, 4, 6, 3], **kwargs)


class SSOLEProjector(nn.Sequential):
    """The SSOLE projector: an MLP of ``depth`` linear layers with ReLU between them.

    The released recipe uses depth 3, hidden 4096, output 4096 and no BatchNorm. The output is
    *not* normalised here: :func:`l2_normalize` does that where it is wanted.

    Args:
        in_dim: backbone feature dimension (512 for ResNet-18, 2048 for ResNet-50).
        hidden_dim: width of the hidden layers.
        out_dim: embedding dimension ``d`` seen by the loss.
        depth: number of linear layers, at least 1.
        batch_norm: insert ``BatchNorm1d`` after each hidden linear layer.

    Raises:
        ValueError: if a dimension or the depth is not positive.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 4096,
        out_dim: int = 4096,
        depth: int = 3,
        batch_norm: bool = False,
    ) -> None:
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(
                f"projector dims must be positive, got {in_dim}, {hidden_dim}, {out_dim}"
            )
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(depth - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        super().__init__(*layers)
        self.config = dict(
            in_dim=in_dim,
            hidden_dim=hidden_dim,
            out_dim=out_dim,
            depth=depth,
            batch_norm=batch_norm,
        )


Output = Literal["backbone", "projector"]
"""Which embedding a model returns: pooled backbone features or projector outputs."""

OUTPUTS: tuple[Output, ...] = ("backbone", "projector")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm, in float32: the project's one normalisation."""
    return F.normalize(x.float(), dim=-1)


class SSOLEModel(nn.Module):
    """A timm backbone and an optional SSOLE projector: the one model that trains and embeds.

    ``forward(images, output, normalize)`` returns pooled backbone features or projector outputs
    for images ``(n, C, H, W)``. Training flattens its views ``(B, N, C, H, W)`` into the batch
    and asks for raw projector outputs; inference (:class:`~ssole_hub.FeatureExtractor`, the
    server, evaluation) asks for either output. The state dict has ``backbone.*`` keys (timm
    names) and ``projector.*`` keys, the layout that checkpoints store and hub folders export.

    Args:
        backbone: a timm model built with ``num_classes=0`` (pooled features out).
        projector: the projector, or ``None`` for a backbone-only model.
        metadata: training metadata (dataset, epochs, ...) that came with the weights.
    """

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.metadata = dict(metadata or {})

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The backbone's timm pretrained config (preprocessing, source)."""
        return getattr(self.backbone, "pretrained_cfg", None) or {}

    @property
    def num_features(self) -> int:
        """Width of the pooled backbone features (timm's meaning)."""
        return int(self.backbone.num_features)

    @property
    def output_dims(self) -> dict[Output, int]:
        """Embedding width per available output (``backbone``, and ``projector`` if present)."""
        dims: dict[Output, int] = {"backbone": self.num_features}
        if self.projector is not None:
            linears = [m for m in self.projector.modules() if isinstance(m, nn.Linear)]
            dims["projector"] = linears[-1].out_features if linears else self.num_features
        return dims

    def forward(
        self, images: torch.Tensor, output: Output | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """Embed a batch of images ``(n, C, H, W)``; returns ``(n, d)``.

        Args:
            images: a preprocessed image batch.
            output: ``"backbone"`` or ``"projector"``; default the projector when the model has
                one, else the backbone.
            normalize: L2-normalise each row (:func:`l2_normalize`, float32 out).

        Raises:
            ValueError: an unknown ``output``, ``"projector"`` for a model without one, or
                ``images`` that are not 4-dimensional.
        """
        if output is None:
            output = "backbone" if self.projector is None else "projector"
        if output not in OUTPUTS:
            raise ValueError(f"output must be 'backbone' or 'projector', got {output!r}")
        if output == "projector" and self.projector is None:
            raise ValueError(
                "output='projector' needs a model with a projector; this one has none "
                "(load it with its projector, or ask for output='backbone')"
            )
        if images.ndim != 4:
            raise ValueError(f"images must be (n, C, H, W), got shape {tuple(images.shape)}")
        z = self.backbone(images)
        if output == "projector":
            z = self.projector(z)
        return l2_normalize(z) if normalize else z
