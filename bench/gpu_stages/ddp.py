"""The ``ddp`` stage: ``training.pretrain`` under torchrun, NCCL and SyncBatchNorm."""

from __future__ import annotations

import json
from typing import Any

from bench.gpu_stages.stage import FASHION_MNIST_MISSING, Check, Plan, Stage, rounded


def build_stage(plan: Plan, timeout_s: float) -> Stage | str:
    """``training.pretrain`` under torchrun with two processes: NCCL and SyncBatchNorm on two GPUs
    (gloo on the CPU in the dry run). Returns the reason instead when it cannot run here."""
    if plan.fashion_mnist is None:
        return FASHION_MNIST_MISSING
    if not plan.dry_run and plan.gpus < 2:
        return f"{plan.gpus} GPU: NCCL takes one process per GPU, so DDP + SyncBatchNorm need 2"
    steps = int(plan.pick("3", "30"))
    run_dir = plan.work / "ddp"
    toy = [
        "data.max_images=64", "data.batch_size=8", "data.num_workers=0", "log_every_steps=1",
        "model.projector_hidden=256", "model.projector_out=256",
    ]  # fmt: skip
    full = ["data.num_workers=4", "log_every_steps=5", "precision=bf16", "model.channels_last=true"]
    command = [
        plan.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "training.pretrain", "--config", "training/configs/fashion_mnist_r18.yaml",
        f"data.root={plan.fashion_mnist}", f"output_dir={plan.work}", "run_name=ddp",
        f"max_steps={steps}", "epochs=1", "knn.every_epochs=0", "knn.at_start=false",
        "model.sync_batchnorm=true", f"device={plan.device}", *plan.pick(toy, full),
    ]  # fmt: skip

    def judge() -> tuple[dict[str, Any], list[Check]]:
        lines = (run_dir / "log.jsonl").read_text().splitlines()
        train = [e for e in map(json.loads, lines) if e.get("event") == "train"]
        checkpoints = len(list((run_dir / "checkpoints").glob("*")))
        finite = all(e.get("loss") is not None for e in train)
        figures = {
            "processes": 2, "backend": plan.pick("gloo", "nccl"),
            "sync_batchnorm": not plan.dry_run, "steps": train[-1]["step"],
            "last_loss": train[-1].get("loss"),
            "images_per_s": rounded(train[-1]["images_per_s"], 1), "checkpoints": checkpoints,
        }  # fmt: skip
        ok = finite and train[-1]["step"] == steps and checkpoints > 0
        measured = f"{train[-1]['step']} steps, {'finite' if finite else 'non-finite'} loss"
        target = f"{steps} steps, finite loss"
        return figures, [Check("trains and checkpoints under torchrun", target, measured, ok)]

    return Stage("ddp", "DDP + SyncBatchNorm under torchrun", command, timeout_s, judge)
