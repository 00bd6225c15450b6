"""Pre-train an SSOLE encoder (or a peer objective) on multi-crop views.

One process (CPU or one GPU)::

    python -m training.pretrain --config training/configs/digits_demo.yaml

Several GPUs or nodes, with torchrun (NCCL on CUDA, gloo on CPU)::

    torchrun --nproc_per_node 4 -m training.pretrain --config training/configs/imagenet100_r18_m4.yaml

Any config key can be overridden as ``key=value`` (``optim.lr=0.5 data.root=/data/train``), and
``--resume`` continues the run from its newest checkpoint exactly where it stopped
(``resume=PATH`` from a given one). The run
directory ``output_dir/run_name`` holds ``config.yaml`` (resolved), ``log.jsonl``, TensorBoard
events under ``tb/``, step checkpoints under ``checkpoints/`` and ``final.pt``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import ssole_hub
from training.checkpointing import (
    checkpoint_name,
    latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    save_atomic,
)
from training.config import Config, ConfigError, config_to_dict, load_config
from training.data import DatasetNotFoundError, build_dataset, subset_indices
from training.distributed import DistributedContext, init_distributed
from training.knn_monitor import KnnMonitor
from training.metrics import rankme
from training.run_log import RunLog
from training.sampler import ResumableSampler
from training.trainer import NonFiniteLossError, Trainer, training_pretrained_cfg
from training.views import MultiViewDataset

__all__ = ["build_loader", "code_version", "main", "run", "run_dir_of"]

FINAL_NAME = "final.pt"


def code_version() -> str:
    """``ssole_hub``'s version, plus the git commit of the checkout when there is one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{ssole_hub.__version__}+g{commit}" if commit else ssole_hub.__version__


def run_dir_of(cfg: Config) -> Path:
    """The run directory, ``output_dir/run_name``."""
    return Path(cfg.output_dir) / cfg.run_name


