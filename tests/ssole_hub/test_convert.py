"""Converting checkpoints of the official SSOLE code and plain torchvision ResNets to hub folders.

The official checkpoints are built here with the official code's own module nesting and names
(a torchvision ResNet as ``SSOLEEncoder.encoder``, its ``fc`` replaced by the projector
``Sequential`` exactly as ``models/ssole_encoder.py`` builds it, BatchNorm converted to
SyncBatchNorm as ``train.py`` does, inside the Lightning module's ``encoder``) and saved in a
Lightning-style dict. The official code itself needs PyTorch Lightning, OmegaConf and a GPU
cluster, so these stand-ins replace it; their ``state_dict`` keys are the ones it writes.
Networks are randomly initialised, with random BatchNorm affine parameters and running statistics
from train-mode passes over real photos, so that every weight matters to the comparison.
"""

from __future__ import annotations

import argparse
import copy

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

import ssole_hub
from ssole_hub.cli import main as cli_main
from ssole_hub.hub.convert import ConversionError, convert_checkpoint, load_external_checkpoint
from ssole_hub.models import RECIPE_MEAN, RECIPE_STD

HIDDEN, DIM = 64, 32  # the official recipe uses 4096 and 4096; the layout is what matters here


def _official_fc(in_size: int, mlp_layers: int, mlp_bn: bool) -> nn.Sequential:
    """The projector as the official ``SSOLEEncoder.__init__`` builds it (``mlp: true``)."""
    layers: list[nn.Module] = []
    for _ in range(mlp_layers - 1):
        if mlp_bn:
            layers += [nn.Linear(in_size, HIDDEN, bias=False), nn.BatchNorm1d(HIDDEN)]
        else:
            layers.append(nn.Linear(in_size, HIDDEN))
        layers.append(nn.ReLU(inplace=True))
        in_size = HIDDEN
    layers.append(nn.Linear(in_size, DIM))
    return nn.Sequential(*layers)


class OfficialEncoder(nn.Module):
    """``SSOLEEncoder``: the ResNet as ``self.encoder``, its ``fc`` replaced by the projector."""

    def __init__(self, arch: str, mlp_bn: bool) -> None:
        super().__init__()
        self.encoder = getattr(torchvision.models, arch)(num_classes=DIM)
        self.encoder.fc = _official_fc(self.encoder.fc.weight.shape[1], 3, mlp_bn)


class OfficialLightningModule(nn.Module):
    """The official ``SSOLE`` LightningModule's state: ``self.encoder`` (SyncBatchNorm) and a
    ``self.loss`` without parameters or buffers."""

    def __init__(self, arch: str, mlp_bn: bool) -> None:
        super().__init__()
        self.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(OfficialEncoder(arch, mlp_bn))


