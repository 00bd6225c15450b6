"""``gather=True`` under real ``torch.distributed``: 2 processes, gloo, over loopback.

Each process holds half of the batch, embeds it with a small linear encoder wrapped in
``DistributedDataParallel`` and calls the loss with ``gather=True``. The processes must agree
with one process holding the whole batch: the high-rank parts are identical on every process,
the low-rank parts average to the whole batch's, and the encoder's (DDP-averaged) gradients
equal the whole batch's gradients. NaN on one process raises ``ValueError`` on both.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ssole_hub import ssole_loss

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
IMAGES, VIEWS, IN_DIM, DIM = 8, 4, 12, 24


def _data() -> tuple[torch.Tensor, nn.Linear]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(IMAGES, VIEWS, IN_DIM, generator=g, dtype=torch.float64)
    encoder = nn.Linear(IN_DIM, DIM).double()
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(DIM, IN_DIM, generator=g, dtype=torch.float64))
        encoder.bias.copy_(torch.randn(DIM, generator=g, dtype=torch.float64))
    return x, encoder


def _step(encoder: nn.Module, x: torch.Tensor, gather: bool) -> dict[str, torch.Tensor]:
    z = F.normalize(encoder(x), dim=-1)
    z.retain_grad()
    parts = ssole_loss(z, gather=gather)
    parts.loss.backward()
    weight = getattr(encoder, "module", encoder).weight
    out = {k: v.detach() for k, v in parts._asdict().items()}
    return {**out, "z_grad": z.grad, "weight_grad": weight.grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        x, encoder = _data()
        ddp = nn.parallel.DistributedDataParallel(encoder)
        per_rank = IMAGES // WORLD
        result = _step(ddp, x[rank * per_rank : (rank + 1) * per_rank], gather=True)
        # Bad input on one process only must raise on every process, not leave one waiting.
        bad = F.normalize(torch.randn(per_rank, VIEWS, DIM, dtype=torch.float64), dim=-1)
        if rank == 1:
            bad[0, 0, 0] = float("nan")
        try:
            ssole_loss(bad, gather=True)
        except ValueError as err:
            result["bad_input_error"] = str(err)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(port: int, out_dir: str) -> None:
    """The two processes, forked from this one (``python THIS_FILE PORT OUT_DIR``)."""
    mp.start_processes(_worker, args=(port, out_dir), nprocs=WORLD, start_method="fork")


@pytest.mark.slow
def test_two_processes_with_gather_match_one_process_with_the_whole_batch(tmp_path, zygote):
    """The processes are forked by a child of the zygote (``tests/zygote.py``): a process that
    has imported torch and used no thread, unlike this one."""
    args = [str(_free_port()), str(tmp_path)]
    done = zygote.run("script", __file__, args, REPO, {**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, encoder = _data()
    whole = _step(encoder, x, gather=False)
    close = dict(rtol=1e-10, atol=1e-12)

    for part in ranks:  # the high-rank term sees all images on every process
        torch.testing.assert_close(part["loss_high"], whole["loss_high"], **close)
        torch.testing.assert_close(part["rank_high"], whole["rank_high"], **close)
    for name in ("loss", "loss_low", "rank_low"):  # per-process low-rank terms average out
        mean = torch.stack([part[name] for part in ranks]).mean()
        torch.testing.assert_close(mean, whole[name], **close)
    assert ranks[0]["loss_low"] != ranks[1]["loss_low"]

    # DDP averages the processes' gradients: that must be the whole batch's gradient.
    for part in ranks:
        torch.testing.assert_close(part["weight_grad"], whole["weight_grad"], **close)
    # Each process's own slice gets WORLD x the whole-batch gradient, which DDP then averages.
    z_grad = torch.cat([part["z_grad"] for part in ranks]) / WORLD
    torch.testing.assert_close(z_grad, whole["z_grad"], **close)

    for part in ranks:
        assert "non-finite" in part.get("bad_input_error", "")


if __name__ == "__main__":
    _run_ranks(int(sys.argv[1]), sys.argv[2])
