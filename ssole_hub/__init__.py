"""SSOLE Hub: self-supervised SSOLE ResNets for timm, torch.hub and HTTP.

``import ssole_hub`` registers ``ssole_resnet18`` and ``ssole_resnet50`` with timm.
"""

from ssole_hub.extractor import FeatureExtractor
from ssole_hub.hub import (
    HubFolder,
    HubFolderError,
    SSOLEFeatureModel,
    export_hub_folder,
    load_model,
    push_to_hub,
    validate_hub_folder,
)
from ssole_hub.images import (
    CorruptImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
)
from ssole_hub.loss import SSOLELoss, SSOLELossParts, nuclear_norm, ssole_loss
from ssole_hub.models import SSOLEEncoder, SSOLEProjector, ssole_resnet18, ssole_resnet50

__version__ = "0.1.0"

__all__ = [
    "CorruptImageError",
    "FeatureExtractor",
    "HubFolder",
    "HubFolderError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "SSOLEEncoder",
    "SSOLEFeatureModel",
    "SSOLELoss",
    "SSOLELossParts",
    "SSOLEProjector",
    "UnsupportedImageError",
    "__version__",
    "decode_image",
    "export_hub_folder",
    "load_model",
    "nuclear_norm",
    "push_to_hub",
    "ssole_loss",
    "ssole_resnet18",
    "ssole_resnet50",
    "validate_hub_folder",
]
