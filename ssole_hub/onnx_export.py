"""ONNX export of a hub folder, guarded for fidelity: :func:`export_onnx`.

It writes ``onnx/model.onnx`` (float32: the backbone, and the projector as a second output when
the folder has one; dynamic batch size) and, when calibration photos are given,
``onnx/model_int8.onnx`` (static int8 by ``onnxruntime.quantization.quantize_static``, calibrated
on those photos). Before a file is kept, its embeddings are compared with float32 eager torch on
real photos, every output, raw (not normalised):

- the **guard photos** are the calibration photos when given; otherwise scikit-image's bundled
  photos (the ``dev`` extra installs scikit-image). With neither there is nothing real to check
  on, and the export stops and asks for ``calibration``; no noise images are invented;
- a file whose smallest cosine similarity is below its limit (:data:`FIDELITY_LIMITS`: 0.9999
  float32, 0.99 int8) is refused with the shortfall named, and nothing is written;
- the measured figures go into ``ssole.json`` (``"onnx"``) and the model card, and
  :func:`~ssole_hub.onnx_backend.guarded_backends` reads them for ``backend="auto"``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssole_hub.hub.folder import MODEL_CARD_FILE, SSOLE_FILE, read_json
from ssole_hub.hub.load import load_model
from ssole_hub.hub.model_card import with_onnx_section
from ssole_hub.images import decode_image
from ssole_hub.models import SSOLEModel
from ssole_hub.onnx_backend import FIDELITY_LIMITS, INPUT_NAME, ONNX_FILES, open_session
from ssole_hub.preprocessing import resolve_preprocessing

__all__ = ["OPSET", "SKIMAGE_PHOTOS", "export_onnx", "guard_photos"]

OPSET = 17
"""ONNX opset of the exported files (ONNX Runtime >= 1.14 runs it)."""
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")
"""scikit-image's bundled photos: the guard photos when no calibration photos are given."""

Calibration = str | os.PathLike | Sequence[str | os.PathLike]
"""A folder of photos, a text file of paths, or a list of photo paths."""


class _Graph(nn.Module):
    """What the ONNX file computes: backbone features and, if present, projector outputs."""

    def __init__(self, model: SSOLEModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.backbone(images)
        if self.model.projector is None:
            return (features,)
        return features, self.model.projector(features)


def guard_photos(model: nn.Module, calibration: Calibration | None) -> tuple[torch.Tensor, str]:
    """The photos the guard (and int8 calibration) runs on, preprocessed by the one resolver:
    ``(batch, source)`` where source is ``"calibration"`` or ``"scikit-image"``.

    Raises:
        ValueError: no calibration photos and scikit-image is not installed, or no images found.
        ImageDecodeError: a calibration file is not a readable image (names it).
    """
    transform = resolve_preprocessing(model).transform
    if calibration is not None:
        from ssole_hub.extract import list_images

        paths, root = list_images(calibration)
        images = [decode_image(root / p) for p in paths]
        return torch.stack([transform(img) for img in images]), "calibration"
    try:
        from skimage import data
    except ImportError as exc:
        raise ValueError(
            "the fidelity check needs real photos: pass calibration photos (--calibration "
            "FOLDER_OR_LIST) or install scikit-image for its bundled photos"
        ) from exc
    from PIL import Image

    images = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in SKIMAGE_PHOTOS]
    return torch.stack([transform(img) for img in images]), "scikit-image"


def _export_float(model: SSOLEModel, path: Path, input_size: Sequence[int]) -> None:
    outputs = list(model.output_dims)
    kwargs: dict[str, Any] = dict(
        input_names=[INPUT_NAME],
        output_names=outputs,
        dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
        opset_version=OPSET,
        do_constant_folding=True,
    )
    # The TorchScript exporter needs nothing beyond torch; since torch 2.9 it must be asked for.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # The exporter restores the module's own mode afterwards: an eval wrapper keeps the
        # model in eval mode (a training-mode wrapper would leave BatchNorm updating its stats).
        graph = _Graph(model).eval()
        torch.onnx.export(graph, (torch.zeros(1, *input_size),), str(path), **kwargs)


