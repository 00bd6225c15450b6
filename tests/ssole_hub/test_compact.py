"""Compact embeddings: the PCA that ``fit-pca`` writes into a hub folder (file, ``ssole.json``
record, card), what ``validate`` refuses, ``dimensions`` in the extractor and ``extract``
(manifest, resume), and the errors that say how to fit a PCA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ssole_hub import (
    PCA,
    FeatureExtractor,
    HubFolderError,
    extract_dataset,
    fit_pca,
    read_embeddings,
    validate_hub_folder,
)
from ssole_hub.cli import main
from ssole_hub.pca import PCA_FILE

MAX = 149  # 150 photo crops: min(n - 1, 512) axes


@pytest.fixture(scope="module")
def fx(pca_folder) -> FeatureExtractor:
    """The PCA folder's extractor, projector too (torch, float32)."""
    return FeatureExtractor.from_pretrained(
        pca_folder, with_projector=True, device="cpu", dtype="float32"
    )


@pytest.fixture(scope="module")
def record(pca_folder) -> dict:
    return json.loads((pca_folder / "ssole.json").read_text())["pca"]


def test_fit_pca_records_its_figures_in_ssole_json(pca_folder, record):
    assert record["output"] == "backbone" and record["whiten"] is False
    assert (record["images"], record["input_dimensions"], record["max_dimensions"]) == (
        150,
        512,
        MAX,
    )
    kept = record["variance_kept"]
    assert list(kept) == ["149", "128", "64", "32"]  # the common sizes it offers, and its largest
    shares = list(kept.values())
    assert shares == sorted(shares, reverse=True) and 0 < shares[-1] < shares[0] <= 1
    assert record["fitted_on"] == {"input_kind": "files", "unreadable": 0, "backend": "torch"}
    pca = PCA.load(pca_folder / PCA_FILE)
    assert pca.digest() == record["digest"] and pca.images == 150


def test_the_card_states_the_sizes_and_their_figures(pca_folder, record):
    card = (pca_folder / "README.md").read_text()
    section = card[card.index("### Compact embeddings") : card.index("## Evaluation")]
    assert "fitted on 150 images" in section and "without whitening" in section
    assert "from 1 to 149" in section
    for size, share in record["variance_kept"].items():
        assert f"| {size} | {100 * share:.1f}% | {4 * int(size)} |" in section


def test_validate_reports_the_pca(pca_folder, capsys):
    info = validate_hub_folder(pca_folder)
    assert info.pca["max_dimensions"] == MAX
    assert main(["validate", str(pca_folder)]) == 0
    assert "PCA of backbone to 1..149 dimensions" in capsys.readouterr().out


def test_dimensions_are_the_unit_rows_of_the_pca_projection(fx, pca_folder, photo_jpegs):
    pca = PCA.load(pca_folder / PCA_FILE)
    raw = fx.embed(photo_jpegs, normalize=False).double().numpy()
    x = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    y = (x - pca.mean) @ pca.components[:128].T
    want = y / np.linalg.norm(y, axis=1, keepdims=True)
    got = fx.embed(photo_jpegs, dimensions=128)
    assert got.shape == (len(photo_jpegs), 128) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    np.testing.assert_allclose(got.norm(dim=1).numpy(), 1, atol=1e-5)
    # one batch or several, the same rows; embed_tensor too
    np.testing.assert_allclose(fx.embed(photo_jpegs, batch_size=2, dimensions=128), got, atol=1e-6)
    batch = fx.preprocess(photo_jpegs)
    np.testing.assert_allclose(fx.embed_tensor(batch, dimensions=128), got, atol=1e-6)


def test_whitening_scales_each_axis_to_unit_variance(fx, photo_crops):
    crops = sorted(photo_crops.iterdir())
    raw = fx.embed(crops, normalize=False)
    pca = fit_pca(raw, output="backbone", whiten=True)
    y = (torch.nn.functional.normalize(raw, dim=1) - torch.from_numpy(pca.mean)) @ torch.from_numpy(
        pca.components[:16]
    ).T
    white = y / torch.from_numpy(pca.variances[:16]).sqrt()
    np.testing.assert_allclose(white.var(0).numpy(), 1, atol=1e-3)
    got = pca.transform(raw, 16)
    np.testing.assert_allclose(got, torch.nn.functional.normalize(white, dim=1), atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dimensions": 0}, "between 1 and 149"),
        ({"dimensions": -4}, "between 1 and 149"),
        ({"dimensions": 150}, "fit it on more images with ssole-hub fit-pca"),
        ({"dimensions": 600}, "between 1 and 149"),
        ({"dimensions": 12.0}, "must be an integer"),
        ({"dimensions": True}, "must be an integer"),
        ({"dimensions": 16, "output": "projector"}, "fitted on backbone embeddings"),
        ({"dimensions": 16, "normalize": False}, "always L2-normalised"),
    ],
)
def test_bad_dimensions_raise_a_value_error_that_says_why(fx, photo_jpegs, options, message):
    with pytest.raises(ValueError, match=message):
        fx.embed(photo_jpegs[:1], **options)
    with pytest.raises(ValueError, match=message):
        fx.check_options(**{"output": "backbone", **options})