def _warm_up(net: nn.Module, batch: torch.Tensor) -> nn.Module:
    """Random BatchNorm affine parameters, then running statistics from train-mode passes."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.momentum = None  # a cumulative average: the statistics of the passes below
        net.train()
        for _ in range(2):
            net(batch)
    return net.eval()


@pytest.fixture(scope="module")
def warm_up_batch(photos) -> torch.Tensor:
    """The six real photos and their mirror images, preprocessed at 112 px (cheap passes)."""
    transform = timm.data.create_transform(input_size=(3, 112, 112), is_training=False)
    batch = torch.stack([transform(img) for img in photos])
    return torch.cat([batch, batch.flip(-1)])


@pytest.fixture(scope="module")
def official(warm_up_batch) -> dict[bool, OfficialLightningModule]:
    """Official-layout ResNet-18 modules, by ``mlp_bn``."""
    torch.manual_seed(0)
    modules = {}
    for mlp_bn in (False, True):
        module = OfficialLightningModule("resnet18", mlp_bn)
        _warm_up(module.encoder.encoder, warm_up_batch)
        modules[mlp_bn] = module
    return modules


@pytest.fixture(scope="module")
def torchvision_resnet18(warm_up_batch) -> nn.Module:
    """A torchvision ResNet-18 classifier (1000 classes), as most SSL code saves it."""
    torch.manual_seed(1)
    return _warm_up(torchvision.models.resnet18(), warm_up_batch)


def _lightning_checkpoint(module: nn.Module) -> dict:
    """What ``pytorch_lightning.Trainer`` saves for the official code (no ``hyper_parameters``:
    the official module never calls ``save_hyperparameters``)."""
    return {
        "epoch": 99,
        "global_step": 12300,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": module.state_dict(),
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 99}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'loss'}": {"best_model_score": torch.tensor(1.5)}
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2.0, "momentum": 0.9}]}],
        "lr_schedulers": [],
    }


@pytest.fixture(scope="module")
def sources(official, torchvision_resnet18, tmp_path_factory) -> dict[str, object]:
    """The checkpoint files, by case name."""
    folder = tmp_path_factory.mktemp("sources")
    files = {}
    for mlp_bn, module in official.items():
        files[f"official_bn{int(mlp_bn)}"] = folder / f"official_bn{int(mlp_bn)}.ckpt"
        torch.save(_lightning_checkpoint(module), files[f"official_bn{int(mlp_bn)}"])
    files["torchvision"] = folder / "resnet18_tv.pth"
    torch.save(torchvision_resnet18.state_dict(), files["torchvision"])
    return files


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> dict[str, object]:
    """The hub folders converted from ``sources`` through the Python API, by case name."""
    out = tmp_path_factory.mktemp("converted")
    return {
        "official_bn0": convert_checkpoint(
            sources["official_bn0"], out / "bn0", source="ssole-official", arch="resnet18"
        ),
        "official_bn1": convert_checkpoint(
            sources["official_bn1"],
            out / "bn1",
            source="ssole-official",
            arch="resnet18",
            projector_bn=True,
        ),
        "torchvision": convert_checkpoint(
            sources["torchvision"], out / "tv", source="torchvision", arch="resnet18"
        ),
    }


def _source_backbone(case: str, official, torchvision_resnet18) -> nn.Module:
    """The source network as a feature extractor: eval mode, ``fc`` = Identity."""
    net = torchvision_resnet18 if case == "torchvision" else official[case.endswith("1")]
    net = copy.deepcopy(net if case == "torchvision" else net.encoder.encoder)
    net.fc = nn.Identity()
    return net.eval()


def _features(net: nn.Module, config: dict, photos) -> torch.Tensor:
    transform = timm.data.create_transform(**config, is_training=False)
    with torch.inference_mode():
        return net(torch.stack([transform(img) for img in photos]))


VANILLA_TIMM_SCRIPT = """
import json, sys
from pathlib import Path
import safetensors.torch, timm, torch
from PIL import Image

folders, photo_dir, out = {args}
paths = sorted(Path(photo_dir).glob("*.png"), key=lambda p: int(p.stem))
images = [Image.open(p).convert("RGB") for p in paths]
configs, features = {{}}, {{}}
for case, folder in folders.items():
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    configs[case] = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**configs[case], is_training=False)
    with torch.inference_mode():
        features[case] = model(torch.stack([transform(i) for i in images])).contiguous()