def _quantize(float_path: Path, int8_path: Path, photos: torch.Tensor) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter([{INPUT_NAME: x[None].numpy()} for x in photos])

        def get_next(self) -> dict[str, Any] | None:
            return next(self._feeds, None)

    # The quantizer logs advice to the root logger for every convolution; keep only errors.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(
            str(float_path),
            str(int8_path),
            Photos(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    finally:
        root.setLevel(level)


def _min_cosines(
    model: SSOLEModel, path: Path, backend: str, photos: torch.Tensor
) -> dict[str, float]:
    """Smallest cosine per output between ``path``'s and eager float32 torch's embeddings."""
    from ssole_hub.onnx_backend import OnnxModel

    onnx_model = OnnxModel(open_session(path, path.name), backend, model.pretrained_cfg, path)
    figures = {}
    with torch.inference_mode():
        for output in model.output_dims:
            reference = model(photos, output)
            cos = F.cosine_similarity(onnx_model(photos, output), reference, dim=1)
            figures[output] = round(float(cos.min()), 6)
    return figures


def _guard(model: SSOLEModel, path: Path, backend: str, photos: torch.Tensor) -> dict[str, Any]:
    """Measure ``path`` against torch; raise ``ValueError`` (with the shortfall) below its limit."""
    limit = FIDELITY_LIMITS[backend]
    cosines = _min_cosines(model, path, backend, photos)
    worst = min(cosines, key=cosines.get)
    if cosines[worst] < limit:
        raise ValueError(
            f"refusing to write {ONNX_FILES[backend]}: min cosine to float32 torch on the "
            f"{worst} output is {cosines[worst]:.6f}, {limit - cosines[worst]:.6f} below the "
            f"limit {limit} (on {len(photos)} photos)"
        )
    return {"file": ONNX_FILES[backend], "limit": limit, "min_cosine": cosines, "passed": True}


def export_onnx(
    folder: str | os.PathLike, *, calibration: Calibration | None = None
) -> dict[str, Any]:
    """Write the ONNX files of an existing hub folder, each checked against float32 torch.

    Args:
        folder: a hub folder (as :func:`ssole_hub.export_hub_folder` writes).
        calibration: real photos (a folder, a text file of paths, or a list of paths) to
            calibrate ``onnx/model_int8.onnx`` on; without them only ``onnx/model.onnx`` is
            written (and any older int8 file removed). They are also the guard photos.

    Returns:
        The record written to ``ssole.json`` under ``"onnx"``: per backend its file, limit,
        min cosine per output; and which photos the guard used.

    Raises:
        ImportError: onnx / onnxruntime are missing (the ``[onnx]`` extra).
        ValueError: a file misses its fidelity limit (nothing is written), or no guard photos.
        FileNotFoundError, HubFolderError: the folder is missing or invalid.
    """
    out = Path(folder)
    model = load_model(out, with_projector=None).float().eval()  # an SSOLEModel for a folder
    photos, source = guard_photos(model, calibration)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx.", dir=out))
    try:
        float_path = tmp / Path(ONNX_FILES["onnx"]).name
        _export_float(model, float_path, photos.shape[1:])
        record: dict[str, Any] = {"opset": OPSET, "backends": {}}
        record["backends"]["onnx"] = _guard(model, float_path, "onnx", photos)
        if calibration is not None:
            int8_path = tmp / Path(ONNX_FILES["onnx-int8"]).name
            _quantize(float_path, int8_path, photos)
            record["backends"]["onnx-int8"] = _guard(model, int8_path, "onnx-int8", photos)
            record["backends"]["onnx-int8"]["calibration_photos"] = len(photos)
        record["guard_photos"] = {"source": source, "count": len(photos)}
        record["onnxruntime"] = _onnxruntime_version()
        target = out / Path(ONNX_FILES["onnx"]).parent
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for file in tmp.glob("*.onnx"):
            file.rename(target / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _record(out, record)
    return record


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _record(folder: Path, record: dict[str, Any]) -> None:
    """Store the figures in ``ssole.json`` and the model card."""
    ssole = read_json(folder / SSOLE_FILE, SSOLE_FILE)
    ssole["onnx"] = record
    (folder / SSOLE_FILE).write_text(json.dumps(ssole, indent=2, default=str) + "\n")
    card = folder / MODEL_CARD_FILE
    card.write_text(with_onnx_section(card.read_text(), record))