def test_a_model_without_a_pca_says_how_to_fit_one(hub_folder, photo_jpegs):
    fx = FeatureExtractor.from_pretrained(hub_folder, device="cpu")
    assert fx.pca is None
    with pytest.raises(ValueError, match="has no fitted PCA") as info:
        fx.embed(photo_jpegs[:1], dimensions=128)
    assert "ssole-hub fit-pca HUB_FOLDER --input IMAGES" in str(info.value)
    assert "nothing is truncated" in str(info.value)


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _truncate(folder: Path) -> None:
    data = (folder / PCA_FILE).read_bytes()
    (folder / PCA_FILE).write_bytes(data[: len(data) // 2])


def _other_pca(folder: Path) -> None:
    # A PCA of other (projector-wide) embeddings under the same name: the record disagrees.
    fit_pca(torch.randn(40, 32), output="backbone").save(folder / PCA_FILE)


def _edit_record(folder: Path) -> None:
    ssole = json.loads((folder / "ssole.json").read_text())
    ssole["pca"]["images"] = 10_000
    (folder / "ssole.json").write_text(json.dumps(ssole))


def _drop_record(folder: Path) -> None:
    ssole = json.loads((folder / "ssole.json").read_text())
    del ssole["pca"]
    (folder / "ssole.json").write_text(json.dumps(ssole))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, "not a readable PCA file"),
        (_other_pca, "input_dimensions is 32 in pca.safetensors but 512"),
        (_edit_record, "images is 150 in pca.safetensors but 10000 in ssole.json"),
        (lambda f: (f / PCA_FILE).unlink(), "records a PCA, but"),
        (_drop_record, "ssole.json records no PCA"),
    ],
)
def test_validate_refuses_a_damaged_or_mismatched_pca(
    damage, message, pca_folder, tmp_path, photo_jpegs, caplog
):
    folder = _copy(pca_folder, tmp_path)
    damage(folder)
    with pytest.raises(HubFolderError, match=message):
        validate_hub_folder(folder)
    assert main(["validate", str(folder)]) == 2
    # Loading still works, full size unchanged; dimensions say why they cannot be had.
    fx = FeatureExtractor.from_pretrained(folder, device="cpu")
    assert fx.embed(photo_jpegs[:1]).shape == (1, 512)
    with pytest.raises(ValueError, match="fit-pca"):
        fx.embed(photo_jpegs[:1], dimensions=32)


def test_extract_dimensions_writes_what_embed_gives_and_records_it(
    fx, pca_folder, photo_dir, tmp_path, capsys
):
    out = tmp_path / "emb-128"
    argv = ["extract", "--model", str(pca_folder), "--input", str(photo_dir), "--out", str(out),
            "--dimensions", "128", "--backend", "torch", "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "(128-d)" in capsys.readouterr().out
    emb, ids = read_embeddings(out)
    want = fx.embed([photo_dir / i for i in ids], dimensions=128).numpy()
    assert emb.shape == (3, 128)
    np.testing.assert_allclose(emb, want, atol=1e-5)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["dim"], manifest["dimensions"]) == (128, 128)
    assert manifest["pca"]["digest"] == fx.pca.digest()
    assert manifest["pca"]["images"] == 150
    # The same command resumes (nothing to do); another size is another extraction.
    assert main(argv) == 0
    assert "already finished and are skipped" in capsys.readouterr().err
    assert main([*argv[:-6], "64", *argv[-5:]]) == 2
    assert "holds shards of a different extraction" in capsys.readouterr().err


def test_extract_dimensions_without_a_pca_fails_before_any_work(hub_folder, photo_dir, tmp_path):
    with pytest.raises(ValueError, match="fit-pca"):
        extract_dataset(hub_folder, photo_dir, tmp_path / "out", dimensions=16, num_workers=0)
    assert not list((tmp_path / "out").glob("embeddings-*"))
