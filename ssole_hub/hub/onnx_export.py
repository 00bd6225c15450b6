"""ONNX export of a hub folder, guarded for fidelity: :func:`export_onnx`.

It writes ``onnx/model.onnx`` (float32: the backbone, and the projector as a second output when
the folder has one; dynamic batch size) and, when calibration photos are given,
``onnx/model_int8.onnx`` (static int8 by ``onnxruntime.quantization.quantize_static``, calibrated
on those photos). Each backend that runs the files (:mod:`ssole_hub.runtimes.openvino`: ``onnx``,
``onnx-bf16``, ``onnx-int8``, all on OpenVINO) is compared with float32 eager torch on real
photos, every output, raw (not normalised):

- the **guard photos** are the calibration photos when given; otherwise scikit-image's bundled
  photos (the ``dev`` extra installs scikit-image). With neither there is nothing real to check
  on, and the export stops and asks for ``calibration``; no noise images are invented;
- two figures per output: the smallest cosine similarity (limits in :data:`FIDELITY_LIMITS`:
  0.9999 float32, 0.999 bfloat16, 0.99 int8), and the **neighbour agreement**: how many of each
  photo's nearest neighbours among the photos stay the same (at least
  :data:`NEIGHBOUR_AGREEMENT_LIMIT`; measured from 5 photos on). Cosine alone let an int8 file
  through that lost 4 kNN points;
- a file that misses a limit is refused with the shortfall named. When the float32 file
  (``onnx``) misses, nothing is written (every backend derives from it). When only the int8 file
  misses, the float32 file is written and the int8 refusal is recorded (``"written": false``,
  its figures and shortfalls) and warned about (:class:`OnnxFileRefusedWarning`, with the ways
  out). ``onnx-bf16`` runs the float32 file, so missing its limit only marks it not passed, and
  ``auto`` does not pick it;
- the measured figures go into ``ssole.json`` (``"onnx"``) and the model card, and
  :func:`~ssole_hub.hub.load.guarded_backends` reads them for ``backend="auto"``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
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
from ssole_hub.preprocessing import resolve_preprocessing
from ssole_hub.runtimes.backends import (
    BACKEND_FILES,
    FIDELITY_LIMITS,
    INPUT_NAME,
    NEIGHBOUR_AGREEMENT_LIMIT,
    ONNX_FILES,
    PRECISIONS,
    Backend,
)
from ssole_hub.runtimes.openvino import OnnxModel, open_session

__all__ = [
    "NEIGHBOUR_K",
    "OPSET",
    "SKIMAGE_PHOTOS",
    "OnnxFileRefusedWarning",
    "export_onnx",
    "guard_photos",
    "neighbour_agreement",
    "refusal_message",
]

OPSET = 17
"""ONNX opset of the exported files."""
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")
"""scikit-image's bundled photos: the guard photos when no calibration photos are given."""
NEIGHBOUR_K = 10
"""Neighbours per photo in the retrieval check (fewer when there are under 21 photos)."""

Calibration = str | os.PathLike | Sequence[str | os.PathLike]
"""A folder of photos, a text file of paths, or a list of photo paths."""


class OnnxFileRefusedWarning(UserWarning):
    """An ONNX file was refused by its fidelity check and not written, while the export went on
    (the int8 file, when the float32 file passed). The message has the figures, the limits and
    the ways out; ``ssole.json`` records the same figures."""


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
        from ssole_hub.images import list_images

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


def neighbour_agreement(reference: torch.Tensor, candidate: torch.Tensor, k: int) -> float:
    """Mean share of each row's ``k`` nearest other rows (by cosine) in ``reference`` that are
    also its ``k`` nearest in ``candidate``: 1.0 when retrieval over the rows is unchanged."""

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.double(), dim=1)
        similarity = (x @ x.T).fill_diagonal_(-float("inf"))
        return similarity.topk(k, dim=1).indices

    pairs = zip(neighbours(reference).tolist(), neighbours(candidate).tolist(), strict=True)
    return sum(len(set(a) & set(b)) for a, b in pairs) / (k * len(reference))


