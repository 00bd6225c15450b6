"""The compact-embeddings benchmark (``bench/compact.py``) end to end on a small Fashion-MNIST
sample with a random-weight model: every size below the fitted axes, for every method, with its
figures, and the JSON with the machine's load before and after."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import timm

from ssole_hub import SSOLEModel, export_hub_folder

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the benches import each other as bench.*
compact = importlib.import_module("bench.compact")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_every_size_and_method_is_measured_and_written(tmp_path, capsys):
    backbone = timm.create_model(
        "ssole_resnet18", pretrained_cfg_overlay={"input_size": (3, 32, 32), "crop_pct": 1.0}
    )
    folder = export_hub_folder(SSOLEModel(backbone).eval(), tmp_path / "tiny")
    out = tmp_path / "compact.json"
    argv = ["--model", str(folder), "--train-images", "150", "--test-images", "40"]
    assert compact.main([*argv, "--queries", "4", "--out", str(out)]) == 0

    report = json.loads(out.read_text())
    rows = {(r["size"], r["method"]): r for r in report["rows"]}
    # 150 bank images give 149 axes: the sizes up to 128, each by all three methods.
    assert set(rows) == {("full", "full")} | {
        (k, m) for k in (128, 64, 32) for m in compact.METHODS
    }
    assert rows["full", "full"]["agreement_at_10"] == 1.0
    for (size, _), row in rows.items():
        assert row["dimensions"] == (512 if size == "full" else size)
        assert row["bytes_per_image"] == 4 * row["dimensions"]
        assert 0 <= row["knn_top1"] <= 100 and 0 <= row["agreement_at_10"] <= 1
        assert row["search_ms_median"] > 0
    kept = report["variance_kept"]
    assert 0 < kept["32"] <= kept["64"] <= kept["128"] <= 1  # rounded to 4 places
    assert report["data"] == {"dataset": "fashion-mnist", "train_images": 150, "test_images": 40}
    assert len(report["machine"]["load_average_before"]) == len(report["load_average_after"]) == 3
    assert "pca-whiten" in capsys.readouterr().out
