"""SSOLE Hub: self-supervised SSOLE ResNets for timm, torch.hub and HTTP.

``import ssole_hub`` registers ``ssole_resnet18`` and ``ssole_resnet50`` with timm: build them with
``timm.create_model("ssole_resnet18", ...)``. The ``torch.hub`` entry points of the same names
(``hubconf.py``) are pretrained, eval-mode feature extractors.

It also makes timm's own Hub downloads fail at once when a file is neither cached nor
downloadable (:func:`ssole_hub.hub.fetch.fail_fast_timm_downloads`): plain
``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` then raises
:class:`HubUnavailableError` naming the repo instead of retrying for half a minute.
"""

from ssole_hub.errors import HubFolderError
from ssole_hub.extract.compact import fit_hub_pca
from ssole_hub.extract.dataset import extract_dataset
from ssole_hub.extract.output import read_embeddings
from ssole_hub.extractor import FeatureExtractor
from ssole_hub.hub.convert import ConversionError, convert_checkpoint
from ssole_hub.hub.export import HubFolder, export_hub_folder, validate_hub_folder
from ssole_hub.hub.fetch import HubUnavailableError, fail_fast_timm_downloads
from ssole_hub.hub.load import load_model
from ssole_hub.hub.onnx_export import export_onnx
from ssole_hub.hub.publish import push_to_hub
from ssole_hub.images import (
    CorruptImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
)
from ssole_hub.loss import SSOLELoss, SSOLELossParts, nuclear_norm, ssole_loss
from ssole_hub.models import Output, SSOLEModel, SSOLEProjector, l2_normalize
from ssole_hub.pca import PCA, fit_pca
from ssole_hub.preprocessing import Preprocessing, resolve_preprocessing
from ssole_hub.version import __version__

__all__ = [
    "PCA",
    "ConversionError",
    "CorruptImageError",
    "FeatureExtractor",
    "HubFolder",
    "HubFolderError",
    "HubUnavailableError",
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
    "extract_dataset",
    "fit_hub_pca",
    "fit_pca",
    "l2_normalize",
    "load_model",
    "nuclear_norm",
    "push_to_hub",
    "read_embeddings",
    "resolve_preprocessing",
    "ssole_loss",
    "validate_hub_folder",
]

fail_fast_timm_downloads()
