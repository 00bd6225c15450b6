"""One pre-training step and the state it carries: model, optimiser, precision, schedule.

:class:`Trainer` builds the encoder from ``ssole_hub`` (timm backbone + SSOLE projector), wraps it
for DDP / ``torch.compile`` as configured, and runs :meth:`Trainer.step` on normalised views. The
epoch loop, logging and checkpoint files live in :mod:`training.pretrain`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ssole_hub  # noqa: F401 - registers ssole_resnet* with timm
from ssole_hub.hub.checkpoint import model_checkpoint_state
from ssole_hub.models import SSOLEModel, SSOLEProjector
from training.checkpointing import capture_rng_state, restore_rng_state
from training.config import Config
from training.distributed import DistributedContext, all_gather_objects, any_true
from training.objectives import build_objective
from training.optim import build_optimizer, learning_rate
from training.views import BatchViews, normalize_views, sample_seed

__all__ = ["NonFiniteLossError", "Trainer", "resolve_precision", "training_pretrained_cfg"]


class NonFiniteLossError(RuntimeError):
    """The loss stayed non-finite for ``max_nonfinite_steps`` consecutive steps."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` becomes ``bf16`` on CUDA and ``fp32`` elsewhere; other values pass through.

    ``fp16`` on a CPU warns: CPU float16 autocast is many times slower than fp32 there.
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        warnings.warn(
            "precision=fp16 on a CPU: float16 autocast has few fast CPU kernels and can make a "
            "step about 10x slower than fp32; the fp16 of a GPU recipe is meant for GPUs. Use "
            "precision=auto (bf16 on CUDA, fp32 on CPU) or precision=fp32.",
            UserWarning,
            stacklevel=2,
        )
    return precision


def _divergence_hint(cfg: Config) -> str:
    if cfg.method in ("vicreg", "barlowtwins") and cfg.optim.name == "sgd":
        return (
            f"; {cfg.method} is published with LARS and a BatchNorm projector "
            "(optim.name=lars model.projector_batch_norm=true), with which its large loss scale "
            "does not set the step size"
        )
    return ""


def training_pretrained_cfg(cfg: Config) -> dict[str, Any]:
    """The evaluation preprocessing for the training resolution, in timm's ``pretrained_cfg``
    keys, so an exported model resizes, crops and normalises the way it was trained."""
    s = cfg.views.size
    return {
        "input_size": (3, s, s),
        "pool_size": (math.ceil(s / 32), math.ceil(s / 32)),
        "mean": tuple(cfg.data.mean),
        "std": tuple(cfg.data.std),
        "interpolation": cfg.data.interpolation,
        "crop_pct": cfg.data.eval_crop_pct,
        "crop_mode": "center",
    }


