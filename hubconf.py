"""torch.hub entry points: ``torch.hub.load("<this repo>", "ssole_resnet18")``.

Each returns an eval-mode model that outputs pooled features; see ``ssole_hub.torch_hub``.
``load_model`` loads any published or local SSOLE model: ``torch.hub.load(repo, "load_model",
"hf-hub:ORG/NAME")``.
"""

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]

from ssole_hub.hub import load_model  # noqa: E402
from ssole_hub.torch_hub import ssole_resnet18, ssole_resnet50  # noqa: E402

__all__ = ["load_model", "ssole_resnet18", "ssole_resnet50"]
