"""A distributed sampler that can start in the middle of an epoch, for exact resume."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from training.views import sample_seed

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffles ``range(n)`` with ``(seed, epoch)``, gives each rank an equal, disjoint share cut to
    whole batches, and yields ``(index, view_seed)`` pairs from step ``start_step`` on.

    The view seed depends only on ``(seed, epoch, index)``, so an image gets the same views
    whichever rank, worker or restart loads it.

    Raises:
        ValueError: if a rank's share holds less than one batch.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n, self.batch_size = n, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = n // world_size // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the dataset has {n} images, fewer than one batch of {batch_size} per process "
                f"on {world_size} process(es); lower data.batch_size or add images"
            )
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's order and skip its first ``start_step`` steps (already trained)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)
        per_rank = self.steps_per_epoch * self.batch_size
        mine = order[self.rank : self.world_size * per_rank : self.world_size]
        for index in mine[self.start_step * self.batch_size :].tolist():
            yield index, sample_seed(self.seed, self.epoch, index)
