"""The model card an export writes: every section checked against the folder's own files (weights,
``config.json``, ``ssole.json``), its figures recomputed here by other means than the exporter's."""

from __future__ import annotations

import ast
import json
import re

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from ssole_hub.hub.model_card import with_onnx_section
from ssole_hub.hub.model_stats import measure_model_stats

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _sections(card: str) -> dict[str, str]:
    """``## `` heading -> its text, in order."""
    parts = re.split(r"^## (.+)$", card, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _macs_and_activations(model: nn.Module, input_size: list[int]) -> tuple[int, int]:
    """MACs and conv/linear output elements of one image, counted from layer shapes by hooks."""
    macs = activations = 0

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal macs, activations
        activations += output.numel()
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += output.numel() * module.in_channels // module.groups * kh * kw
        else:
            macs += output.numel() * module.in_features

    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_hook(hook)
    with torch.inference_mode():
        model(torch.zeros(1, *input_size))
    return macs, activations


@pytest.fixture(scope="module")
def folder_files(hub_folder) -> dict:
    return {
        "card": (hub_folder / "README.md").read_text(),
        "config": json.loads((hub_folder / "config.json").read_text()),
        "ssole": json.loads((hub_folder / "ssole.json").read_text()),
        "weights": safetensors.torch.load_file(hub_folder / "model.safetensors"),
    }


def test_model_details_state_the_folders_size_cost_paper_dataset_and_recipe(
    hub_folder, folder_files
):
    details = _sections(folder_files["card"])["Model Details"]
    ssole, input_size = (
        folder_files["ssole"],
        folder_files["config"]["pretrained_cfg"]["input_size"],
    )
    params = sum(v.numel() for k, v in folder_files["weights"].items() if not k.endswith(BUFFERS))
    assert f"Params (M): {params / 1e6:.1f}" in details
    assert ssole["model_stats"]["params_m"] == pytest.approx(params / 1e6, abs=1e-3)

    model = timm.create_model(f"local-dir:{hub_folder}", pretrained=True).eval()
    macs, activations = _macs_and_activations(model, input_size)
    assert f"GMACs: {macs / 1e9:.2f}" in details
    assert f"Activations (M): {activations / 1e6:.2f}" in details
    assert f"Image size: {input_size[1]} x {input_size[2]}" in details
    assert ssole["model_stats"]["image_size"] == input_size[1:]

    assert "SSOLE: Rethinking Orthogonal Low-rank Embedding" in details and "ICLR 2025" in details
    assert f"**Dataset:** {ssole['metadata']['dataset']}" in details
    for key in ("epochs", "views"):
        assert f"| {key} | {ssole['metadata'][key]} |" in details
    out_dim = ssole["projector_config"]["out_dim"]
    assert f"-> {out_dim}` ({ssole['projector_config']['depth']} linear layers" in details


def test_usage_examples_parse_name_the_repo_and_the_feature_maps_are_what_timm_returns(
    hub_folder, folder_files, hub_photos
):
    usage = _sections(folder_files["card"])["Usage"]
    for block in re.findall(r"```python\n(.*?)```", usage, flags=re.DOTALL):
        ast.parse(block)
    repo = "hf-hub:ssole-hub/ssole_resnet18-test"
    assert f'timm.create_model("{repo}", pretrained=True).eval()' in usage
    assert f'timm.create_model("{repo}", pretrained=True, features_only=True)' in usage
    assert f'torch.hub.load("ssole-hub/ssole-hub", "load_model", "{repo}")' in usage
    assert f"python -m server --model {repo}" in usage and "/v1/embeddings" in usage

    # what the card promises, done with plain timm on the folder: pretrained feature maps
    model = timm.create_model(f"local-dir:{hub_folder}", pretrained=True, features_only=True)
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    with torch.inference_mode():
        maps = model.eval()(transform(hub_photos[0]).unsqueeze(0))
    shapes = ", ".join(f"({m.shape[1]}, {m.shape[2]}, {m.shape[3]})" for m in maps)
    assert f"# one map per stage: {shapes}" in usage
    weights = folder_files["weights"]
    assert torch.equal(
        model.state_dict()["layer4.1.conv2.weight"], weights["layer4.1.conv2.weight"]
    )


def test_evaluation_lists_every_recorded_result_with_its_protocol(folder_files):
    evaluation = _sections(folder_files["card"])["Evaluation"]
    assert "weighted kNN" in evaluation and "linear probe" in evaluation and "RankMe" in evaluation
    results = folder_files["ssole"]["eval_results"]
    assert results  # the fixture records three
    for name, value in results.items():
        assert f"| {name} | {value:.4g} |" in evaluation


def test_sections_come_in_timms_order_and_end_with_the_citation(folder_files):
    names = list(_sections(folder_files["card"]))
    assert names == ["Model Details", "Usage", "Evaluation", "Citation"]
    assert "@inproceedings{huang2025ssole" in _sections(folder_files["card"])["Citation"]


def test_the_onnx_section_lists_any_backend_of_the_record_within_usage(folder_files):
    record = {
        "guard_photos": {"source": "scikit-image photos", "count": 6},
        "backends": {
            "onnx": {
                "file": "onnx/model.onnx",
                "limit": 0.9999,
                "min_cosine": {"backbone": 0.99999},
            },
            "openvino": {"file": "openvino/model.xml", "min_cosine": {"projector": 0.998765}},
            "tensorrt": {"file": "trt/model.plan"},
        },
    }
    old = folder_files["card"].replace(
        "## Evaluation", "## ONNX Runtime\n\nold figures\n\n## Evaluation"
    )
    card = with_onnx_section(with_onnx_section(old, record), record)
    assert card.count("### ONNX backends") == 1 and "ONNX Runtime" not in card
    usage = _sections(card)["Usage"]
    assert "| onnx | `onnx/model.onnx` | - | backbone | 0.999990 (0.9999) | n/a | - |" in usage
    assert "| openvino | `openvino/model.xml` | - | projector | 0.998765 (-) | n/a | - |" in usage
    assert "| tensorrt | `trt/model.plan` | - | - | - (-) | n/a | - |" in usage
    assert "--backend onnx  # or openvino, tensorrt, torch, auto" in usage
    assert "6 real photos (scikit-image photos)" in usage
    assert list(_sections(card)) == ["Model Details", "Usage", "Evaluation", "Citation"]


def test_measured_figures_match_timms_published_resnet50_card_and_leave_the_model_alone():
    model = timm.create_model("resnet50", num_classes=0)
    before = model.conv1.weight.clone()
    stats = measure_model_stats(model, (3, 224, 224))
    # timm's resnet50 card: GMACs 4.1, Activations (M) 11.1 (Params 25.6 with its 1000-class fc)
    assert round(stats.gmacs, 1) == 4.1 and round(stats.activations_m, 1) == 11.1
    assert stats.params_m == pytest.approx((25_557_032 - 2048 * 1000 - 1000) / 1e6, abs=1e-3)
    assert stats.feature_maps[-1] == (2048, 7, 7)
    assert model.conv1.weight.device.type == "cpu" and torch.equal(model.conv1.weight, before)
    with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\)"):
        measure_model_stats(model, (224, 224))
