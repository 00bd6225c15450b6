"""End-to-end pre-training on real digits: learning, exact resume, checkpoints, failures. (Two
ranks under torchrun: the GPU check's dry run, ``tests/bench/test_gpu_check.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from ssole_hub.hub.checkpoint import load_model_checkpoint
from ssole_hub.preprocessing import resolve_preprocessing
from training import pretrain
from training.data import DatasetNotFoundError
from training.distributed import init_distributed
from training.trainer import NonFiniteLossError, Trainer

REPO = Path(__file__).resolve().parents[2]


def _log(run_dir: Path, event: str = "train") -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


@pytest.mark.slow
def test_loss_decreases_over_a_short_run_on_digits(tiny_config):
    cfg = tiny_config("epochs=1", "max_steps=16", "optim.lr=0.1", "optim.warmup_epochs=0.05")
    path = pretrain.run(cfg)
    losses = [r["loss"] for r in _log(path.parent.parent)]
    assert len(losses) == 16
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.02, (first, last)
    assert all(r["rankme"] >= 1 for r in _log(path.parent.parent))


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tiny_config):
    # 64 images in batches of 16: 4 steps per epoch; stopping at step 6 cuts epoch 2 mid-way.
    common = ["epochs=2", "data.max_images=64", "optim.warmup_epochs=0.5"]
    full = pretrain.run(tiny_config(*common, "run_name=full"))

    stopped = pretrain.run(tiny_config(*common, "run_name=cut", "max_steps=6"))
    assert stopped.name == "step_00000006.pt"
    resumed = pretrain.run(tiny_config(*common, "run_name=cut", "resume=latest"))

    a = torch.load(full, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    mid = torch.load(stopped, weights_only=True)
    assert not torch.equal(
        mid["model"]["backbone.conv1.weight"], b["model"]["backbone.conv1.weight"]
    )
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key
    mom_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(mom_a, mom_b, strict=True))


@pytest.mark.slow
def test_checkpoint_loads_safely_and_exports_a_vanilla_timm_backbone(tiny_config, photos):
    path = pretrain.run(
        tiny_config("max_steps=2", "checkpoint_every_steps=1", "keep_checkpoints=1")
    )
    run_dir = path.parent.parent
    # keep_checkpoints=1 leaves only the newest step file.
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*.pt")] == ["step_00000002.pt"]
    assert (run_dir / "config.yaml").is_file()

    ckpt = load_model_checkpoint(path)  # weights_only=True inside
    assert ckpt.arch == "ssole_resnet18"
    assert ckpt.metadata["method"] == "ssole" and ckpt.metadata["views"] == 2
    assert (
        ckpt.metadata["image_size"] == 16 and ckpt.metadata["config"]["data"]["dataset"] == "digits"
    )
    assert tuple(ckpt.pretrained_cfg["input_size"]) == (3, 16, 16)
    vanilla = timm.create_model("resnet18", num_classes=0)
    vanilla.load_state_dict(ckpt.backbone)
    x = resolve_preprocessing(ckpt.pretrained_cfg).transform(photos[0]).unsqueeze(0)
    assert x.shape == (1, 3, 16, 16)
    assert vanilla.eval()(x).shape == (1, 512)
    assert set(ckpt.projector) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}


def _nan_objective(*args, **kwargs):
    return lambda z: {"loss": z.sum() * float("nan")}


def test_non_finite_loss_skips_the_update_and_is_counted(tiny_config, monkeypatch):
    import training.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "build_objective", _nan_objective)
    trainer = Trainer(tiny_config(), init_distributed("cpu"), steps_per_epoch=10)
    before = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    views = torch.randn(4, 2, 3, 16, 16)
    out = trainer.step(views)
    assert out["skipped"] and trainer.nonfinite_total == 1 and trainer.global_step == 1
    after = trainer.encoder.state_dict()
    params = [k for k in before if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(before[k], after[k]) for k in params)


def test_many_non_finite_losses_in_a_row_abort_with_a_clear_message(tiny_config, monkeypatch):
    import training.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "build_objective", _nan_objective)
    cfg = tiny_config("max_nonfinite_steps=3", "max_steps=10")
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* for 3 steps in a row"):
        pretrain.run(cfg)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    assert [r["total"] for r in _log(run_dir, "nonfinite")] == [1, 2]
    assert _log(run_dir, "abort")[0]["nonfinite_total"] == 3


def test_missing_fashion_mnist_fails_with_install_hint(tiny_config, tmp_path):
    cfg = tiny_config("data.dataset=fashion-mnist", f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        pretrain.run(cfg)


def test_command_line_rejects_a_bad_override_before_training(tmp_path, capsys):
    cfg = REPO / "training" / "configs" / "digits_demo.yaml"
    code = pretrain.main(["--config", str(cfg), f"output_dir={tmp_path}", "optim.lr=fast"])
    assert code == 2
    assert "optim.lr must be a number" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_batch_views_on_the_device_depend_only_on_seed_and_step(tiny_config):
    cfg = tiny_config("views.backend=batch")
    trainer = Trainer(cfg, init_distributed("cpu"), steps_per_epoch=10)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    first = trainer.prepare(images)
    torch.rand(100)  # the caller's random stream must not matter
    again = trainer.prepare(images)
    trainer.global_step = 1
    later = trainer.prepare(images)
    assert first.shape == (4, 2, 3, 16, 16) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, later)
