"""Forward + backward time of ``ssole_loss`` against the same formula on a generic SVD.

The baseline is the released code's way: ``torch.linalg.matrix_norm(..., "nuc")`` (an SVD) on the
explicitly centred ``(B, N, d)`` views and on the ``(N, B, d)`` view matrices, in float32. Both
run on the same inputs, interleaved repeat by repeat so that load from other processes hits both
alike; the table reports medians and their ratio, and the JSON keeps every repeat.

    python bench/loss.py                 # B in {32, 128, 256}, N in {4, 8}, d in {2048, 4096}
    python bench/loss.py --quick         # B = 256, N = 8, d = 4096 only, 3 repeats
    python bench/loss.py --device cuda
    python bench/loss.py --shape 16 4 64  # one given size (e.g. a toy size for a dry run)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ssole_hub.loss import ssole_loss

RESULTS = Path(__file__).resolve().parent / "results" / "loss.json"


def svd_loss(z: torch.Tensor, lambda_: float = 0.6, gamma: float = 0.5) -> torch.Tensor:
    """The SSOLE formula with generic SVD nuclear norms (the released implementation's way)."""
    b, n, _ = z.shape
    r = torch.linalg.matrix_norm(z - z.mean(1, keepdim=True).detach(), "nuc")
    loss_low = (r**2).mean() / (n - 1) ** 2
    big_r = torch.linalg.matrix_norm(z.transpose(0, 1), "nuc")
    beta = torch.asin(big_r / b) - math.asin(1 / math.sqrt(b))
    c2 = (b * torch.cos(beta) ** 2 - 1) / (b - 1)
    c1 = (b**2 / big_r**2 - 1) / (b - 1)
    return loss_low + lambda_ * (gamma * c1 + (1 - gamma) * c2).mean()


def fast_loss(z: torch.Tensor) -> torch.Tensor:
    return ssole_loss(z).loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(fn: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor) -> tuple[float, float]:
    """Seconds for one forward + backward of ``fn`` on a fresh leaf copy of ``z0``; the loss."""
    z = z0.clone().requires_grad_()
    _sync(z0.device)
    start = time.perf_counter()
    loss = fn(z)
    loss.backward()
    _sync(z0.device)
    return time.perf_counter() - start, loss.item()


def bench_config(b: int, n: int, d: int, repeats: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    z0 = F.normalize(torch.randn(b, n, d, generator=g), dim=-1).to(device)
    for fn in (fast_loss, svd_loss):  # warm-up: kernels, allocator, thread pools
        time_step(fn, z0)
    fast, svd = [], []
    for _ in range(repeats):
        t, fast_value = time_step(fast_loss, z0)
        fast.append(t)
        t, svd_value = time_step(svd_loss, z0)
        svd.append(t)
    fast_ms, svd_ms = 1e3 * statistics.median(fast), 1e3 * statistics.median(svd)
    return {
        "B": b,
        "N": n,
        "d": d,
        "ssole_loss_ms": round(fast_ms, 3),
        "svd_ms": round(svd_ms, 3),
        "speedup": round(svd_ms / fast_ms, 2),
        "loss_rel_diff": abs(fast_value - svd_value) / abs(svd_value),
        "ssole_loss_ms_all": [round(1e3 * t, 3) for t in fast],
        "svd_ms_all": [round(1e3 * t, 3) for t in svd],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per config")
    parser.add_argument("--quick", action="store_true", help="only B=256, N=8, d=4096")
    parser.add_argument(
        "--shape", type=int, nargs=3, metavar=("B", "N", "D"), help="only this one size"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    repeats = args.repeats or (3 if args.quick else 5)
    if args.shape:
        configs = [tuple(args.shape)]
    elif args.quick:
        configs = [(256, 8, 4096)]
    else:
        configs = list(itertools.product((32, 128, 256), (4, 8), (2048, 4096)))

    rows = [bench_config(b, n, d, repeats, device) for b, n, d in tqdm(configs, desc="configs")]

    print(f"\nforward + backward, median of {repeats} ({device}, torch {torch.__version__})")
    print(f"{'B':>4} {'N':>2} {'d':>5} | {'ssole_loss ms':>13} {'SVD ms':>10} {'speed-up':>8}")
    for row in rows:
        print(
            f"{row['B']:>4} {row['N']:>2} {row['d']:>5} | {row['ssole_loss_ms']:>13.1f} "
            f"{row['svd_ms']:>10.1f} {row['speedup']:>7.1f}x"
        )
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    )
    report = {
        "benchmark": "ssole_loss forward+backward vs generic-SVD nuclear norms",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