def run(cfg: Config) -> Path:
    """Pre-train as ``cfg`` says (in this process, or in each torchrun process) and return the
    path of the final checkpoint (``<run dir>/final.pt``; with ``max_steps`` set, the checkpoint
    written where the run stopped).

    Raises:
        ConfigError: if the config is invalid.
        DatasetNotFoundError: if the dataset's files are missing.
        NonFiniteLossError: if the loss stays NaN/inf for ``max_nonfinite_steps`` steps.
    """
    cfg.validate()
    ctx = init_distributed(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        ctx.close()


def _metadata(cfg: Config, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "dataset": cfg.data.dataset,
        "epochs": cfg.epochs,
        "views": cfg.views.num_views,
        "image_size": cfg.views.size,
        "method": cfg.method,
        "config": config_to_dict(cfg),
        "code_version": code_version(),
        **extra,
    }


def _resume_state(cfg: Config, ckpt_dir: Path) -> dict[str, Any] | None:
    if not cfg.resume:
        return None
    path = latest_checkpoint(ckpt_dir) if cfg.resume == "latest" else Path(cfg.resume)
    if path is None:
        print(f"no checkpoint in {ckpt_dir} yet; starting from scratch", file=sys.stderr)
        return None
    return load_training_checkpoint(path)


def build_loader(cfg: Config, ctx: DistributedContext) -> tuple[DataLoader, ResumableSampler]:
    """The training DataLoader (multi-view items, this rank's share) and its resumable sampler.

    Raises:
        DatasetNotFoundError: if the dataset's files are missing.
        ValueError: if the dataset is empty or smaller than one batch per process.
    """
    d = cfg.data
    images = build_dataset(
        d.dataset, "train", d.root, synthetic_images=d.synthetic_images,
        synthetic_size=d.synthetic_size,
    )  # fmt: skip
    if d.max_images:
        images = Subset(images, subset_indices(len(images), d.max_images, cfg.seed))
    sampler = ResumableSampler(len(images), d.batch_size, ctx.rank, ctx.world_size, cfg.seed)
    loader = DataLoader(
        MultiViewDataset(images, cfg.views, d),
        batch_size=d.batch_size,
        sampler=sampler,
        num_workers=d.num_workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
    )
    return loader, sampler


def _train(cfg: Config, ctx: DistributedContext) -> Path:
    run_dir = run_dir_of(cfg)
    ckpt_dir = run_dir / "checkpoints"
    loader, sampler = build_loader(cfg, ctx)
    trainer = Trainer(cfg, ctx, sampler.steps_per_epoch)
    pretrained_cfg = training_pretrained_cfg(cfg)
    evaluation: dict[str, Any] = {}

    epoch, step_in_epoch = 0, 0
    state = _resume_state(cfg, ckpt_dir)
    if state is not None:
        trainer.load_state_dict(state)
        epoch, step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        evaluation = dict(state.get("metadata", {}).get("evaluation", {}))
        if state.get("world_size") != ctx.world_size:
            print(
                f"warning: checkpoint was written by {state.get('world_size')} process(es), this "
                f"run has {ctx.world_size}; the data order from here on differs from the original",
                file=sys.stderr,
            )
        del state

    log = RunLog(run_dir) if ctx.is_main else None
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    knn = (
        KnnMonitor(cfg, pretrained_cfg, ctx.device)
        if ctx.is_main and (cfg.knn.every_epochs or cfg.knn.at_start)
        else None
    )

    def save(path: Path) -> Path:
        # Collective (RNG states of every rank); only rank 0 writes.
        meta = _metadata(cfg, {"global_step": trainer.global_step, "evaluation": evaluation})
        full = trainer.state_dict(epoch, step_in_epoch, meta)
        if ctx.is_main:
            save_atomic(full, path)
        ctx.barrier()
        return path

    def save_step() -> Path:
        path = save(ckpt_dir / checkpoint_name(trainer.global_step))
        if ctx.is_main:
            prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        return path

    def measure_knn(tag: str) -> None:
        if knn is not None:
            acc = knn(trainer.encoder.backbone)
            evaluation["knn_top1"] = acc
            log.log("knn", trainer.global_step, epoch=epoch, knn_top1=acc, when=tag)
            tqdm.write(f"kNN top-1 ({tag}, step {trainer.global_step}): {acc:.2f}%")
        ctx.barrier()

    if cfg.knn.at_start and trainer.global_step == 0:
        measure_knn("random init")

    images_per_step = cfg.data.batch_size * ctx.world_size
    last_path: Path | None = None
    stop = False
    bar = tqdm(
        total=trainer.total_steps,
        initial=trainer.global_step,
        disable=not ctx.is_main,
        dynamic_ncols=True,
        desc=f"{cfg.method} {cfg.run_name}",
    )
    try:
        while epoch < cfg.epochs and not stop:
            sampler.set_epoch(epoch, step_in_epoch)
            t_log, steps_since_log = time.perf_counter(), 0
            for batch in loader:
                out = trainer.step(trainer.prepare(batch))
                step_in_epoch += 1
                steps_since_log += 1
                bar.update(1)
                if out["skipped"] and log is not None:
                    log.log("nonfinite", trainer.global_step, total=trainer.nonfinite_total)
                if trainer.global_step % cfg.log_every_steps == 0 or step_in_epoch == 1:
                    now = time.perf_counter()
                    ips = images_per_step * steps_since_log / max(now - t_log, 1e-9)
                    t_log, steps_since_log = now, 0
                    if log is not None:
                        _log_step(log, bar, trainer, out, epoch, ips)
                stop = bool(cfg.max_steps) and trainer.global_step >= cfg.max_steps
                if stop or (
                    cfg.checkpoint_every_steps
                    and trainer.global_step % cfg.checkpoint_every_steps == 0
                    and step_in_epoch < sampler.steps_per_epoch
                ):
                    last_path = save_step()
                if stop:
                    break
            if stop:
                break
            epoch, step_in_epoch = epoch + 1, 0
            if cfg.knn.every_epochs and (epoch % cfg.knn.every_epochs == 0 or epoch == cfg.epochs):
                measure_knn(f"epoch {epoch}")
            last_path = save_step()
    except NonFiniteLossError:
        if log is not None:
            log.log("abort", trainer.global_step, nonfinite_total=trainer.nonfinite_total)
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()
    if stop:
        return last_path  # type: ignore[return-value]
    return save(run_dir / FINAL_NAME)


def _log_step(
    log: RunLog, bar: tqdm, trainer: Trainer, out: dict[str, Any], epoch: int, ips: float
) -> None:
    scalars = {
        k: float(v)
        for k, v in out.items()
        if isinstance(v, torch.Tensor) and v.ndim == 0 and k != "z"
    }
    z = out["z"]
    if not out["skipped"]:
        scalars["rankme"] = rankme(z[:, 0].float())
    log.log(
        "train", trainer.global_step, epoch=epoch, lr=out["lr"], images_per_s=ips,
        nonfinite_total=trainer.nonfinite_total, **scalars,
    )  # fmt: skip
    shown = {k: f"{v:.4g}" for k, v in scalars.items() if k.startswith(("loss", "rank"))}
    bar.set_postfix(**shown, lr=f"{out['lr']:.3g}", img_s=f"{ips:.0f}", refresh=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.pretrain", description=__doc__.splitlines()[0]
    )
    p.add_argument("--config", required=True, help="YAML config (see training/configs/)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's newest checkpoint (resume=PATH picks a checkpoint)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input, 1 for an aborted run)."""
    args = _parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=latest")
    try:
        cfg = load_config(args.config, overrides)
        path = run(cfg)
    except (ConfigError, DatasetNotFoundError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
