"""Fixtures for the pre-training tests: tiny but real configs (ResNet-18, real digits)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from training.config import Config, load_config

TINY = [
    "data.dataset=digits",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.eval_crop_pct=1.0",
    "views.num_views=2",
    "views.size=16",
    "views.scale=[0.5,1.0]",
    "views.backend=pil",
    "model.projector_hidden=64",
    "model.projector_out=64",
    "model.channels_last=false",
    "optim.lr=0.05",
    "optim.final_lr=0.0",
    "log_every_steps=1",
    "device=cpu",
]


@pytest.fixture
def tiny_config(tmp_path) -> Callable[..., Config]:
    """Build a tiny digits config writing under ``tmp_path``; extra ``key=value`` overrides win."""

    def make(*overrides: str) -> Config:
        return load_config(None, [*TINY, f"output_dir={tmp_path / 'runs'}", *overrides])

    return make


@pytest.fixture(scope="session")
def digits_split():
    """scikit-learn's real 8x8 digits as raw-pixel features, a stratified 70/30 split."""
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return tuple(torch.as_tensor(a) for a in (xtr, ytr, xte, yte))
