"""``torch.hub`` entry points (re-exported by ``hubconf.py``): SSOLE backbones, pretrained by default.

They share their names with the timm models ``import ssole_hub`` registers, but not their
meaning: these load the released weights and return eval-mode feature extractors, while
``timm.create_model("ssole_resnet18")`` follows timm's defaults (random init, train mode). So the
package exports neither; timm's are reached through timm, these through ``torch.hub``.
"""

from __future__ import annotations

from torch import nn

from ssole_hub.hub.load import load_model

__all__ = ["ssole_resnet18", "ssole_resnet50"]


def _entry(arch: str, pretrained: bool, tag: str | None, with_projector: bool) -> nn.Module:
    return load_model(
        f"{arch}.{tag}" if tag else arch, pretrained=pretrained, with_projector=with_projector
    )


def ssole_resnet18(
    pretrained: bool = True, tag: str | None = None, with_projector: bool = False
) -> nn.Module:
    """SSOLE ResNet-18 (eval mode, 512-d pooled features); ``tag`` picks the recipe (default
    ``in100_m4``), ``with_projector`` adds the projector (raw projector outputs)."""
    return _entry("ssole_resnet18", pretrained, tag, with_projector)


def ssole_resnet50(
    pretrained: bool = True, tag: str | None = None, with_projector: bool = False
) -> nn.Module:
    """SSOLE ResNet-50 (eval mode, 2048-d pooled features); ``tag`` picks the recipe (default
    ``in1k_m8``), ``with_projector`` adds the projector (raw projector outputs)."""
    return _entry("ssole_resnet50", pretrained, tag, with_projector)
