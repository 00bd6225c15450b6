"""Pre-train an SSOLE encoder (or a peer objective) on multi-crop views.

One process (CPU or one GPU)::

    python -m training.pretrain --config training/configs/digits_demo.yaml

Several GPUs or nodes, with torchrun (NCCL on CUDA, gloo on CPU)::

    torchrun --nproc_per_node 4 -m training.pretrain --config training/configs/imagenet100_r18_m4.yaml

Any config key can be overridden as ``key=value`` (``optim.lr=0.5 data.root=/data/train``), and
``--resume`` continues the run from its newest checkpoint exactly where it stopped
(``resume=PATH`` from a given one). The run
directory ``output_dir/run_name`` holds ``config.yaml`` (resolved), ``log.jsonl``, TensorBoard
events under ``tb/``, step checkpoints under ``checkpoints/`` and ``final.pt``. A new run refuses
a run directory that already holds a run, unless it is told to ``--resume`` that run or to
``--overwrite`` it (which deletes the old run's files first).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from training.distributed import DistributedContext, any_true, init_distributed
from training.knn_monitor import KnnMonitor
from training.metrics import rankme
from training.run_log import RunLog
from training.sampler import ResumableSampler
from training.trainer import NonFiniteLossError, Trainer, training_pretrained_cfg
from training.views import MultiViewDataset

__all__ = ["RunDirectoryError", "build_loader", "code_version", "main", "run", "run_dir_of"]

FINAL_NAME = "final.pt"
RUN_FILES = ("config.yaml", "log.jsonl", "tb", "checkpoints", FINAL_NAME)
"""What a run writes into its directory; other files there are left alone."""


class RunDirectoryError(ConfigError):
    """The run directory already holds a run, or a checkpoint to resume from belongs to another."""


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


def run(cfg: Config, *, overwrite: bool = False) -> Path:
    """Pre-train as ``cfg`` says (in this process, or in each torchrun process) and return the
    path of the final checkpoint (``<run dir>/final.pt``; with ``max_steps`` set, the checkpoint
    written where the run stopped).

    A run directory holds one run. Unless ``cfg.resume`` continues it, a run directory that
    already holds a run's files is refused, or, with ``overwrite``, cleared of them first.

    Raises:
        ConfigError: if the config is invalid.
        RunDirectoryError: if the run directory holds another run (and neither ``cfg.resume`` nor
            ``overwrite`` is set), or the checkpoint to resume from was written by another run.
        DatasetNotFoundError: if the dataset's files are missing.
        NonFiniteLossError: if the loss stays NaN/inf for ``max_nonfinite_steps`` steps.
    """
    cfg.validate()
    if overwrite and cfg.resume:
        raise ConfigError("overwrite and resume contradict each other: choose one")
    ctx = init_distributed(cfg.device)
    try:
        _claim_run_dir(cfg, ctx, overwrite)
        return _train(cfg, ctx)
    finally:
        ctx.close()


def _claim_run_dir(cfg: Config, ctx: DistributedContext, overwrite: bool) -> None:
    """Refuse (on every rank) or clear a run directory that holds another run's files."""
    run_dir = run_dir_of(cfg)
    found = [n for n in RUN_FILES if (run_dir / n).exists()] if ctx.is_main else []
    refuse = any_true(bool(found) and not cfg.resume and not overwrite, ctx.device)
    if refuse:
        raise RunDirectoryError(
            f"{run_dir} already holds a run ({', '.join(found) or 'see rank 0'}). To continue "
            "that run, add --resume (resume=latest); to start a new one next to it, choose "
            f"another run_name=...; to replace it, add --overwrite (run(cfg, overwrite=True) "
            "from Python), which deletes its checkpoints, final.pt, log.jsonl, config.yaml and "
            "TensorBoard events."
        )
    if overwrite and found:
        for name in found:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        print(f"--overwrite: deleted the earlier run in {run_dir}", file=sys.stderr)
    ctx.barrier()


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


# What a run is: a checkpoint recording other values belongs to another run.
_RUN_IDENTITY = ("method", "data.dataset", "model.arch", "views.num_views")


