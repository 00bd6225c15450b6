"""Fitting a hub folder's PCA on the user's images: :func:`fit_hub_pca` (``ssole-hub fit-pca``).

The images are embedded by :func:`~ssole_hub.extract.dataset.extract_dataset` (any input it
takes: a folder, a list file, webdataset tars, parquet files; either engine) into a temporary
folder, the PCA is fitted on those embeddings (:func:`ssole_hub.pca.fit_pca`) and written into
the folder with its record and card section (:func:`ssole_hub.hub.compact.add_pca`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssole_hub.extract.dataset import extract_dataset
from ssole_hub.extract.output import read_embeddings
from ssole_hub.hub.compact import add_pca
from ssole_hub.hub.folder import SSOLE_FILE
from ssole_hub.models import Output
from ssole_hub.pca import PCA, fit_pca

__all__ = ["fit_hub_pca"]


def fit_hub_pca(
    folder: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    output: Output = "backbone",
    whiten: bool = False,
    backend: str = "torch",
    progress: bool = True,
    **extract_options: Any,
) -> PCA:
    """Fit a PCA on the hub folder's embeddings of ``inputs`` and write it into the folder
    (``pca.safetensors``, its record in ``ssole.json``, the card's "Compact embeddings"
    section), replacing any earlier one; the folder's other files (ONNX files included) stay.
    Then ``dimensions=k`` works for any ``k`` from 1 to ``min(images - 1, width)``.

    Args:
        folder: a hub folder on disk (``local-dir:PATH`` or the path).
        inputs: the images, anything :func:`~ssole_hub.extract.dataset.extract_dataset` reads;
            like the ones the model will embed, and more of them than the largest size wanted.
            Unreadable ones are skipped (and counted in the record).
        output: the embedding it applies to, ``"backbone"`` or ``"projector"``.
        whiten: divide each coordinate by its standard deviation before the final
            L2-normalisation (PCA-whitening).
        backend: the forward pass of the extraction (default torch, the reference).
        progress: show the extraction's progress bar.
        **extract_options: other options of
            :func:`~ssole_hub.extract.dataset.extract_dataset` (``batch_size``, ``num_workers``,
            ``image_column``, ``engine``, ``device``, ...).

    Returns:
        The fitted PCA.

    Raises:
        FileNotFoundError: ``folder`` is not a hub folder, or ``inputs`` do not exist.
        ValueError: fewer than 2 readable images, bad extraction options, or a ``torchrun`` job
            (fit in one process; ``engine="ray"`` scales out).
        HubFolderError: the folder cannot be read.
    """
    path = Path(os.fspath(folder).removeprefix("local-dir:"))
    if not (path / SSOLE_FILE).is_file():
        raise FileNotFoundError(f"no hub folder at {path} (it has no {SSOLE_FILE})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("fit a PCA in one process, not under torchrun (engine='ray' scales out)")
    with tempfile.TemporaryDirectory(prefix="ssole-fit-pca-") as tmp:
        manifest = extract_dataset(
            path,
            inputs,
            tmp,
            output=output,
            normalize=True,
            backend=backend,
            progress=progress,
            **extract_options,
        )
        embeddings, _ = read_embeddings(tmp)
    if len(embeddings) < 2:
        raise ValueError(
            f"fitting a PCA needs at least 2 readable images; {len(embeddings)} of "
            f"{manifest['num_inputs']} could be embedded"
        )
    pca = fit_pca(embeddings, output=output, whiten=whiten)
    fitted_on = {
        "input_kind": manifest["input_kind"],
        "unreadable": manifest["num_errors"],
        "backend": manifest["backend"],
    }
    add_pca(path, pca, fitted_on)
    return pca