class Trainer:
    """Model, optimiser, scaler and schedule of one process; :meth:`step` trains on one batch.

    Args:
        cfg: the run's config.
        ctx: this process's rank, world size and device.
        steps_per_epoch: optimiser steps per epoch (sets the schedule's length).
    """

    def __init__(self, cfg: Config, ctx: DistributedContext, steps_per_epoch: int) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        # PyTorch's SyncBatchNorm runs on GPUs only; CPU ranks keep per-rank statistics.
        self.sync_batchnorm = (
            ctx.distributed and cfg.model.sync_batchnorm and self.device.type == "cuda"
        )
        self.encoder, self.projector_config = self._build_encoder()
        self.model = self._wrap_for_training(self.encoder)

        self.precision = resolve_precision(cfg.precision, self.device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.optimizer = build_optimizer(self.encoder, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.objective = build_objective(
            cfg.method, gather=ctx.distributed, **cfg.objective_options()
        )
        self.batch_views = (
            BatchViews(cfg.views, cfg.data.interpolation).to(self.device)
            if cfg.views.backend == "batch"
            else None
        )
        self.mean = torch.tensor(cfg.data.mean, device=self.device)
        self.std = torch.tensor(cfg.data.std, device=self.device)

        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.epochs * steps_per_epoch
        self.warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
        self.global_step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0

    def _build_encoder(self) -> tuple[nn.Module, dict[str, Any]]:
        """The encoder (timm backbone + SSOLE projector) on the device, and the projector's
        config."""
        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(self.cfg.seed)
        m = self.cfg.model
        backbone = timm.create_model(m.arch, num_classes=0)
        projector = SSOLEProjector(
            backbone.num_features, m.projector_hidden, m.projector_out, m.projector_depth,
            m.projector_batch_norm,
        )  # fmt: skip
        encoder: nn.Module = SSOLEModel(backbone, projector)
        if self.sync_batchnorm:
            encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
        encoder.to(self.device)
        if m.channels_last:
            encoder.to(memory_format=torch.channels_last)
        return encoder, projector.config

    def _wrap_for_training(self, encoder: nn.Module) -> nn.Module:
        """``encoder`` in DDP when several processes train, compiled when configured."""
        model = encoder
        if self.ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(encoder, device_ids=ids)
        if self.cfg.model.compile:
            model = torch.compile(model)
        return model

    # --- one step ---------------------------------------------------------------------------

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """Loader output to normalised views ``(B, N, 3, S, S)`` on the device. With the ``batch``
        backend the views are drawn here, seeded by ``(seed, step, rank)``."""
        batch = batch.to(self.device, non_blocking=True)
        if self.batch_views is not None:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(sample_seed(self.cfg.seed, self.global_step, self.ctx.rank))
                batch = self.batch_views(batch)
        return normalize_views(batch, self.mean, self.std, self.cfg.model.channels_last)

    def lr(self) -> float:
        """The learning rate of the next step."""
        o = self.cfg.optim
        return learning_rate(
            self.global_step, self.total_steps, self.warmup_steps, o.lr, o.final_lr
        )

    def step(self, views: torch.Tensor) -> dict[str, Any]:
        """Train on normalised views ``(B, N, 3, S, S)``: forward under autocast, objective in
        float32, backward, optimiser step. A non-finite loss on any rank skips the update on every
        rank (the step still counts); after ``max_nonfinite_steps`` in a row it raises.

        Returns:
            The objective's tensors (``loss`` and its parts), ``z`` (detached embeddings),
            ``lr`` and ``skipped``.

        Raises:
            NonFiniteLossError: after too many consecutive non-finite losses.
        """
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            # The views of a batch go through the model as one batch of images.
            b, n = views.shape[:2]
            z = self.model(views.flatten(0, 1), "projector").view(b, n, -1)
        # The objectives need float32 (eigen-solvers have no half kernels): leave autocast.
        with torch.autocast(self.device.type, enabled=False):
            out = self.objective(z.float())
        loss = out["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        skipped = any_true(not bool(torch.isfinite(loss.detach())), self.device)
        if skipped:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"aborting: the loss was non-finite (NaN or inf) for {self.nonfinite_in_a_row} "
                    f"steps in a row (up to step {self.global_step}, {self.nonfinite_total} in all); "
                    "lower optim.lr, add optim.warmup_epochs, use precision=fp32 or bf16, or check "
                    f"the data{_divergence_hint(self.cfg)}"
                )
        else:
            self.nonfinite_in_a_row = 0
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.global_step += 1
        return {
            **{k: v.detach() for k, v in out.items()},
            "z": z.detach(),
            "lr": lr,
            "skipped": skipped,
        }

    # --- checkpoint state -------------------------------------------------------------------

    def state_dict(
        self, epoch: int, step_in_epoch: int, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """The full checkpoint: model part (``ssole_hub.hub.checkpoint``) plus training state. Collective:
        every rank must call it (RNG states are gathered); only rank 0 needs to save the result."""
        rng = all_gather_objects(capture_rng_state())
        state = model_checkpoint_state(
            self.encoder,
            self.cfg.model.arch,
            self.projector_config,
            training_pretrained_cfg(self.cfg),
            metadata,
        )
        state.update(
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            schedule={
                "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps,
                "steps_per_epoch": self.steps_per_epoch,
            },
            global_step=self.global_step,
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            world_size=self.ctx.world_size,
            nonfinite_total=self.nonfinite_total,
            nonfinite_in_a_row=self.nonfinite_in_a_row,
            rng=rng,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (model, optimiser, scaler, step, counters, RNG).

        Raises:
            ValueError: if the checkpoint's model does not fit this config's model.
        """
        model_state = state["model"]
        if any(k.startswith("module.") for k in self.encoder.state_dict()):  # pragma: no cover
            model_state = {f"module.{k}": v for k, v in model_state.items()}
        try:
            self.encoder.load_state_dict(model_state)
        except RuntimeError as exc:
            raise ValueError(
                f"checkpoint does not match model.arch / projector config: {exc}"
            ) from exc
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        rng = state.get("rng") or []
        if rng:
            restore_rng_state(rng[self.ctx.rank] if len(rng) == self.ctx.world_size else rng[0])
