"""One preprocessing resolver: change a folder's ``pretrained_cfg`` and the server, ``extract``
and evaluation all follow it."""

from __future__ import annotations

import base64
import json
import shutil

import httpx
import numpy as np
import pytest

from ssole_hub import FeatureExtractor, extract_dataset, read_embeddings
from training.evaluate import evaluate

pytestmark = pytest.mark.slow

CHANGED = {"input_size": [3, 48, 48], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="module")
def changed_folder(tiny_model_dir, tmp_path_factory):
    """The tiny model's folder with the same weights and another preprocessing."""
    folder = tmp_path_factory.mktemp("changed") / "tiny-ssole-48px"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(CHANGED)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_server_extract_and_evaluate_follow_a_changed_pretrained_cfg(
    changed_folder, tiny_model_dir, make_server, photo_jpegs, tmp_path
):
    fx = FeatureExtractor.from_pretrained(changed_folder, device="cpu")
    assert list(fx.data_config["input_size"]) == CHANGED["input_size"]
    want = fx.embed(photo_jpegs).numpy()
    before = FeatureExtractor.from_pretrained(tiny_model_dir, device="cpu").embed(photo_jpegs)
    assert np.abs(want - before.numpy()).max() > 1e-3  # the change matters

    srv = make_server(model=f"local-dir:{changed_folder}")
    inputs = ["data:image/jpeg;base64," + base64.b64encode(j).decode() for j in photo_jpegs]
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"input": inputs})
    assert r.status_code == 200
    served = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    assert np.abs(served - want).max() <= 1e-5

    images = tmp_path / "images"
    images.mkdir()
    for i, jpeg in enumerate(photo_jpegs):
        (images / f"{i}.jpg").write_bytes(jpeg)
    manifest = extract_dataset(changed_folder, images, tmp_path / "out", progress=False)
    assert list(manifest["preprocessing"]["input_size"]) == CHANGED["input_size"]
    extracted, paths = read_embeddings(tmp_path / "out")
    order = [int(p.split(".")[0]) for p in paths]
    assert np.abs(extracted - want[order]).max() <= 1e-5

    results = evaluate(
        str(changed_folder), "digits", protocols=["knn"], train_limit=40, test_limit=20,
        progress=False,
    )  # fmt: skip
    preprocessing = results["preprocessing"]
    assert list(preprocessing["input_size"]) == CHANGED["input_size"]
    assert list(preprocessing["mean"]) == CHANGED["mean"]
    assert list(preprocessing["std"]) == CHANGED["std"]
