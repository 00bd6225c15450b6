"""A random-init baseline is marked as such everywhere (table, JSON, model card) and uses the
compared model's preprocessing; the model card renders evaluation JSON as a results table."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from ssole_hub import export_hub_folder, load_model
from ssole_hub.hub.checkpoint import ModelCheckpoint
from ssole_hub.hub.model_card import render_model_card
from training.evaluate import main

pytestmark = pytest.mark.slow

SMALL = ["--dataset", "digits", "--protocol", "knn,rankme", "--train-limit", "200"]
SMALL += ["--test-limit", "100", "--device", "cpu"]


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A hub folder whose preprocessing is the digits demo's: 32 px, mean and std 0.5."""
    torch.manual_seed(0)
    backbone = timm.create_model("ssole_resnet18", num_classes=0)
    ckpt = ModelCheckpoint(
        arch="ssole_resnet18",
        backbone=backbone.state_dict(),
        projector=None,
        projector_config=None,
        pretrained_cfg={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3},
        metadata={"dataset": "digits"},
    )
    return export_hub_folder(ckpt, tmp_path_factory.mktemp("models") / "digits-model")


def test_random_init_uses_the_folders_preprocessing(digits_model):
    baseline = load_model(f"local-dir:{digits_model}", pretrained=False)
    assert tuple(baseline.pretrained_cfg["input_size"]) == (3, 32, 32)
    assert tuple(baseline.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)


def test_random_init_results_are_marked_in_the_table_and_the_json(digits_model, tmp_path, capsys):
    out = tmp_path / "baseline.json"
    assert (
        main(["--model", f"local-dir:{digits_model}", "--random-init", *SMALL, "--out", str(out)])
        == 0
    )
    table = capsys.readouterr().out
    assert "digits-model (random init)" in table
    results = json.loads(out.read_text())
    assert results["model"] == "digits-model (random init)" and results["random_init"] is True

    out = tmp_path / "trained.json"
    assert main(["--model", f"local-dir:{digits_model}", *SMALL, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["model"] == "digits-model" and results["random_init"] is False


def test_model_card_marks_random_init_results_and_has_a_real_header(digits_model, tmp_path):
    results_path = tmp_path / "eval.json"
    main(["--model", str(digits_model), "--random-init", *SMALL, "--out", str(results_path)])
    results = json.loads(results_path.read_text())
    record = json.loads((digits_model / "ssole.json").read_text())
    text = render_model_card({**record, "eval_results": results}, repo_id="me/digits-model")
    assert "at random initialisation (a baseline)" in text
    assert "| dataset | metric | value | settings |" in text
    knn = results["protocols"]["knn"]["top1"]
    assert f"| digits | weighted kNN top-1 | {knn:.4g} | k=20, T=0.07 |" in text
    assert "| model |" not in text