def _figures(
    model: SSOLEModel, onnx_model: OnnxModel, photos: torch.Tensor
) -> tuple[dict[str, float], dict[str, float]]:
    """Per output: the smallest cosine between the backend's and eager float32 torch's
    embeddings, and their neighbour agreement (none with fewer than 5 photos)."""
    k = min(NEIGHBOUR_K, (len(photos) - 1) // 2)
    cosines, agreement = {}, {}
    with torch.inference_mode():
        for output in model.output_dims:
            reference = model(photos, output)
            embeddings = onnx_model(photos, output)
            cos = F.cosine_similarity(embeddings, reference, dim=1)
            cosines[output] = round(float(cos.min()), 6)
            if k >= 2:
                agreement[output] = round(neighbour_agreement(reference, embeddings, k), 4)
    return cosines, agreement


def _guard(
    model: SSOLEModel, path: Path, backend: Backend, photos: torch.Tensor, limit: float
) -> dict[str, Any]:
    """Measure ``backend`` on ``path`` against torch: the figures, and whether they keep the
    min-cosine ``limit`` and the neighbour-agreement limit (the shortfalls named if not)."""
    session = open_session(path, path.name, precision=PRECISIONS[backend])
    onnx_model = OnnxModel(session, backend, model.pretrained_cfg, path)
    cosines, agreement = _figures(model, onnx_model, photos)
    shortfalls = [
        f"min cosine to float32 torch on the {out} output is {value:.6f}, "
        f"{limit - value:.6f} below the limit {limit}"
        for out, value in cosines.items()
        if value < limit
    ] + [
        f"neighbour agreement with float32 torch on the {out} output is {value:.4f}, below "
        f"the limit {NEIGHBOUR_AGREEMENT_LIMIT}"
        for out, value in agreement.items()
        if value < NEIGHBOUR_AGREEMENT_LIMIT
    ]
    return {
        "file": BACKEND_FILES[backend],
        "precision": onnx_model.precision,
        "limit": limit,
        "min_cosine": cosines,
        "neighbour_agreement": agreement,
        "neighbour_agreement_limit": NEIGHBOUR_AGREEMENT_LIMIT,
        "passed": not shortfalls,
        **({"shortfalls": shortfalls} if shortfalls else {}),
    }


def _check_limits(limits: Mapping[str, float] | None) -> dict[str, float]:
    """:data:`FIDELITY_LIMITS` with ``limits`` over them.

    Raises:
        ValueError: an unknown backend, or a limit outside (0, 1].
    """
    merged = dict(FIDELITY_LIMITS)
    for backend, limit in (limits or {}).items():
        if backend not in FIDELITY_LIMITS:
            raise ValueError(
                f"no fidelity limit for backend {backend!r}; limits exist for "
                f"{', '.join(FIDELITY_LIMITS)}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 < limit <= 1:
            raise ValueError(
                f"the min-cosine limit of {backend} must be a number in (0, 1], got {limit!r}"
            )
        merged[backend] = float(limit)
    return merged


def refusal_message(folder: str | os.PathLike, record: Mapping[str, Any]) -> str | None:
    """What to tell a user whose int8 file was refused (``record`` as :func:`export_onnx`
    returns it): the file, the shortfalls with their figures and limits, what was written
    instead, and the ways out. ``None`` when no file was refused."""
    backends = record.get("backends") or {}
    int8 = backends.get("onnx-int8") or {}
    if int8.get("written") is not False:
        return None
    photos = record.get("guard_photos") or {}
    usable = [b for b in ("onnx", "onnx-bf16") if (backends.get(b) or {}).get("passed")]
    return (
        f"{int8['file']} was refused and not written: {'; '.join(int8['shortfalls'])} (on "
        f"{photos.get('count', '?')} {photos.get('source', '')} photos). {ONNX_FILES['onnx']} "
        f"(float32) passed and was written: {'backends' if len(usable) > 1 else 'backend'} "
        f"{' and '.join(usable)} can run it, and auto picks the fastest. For an int8 file, "
        "calibrate on other or more photos, like the "
        f"ones the model will embed: ssole-hub export --out {os.fspath(folder)} --onnx "
        "--calibration PHOTOS (this replaces the folder's ONNX files); or leave out "
        "--calibration to keep only the float32 file."
    )


def export_onnx(
    folder: str | os.PathLike,
    *,
    calibration: Calibration | None = None,
    limits: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Write the ONNX files of an existing hub folder, each checked against float32 torch.

    The folder's ``onnx/`` is replaced as a whole, so running it again on the same folder (say,
    with other calibration photos) is the way to redo its ONNX files.

    Args:
        folder: a hub folder (as :func:`ssole_hub.export_hub_folder` writes).
        calibration: real photos (a folder, a text file of paths, or a list of paths) to
            calibrate ``onnx/model_int8.onnx`` on; without them only ``onnx/model.onnx`` is
            written (and any older int8 file removed). They are also the guard photos.
        limits: min-cosine limits per backend (``"onnx"``, ``"onnx-bf16"``, ``"onnx-int8"``)
            over :data:`~ssole_hub.runtimes.backends.FIDELITY_LIMITS`, e.g. ``{"onnx-int8": 0.995}``
            for a stricter int8 check; each in (0, 1].

    Returns:
        The record written to ``ssole.json`` under ``"onnx"``: per backend its file, whether
        the file was written (``onnx``, ``onnx-int8``), the precision it ran at, its limits, min
        cosine and neighbour agreement per output, whether it passed and, if not, its
        shortfalls; which photos the guard used; the runtime versions.

    Warns:
        OnnxFileRefusedWarning: the int8 file missed a limit and was not written (the float32
            file was); the message has the figures, the limits and the ways out.

    Raises:
        ImportError: onnx, onnxruntime or openvino is missing (the ``[onnx]`` extra).
        ValueError: the float32 file misses its fidelity limit (nothing is written), no guard
            photos, or a bad ``limits`` entry.
        FileNotFoundError, HubFolderError: the folder is missing or invalid.
    """
    out = Path(folder)
    checked_limits = _check_limits(limits)
    model = load_model(out, with_projector=None).float().eval()  # an SSOLEModel for a folder
    photos, source = guard_photos(model, calibration)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx.", dir=out))
    try:
        record = _write_and_guard(model, tmp, photos, calibration is not None, checked_limits)
        record["guard_photos"] = {"source": source, "count": len(photos)}
        record["runtime"] = _versions()
        target = out / Path(ONNX_FILES["onnx"]).parent
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for file in tmp.glob("*.onnx"):
            file.rename(target / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _record(out, record)
    message = refusal_message(out, record)
    if message:
        warnings.warn(message, OnnxFileRefusedWarning, stacklevel=2)
    return record


def _write_and_guard(
    model: SSOLEModel,
    tmp: Path,
    photos: torch.Tensor,
    calibrate: bool,
    limits: Mapping[str, float],
) -> dict[str, Any]:
    """Write the files into ``tmp`` and guard them; a refused int8 file is deleted there.

    Raises:
        ValueError: the float32 file misses a limit (names the shortfalls).
    """
    float_path = tmp / Path(ONNX_FILES["onnx"]).name
    _export_float(model, float_path, photos.shape[1:])
    backends: dict[str, dict[str, Any]] = {}
    for backend in ("onnx", "onnx-bf16"):
        backends[backend] = _guard(model, float_path, backend, photos, limits[backend])
    if not backends["onnx"]["passed"]:
        raise ValueError(
            f"refusing to write {ONNX_FILES['onnx']}: {'; '.join(backends['onnx']['shortfalls'])}"
            f" (on {len(photos)} photos); no ONNX file was written"
        )
    backends["onnx"]["written"] = True
    if calibrate:
        int8_path = tmp / Path(ONNX_FILES["onnx-int8"]).name
        _quantize(float_path, int8_path, photos)
        int8 = _guard(model, int8_path, "onnx-int8", photos, limits["onnx-int8"])
        int8.update(written=int8["passed"], calibration_photos=len(photos))
        if not int8["passed"]:
            int8_path.unlink()
        backends["onnx-int8"] = int8
    return {"opset": OPSET, "backends": backends}


def _versions() -> dict[str, str]:
    """The runtime that ran the guard (OpenVINO) and the quantizer (ONNX Runtime)."""
    import onnxruntime
    import openvino

    return {"openvino": openvino.__version__, "onnxruntime_quantizer": onnxruntime.__version__}


def _record(folder: Path, record: dict[str, Any]) -> None:
    """Store the figures in ``ssole.json`` and the model card."""
    ssole = read_json(folder / SSOLE_FILE, SSOLE_FILE)
    ssole["onnx"] = record
    (folder / SSOLE_FILE).write_text(json.dumps(ssole, indent=2, default=str) + "\n")
    card = folder / MODEL_CARD_FILE
    card.write_text(with_onnx_section(card.read_text(), record))
