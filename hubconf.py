"""torch.hub entry points: ``torch.hub.load("<this repo>", "ssole_resnet18")``.

Each returns a pretrained, eval-mode model that outputs pooled features; see
``ssole_hub.hub.torch_hub``. (timm's models of the same names, ``timm.create_model("ssole_resnet18")``
after ``import ssole_hub``, follow timm's defaults instead: random init unless
``pretrained=True``, train mode.) ``load_model`` loads any published or local SSOLE model:
``torch.hub.load(repo, "load_model", "hf-hub:ORG/NAME")``.
"""

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]

from ssole_hub.hub.load import load_model  # noqa: E402
from ssole_hub.hub.torch_hub import ssole_resnet18, ssole_resnet50  # noqa: E402

__all__ = ["load_model", "ssole_resnet18", "ssole_resnet50"]
