"""``hubconf.py``: the torch.hub entry points, loaded the way users load them (``source="local"``).

Downloads of pretrained weights through these entry points are covered over HTTP in
``test_hub_remote.py``; here they build without weights.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch

from ssole_hub import SSOLEModel

REPO_ROOT = str(Path(__file__).resolve().parents[2])


def test_hubconf_declares_importable_dependencies_and_documented_entry_points():
    # torch.hub.list/help only read GitHub repos; load the file as torch.hub does for source="local".
    spec = importlib.util.spec_from_file_location("hubconf", Path(REPO_ROOT) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    for dependency in hubconf.dependencies:
        assert importlib.util.find_spec(dependency) is not None, dependency
    assert hubconf.load_model.__doc__
    for name in ("ssole_resnet18", "ssole_resnet50"):
        entry = getattr(hubconf, name)
        assert "SSOLE" in entry.__doc__ and "pooled features" in entry.__doc__
        assert inspect.signature(entry).parameters["pretrained"].default is True


def test_hubconf_models_are_eval_mode_and_output_pooled_features():
    model = torch.hub.load(REPO_ROOT, "ssole_resnet18", source="local", pretrained=False)
    assert not model.training
    assert model.pretrained_cfg["tag"] == "in100_m4"
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 512)


def test_hubconf_with_projector_returns_projector_outputs_and_preprocessing():
    model = torch.hub.load(
        REPO_ROOT, "ssole_resnet18", source="local", pretrained=False, with_projector=True
    )
    assert isinstance(model, SSOLEModel) and not model.training
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, model.projector.config["out_dim"])


def test_hubconf_load_model_entry_loads_any_hub_folder(hub_folder, encoder):
    model = torch.hub.load(REPO_ROOT, "load_model", f"local-dir:{hub_folder}", source="local")
    expected = encoder.backbone.state_dict()
    assert not model.training
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