safetensors.torch.save_file(features, out)
print(json.dumps({{"configs": configs, "ssole_hub_imported": "ssole_hub" in sys.modules}}))
"""


@pytest.mark.slow
def test_converted_folders_give_the_source_features_in_vanilla_timm_without_ssole_hub(
    converted,
    official,
    torchvision_resnet18,
    photo_dir,
    hub_photos,
    hub_env,
    python_subprocess,
    tmp_path,
):
    out = tmp_path / "features.safetensors"
    folders = {case: str(path) for case, path in converted.items()}
    script = VANILLA_TIMM_SCRIPT.format(args=repr((folders, str(photo_dir), str(out))))
    result = python_subprocess(script, hub_env, tmp_path)
    assert result["ssole_hub_imported"] is False
    features = safetensors.torch.load_file(out)
    for case, config in result["configs"].items():
        # official checkpoints: the SSOLE recipe's preprocessing; torchvision: torchvision's
        recipe = (RECIPE_MEAN, RECIPE_STD, "bicubic", 0.875)
        tv = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875)
        expected = tv if case == "torchvision" else recipe
        found = (tuple(config["mean"]), tuple(config["std"]), config["interpolation"])
        assert (*found, config["crop_pct"]) == expected, case
        source = _features(
            _source_backbone(case, official, torchvision_resnet18), config, hub_photos
        )
        assert features[case].shape == source.shape == (len(hub_photos), 512), case
        assert source.std().item() > 0.1, case  # real, varied features, not a degenerate net
        assert (features[case] - source).abs().max().item() <= 1e-5, case


@pytest.mark.parametrize("mlp_bn", [False, True])
def test_official_projector_gives_the_source_fc_outputs(mlp_bn, converted, official, hub_photos):
    folder = converted[f"official_bn{int(mlp_bn)}"]
    info = ssole_hub.validate_hub_folder(folder)
    assert info.architecture == "ssole_resnet18" and info.timm_architecture == "resnet18"
    assert info.projector_config == {
        "in_dim": 512,
        "hidden_dim": HIDDEN,
        "out_dim": DIM,
        "depth": 3,
        "batch_norm": mlp_bn,
    }
    assert info.metadata["converted_from"] == {
        "source": "ssole-official",
        "file": f"official_bn{int(mlp_bn)}.ckpt",
        "epoch": 99,
        "global_step": 12300,
    }
    model = ssole_hub.load_model(folder, with_projector=True)
    source_fc = official[mlp_bn].encoder.encoder.fc.eval()
    config = timm.data.resolve_model_data_config(model.backbone)
    features = _features(model.backbone, config, hub_photos)
    with torch.inference_mode():
        projected, expected = model.projector(features), source_fc(features)
    assert projected.shape == (len(hub_photos), DIM)
    assert (projected - expected).abs().max().item() <= 1e-5


def test_official_single_linear_projector_converts_to_a_depth_1_projector(official, tmp_path):
    # ``mlp: false``: SSOLEEncoder keeps the ResNet's own fc, ``Linear(512, dim)``, as projector
    torch.manual_seed(3)
    fc = nn.Linear(512, DIM)
    checkpoint = _lightning_checkpoint(official[False])
    state = {k: v for k, v in checkpoint["state_dict"].items() if ".fc." not in k}
    checkpoint["state_dict"] = {
        **state,
        **{f"encoder.encoder.fc.{k}": v for k, v in fc.state_dict().items()},
    }
    path = _saved(checkpoint, tmp_path / "linear.ckpt")
    folder = convert_checkpoint(path, tmp_path / "hub", source="ssole-official", arch="resnet18")
    model = ssole_hub.load_model(folder, with_projector=True)
    assert model.projector.config["depth"] == 1 and model.output_dims["projector"] == DIM
    features = torch.randn(4, 512)
    with torch.inference_mode():
        assert (model.projector(features) - fc(features)).abs().max().item() <= 1e-6


def test_torchvision_state_dict_converts_without_its_classifier(
    converted, sources, tmp_path, capsys
):
    folder = converted["torchvision"]
    info = ssole_hub.validate_hub_folder(folder)
    assert info.projector_config is None and not (folder / "projector.safetensors").exists()
    assert info.metadata["converted_from"]["dropped_keys"] == ["fc.bias", "fc.weight"]
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    assert not any(k.startswith("fc.") for k in weights)
    card = (folder / "README.md").read_text()
    assert "converted from a torchvision checkpoint" in card and "with **SSOLE**" not in card
    assert "with **SSOLE**" in (converted["official_bn0"] / "README.md").read_text()
    # the command line writes the same folder and says what it dropped
    argv = ["convert", str(sources["torchvision"]), "--from", "torchvision", "--arch", "resnet18"]
    assert cli_main([*argv, "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "dropped fc.bias, fc.weight" in printed and "valid hub folder" in printed
    from_cli = safetensors.torch.load_file(tmp_path / "cli" / "model.safetensors")
    assert from_cli.keys() == weights.keys()
    assert all(torch.equal(from_cli[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_a_torchvision_resnet50_converts_and_loads_with_local_dir(
    warm_up_batch, hub_photos, tmp_path
):
    torch.manual_seed(2)
    source = _warm_up(torchvision.models.resnet50(), warm_up_batch[:6])
    torch.save(source.state_dict(), tmp_path / "r50.pth")
    folder = convert_checkpoint(
        tmp_path / "r50.pth", tmp_path / "hub", source="torchvision", arch="resnet50"
    )
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    config = timm.data.resolve_model_data_config(model)
    source.fc = nn.Identity()
    expected = _features(source, config, hub_photos)
    assert expected.shape == (len(hub_photos), 2048)
    assert (_features(model, config, hub_photos) - expected).abs().max().item() <= 1e-5


# --- refusals ---------------------------------------------------------------------------------


def _saved(obj, path):
    torch.save(obj, path)
    return path


def test_wrong_arch_is_refused_naming_the_one_that_fits(sources, tmp_path):
    with pytest.raises(ConversionError, match=r"do not fit resnet50: .*they fit resnet18") as info:
        convert_checkpoint(
            sources["official_bn0"], tmp_path / "out", source="ssole-official", arch="resnet50"
        )
    assert "layer1.0.conv1.weight (64, 64, 3, 3) (expected (64, 64, 1, 1))" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.pop("encoder.encoder.layer4.1.bn2.running_var"),
            "1 missing keys: encoder.encoder.layer4.1.bn2.running_var",
        ),
        (
            lambda s: s.pop("encoder.encoder.fc.3.weight"),
            "1 missing keys: encoder.encoder.fc.3.weight",
        ),
        (
            lambda s: s.update({"encoder.encoder.layer5.0.conv1.weight": torch.zeros(1)}),
            "1 unexpected keys: encoder.encoder.layer5.0.conv1.weight",
        ),
        (
            lambda s: s.update({"momentum_encoder.conv1.weight": torch.zeros(1)}),
            "unexpected keys outside encoder.encoder.: momentum_encoder.conv1.weight",
        ),
        (
            lambda s: s.update({"encoder.encoder.fc.1.weight": torch.zeros(HIDDEN, HIDDEN)}),
            "wrong shape: encoder.encoder.fc.1.weight (64, 64) (expected (64,))",
        ),
    ],
    ids=["missing-backbone", "missing-projector", "extra-backbone", "extra-outside", "misshapen"],
)
def test_keys_that_do_not_fit_are_named(change, message, official, tmp_path):
    checkpoint = _lightning_checkpoint(official[True])
    change(checkpoint["state_dict"])
    path = _saved(checkpoint, tmp_path / "changed.ckpt")
    with pytest.raises(ConversionError, match=r"changed\.ckpt") as info:
        load_external_checkpoint(path, source="ssole-official", arch="resnet18", projector_bn=True)
    assert message in str(info.value)


def test_torchvision_keys_that_do_not_fit_are_named(torchvision_resnet18, tmp_path):
    state = torchvision_resnet18.state_dict()
    state.pop("layer2.0.downsample.1.running_mean")
    state["fc.0.weight"] = torch.zeros(8, 512)  # an MLP head is not a classifier to drop
    path = _saved(state, tmp_path / "tv.pth")
    with pytest.raises(ConversionError) as info:
        load_external_checkpoint(path, source="torchvision", arch="resnet18")
    text = str(info.value)
    assert "1 missing keys: layer2.0.downsample.1.running_mean" in text
    assert "1 unexpected keys: fc.0.weight" in text


@pytest.mark.parametrize("mlp_bn", [False, True])
def test_projector_batch_norm_must_match_the_weights(mlp_bn, sources):
    # each checkpoint converted with the other setting of --projector-bn
    with pytest.raises(ConversionError) as info:
        load_external_checkpoint(
            sources[f"official_bn{int(mlp_bn)}"],
            source="ssole-official",
            arch="resnet18",
            projector_bn=not mlp_bn,
        )
    text = str(info.value)
    if mlp_bn:
        assert "unexpected keys: encoder.encoder.fc.1.bias" in text
        assert "has BatchNorm layers: pass projector_bn=True (--projector-bn)" in text
    else:
        assert "missing keys: encoder.encoder.fc.1.bias" in text
        assert "has no BatchNorm layers" in text


def test_a_file_that_needs_unpickling_is_refused_naming_the_file_and_the_object(
    official, tmp_path, capsys
):
    checkpoint = _lightning_checkpoint(official[False])
    checkpoint["hparams"] = argparse.Namespace(lr=2.0)  # an object weights_only loading refuses
    path = _saved(checkpoint, tmp_path / "pickled.ckpt")
    with pytest.raises(ConversionError) as info:
        load_external_checkpoint(path, source="ssole-official", arch="resnet18")
    text = str(info.value)
    assert str(path) in text and "argparse.Namespace" in text and "arbitrary code" in text
    argv = ["convert", str(path), "--from", "ssole-official", "--arch", "resnet18"]
    assert cli_main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "ssole-hub convert: error:" in err and "argparse.Namespace" in err
    assert not (tmp_path / "out").exists()


def test_files_of_another_layout_are_refused_saying_which_source_reads_them(sources, tmp_path):
    with pytest.raises(ConversionError, match=r"not a state dict: epoch, .*--from ssole-official"):
        load_external_checkpoint(sources["official_bn0"], source="torchvision", arch="resnet18")
    with pytest.raises(ConversionError, match=r"no 'state_dict' .*--from torchvision"):
        load_external_checkpoint(sources["torchvision"], source="ssole-official", arch="resnet18")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match=r"junk\.ckpt is not a readable torch checkpoint"):
        load_external_checkpoint(junk, source="ssole-official", arch="resnet18")
    with pytest.raises(FileNotFoundError, match=r"absent\.ckpt"):
        load_external_checkpoint(tmp_path / "absent.ckpt", source="torchvision", arch="resnet18")
    with pytest.raises(ValueError, match="arch must be one of resnet18, resnet50"):
        load_external_checkpoint(sources["torchvision"], source="torchvision", arch="resnet34")
