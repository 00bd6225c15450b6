"""SSOLE ResNets registered with timm, the SSOLE projector and the multi-view encoder.

The backbones are timm's own ResNet-18/50 (state dicts interchangeable with ``resnet18`` /
``resnet50``), built with ``num_classes=0`` so they output pooled features. Their pretrained
configs live in one table, in timm's style, and point at Hugging Face Hub repos named
``<org>/<model>.<tag>``; the org comes from the ``SSOLE_HUB_ORG`` environment variable.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, _create_resnet
from torch import nn

__all__ = ["HUB_ORG", "SSOLEEncoder", "SSOLEProjector", "ssole_resnet18", "ssole_resnet50"]

HUB_ORG = os.environ.get("SSOLE_HUB_ORG", "ssole-hub")
"""Hugging Face org (or user) that holds the published checkpoints (``SSOLE_HUB_ORG``)."""

RECIPE_MEAN = (0.485, 0.456, 0.406)
RECIPE_STD = (0.228, 0.224, 0.225)


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
    *not* normalised here; :class:`SSOLEEncoder` L2-normalises it.

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


class SSOLEEncoder(nn.Module):
    """Backbone + projector: maps views ``(B, N, C, H, W)`` to unit-norm embeddings ``(B, N, d)``.

    The state dict has ``backbone.*`` keys (timm names) and ``projector.*`` keys, which is the
    layout training checkpoints store and :mod:`ssole_hub.hub` exports. ``normalize=False``
    returns raw projector outputs (for losses such as VICReg that expect them).
    """

    def __init__(
        self, backbone: nn.Module, projector: SSOLEProjector, normalize: bool = True
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.normalize = normalize

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """Embed ``views`` of shape ``(B, N, C, H, W)``; returns ``(B, N, d)`` in float32, rows
        L2-normalised unless ``normalize`` is off.

        Raises:
            ValueError: if ``views`` is not 5-dimensional.
        """
        if views.ndim != 5:
            raise ValueError(f"views must be (B, N, C, H, W), got shape {tuple(views.shape)}")
        b, n = views.shape[:2]
        feats = self.backbone(views.flatten(0, 1))
        z = self.projector(feats)
        z = z.float().view(b, n, -1)
        return F.normalize(z, dim=-1) if self.normalize else z
