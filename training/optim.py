"""Optimiser (SGD or LARS, no weight decay on 1-D parameters) and the per-step learning rate."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import OptimConfig

__all__ = ["build_optimizer", "learning_rate"]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum, or LARS (lightly's), with two parameter groups: weights with
    ``weight_decay``, and biases / norm parameters (every 1-D tensor) with none. lightly's LARS
    leaves parameters without weight decay out of the layer-wise scaling, so biases and norms are
    excluded from LARS as well."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "lars":
        from lightly.utils.lars import LARS

        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def learning_rate(
    step: int, total_steps: int, warmup_steps: int, lr: float, final_lr: float
) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up from ``lr / warmup_steps`` to ``lr``,
    then a cosine from ``lr`` down to ``final_lr`` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * progress))