def _resume_state(cfg: Config, ckpt_dir: Path) -> dict[str, Any] | None:
    if not cfg.resume:
        return None
    path = latest_checkpoint(ckpt_dir) if cfg.resume == "latest" else Path(cfg.resume)
    if path is None:
        print(f"no checkpoint in {ckpt_dir} yet; starting from scratch", file=sys.stderr)
        return None
    state = load_training_checkpoint(path)
    saved = state.get("metadata", {}).get("config", {})
    ours = config_to_dict(cfg)
    for key in _RUN_IDENTITY:
        section, _, name = key.rpartition(".")
        theirs = (saved.get(section, {}) if section else saved).get(name)
        mine = (ours[section] if section else ours)[name]
        if theirs is not None and theirs != mine:
            raise RunDirectoryError(
                f"{path} belongs to another run ({key} {theirs!r}, this config has {mine!r}); "
                "resume with that run's config, or start this one under another run_name=..."
            )
    return state


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
    """Set up, resume, train epoch by epoch with a checkpoint after each; returns the final
    checkpoint's path (with ``max_steps``, the one written where the run stopped)."""
    # --- set-up: data, model and optimiser, where a resumed run stands, log and monitor
    run_dir = run_dir_of(cfg)
    loader, sampler = build_loader(cfg, ctx)
    trainer = Trainer(cfg, ctx, sampler.steps_per_epoch)
    progress = _resume(cfg, ctx, trainer, run_dir / "checkpoints")
    log = RunLog(run_dir) if ctx.is_main else None
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    knn = (
        KnnMonitor(cfg, training_pretrained_cfg(cfg), ctx.device)
        if ctx.is_main and (cfg.knn.every_epochs or cfg.knn.at_start)
        else None
    )
    training_run = _TrainingRun(cfg, ctx, trainer, progress, log, knn)
    if cfg.knn.at_start and trainer.global_step == 0:
        training_run.measure_knn("random init")

    # --- the loop: an epoch, then the kNN monitor when due and a checkpoint
    bar = tqdm(
        total=trainer.total_steps,
        initial=trainer.global_step,
        disable=not ctx.is_main,
        dynamic_ncols=True,
        desc=f"{cfg.method} {cfg.run_name}",
    )
    try:
        while progress.epoch < cfg.epochs:
            stopped_at = training_run.train_epoch(loader, sampler, bar)
            if stopped_at is not None:
                return stopped_at  # max_steps reached: that step's checkpoint ends the run
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            epoch, every = progress.epoch, cfg.knn.every_epochs
            if every and (epoch % every == 0 or epoch == cfg.epochs):
                training_run.measure_knn(f"epoch {epoch}")
            training_run.save_step()
    except NonFiniteLossError:
        if log is not None:
            log.log("abort", trainer.global_step, nonfinite_total=trainer.nonfinite_total)
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()

    # --- the final checkpoint
    return training_run.save(run_dir / FINAL_NAME)


@dataclass
class _Progress:
    """Where a run stands: its epoch, the steps done in that epoch, and its latest evaluation."""

    epoch: int = 0
    step_in_epoch: int = 0
    evaluation: dict[str, Any] = field(default_factory=dict)


def _resume(cfg: Config, ctx: DistributedContext, trainer: Trainer, ckpt_dir: Path) -> _Progress:
    """Load the checkpoint to resume from, if any, into ``trainer``; returns where it stood."""
    state = _resume_state(cfg, ckpt_dir)
    if state is None:
        return _Progress()
    trainer.load_state_dict(state)
    if state.get("world_size") != ctx.world_size:
        print(
            f"warning: checkpoint was written by {state.get('world_size')} process(es), this "
            f"run has {ctx.world_size}; the data order from here on differs from the original",
            file=sys.stderr,
        )
    return _Progress(
        int(state["epoch"]),
        int(state["step_in_epoch"]),
        dict(state.get("metadata", {}).get("evaluation", {})),
    )


