"""Confirm the digits sweep's winners on Fashion-MNIST: each method's best point, several seeds.

For every method, the point with the best mean kNN top-1 in its digits sweep
(``bench/results/recipe_sweep_<method>.json``, ``bench/recipe_sweep.py``) is trained again on a
class-balanced Fashion-MNIST subset (``bench/quality.py``'s, drawn once with seed 42) from
``training/configs/fashion_mnist_r18.yaml`` at a budget whose runs stay well under 20 minutes
on 2 cores: 4,096 train images, 8 epochs, 64 px, batch 64 (the sweep's), bf16 autocast. Each run
is evaluated by ``training.evaluate``: weighted kNN top-1 (k=20, T=0.07) and a linear probe
(``--probe-epochs``) on the 10,000 test images with the subset as the bank, and RankMe of the
train features. Each result is appended to ``bench/results/recipe_confirm.json`` as soon as it
is measured (machine record, load averages; ``--resume`` skips runs already there) and a table
of mean ± std over seeds closes the run::

    python bench/recipe_confirm.py --seeds 42 1
    python bench/recipe_confirm.py --seeds 42 1 --resume        # finish a run cut short
    python bench/recipe_confirm.py --dry-run                     # the runs, exact overrides
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import FASHION_MNIST_DIR, write_subset  # noqa: E402
from bench.recipe_sweep import (  # noqa: E402
    RESULTS,
    HelpFormatter,
    Point,
    add_budget_arguments,
    budget_of,
    budget_record,
    description,
    dry_run,
    format_table,
    interrupted,
    load_results,
    run_points,
    save_results,
    select_points,
    summarise_runs,
    sweep_grid,
)
from training.objectives import METHODS  # noqa: E402

CONFIG = ROOT / "training" / "configs" / "fashion_mnist_r18.yaml"
# The budget on top of the config (the sweep's batch and projector, so its lr carries over).
BUDGET = (
    "epochs=8",
    "views.size=64",
    "data.batch_size=64",
    "model.projector_hidden=1024",
    "model.projector_out=1024",
    "optim.warmup_epochs=1",
    "precision=bf16",
    "checkpoint_every_steps=0",
)
SUBSET_SEED = 42


def winner(method: str, results: Path = RESULTS) -> Point:
    """``method``'s point with the best mean kNN top-1 (no diverged run) in its digits sweep,
    renamed ``<method>:<point>``.

    Raises:
        FileNotFoundError: when the sweep's JSON is missing (run ``bench/recipe_sweep.py``).
    """
    path = results / f"recipe_sweep_{method}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run python bench/recipe_sweep.py --method {method} first"
        )
    summary = json.loads(path.read_text())["summary"]
    best = max(
        (r for r in summary if not r.get("diverged") and r.get("knn_top1_mean") is not None),
        key=lambda r: r["knn_top1_mean"],
    )
    (point,) = select_points(sweep_grid(method), best["point"])
    return Point(f"{method}:{point.name}", (("method", method), *point.settings))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the confirmation; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=description(__doc__), formatter_class=HelpFormatter
    )
    add_budget_arguments(parser, RESULTS / "recipe_confirm.json")
    parser.set_defaults(config=str(CONFIG), seeds=[42, 1])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list")
    parser.add_argument("--train-images", type=int, default=4096, help="subset's train images")
    parser.add_argument("--test-images", type=int, default=10000, help="subset's test images")
    parser.add_argument("--probe-epochs", type=int, default=25, help="linear probe epochs")
    parser.add_argument("--data-root", default=FASHION_MNIST_DIR, help="Fashion-MNIST idx files")
    args = parser.parse_args(argv)
    points = [winner(m.strip()) for m in args.methods.split(",") if m.strip()]
    subset = Path(args.work_dir) / f"fashion-mnist-{args.train_images}-{args.test_images}"
    args.overrides = [*BUDGET, *args.overrides]
    budget = budget_of(args, ("knn", "linear", "rankme"), probe_epochs=args.probe_epochs)
    record = budget_record(budget)  # recorded without the subset's path (no machine's paths)
    record["subset"] = {"train_images": args.train_images, "test_images": args.test_images,
                        "seed": SUBSET_SEED}  # fmt: skip
    budget.overrides.append(f"data.root={subset}")
    if args.dry_run:
        dry_run(budget, "confirm", points, args.seeds)
        return 0
    write_subset(subset, args.train_images, args.test_images, SUBSET_SEED, args.data_root)
    out = Path(args.out)
    header = {"benchmark": "recipe_confirm", "budget": record,
              "grid": {p.name: p.overrides() for p in points}}  # fmt: skip
    try:
        data = load_results(out, header, args.resume)
    except ValueError as exc:
        parser.error(str(exc))
    summarise = functools.partial(summarise_runs, order=None)
    print(f"load average before: {data['machine']['load_average_before']}", flush=True)
    try:
        run_points(budget, "confirm", points, args.seeds, out, data, summarise)
    except KeyboardInterrupt:
        return interrupted(out, data)
    save_results(out, data, summarise)
    print()
    print(format_table(data["summary"]))
    print(f"\nload average after: {data['load_average_after']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
