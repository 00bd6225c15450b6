"""Config loading: YAML files, command-line overrides and clear errors for bad input."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from training.config import ConfigError, config_to_dict, load_config
from training.objectives import METHODS, build_objective

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "training" / "configs").glob("*.yaml"))


def test_every_shipped_config_loads_and_names_its_run():
    assert {p.stem for p in CONFIGS} >= {
        "imagenet100_r18_m4", "imagenet1k_r50_m8", "fashion_mnist_r18", "digits_demo",
    }  # fmt: skip
    for path in CONFIGS:
        cfg = load_config(path, ["data.root=/data/train", "data.val_root=/data/val"])
        assert cfg.run_name == path.stem
        assert cfg.method in METHODS


def test_imagenet100_config_is_the_released_recipe():
    cfg = load_config(
        CONFIGS[0].parent / "imagenet100_r18_m4.yaml", ["data.root=/x", "data.val_root=/y"]
    )
    assert (cfg.model.arch, cfg.views.num_views, cfg.views.size) == ("ssole_resnet18", 4, 224)
    assert cfg.views.scale == (0.14, 1.0) and cfg.views.color_jitter == (0.8, 0.8, 0.8, 0.2)
    assert (cfg.views.color_jitter_p, cfg.views.grayscale_p, cfg.views.blur_p) == (0.8, 0.2, 0.5)
    assert cfg.views.solarize_p == 0.2 and cfg.views.blur_sigma == (0.1, 2.0)
    assert (cfg.data.batch_size, cfg.epochs, cfg.seed, cfg.ssole_lambda) == (32, 100, 42, 0.6)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.final_lr) == ("sgd", 2.0, 0.002)
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.warmup_epochs) == (0.9, 1e-5, 0)
    assert (cfg.model.projector_hidden, cfg.model.projector_out, cfg.model.projector_depth) == (
        4096,
        4096,
        3,
    )
    assert cfg.precision == "fp16" and cfg.model.sync_batchnorm
    assert cfg.data.std == (0.228, 0.224, 0.225)


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: vicreg\ndata:\n  dataset: digits\n")
    cfg = load_config(path, ["optim.lr=0.5", "views.scale=[0.2, 1.0]", "model.compile=true"])
    assert cfg.method == "vicreg" and cfg.optim.lr == 0.5 and cfg.views.scale == (0.2, 1.0)
    assert cfg.model.compile is True and cfg.data.dataset == "digits"
    assert config_to_dict(cfg)["views"]["scale"] == [0.2, 1.0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
        ("epochz=3", "unknown config key 'epochz'"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("epochs=2.5", "epochs must be an integer"),
        ("method=byol", "method must be one of 'ssole', 'vicreg'"),
        ("views.num_views=1", "views.num_views must be >= 2"),
        ("views.scale=[0.5]", "views.scale must be a list of 2 numbers"),
        ("views.scale=[0.9,0.2]", "views.scale must satisfy"),
        ("views.blur_p=1.5", "views.blur_p must be a probability"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("model.arch=resnet_unknown", "not a timm model name"),
        ("model.compile=yes please", "model.compile must be true or false"),
        ("optim=3", "optim must be a mapping"),
        ("lr", "must look like key=value"),
    ],
)
def test_bad_overrides_fail_with_a_message_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["data.dataset=digits", override])


def test_folder_dataset_needs_a_root_and_knn_needs_a_held_out_folder():
    with pytest.raises(ConfigError, match=r"data\.root must name an image folder"):
        load_config(None, ["data.dataset=folder"])
    with pytest.raises(ConfigError, match=r"set data\.val_root"):
        load_config(None, ["data.root=/x", "knn.every_epochs=1"])


def test_missing_or_malformed_config_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_exponent_without_a_dot_is_read_as_a_number() -> None:
    """PyYAML reads ``1e-05`` as a string; the config still takes it as the number it means."""
    cfg = load_config(None, ["data.dataset=digits", "optim.weight_decay=1e-05"])
    assert cfg.optim.weight_decay == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match=r"optim\.weight_decay must be finite"):
        load_config(None, ["data.dataset=digits", "optim.weight_decay=nan"])


def test_objective_settings_default_to_the_papers_and_take_overrides() -> None:
    cfg = load_config(None, ["data.dataset=digits"])
    assert (cfg.ssole_objective, cfg.ssole_centering) == ("ssole", "mean")
    assert cfg.vicreg_weights == (25.0, 25.0, 1.0)
    assert (cfg.barlowtwins_lambda, cfg.simclr_temperature) == (5e-3, 0.2)
    cfg = load_config(
        None,
        [
            "data.dataset=digits", "ssole_objective=coupled_ole", "ssole_centering=none",
            "vicreg_weights=[10,10,1]", "barlowtwins_lambda=0.01", "simclr_temperature=0.5",
        ],
    )  # fmt: skip
    assert (cfg.ssole_objective, cfg.ssole_centering) == ("coupled_ole", "none")
    assert cfg.vicreg_weights == (10.0, 10.0, 1.0)
    assert (cfg.barlowtwins_lambda, cfg.simclr_temperature) == (0.01, 0.5)


def test_objective_options_are_exactly_build_objectives_keywords() -> None:
    cfg = load_config(None, ["data.dataset=digits", "ssole_centering=none", "ssole_lambda=0.3"])
    options = cfg.objective_options()
    inspect.signature(build_objective).bind("ssole", **options)  # no unknown keyword
    keywords = set(inspect.signature(build_objective).parameters) - {"method", "gather"}
    assert set(options) == keywords
    assert options["ssole_centering"] == "none" and options["lambda_"] == 0.3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ssole_objective=ole", "ssole_objective must be one of 'ssole', 'coupled_ole', got 'ole'"),
        ("ssole_centering=median", "ssole_centering must be one of 'mean', 'none', got 'median'"),
        ("vicreg_weights=[25,-1,1]", "vicreg_weights must be non-negative"),
        ("vicreg_weights=[25,25]", "vicreg_weights must be a list of 3 numbers"),
        ("barlowtwins_lambda=-0.1", "barlowtwins_lambda must be >= 0"),
        ("simclr_temperature=0", "simclr_temperature must be > 0"),
    ],
)
def test_bad_objective_settings_fail_naming_the_key(override, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["data.dataset=digits", override])
