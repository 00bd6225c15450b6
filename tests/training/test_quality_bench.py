"""The quality benchmark (``bench/quality.py``) end to end at a tiny budget on real Fashion-MNIST:
it must keep working, so that the figures in BENCHMARKS.md can be re-measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssole_hub.checkpoint import load_model_checkpoint
from training.data import FASHION_MNIST_DIR, labelled_splits

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed"
)


@pytest.mark.parametrize("peer_projector", ["shared", "bn"])
def test_quality_benchmark_trains_every_method_on_one_budget_and_writes_its_table(
    tmp_path, peer_projector
):
    out = tmp_path / "quality.json"
    cmd = [
        sys.executable, str(ROOT / "bench" / "quality.py"),
        "--methods", "ssole,simclr", "--train-images", "100", "--test-images", "50",
        "--epochs", "1", "--views", "2", "--size", "32", "--batch-size", "25",
        "--projector-dim", "64", "--probe-epochs", "2", "--workers", "0", "--device", "cpu",
        "--precision", "fp32", "--peer-projector", peer_projector, "--work-dir", str(tmp_path / "work"), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads(out.read_text())
    peer = "simclr" if peer_projector == "shared" else "simclr (BN projector)"
    assert [r["model"] for r in report["rows"]] == ["raw pixels", "random init", "ssole", peer]
    assert [r["method"] for r in report["rows"]] == [None, None, "ssole", "simclr"]
    for row in report["rows"]:
        assert 0.0 <= row["knn_top1"] <= 100.0 and 0.0 <= row["linear_top1"] <= 100.0
        assert row["rankme"] >= 1.0
    assert all(r["train_s"] > 0 for r in report["rows"][2:])
    assert report["budget"]["train_images"] == 100 and report["budget"]["precision"] == "fp32"
    # The summary is computed from the rows, not written separately.
    ssole, simclr, raw = (report["rows"][i]["knn_top1"] for i in (2, 3, 0))
    assert report["summary"]["best_peer"] == "simclr"
    assert report["summary"]["ssole_minus_best_peer_knn"] == pytest.approx(ssole - simclr, abs=0.01)
    assert report["summary"]["ssole_minus_raw_pixels_knn"] == pytest.approx(ssole - raw, abs=0.01)
    # The shared config names no machine's paths, and the table is printed.
    assert not any(str(tmp_path) in o for o in report["config_overrides"])
    assert "| ssole |" in done.stdout and "| raw pixels |" in done.stdout
    # SSOLE always trains its released projector (no BatchNorm); only peers may get one.
    runs = tmp_path / "work" / "runs"
    peer_dir = "simclr" if peer_projector == "shared" else "simclr-bn"
    ssole_ckpt = load_model_checkpoint(runs / "ssole" / "final.pt")
    peer_ckpt = load_model_checkpoint(runs / peer_dir / "final.pt")
    assert ssole_ckpt.projector_config["batch_norm"] is False
    assert peer_ckpt.projector_config["batch_norm"] is (peer_projector == "bn")

    # The subset is class-balanced: 10 of each of the 10 classes, 5 of each in the test split.
    train, test = labelled_splits("fashion-mnist", tmp_path / "work" / "data")
    assert np.bincount(train.labels).tolist() == [10] * 10
    assert np.bincount(test.labels).tolist() == [5] * 10


def test_quality_benchmark_rejects_an_unknown_method(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--methods", "ssole,byol"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown method(s) byol" in done.stderr
