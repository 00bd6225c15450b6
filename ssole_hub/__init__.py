"""SSOLE Hub: self-supervised SSOLE ResNets for timm, torch.hub and HTTP.

``import ssole_hub`` registers ``ssole_resnet18`` and ``ssole_resnet50`` with timm.
"""

from ssole_hub.convert import ConversionError, convert_checkpoint
from ssole_hub.extractor import FeatureExtractor
from ssole_hub.hub import (
    HubFolder,
    HubFolderError,
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
from ssole_hub.models import (
    Output,
    SSOLEModel,
    SSOLEProjector,
    l2_normalize,
    ssole_resnet18,
    ssole_resnet50,
)
from ssole_hub.onnx_export import export_onnx
from ssole_hub.preprocessing import Preprocessing, resolve_preprocessing

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "CorruptImageError",
    "FeatureExtractor",
    "HubFolder",
    "HubFolderError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "Output",
    "Preprocessing",
    "SSOLELoss",
    "SSOLELossParts",
    "SSOLEModel",
    "SSOLEProjector",
    "UnsupportedImageError",
    "__version__",
    "convert_checkpoint",
    "decode_image",
    "export_hub_folder",
    "export_onnx",
    "l2_normalize",
    "load_model",
    "nuclear_norm",
    "push_to_hub",
    "resolve_preprocessing",
    "ssole_loss",
    "ssole_resnet18",
    "ssole_resnet50",
    "validate_hub_folder",
]
