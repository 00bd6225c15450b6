"""Compact embeddings in a hub folder: its fitted PCA (:data:`~ssole_hub.pca.PCA_FILE`), the
record of it in ``ssole.json`` (``"pca"``) and its section of the model card.

:func:`add_pca` writes all three (``ssole-hub fit-pca`` fits the PCA:
:func:`ssole_hub.extract.compact.fit_hub_pca`); :func:`read_pca` reads the PCA back, checked
against its record, for :func:`~ssole_hub.hub.load.load_pca` and
:func:`~ssole_hub.hub.export.validate_hub_folder`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ssole_hub.errors import HubFolderError
from ssole_hub.file_modes import give_umask_mode
from ssole_hub.hub.fetch import Fetch
from ssole_hub.hub.folder import MODEL_CARD_FILE, SSOLE_FILE, read_json
from ssole_hub.hub.model_card import with_pca_section
from ssole_hub.pca import PCA, PCA_FILE

__all__ = ["FIT_COMMAND", "PCA_RECORD", "add_pca", "pca_record", "read_pca"]

PCA_RECORD = "pca"
"""The key of ``ssole.json`` that records the folder's PCA."""
FIT_COMMAND = "ssole-hub fit-pca HUB_FOLDER --input IMAGES"
"""How to fit one; error messages name it."""
_DECIMALS = 4


def pca_record(pca: PCA, fitted_on: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``ssole.json`` records of ``pca``: its file, output, widths, images, whitening,
    digest, the variance kept at each size, and ``fitted_on`` (how the images were read)."""
    return {
        "file": PCA_FILE,
        "output": pca.output,
        "input_dimensions": pca.input_dimensions,
        "max_dimensions": pca.max_dimensions,
        "images": pca.images,
        "whiten": pca.whiten,
        "digest": pca.digest(),
        "variance_kept": {str(k): round(v, _DECIMALS) for k, v in pca.variance_table().items()},
        **({"fitted_on": dict(fitted_on)} if fitted_on else {}),
    }


def add_pca(
    folder: str | os.PathLike, pca: PCA, fitted_on: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``pca`` into the hub folder (replacing any earlier one): the file, its record in
    ``ssole.json`` and the model card's section. Returns the record.

    Raises:
        FileNotFoundError: ``folder`` has no ``ssole.json`` (not a hub folder).
        HubFolderError: its ``ssole.json`` is unreadable.
    """
    path = Path(folder)
    ssole = read_json(path / SSOLE_FILE, SSOLE_FILE)
    record = pca_record(pca, fitted_on)
    fd, tmp = tempfile.mkstemp(prefix=f".{PCA_FILE}.", dir=path)
    os.close(fd)
    try:
        pca.save(tmp)
        give_umask_mode(Path(tmp))
        os.replace(tmp, path / PCA_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    ssole[PCA_RECORD] = record
    (path / SSOLE_FILE).write_text(json.dumps(ssole, indent=2, default=str) + "\n")
    card = path / MODEL_CARD_FILE
    card.write_text(with_pca_section(card.read_text(), record))
    return record


def _disagreements(pca: PCA, record: Mapping[str, Any]) -> list[str]:
    """Where the file and its record in ``ssole.json`` differ."""
    found = pca_record(pca)
    keys = ("output", "input_dimensions", "max_dimensions", "images", "whiten", "digest")
    problems = [
        f"{key} is {found[key]!r} in {PCA_FILE} but {record.get(key)!r} in {SSOLE_FILE}"
        for key in keys
        if record.get(key) != found[key]
    ]
    kept = found["variance_kept"]
    if not problems and record.get("variance_kept") != kept:
        problems.append(f"variance_kept is {kept} in {PCA_FILE} but {record.get('variance_kept')}")
    return problems


def read_pca(fetch: Fetch, output_dims: Mapping[str, int] | None = None) -> PCA | None:
    """The folder's PCA, or ``None`` when ``ssole.json`` records none. With ``output_dims``
    (output -> width) it must apply to one of those outputs, at its width.

    Raises:
        HubFolderError: the file is missing or unreadable, differs from its record, or does not
            fit the model's outputs (each message says how to fit it again).
    """
    record = read_json(fetch(SSOLE_FILE), SSOLE_FILE).get(PCA_RECORD)
    if not record:
        return None
    again = f"fit it again with `{FIT_COMMAND}`"
    try:
        path = fetch(PCA_FILE)
    except FileNotFoundError as exc:
        raise HubFolderError(f"{SSOLE_FILE} records a PCA, but: {exc}; {again}") from None
    try:
        pca = PCA.load(path)
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise HubFolderError(f"{PCA_FILE} is not a readable PCA file ({exc}); {again}") from exc
    problems = _disagreements(pca, record)
    if output_dims is not None and output_dims.get(pca.output) != pca.input_dimensions:
        problems.append(
            f"it applies to {pca.input_dimensions}-d {pca.output} embeddings, but the model's "
            f"outputs are {dict(output_dims)}"
        )
    if problems:
        raise HubFolderError(f"{PCA_FILE} does not fit this folder: {'; '.join(problems)}; {again}")
    return pca
