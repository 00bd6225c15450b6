"""Pre-training objectives on multi-view embeddings ``(B, N, d)``: SSOLE and its peers.

Peers come from the maintained ``lightly`` package. They are 2-view losses; with N views they are
averaged over all N*(N-1)/2 view pairs, so every method sees the same views.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from ssole_hub.loss import SSOLELoss, ssole_loss
from ssole_hub.models import l2_normalize

__all__ = ["METHODS", "Objective", "build_objective"]

Objective = Callable[[torch.Tensor], dict[str, torch.Tensor]]
"""Maps raw projector outputs ``(B, N, d)`` to a dict with at least ``"loss"``."""

METHODS = ("ssole", "vicreg", "barlowtwins", "simclr")


def _check_views(z: torch.Tensor) -> None:
    if z.ndim != 3 or z.shape[0] < 2 or z.shape[1] < 2:
        raise ValueError(
            f"embeddings must be (B, N, d) with B >= 2 images and N >= 2 views, got shape {tuple(z.shape)}"
        )


def _pairwise(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Objective:
    def objective(z: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_views(z)
        pairs = list(itertools.combinations(range(z.shape[1]), 2))
        loss = sum(loss_fn(z[:, i].float(), z[:, j].float()) for i, j in pairs) / len(pairs)
        return {"loss": loss}

    return objective


def build_objective(
    method: str,
    lambda_: float = 0.6,
    gamma: float = 0.5,
    gather: bool = False,
    *,
    ssole_objective: str = "ssole",
    ssole_centering: str = "mean",
    vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0),
    barlowtwins_lambda: float = 5e-3,
    simclr_temperature: float = 0.2,
) -> Objective:
    """Return the objective for ``method`` (one of :data:`METHODS`).

    SSOLE L2-normalises the embeddings itself and reports its parts (``loss_low``, ``loss_high``,
    ``rank_low``, ``rank_high``); ``gather`` makes every method use all ranks' embeddings.

    Every method's settings may be passed (``Config.objective_options()`` gives them all); each
    objective reads only its own:

    - ``ssole``: ``lambda_``, ``gamma``, ``ssole_objective`` (``ssole`` or ``coupled_ole``) and
      ``ssole_centering`` (``mean`` or ``none``), as :func:`ssole_hub.loss.ssole_loss`;
    - ``vicreg``: ``vicreg_weights``, the (invariance, variance, covariance) weights;
    - ``barlowtwins``: ``barlowtwins_lambda``, the weight of the off-diagonal terms;
    - ``simclr``: ``simclr_temperature``, NT-Xent's temperature.

    Every objective raises ``ValueError`` for input that is not ``(B, N, d)`` with B, N >= 2.

    Raises:
        ValueError: for an unknown method, or an SSOLE setting out of range.
    """
    if method == "ssole":
        # Refuse bad settings now rather than at the first training step.
        SSOLELoss(lambda_, gamma, objective=ssole_objective, centering=ssole_centering)

        def ssole(z: torch.Tensor) -> dict[str, torch.Tensor]:
            _check_views(z)
            parts = ssole_loss(
                l2_normalize(z),
                lambda_,
                gamma,
                gather,
                objective=ssole_objective,
                centering=ssole_centering,
            )
            return parts._asdict()

        return ssole
    if method == "vicreg":
        from lightly.loss import VICRegLoss

        sim, var, cov = vicreg_weights
        return _pairwise(
            VICRegLoss(lambda_param=sim, mu_param=var, nu_param=cov, gather_distributed=gather)
        )
    if method == "barlowtwins":
        from lightly.loss import BarlowTwinsLoss

        return _pairwise(
            BarlowTwinsLoss(lambda_param=barlowtwins_lambda, gather_distributed=gather)
        )
    if method == "simclr":
        from lightly.loss import NTXentLoss

        return _pairwise(NTXentLoss(temperature=simclr_temperature, gather_distributed=gather))
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