class _TrainingRun:
    """The steps of one epoch, the kNN monitor and the checkpoints of a run in progress.

    ``log`` and ``knn`` are ``None`` on every rank but the main one.
    """

    def __init__(
        self,
        cfg: Config,
        ctx: DistributedContext,
        trainer: Trainer,
        progress: _Progress,
        log: RunLog | None,
        knn: KnnMonitor | None,
    ) -> None:
        self.cfg, self.ctx, self.trainer, self.progress = cfg, ctx, trainer, progress
        self.log, self.knn = log, knn
        self.ckpt_dir = run_dir_of(cfg) / "checkpoints"
        self.images_per_step = cfg.data.batch_size * ctx.world_size

    def train_epoch(self, loader: DataLoader, sampler: ResumableSampler, bar: tqdm) -> Path | None:
        """Train the rest of the current epoch, logging and checkpointing as configured.

        Returns:
            The checkpoint written when the run reached ``max_steps`` (the run stops there), or
            ``None`` when the epoch ran to its end.
        """
        cfg, trainer, progress = self.cfg, self.trainer, self.progress
        sampler.set_epoch(progress.epoch, progress.step_in_epoch)
        t_log, steps_since_log = time.perf_counter(), 0
        for batch in loader:
            out = trainer.step(trainer.prepare(batch))
            progress.step_in_epoch += 1
            steps_since_log += 1
            bar.update(1)
            if out["skipped"] and self.log is not None:
                self.log.log("nonfinite", trainer.global_step, total=trainer.nonfinite_total)
            if trainer.global_step % cfg.log_every_steps == 0 or progress.step_in_epoch == 1:
                now = time.perf_counter()
                ips = self.images_per_step * steps_since_log / max(now - t_log, 1e-9)
                t_log, steps_since_log = now, 0
                if self.log is not None:
                    _log_step(self.log, bar, trainer, out, progress.epoch, ips)
            if cfg.max_steps and trainer.global_step >= cfg.max_steps:
                return self.save_step()
            if self._step_checkpoint_due(sampler.steps_per_epoch):
                self.save_step()
        return None

    def _step_checkpoint_due(self, steps_per_epoch: int) -> bool:
        """Whether ``checkpoint_every_steps`` asks for a checkpoint now (the end of an epoch has
        its own)."""
        every = self.cfg.checkpoint_every_steps
        return bool(
            every
            and self.trainer.global_step % every == 0
            and self.progress.step_in_epoch < steps_per_epoch
        )

    def save(self, path: Path) -> Path:
        """Write the full training checkpoint to ``path``. Collective (the RNG states of every
        rank are gathered); only the main rank writes."""
        progress = self.progress
        meta = _metadata(
            self.cfg,
            {"global_step": self.trainer.global_step, "evaluation": progress.evaluation},
        )
        full = self.trainer.state_dict(progress.epoch, progress.step_in_epoch, meta)
        if self.ctx.is_main:
            save_atomic(full, path)
        self.ctx.barrier()
        return path

    def save_step(self) -> Path:
        """A step checkpoint under ``checkpoints/``, pruned to the newest ``keep_checkpoints``."""
        path = self.save(self.ckpt_dir / checkpoint_name(self.trainer.global_step))
        if self.ctx.is_main:
            prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        return path

    def measure_knn(self, tag: str) -> None:
        """Run the kNN monitor (main rank), log and keep its accuracy; every rank waits for it."""
        if self.knn is not None:
            step = self.trainer.global_step
            acc = self.knn(self.trainer.encoder.backbone)
            self.progress.evaluation["knn_top1"] = acc
            self.log.log("knn", step, epoch=self.progress.epoch, knn_top1=acc, when=tag)
            tqdm.write(f"kNN top-1 ({tag}, step {step}): {acc:.2f}%")
        self.ctx.barrier()


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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run directory that holds an earlier run, deleting its files",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def _interrupted(args: argparse.Namespace, cfg: Config | None) -> str:
    """What to tell the user after Ctrl-C: where the run stands and how to continue it."""
    if cfg is None:
        return "interrupted before training started"
    newest = latest_checkpoint(run_dir_of(cfg) / "checkpoints")
    if newest is None:
        return (
            f"interrupted before the first checkpoint of {run_dir_of(cfg)}; to start again, "
            "run the same command with --overwrite"
        )
    command = ["python", "-m", "training.pretrain", "--config", args.config, *args.overrides]
    return (
        f"interrupted; the newest checkpoint is {newest} (training since then is lost). "
        f"To continue the run from it:\n  {shlex.join([*command, '--resume'])}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input, 1 for an aborted run,
    130 after Ctrl-C)."""
    args = _parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=latest")
    is_main = os.environ.get("RANK", "0") == "0"
    cfg = None
    try:
        cfg = load_config(args.config, overrides)
        path = run(cfg, overwrite=args.overwrite)
    except (ConfigError, DatasetNotFoundError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if is_main:
            print(f"\n{_interrupted(args, cfg)}", file=sys.stderr)
        return 130
    if is_main:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
