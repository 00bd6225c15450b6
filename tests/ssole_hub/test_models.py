"""The SSOLE ResNets registered with timm, the projector and the multi-view encoder."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torchvision.transforms import v2

import ssole_hub  # noqa: F401  (registers the models with timm)
from ssole_hub import SSOLEModel, SSOLEProjector, l2_normalize, ssole_loss


def test_both_models_are_listed_by_timm():
    assert timm.list_models("ssole_*") == ["ssole_resnet18", "ssole_resnet50"]


@pytest.mark.parametrize(("name", "dim"), [("ssole_resnet18", 512), ("ssole_resnet50", 2048)])
def test_model_outputs_pooled_features(name, dim):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, dim)
    assert model.num_classes == 0
    assert model.num_features == dim


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_state_dict_is_interchangeable_with_vanilla_timm(arch):
    ours = timm.create_model(f"ssole_{arch}")
    vanilla = timm.create_model(arch, num_classes=0)
    ours_sd, vanilla_sd = ours.state_dict(), vanilla.state_dict()
    assert list(ours_sd) == list(vanilla_sd)
    assert all(ours_sd[k].shape == vanilla_sd[k].shape for k in ours_sd)
    # Interchangeable both ways, strictly.
    vanilla.load_state_dict(ours_sd)
    ours.load_state_dict(vanilla_sd)


def test_pretrained_config_follows_the_recipe():
    cfg = timm.create_model("ssole_resnet18").pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406)
    assert cfg["std"] == (0.228, 0.224, 0.225)
    assert cfg["num_classes"] == 0


@pytest.mark.parametrize(
    ("depth", "batch_norm", "expected"),
    [
        (3, False, [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]),
        (2, True, [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]),
        (1, False, [nn.Linear]),
    ],
)
def test_projector_layers_follow_depth_and_batch_norm(depth, batch_norm, expected):
    proj = SSOLEProjector(32, hidden_dim=48, out_dim=16, depth=depth, batch_norm=batch_norm)
    assert [type(m) for m in proj] == expected
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 32
    assert all(m.out_features == 48 for m in linears[:-1])
    assert linears[-1].out_features == 16
    # BatchNorm makes the bias of the linear before it redundant.
    assert all((m.bias is None) == batch_norm for m in linears[:-1])
    assert proj(torch.randn(5, 32)).shape == (5, 16)
    assert proj.config == dict(
        in_dim=32, hidden_dim=48, out_dim=16, depth=depth, batch_norm=batch_norm
    )


def test_projector_defaults_are_the_released_recipe():
    proj = SSOLEProjector(512)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (512, 4096),
        (4096, 4096),
        (4096, 4096),
    ]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in proj)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_dim": 0}, "dims must be positive"),
        ({"in_dim": 8, "hidden_dim": -1}, "dims must be positive"),
        ({"in_dim": 8, "out_dim": 0}, "dims must be positive"),
        ({"in_dim": 8, "depth": 0}, "depth must be >= 1"),
    ],
)
def test_projector_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSOLEProjector(**kwargs)


@pytest.fixture(scope="module")
def small_encoder() -> SSOLEModel:
    torch.manual_seed(0)
    backbone = timm.create_model("ssole_resnet18")
    return SSOLEModel(backbone, SSOLEProjector(512, hidden_dim=64, out_dim=32)).eval()


def _views(photos, n_views: int) -> torch.Tensor:
    augment = v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(64, scale=(0.14, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize((0.485, 0.456, 0.406), (0.228, 0.224, 0.225)),
        ]
    )
    return torch.stack([torch.stack([augment(p) for _ in range(n_views)]) for p in photos])


def test_model_maps_views_of_real_photos_to_unit_norm_embeddings(small_encoder, photos):
    torch.manual_seed(0)
    views = _views(photos, 3)  # (6 photos, 3 views, 3, 64, 64)
    with torch.no_grad():
        z = small_encoder(views.flatten(0, 1), "projector", normalize=True).view(6, 3, -1)
    assert z.shape == (len(photos), 3, 32)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(len(photos), 3))
    assert torch.isfinite(ssole_loss(z).loss)


def test_model_without_normalize_returns_raw_projector_outputs(small_encoder, photos):
    images = _views(photos[:2], 2).flatten(0, 1)
    with torch.no_grad():
        z_raw, z = small_encoder(images), small_encoder(images, normalize=True)
        pooled = small_encoder(images, "backbone")
    assert not torch.allclose(z_raw.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(l2_normalize(z_raw), z)
    torch.testing.assert_close(small_encoder.projector(pooled), z_raw)
    assert small_encoder.output_dims == {"backbone": 512, "projector": 32}


def test_model_rejects_bad_inputs_and_outputs(small_encoder):
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        small_encoder(torch.randn(2, 2, 3, 64, 64))
    with pytest.raises(ValueError, match="output must be"):
        small_encoder(torch.randn(1, 3, 64, 64), "logits")
    with pytest.raises(ValueError, match="has none"):
        SSOLEModel(small_encoder.backbone)(torch.randn(1, 3, 64, 64), "projector")


def test_encoder_state_dict_has_backbone_and_projector_keys(small_encoder):
    keys = list(small_encoder.state_dict())
    assert {k.split(".")[0] for k in keys} == {"backbone", "projector"}
    assert "backbone.conv1.weight" in keys
