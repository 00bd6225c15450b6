"""Fixtures for the hub tests: a small trained-looking SSOLE checkpoint, its exported hub folder,
real photos on disk, and a loopback stand-in for the Hugging Face Hub (see ``tests/hub_server.py``)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import ssole_hub
from ssole_hub.hub.checkpoint import model_checkpoint_state
from ssole_hub.models import SSOLEModel, SSOLEProjector

REPO_ROOT = Path(__file__).resolve().parents[2]
# Non-default preprocessing, so tests can tell the checkpoint's config from the architecture's.
CKPT_PRETRAINED_CFG = {"input_size": (3, 160, 160), "crop_pct": 0.9, "interpolation": "bilinear"}
PROJECTOR = {"in_dim": 512, "hidden_dim": 64, "out_dim": 32, "depth": 3}


def _load_hub_server():
    # pytest runs with --import-mode=importlib and tests/ is not a package: load the module by path.
    spec = importlib.util.spec_from_file_location(
        "hub_server", REPO_ROOT / "tests" / "hub_server.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


hub_server = _load_hub_server()


@pytest.fixture(scope="session")
def export_settings() -> dict:
    """What the test checkpoint declares: its preprocessing and projector config."""
    return {"pretrained_cfg": dict(CKPT_PRETRAINED_CFG), "projector": dict(PROJECTOR)}


@pytest.fixture(scope="session")
def encoder() -> SSOLEModel:
    """A ResNet-18 SSOLE encoder with a small projector and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    backbone = timm.create_model("ssole_resnet18")
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return SSOLEModel(backbone, SSOLEProjector(**PROJECTOR)).eval()


@pytest.fixture(scope="session")
def checkpoint_path(encoder, tmp_path_factory) -> Path:
    """A training checkpoint of ``encoder`` in the shared checkpoint format."""
    state = model_checkpoint_state(
        encoder,
        "ssole_resnet18",
        encoder.projector.config,
        CKPT_PRETRAINED_CFG,
        {"dataset": "imagenet-100", "epochs": 2, "views": 4, "eval_results": {"knn_top1": 31.5}},
    )
    state["optimizer"] = {"state": {}, "param_groups": []}  # training's own keys ride along
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def hub_folder(checkpoint_path, tmp_path_factory) -> Path:
    """The hub folder exported from ``checkpoint_path`` (treat as read-only; copy to modify)."""
    out = tmp_path_factory.mktemp("export") / "ssole_resnet18-test"
    return ssole_hub.export_hub_folder(
        checkpoint_path, out, eval_results={"linear_top1": 40.25, "rankme": 120.0}
    )


@pytest.fixture(scope="session")
def hub_photos(photos) -> list:
    """Three of the real photos (colour, grayscale-turned-RGB, astronomy): enough to compare
    features, few enough to keep CPU forward passes short."""
    return [photos[0], photos[4], photos[5]]


@pytest.fixture(scope="session")
def photo_dir(hub_photos, tmp_path_factory) -> Path:
    """The hub test photos written as PNG files."""
    folder = tmp_path_factory.mktemp("photos")
    for i, img in enumerate(hub_photos):
        img.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def reference_features(encoder, hub_photos) -> dict[str, torch.Tensor]:
    """Backbone features and raw projector outputs of the source encoder on the photos, with the
    preprocessing the checkpoint declares."""
    backbone = timm.create_model(
        "ssole_resnet18", pretrained_cfg_overlay=dict(CKPT_PRETRAINED_CFG)
    ).eval()
    backbone.load_state_dict(encoder.backbone.state_dict())
    config = timm.data.resolve_model_data_config(backbone)
    transform = timm.data.create_transform(**config, is_training=False)
    batch = torch.stack([transform(img) for img in hub_photos])
    with torch.inference_mode():
        feats = encoder.backbone(batch)
        return {"features": feats, "projected": encoder.projector(feats)}


@pytest.fixture
def make_loopback_hub():
    """``make(**kwargs)``: start a loopback Hub stand-in (``LoopbackHub`` arguments); stopped after
    the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(hub_server.LoopbackHub(**kwargs))


@pytest.fixture
def loopback_hub(make_loopback_hub):
    """A running loopback stand-in for the Hub that requires the token ``test-token`` to write."""
    return make_loopback_hub(token="test-token")


@pytest.fixture
def hub_env(tmp_path) -> dict[str, str]:
    """Environment for a subprocess that uses the HF client: its own HF_HOME / cache / torch hub
    dir under tmp, no inherited token or endpoint, telemetry off."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_", "SSOLE_HUB_")) and k != "TORCH_HOME"
    }
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_CACHE=str(tmp_path / "hf_home" / "hub"),
        TORCH_HOME=str(tmp_path / "torch_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    return env


def run_python(script: str, env: dict[str, str], cwd: Path) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON object last, which is returned."""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def python_subprocess():
    """``run(script, env, cwd) -> dict``: run a script in a fresh Python, return its last JSON line."""
    return run_python
