"""SSOLE Hub: self-supervised SSOLE ResNets for timm, torch.hub and HTTP.

``import ssole_hub`` registers ``ssole_resnet18`` and ``ssole_resnet50`` with timm.
"""

from ssole_hub.loss import SSOLELoss, SSOLELossParts, nuclear_norm, ssole_loss
from ssole_hub.models import SSOLEEncoder, SSOLEProjector, ssole_resnet18, ssole_resnet50

__version__ = "0.1.0"

__all__ = [
    "SSOLEEncoder",
    "SSOLELoss",
    "SSOLELossParts",
    "SSOLEProjector",
    "__version__",
    "nuclear_norm",
    "ssole_loss",
    "ssole_resnet18",
    "ssole_resnet50",
]
