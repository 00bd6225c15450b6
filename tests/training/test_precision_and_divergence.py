"""Settings that silently cost a lot warn: fp16 autocast on a CPU; a divergent peer run names the
published optimiser and projector of its method."""

from __future__ import annotations

import warnings

import pytest
import torch

from training.distributed import init_distributed
from training.trainer import NonFiniteLossError, Trainer, resolve_precision


def test_fp16_on_a_cpu_warns_and_names_the_fix():
    with pytest.warns(UserWarning, match=r"fp16 on a CPU.*precision=auto"):
        assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.parametrize(
    ("precision", "device", "resolved"),
    [("auto", "cpu", "fp32"), ("auto", "cuda", "bf16"), ("fp16", "cuda", "fp16")],
)
def test_other_precisions_do_not_warn(precision, device, resolved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision(precision, torch.device(device)) == resolved


@pytest.mark.parametrize(("optimizer", "hinted"), [("sgd", True), ("lars", False)])
def test_a_divergent_vicreg_run_names_its_published_settings(
    tiny_config, monkeypatch, optimizer, hinted
):
    import training.trainer as trainer_mod

    monkeypatch.setattr(
        trainer_mod, "build_objective", lambda *a, **k: lambda z: {"loss": z.sum() * torch.inf}
    )
    cfg = tiny_config("method=vicreg", f"optim.name={optimizer}", "max_nonfinite_steps=1")
    trainer = Trainer(cfg, init_distributed("cpu"), steps_per_epoch=10)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.step(torch.randn(4, 2, 3, 16, 16))
    assert ("optim.name=lars model.projector_batch_norm=true" in str(info.value)) is hinted
