"""Optimiser groups, the learning-rate schedule, and checkpoint files (atomic, pruned, safe)."""

from __future__ import annotations

import random
from itertools import pairwise

import numpy as np
import pytest
import timm
import torch

import ssole_hub  # noqa: F401 - registers ssole_resnet18
from training.checkpointing import (
    capture_rng_state,
    checkpoint_name,
    latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_atomic,
)
from training.config import OptimConfig
from training.optim import build_optimizer, learning_rate


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_biases_and_norms_get_no_weight_decay(name):
    model = timm.create_model("ssole_resnet18", num_classes=0)
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=1e-4))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert type(opt).__name__ == {"sgd": "SGD", "lars": "LARS"}[name]


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_final_lr():
    lrs = [learning_rate(s, 100, 10, lr=2.0, final_lr=0.002) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)
    assert all(a < b for a, b in pairwise(lrs[:10]))
    assert all(a >= b for a, b in pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.002)
    no_warmup = [learning_rate(s, 50, 0, 2.0, 0.002) for s in (0, 49)]
    assert no_warmup == pytest.approx([2.0, 0.002])


def test_checkpoints_are_written_atomically_pruned_and_found(tmp_path):
    for step in (5, 10, 15, 20):
        save_atomic({"step": step}, tmp_path / checkpoint_name(step))
    assert not list(tmp_path.glob("*.tmp"))
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [checkpoint_name(5), checkpoint_name(10)]
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(20)
    assert latest_checkpoint(tmp_path / "none") is None


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = save_atomic({"v": torch.ones(2)}, tmp_path / "c.pt")
    with pytest.raises(Exception):  # noqa: B017 - any pickling error will do
        save_atomic({"v": lambda: None}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(2))
    assert not list(tmp_path.glob("*.tmp"))


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_atomic({"rng": capture_rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_resuming_from_a_file_that_is_not_a_training_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint to resume from not found"):
        load_training_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_training_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="lacks optimizer"):
        load_training_checkpoint(tmp_path / "partial.pt")
