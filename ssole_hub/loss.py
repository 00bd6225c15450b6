"""PLACEHOLDER reference implementation (generic SVD). Being replaced by the exact, fast one."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class SSOLELossParts(NamedTuple):
    loss: torch.Tensor
    loss_low: torch.Tensor
    loss_high: torch.Tensor
    rank_low: torch.Tensor
    rank_high: torch.Tensor


def nuclear_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x).sum(-1)


def ssole_loss(
    z: torch.Tensor, lambda_: float = 0.6, gamma: float = 0.5, gather: bool = False
) -> SSOLELossParts:
    z = z.float()
    b, n, d = z.shape
    centred = z - z.mean(1, keepdim=True).detach()
    r = nuclear_norm(centred)
    loss_low = (r**2 / (n - 1) ** 2).mean()
    m = z.transpose(0, 1)
    rv = nuclear_norm(m)
    beta = torch.asin(rv / b) - math.asin(1 / math.sqrt(b))
    c2 = (b * torch.cos(beta) ** 2 - 1) / (b - 1)
    c1 = (b**2 / rv**2 - 1) / (b - 1)
    loss_high = (gamma * c1 + (1 - gamma) * c2).mean()
    return SSOLELossParts(loss_low + lambda_ * loss_high, loss_low, loss_high, r.mean(), rv.mean())


class SSOLELoss(nn.Module):
    def __init__(self, lambda_: float = 0.6, gamma: float = 0.5, gather: bool = False) -> None:
        super().__init__()
        self.lambda_, self.gamma, self.gather = lambda_, gamma, gather

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return ssole_loss(z, self.lambda_, self.gamma, self.gather).loss
