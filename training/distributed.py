"""Process-group set-up from ``torchrun``'s environment: NCCL on CUDA, gloo on CPU.

Run as a plain ``python -m training.pretrain`` this is a single process with no process group;
under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) every process joins one group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "all_gather_objects", "any_true", "init_distributed"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (no-op when there is none)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join torchrun's process group if there is one and pick this process's device.

    ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda``.

    Raises:
        RuntimeError: if ``cuda`` is asked for and no GPU is available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA GPU is available; use device=cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            device_id=dev if use_cuda else None,
        )
    return DistributedContext(rank, world_size, local_rank, dev)


def any_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
