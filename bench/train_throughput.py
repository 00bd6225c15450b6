"""Pre-training throughput: the full pipeline against its compute bound, side by side in one run.

- **pipeline**: images/s of the real training loop: DataLoader (decoding, views in workers or
  per batch on the device) + :meth:`training.trainer.Trainer.step`.
- **bound**: images/s of the same step on one pre-made batch of views already on the device (no
  loading, no augmentation): what the model and optimiser alone allow.

Repeats alternate pipeline and bound so both see the same machine load; the ratio (median of the
per-repeat pipeline / bound ratios) is what to compare across machines. Writes ``bench/results/train_throughput.json``.

    python bench/train_throughput.py --config training/configs/fashion_mnist_r18.yaml
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import load_config  # noqa: E402
from training.distributed import init_distributed  # noqa: E402
from training.pretrain import build_loader  # noqa: E402
from training.trainer import Trainer  # noqa: E402


def _batches(loader, sampler) -> Iterator[torch.Tensor]:
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "training/configs/fashion_mnist_r18.yaml"))
    p.add_argument("--steps", type=int, default=6, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the first repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench/results/train_throughput.json"))
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"output_dir={tmp}", *args.overrides])
        ctx = init_distributed(cfg.device)
        loader, sampler = build_loader(cfg, ctx)
        trainer = Trainer(cfg, ctx, sampler.steps_per_epoch)
        batches = _batches(loader, sampler)
        images_per_step = cfg.data.batch_size * ctx.world_size

        fixed = trainer.prepare(next(batches))
        for _ in range(args.warmup):
            trainer.step(trainer.prepare(next(batches)))
            trainer.step(fixed)
        _sync(ctx.device)

        results: dict[str, list[float]] = {"pipeline": [], "bound": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(args.steps):
                trainer.step(trainer.prepare(next(batches)))
            _sync(ctx.device)
            results["pipeline"].append(images_per_step * args.steps / (time.perf_counter() - t))

            t = time.perf_counter()
            for _ in range(args.steps):
                trainer.step(fixed)
            _sync(ctx.device)
            results["bound"].append(images_per_step * args.steps / (time.perf_counter() - t))
        ctx.close()

    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["pipeline"] / med["bound"]
    # Each pipeline repeat runs right before its bound repeat: their ratio cancels slow drifts in
    # machine load, so the median of paired ratios is the figure to quote on a shared machine.
    paired = [a / b for a, b in zip(results["pipeline"], results["bound"], strict=True)]
    device = (
        torch.cuda.get_device_name(ctx.device)
        if ctx.device.type == "cuda"
        else platform.processor()
    )
    report = {
        "config": Path(args.config).name,
        "overrides": args.overrides,
        "device": f"{ctx.device.type} ({device or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "method": cfg.method,
        "arch": cfg.model.arch,
        "views": f"{cfg.views.num_views} x {cfg.views.size} px ({cfg.views.backend})",
        "batch_per_process": cfg.data.batch_size,
        "precision": trainer.precision,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "images_per_s": results,
        "median_images_per_s": med,
        "ratio_of_medians": ratio,
        "paired_ratios": paired,
        "ratio_pipeline_to_bound": statistics.median(paired),
    }
    print(f"\n{report['config']}: {report['arch']}, {report['views']}, batch {cfg.data.batch_size}, "
          f"{report['precision']}, {report['device']}")  # fmt: skip
    print(f"{'measure':<10} {'median img/s':>13} {'repeats':>30}")
    for k, v in results.items():
        print(f"{k:<10} {med[k]:>13.1f} {', '.join(f'{x:.1f}' for x in v):>30}")
    print(
        f"{'ratio':<10} {statistics.median(paired):>13.3f} {', '.join(f'{x:.2f}' for x in paired):>30}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
