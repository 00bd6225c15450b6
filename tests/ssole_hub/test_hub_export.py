"""Exporting checkpoints and models to hub folders, validating them, and the export/validate CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard

import ssole_hub
from ssole_hub import HubFolderError
from ssole_hub.cli import main
from ssole_hub.hub.checkpoint import CheckpointError, load_model_checkpoint


def test_export_writes_timm_config_weights_projector_metadata_and_card(
    hub_folder, encoder, export_settings
):
    ckpt_cfg, projector_cfg = export_settings["pretrained_cfg"], export_settings["projector"]
    names = sorted(p.name for p in hub_folder.iterdir())
    assert names == sorted(
        ["README.md", "config.json", "model.safetensors", "projector.safetensors", "ssole.json"]
    )

    config = json.loads((hub_folder / "config.json").read_text())
    assert config["architecture"] == "resnet18"  # a name vanilla timm knows
    assert config["num_classes"] == 0 and config["num_features"] == 512
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == list(ckpt_cfg["input_size"])
    assert cfg["crop_pct"] == ckpt_cfg["crop_pct"]
    assert cfg["interpolation"] == "bilinear"
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.228, 0.224, 0.225]
    assert not {"hf_hub_id", "url", "file", "tag"} & set(cfg)

    weights = safetensors.torch.load_file(hub_folder / "model.safetensors")
    assert weights.keys() == encoder.backbone.state_dict().keys()
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(weights[key], value), key
    projector = safetensors.torch.load_file(hub_folder / "projector.safetensors")
    assert torch.equal(projector["0.weight"], encoder.projector[0].weight)

    ssole = json.loads((hub_folder / "ssole.json").read_text())
    assert ssole["architecture"] == "ssole_resnet18"
    assert ssole["projector_config"] == {**projector_cfg, "batch_norm": False}
    assert ssole["metadata"] == {"dataset": "imagenet-100", "epochs": 2, "views": 4}
    # results recorded in training and those passed to export are both kept
    assert ssole["eval_results"] == {"knn_top1": 31.5, "linear_top1": 40.25, "rankme": 120.0}
    assert ssole["code_version"]["ssole_hub"] == ssole_hub.__version__
    assert ssole["code_version"]["timm"] == timm.__version__


def test_model_card_has_hub_front_matter_usage_results_and_citation(hub_folder):
    card = ModelCard.load(hub_folder / "README.md")
    assert card.data.library_name == "timm"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.license == "apache-2.0"
    assert card.data.datasets == ["imagenet-100"]
    assert "ssole" in card.data.tags
    text = card.text
    assert 'timm.create_model("hf-hub:ssole-hub/ssole_resnet18-test", pretrained=True)' in text
    assert (
        'torch.hub.load("ssole-hub/ssole-hub", "load_model", "hf-hub:ssole-hub/ssole_resnet18-test")'
        in text
    )
    assert "/v1/embeddings" in text
    assert "| linear_top1 | 40.25 |" in text and "| knn_top1 | 31.5 |" in text
    assert "@inproceedings{huang2025ssole" in text


def test_validate_reports_what_the_folder_holds(hub_folder, export_settings):
    info = ssole_hub.validate_hub_folder(hub_folder)
    assert info.architecture == "ssole_resnet18" and info.timm_architecture == "resnet18"
    assert info.num_features == 512
    assert info.projector_config["out_dim"] == export_settings["projector"]["out_dim"]
    assert info.eval_results["rankme"] == 120.0
    assert info.pretrained_cfg["input_size"] == [3, 160, 160]


def test_export_from_encoder_module_writes_the_same_weights(encoder, hub_folder, tmp_path):
    out = ssole_hub.export_hub_folder(encoder, tmp_path / "from-module")
    for name in ("model.safetensors", "projector.safetensors"):
        a = safetensors.torch.load_file(out / name)
        b = safetensors.torch.load_file(hub_folder / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ssole_hub.validate_hub_folder(out)


def test_export_of_a_bare_timm_classifier_drops_the_head_and_has_no_projector(tmp_path):
    model = timm.create_model("resnet18", num_classes=10)
    out = ssole_hub.export_hub_folder(model, tmp_path / "bare")
    assert not (out / "projector.safetensors").exists()
    assert not any(
        k.startswith("fc.") for k in safetensors.torch.load_file(out / "model.safetensors")
    )
    assert ssole_hub.validate_hub_folder(out).projector_config is None
    with pytest.raises(HubFolderError, match="no projector"):
        ssole_hub.load_model(out, with_projector=True)


def test_export_refuses_an_existing_folder_unless_overwrite(checkpoint_path, tmp_path):
    out = tmp_path / "folder"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        ssole_hub.export_hub_folder(checkpoint_path, out)
    ssole_hub.export_hub_folder(checkpoint_path, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_export_rejects_unknown_architecture_and_leaves_nothing_behind(checkpoint_path, tmp_path):
    ckpt = load_model_checkpoint(checkpoint_path)
    ckpt.arch = "ssole_resnet99"
    with pytest.raises(HubFolderError, match="unknown architecture 'ssole_resnet99'"):
        ssole_hub.export_hub_folder(ckpt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_weights_that_do_not_fit_the_architecture(checkpoint_path, tmp_path):
    ckpt = load_model_checkpoint(checkpoint_path)
    ckpt.arch = "ssole_resnet50"
    with pytest.raises(HubFolderError, match=r"shape mismatch for conv1\.weight|missing keys"):
        ssole_hub.export_hub_folder(ckpt, tmp_path / "out")


def test_export_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, bogus)
    with pytest.raises(CheckpointError, match="not an SSOLE checkpoint"):
        ssole_hub.export_hub_folder(bogus, tmp_path / "out")


def test_cli_exports_and_validates_and_reports_errors(checkpoint_path, tmp_path, capsys):
    out = tmp_path / "cli-out"
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"fashion-mnist": {"knn_top1": 80.5}}))
    argv = ["export", "--checkpoint", str(checkpoint_path), "--out", str(out)]
    assert main([*argv, "--eval-results", str(results), "--repo", "me/cli-model"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ssole = json.loads((out / "ssole.json").read_text())
    assert ssole["eval_results"]["fashion-mnist"] == {"knn_top1": 80.5}
    card = (out / "README.md").read_text()
    assert "| fashion-mnist / knn_top1 | 80.5 |" in card and "hf-hub:me/cli-model" in card
    assert main(["validate", str(out)]) == 0
    assert "valid hub folder" in capsys.readouterr().out

    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.safetensors").unlink()
    assert main(["validate", str(broken)]) == 2
    assert "has no model.safetensors" in capsys.readouterr().err
