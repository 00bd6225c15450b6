"""Loading hub folders and checkpoints: vanilla timm, ``load_model``, and clear errors for bad artefacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import ssole_hub
from ssole_hub import HubFolderError, SSOLEModel
from ssole_hub.hub.folder import built_with

VANILLA_TIMM_SCRIPT = """
import json, sys
from pathlib import Path
import safetensors.torch, timm, torch
from PIL import Image

folder, photo_dir, out = sys.argv[1:] if len(sys.argv) > 1 else ({args})
model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)
images = [Image.open(p).convert("RGB") for p in sorted(Path(photo_dir).glob("*.png"), key=lambda p: int(p.stem))]
with torch.inference_mode():
    feats = model(torch.stack([transform(i) for i in images]))
safetensors.torch.save_file({{"features": feats.contiguous()}}, out)
print(json.dumps({{"config": config, "ssole_hub_imported": "ssole_hub" in sys.modules}}))
"""


def _features(model: torch.nn.Module, photos) -> torch.Tensor:
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    with torch.inference_mode():
        return model(torch.stack([transform(img) for img in photos]))


@pytest.mark.slow
def test_vanilla_timm_in_a_process_without_ssole_hub_loads_local_dir_with_same_features(
    hub_folder, photo_dir, reference_features, hub_env, python_subprocess, tmp_path, export_settings
):
    out = tmp_path / "features.safetensors"
    script = VANILLA_TIMM_SCRIPT.format(args=repr((str(hub_folder), str(photo_dir), str(out))))
    result = python_subprocess(script, hub_env, tmp_path)
    assert result["ssole_hub_imported"] is False
    # the preprocessing came from config.json, not timm's resnet18 defaults
    assert result["config"]["input_size"] == [3, 160, 160]
    assert result["config"]["crop_pct"] == export_settings["pretrained_cfg"]["crop_pct"]
    feats = safetensors.torch.load_file(out)["features"]
    assert feats.shape == reference_features["features"].shape
    assert (feats - reference_features["features"]).abs().max().item() <= 1e-5


def test_load_model_gives_the_same_model_from_folder_local_dir_and_checkpoint(
    hub_folder, checkpoint_path, hub_photos, reference_features
):
    for source in (hub_folder, f"local-dir:{hub_folder}", checkpoint_path):
        model = ssole_hub.load_model(source, with_projector=True)
        assert isinstance(model, SSOLEModel) and not model.training
        assert model.pretrained_cfg is model.backbone.pretrained_cfg
        assert list(timm.data.resolve_model_data_config(model)["input_size"]) == [3, 160, 160]
        assert model.metadata["dataset"] == "imagenet-100"
        feats = _features(model.backbone, hub_photos)
        assert (feats - reference_features["features"]).abs().max().item() <= 1e-5, source
        with torch.inference_mode():
            projected = model.projector(feats)
        assert projected.shape == (len(hub_photos), 32)
        assert (projected - reference_features["projected"]).abs().max().item() <= 1e-5, source


def test_load_model_without_projector_is_the_bare_eval_backbone(hub_folder, encoder):
    model = ssole_hub.load_model(str(hub_folder))
    assert isinstance(model, timm.models.ResNet) and not model.training
    assert model.num_classes == 0 and model.num_features == 512
    expected = encoder.backbone.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_load_model_without_weights_keeps_the_preprocessing_but_not_the_weights(
    hub_folder, hub_photos, reference_features
):
    model = ssole_hub.load_model(hub_folder, pretrained=False)
    assert list(model.pretrained_cfg["input_size"]) == [3, 160, 160]
    assert (_features(model, hub_photos) - reference_features["features"]).abs().max().item() > 1e-3


def test_timm_loads_the_folder_weights_through_a_pretrained_cfg_file_overlay(
    hub_folder, hub_photos, reference_features, export_settings
):
    model = timm.create_model(
        "ssole_resnet18",
        pretrained=True,
        pretrained_cfg_overlay=dict(
            file=str(hub_folder / "model.safetensors"), **export_settings["pretrained_cfg"]
        ),
    ).eval()
    assert (
        _features(model, hub_photos) - reference_features["features"]
    ).abs().max().item() <= 1e-5


def test_registered_configs_point_at_safetensors_in_per_tag_repos():
    cfg = timm.models.get_pretrained_cfg("ssole_resnet18.in100_m4")
    assert cfg.hf_hub_id.endswith("/ssole_resnet18.in100_m4")
    assert cfg.hf_hub_filename == "model.safetensors"
    assert cfg.num_classes == 0 and cfg.mean == (0.485, 0.456, 0.406)
    assert set(timm.list_pretrained("ssole_*")) >= {
        "ssole_resnet18.in100_m4",
        "ssole_resnet50.in1k_m8",
    }


# --- bad artefacts ---------------------------------------------------------------------------


def _broken_copy(hub_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(hub_folder, folder)
    return folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, leaf = key.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = value
    path.write_text(json.dumps(data))


def _swap_weight_shape(path: Path) -> None:
    state = safetensors.torch.load_file(path)
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    safetensors.torch.save_file(state, path)


BREAKAGES = {
    "missing weights": (
        lambda f: (f / "model.safetensors").unlink(),
        FileNotFoundError,
        "has no model.safetensors",
    ),
    "missing config": (
        lambda f: (f / "config.json").unlink(),
        FileNotFoundError,
        "has no config.json",
    ),
    "truncated weights": (
        lambda f: _truncate(f / "model.safetensors"),
        HubFolderError,
        "model.safetensors is not a readable safetensors file",
    ),
    "truncated projector": (
        lambda f: _truncate(f / "projector.safetensors"),
        HubFolderError,
        "projector.safetensors is not a readable safetensors file",
    ),
    "shape mismatch": (
        lambda f: _swap_weight_shape(f / "model.safetensors"),
        HubFolderError,
        r"shape mismatch for layer1.0.conv1.weight: expected \(64, 64, 3, 3\), found \(32, 64, 3, 3\)",
    ),
    "wrong architecture": (
        lambda f: _edit_json(f / "config.json", architecture="resnet50"),
        HubFolderError,
        "do not fit ResNet",
    ),
    "unknown architecture": (
        lambda f: _edit_json(f / "config.json", architecture="resnet_made_up"),
        HubFolderError,
        "architecture 'resnet_made_up', which timm .* does not know",
    ),
    "projector does not fit backbone": (
        lambda f: _edit_json(f / "ssole.json", projector_config__in_dim=2048),
        HubFolderError,
        "projector in_dim 2048 does not match the backbone's 512 features",
    ),
    "config not json": (
        lambda f: (f / "config.json").write_text("{not json"),
        HubFolderError,
        "config.json is not valid JSON",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_bad_artefacts_fail_clearly_in_validate_and_load(breakage, hub_folder, tmp_path):
    damage, error, message = BREAKAGES[breakage]
    folder = _broken_copy(hub_folder, tmp_path)
    damage(folder)
    with pytest.raises(error, match=message):
        ssole_hub.validate_hub_folder(folder)
    with pytest.raises(error, match=message):
        ssole_hub.load_model(folder, with_projector=True)


def test_validate_requires_the_model_card_front_matter(hub_folder, tmp_path):
    folder = _broken_copy(hub_folder, tmp_path)
    card = (folder / "README.md").read_text().replace("library_name: timm", "library_name: other")
    (folder / "README.md").write_text(card)
    with pytest.raises(HubFolderError, match="front matter lacks `library_name: timm`"):
        ssole_hub.validate_hub_folder(folder)


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        (
            "ssole_resnet99",
            ValueError,
            "unknown model 'ssole_resnet99'; use one of .*ssole_resnet18.in100_m4",
        ),
        ("ssole_resnet18.no_such_tag", ValueError, "unknown model 'ssole_resnet18.no_such_tag'"),
        ("hf-hub:not a repo!", ValueError, "invalid Hub repo id 'not a repo!'"),
        ("hf-hub:org/name/extra", ValueError, "invalid Hub repo id 'org/name/extra'"),
        ("org/name", FileNotFoundError, "for a Hub repo write hf-hub:org/name"),
        (
            "local-dir:/nonexistent/folder",
            FileNotFoundError,
            "no hub folder or checkpoint at /nonexistent/folder",
        ),
    ],
)
def test_load_model_rejects_unknown_names_paths_and_repo_ids(name, error, message):
    with pytest.raises(error, match=message):
        ssole_hub.load_model(name)


def test_load_model_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        ssole_hub.load_model(path)


def test_weights_are_assigned_to_a_model_built_without_initialising_it():
    """``built_with``: the loaded tensors are the file's, cast to the model's dtypes, nothing is
    left on the meta device; a module with a non-persistent buffer, or whose constructor reads
    a tensor's value, is built and loaded as usual; weights that do not fit are named."""
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=0).state_dict()
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in source.items()}
    built = built_with(lambda: timm.create_model("resnet18", num_classes=0), state, "weights")
    loaded = built.state_dict()
    assert loaded.keys() == source.keys()
    for name, tensor in loaded.items():
        assert tensor.device.type == "cpu" and tensor.dtype == source[name].dtype, name
        assert torch.equal(tensor, state[name].to(tensor.dtype)), name
    assert all(p.requires_grad for p in built.parameters())

    class Scaled(torch.nn.Linear):
        def __init__(self) -> None:
            super().__init__(3, 2)
            self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

    class Computed(torch.nn.Linear):  # a constructor that reads a tensor's value
        def __init__(self) -> None:
            super().__init__(3, 2)
            self.steps = int(torch.ones(()).item())

    weights = torch.nn.Linear(3, 2).state_dict()
    scaled = built_with(Scaled, weights, "weights")
    assert scaled.scale.item() == 2.0 and torch.equal(scaled.weight, weights["weight"])
    computed = built_with(Computed, weights, "weights")
    assert computed.steps == 1 and torch.equal(computed.weight, weights["weight"])

    cut = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    with pytest.raises(HubFolderError, match=r"cut weights do not fit ResNet: \d+ missing keys"):
        built_with(lambda: timm.create_model("resnet18", num_classes=0), cut, "cut weights")
