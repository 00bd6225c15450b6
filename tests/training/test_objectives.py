"""The pre-training objectives: SSOLE and lightly's VICReg, Barlow Twins and NT-Xent (SimCLR)
averaged over every pair of the N views."""

from __future__ import annotations

import itertools

import pytest
import torch
from lightly.loss import BarlowTwinsLoss, NTXentLoss, VICRegLoss

from ssole_hub.loss import ssole_loss
from ssole_hub.models import l2_normalize
from training.objectives import METHODS, build_objective


def _embeddings(b: int = 32, n: int = 4, d: int = 64, agree: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if agree:
        base = torch.randn(b, 1, d, generator=g)
        return base + 0.05 * torch.randn(b, n, d, generator=g)
    return torch.randn(b, n, d, generator=g)


@pytest.mark.parametrize("method", METHODS)
def test_every_objective_gives_a_finite_scalar_loss_with_gradients(method):
    z = _embeddings().requires_grad_(True)
    out = build_objective(method)(z)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_objective_prefers_views_that_agree(method):
    objective = build_objective(method)
    agreeing = objective(_embeddings(agree=True))["loss"]
    independent = objective(_embeddings(agree=False))["loss"]
    assert agreeing < independent


@pytest.mark.parametrize(
    ("method", "loss"),
    [("vicreg", VICRegLoss()), ("barlowtwins", BarlowTwinsLoss()), ("simclr", NTXentLoss(0.2))],
)
def test_two_view_peers_average_lightly_losses_over_all_view_pairs(method, loss):
    z = _embeddings(n=3)
    expected = sum(loss(z[:, i], z[:, j]) for i, j in itertools.combinations(range(3), 2)) / 3
    assert build_objective(method)(z)["loss"] == pytest.approx(float(expected), rel=1e-5)
    # With two views the objective is lightly's loss itself.
    two = z[:, :2]
    assert build_objective(method)(two)["loss"] == pytest.approx(
        float(loss(two[:, 0], two[:, 1])), rel=1e-5
    )


def test_ssole_reports_its_parts_and_scores_collapse_as_high_rank_loss_one():
    collapsed = torch.ones(16, 4, 32)
    out = build_objective("ssole")(collapsed)
    assert {"loss", "loss_low", "loss_high", "rank_low", "rank_high"} <= out.keys()
    assert float(out["loss_high"]) == pytest.approx(1.0, abs=1e-4)
    assert float(out["loss_low"]) == pytest.approx(0.0, abs=1e-6)


def test_unknown_method_is_rejected_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown method 'byol'.*ssole"):
        build_objective("byol")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(8, 1, 16), (1, 4, 16), (8, 16)])
def test_objectives_reject_fewer_than_two_views_or_images(method, shape):
    with pytest.raises(ValueError, match=r"\(B, N, d\)"):
        build_objective(method)(torch.randn(*shape))


@pytest.mark.parametrize(
    "variant",
    [{"objective": "coupled_ole"}, {"centering": "none"}, {"objective": "ssole"}],
    ids=["coupled_ole", "raw_views", "ssole"],
)
def test_ssole_variants_train_the_loss_they_name(variant):
    z = _embeddings(b=8, n=3, d=16).requires_grad_(True)
    keys = {"objective": "ssole_objective", "centering": "ssole_centering"}
    objective = build_objective("ssole", 0.4, **{keys[k]: v for k, v in variant.items()})
    out = objective(z)
    expected = ssole_loss(l2_normalize(z.detach()), 0.4, **variant)
    assert out["loss"].item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert out["loss_low"].item() == pytest.approx(expected.loss_low.item(), rel=1e-6)
    out["loss"].backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_coupled_ole_objective_differs_from_ssole():
    z = _embeddings(b=8, n=3, d=16)
    ssole = float(build_objective("ssole")(z)["loss"])
    coupled = build_objective("ssole", ssole_objective="coupled_ole")(z)
    # coupled OLE subtracts its high-rank term: loss = loss_low - lambda * loss_high.
    assert float(coupled["loss"]) == pytest.approx(
        float(coupled["loss_low"]) - 0.6 * float(coupled["loss_high"]), rel=1e-6
    )
    assert float(coupled["loss"]) != pytest.approx(ssole, rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ssole_objective": "ole"}, "objective must be one of"),
        ({"ssole_centering": "median"}, "centering must be one of"),
    ],
)
def test_bad_ssole_variant_is_rejected_when_the_objective_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_objective("ssole", **kwargs)


@pytest.mark.parametrize(
    ("method", "kwargs", "loss"),
    [
        ("vicreg", {"vicreg_weights": (10.0, 5.0, 2.0)}, VICRegLoss(10.0, 5.0, 2.0)),
        ("barlowtwins", {"barlowtwins_lambda": 1e-2}, BarlowTwinsLoss(1e-2)),
        ("simclr", {"simclr_temperature": 0.5}, NTXentLoss(0.5)),
    ],
)
def test_peer_settings_reach_their_loss(method, kwargs, loss):
    z = _embeddings(n=2)
    out = build_objective(method, **kwargs)(z)["loss"]
    assert float(out) == pytest.approx(float(loss(z[:, 0], z[:, 1])), rel=1e-5)
    assert float(out) != pytest.approx(float(build_objective(method)(z)["loss"]), rel=1e-3)
