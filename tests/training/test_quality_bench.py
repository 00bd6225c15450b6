"""The quality benchmark (``bench/quality.py``) end to end at a tiny budget on real Fashion-MNIST:
it must keep working, so that the figures in BENCHMARKS.md can be re-measured."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ssole_hub.hub.checkpoint import load_model_checkpoint
from training.data import FASHION_MNIST_DIR, labelled_splits

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed"
)


def _bench(zygote, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python bench/quality.py ...`` (in a child of the zygote, ``tests/zygote.py``)."""
    args = [
        "--train-images", "100", "--test-images", "50", "--epochs", "2", "--views", "2",
        "--size", "32", "--batch-size", "25", "--projector-dim", "64", "--probe-epochs", "2",
        "--workers", "0", "--device", "cpu", "--precision", "fp32", "--ssole-projector", "bn",
        "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "quality.json"), *extra,
    ]  # fmt: skip
    script = str(ROOT / "bench" / "quality.py")
    done = zygote.run("script", script, args, tmp_path, dict(os.environ), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_quality_benchmark_trains_every_method_on_one_budget_and_writes_its_table(tmp_path, zygote):
    done = _bench(zygote, tmp_path, "--methods", "ssole,simclr", "--peer-projector", "shared,bn")

    report = json.loads((tmp_path / "quality.json").read_text())
    rows = report["rows"]
    names = ["raw pixels", "random init", "ssole (BN projector)", "simclr", "simclr (BN projector)"]
    assert [r["model"] for r in rows] == names
    assert [r["method"] for r in rows] == [None, None, "ssole", "simclr", "simclr"]
    for row in rows:
        assert 0.0 <= row["knn_top1"] <= 100.0 and 0.0 <= row["linear_top1"] <= 100.0
        assert row["rankme"] >= 1.0
    assert all(r["train_s"] > 0 and r["reused"] is False for r in rows[2:])
    assert all(r["train_images_per_s"] > 0 for r in rows[2:])
    assert report["budget"]["train_images"] == 100 and report["budget"]["precision"] == "fp32"
    # The summary is computed from the rows (both SimCLR variants count as peers).
    knn = {r["model"]: r["knn_top1"] for r in rows}
    best = max(names[3:], key=knn.__getitem__)
    ssole = knn["ssole (BN projector)"]
    assert report["summary"]["best_peer"] == best
    assert report["summary"]["ssole"] == "ssole (BN projector)"
    assert report["summary"]["ssole_minus_best_peer_knn"] == pytest.approx(
        ssole - knn[best], abs=0.01
    )
    assert report["summary"]["ssole_minus_raw_pixels_knn"] == pytest.approx(
        ssole - knn["raw pixels"], abs=0.01
    )
    # The shared config names no machine's paths, and the table is printed.
    assert not any(str(tmp_path) in o for o in report["config_overrides"])
    assert "| ssole (BN projector) |" in done.stdout and "| raw pixels |" in done.stdout
    # Each method trains the projectors asked for it (SSOLE's and the peers' separately).
    runs = tmp_path / "work" / "runs"
    for run_name, batch_norm in (("ssole-bn", True), ("simclr", False), ("simclr-bn", True)):
        ckpt = load_model_checkpoint(runs / run_name / "final.pt")
        assert ckpt.projector_config["batch_norm"] is batch_norm, run_name

    # The subset is class-balanced: 10 of each of the 10 classes, 5 of each in the test split.
    train, test = labelled_splits("fashion-mnist", tmp_path / "work" / "data")
    assert np.bincount(train.labels).tolist() == [10] * 10
    assert np.bincount(test.labels).tolist() == [5] * 10

    # --evaluate-only evaluates the finished runs again and skips those never run ...
    finals = {d: (runs / d / "final.pt").stat().st_mtime_ns for d in ("ssole-bn", "simclr")}
    done = _bench(zygote, tmp_path, "--methods", "ssole,simclr,vicreg", "--evaluate-only")
    assert "vicreg: no finished run of this budget; skipped" in done.stdout
    assert not (runs / "vicreg").exists()
    again = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert [r["model"] for r in again] == names[:4]
    assert [r["reused"] for r in again[2:]] == [True, True]
    assert {d: (runs / d / "final.pt").stat().st_mtime_ns for d in finals} == finals
    for before, after in zip(rows[:4], again, strict=True):
        assert after["knn_top1"] == pytest.approx(before["knn_top1"], abs=1e-6), after["model"]
        if before["train_s"] is not None:  # the logged span lies inside the whole run
            assert 0 < after["train_s"] <= before["train_s"]
    # ... and --reuse retrains a run whose saved config is not this budget's.
    done = _bench(zygote, tmp_path, "--methods", "ssole", "--reuse", "--lr", "1.0")
    assert "ssole-bn: the saved config differs from this budget; retraining" in done.stdout
    assert (runs / "ssole-bn" / "final.pt").stat().st_mtime_ns != finals["ssole-bn"]
    assert json.loads((tmp_path / "quality.json").read_text())["rows"][2]["reused"] is False


def test_quality_benchmark_rejects_an_unknown_method_or_projector(tmp_path, zygote):
    script = str(ROOT / "bench" / "quality.py")
    for args, message in (
        (["--methods", "ssole,byol"], "unknown method(s) byol"),
        (["--peer-projector", "shared,ln"], "--peer-projector: 'shared,ln' is not a comma list"),
        (["--ssole-projector", ""], "--ssole-projector: '' is not a comma list of shared, bn"),
    ):
        done = zygote.run("script", script, args, tmp_path, dict(os.environ), timeout=120)
        assert done.returncode == 2, args
        assert message in done.stderr, done.stderr
