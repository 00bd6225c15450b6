"""SSOLE ablation: the paper's claims, one switch each, and the number of views, at one budget.

Points (each trained with every seed, default 42, 1 and 2):

- ``ssole``: SSOLE as the config has it (the digits demo: 3 epochs, 4 views);
- ``objective=coupled_ole``: the coupled OLE objective SSOLE departs from,
  ``mean_i ||Z_i||_* / N - lambda ||Z_all||_* / (b N)`` (``ssole_objective=coupled_ole``);
- ``centering=none``: SSOLE with its low-rank term on the raw views instead of their deviations
  from the mean (``ssole_centering=none``);
- ``views=2``, ``views=8``: SSOLE with 2 and 8 views (the levels of 2, 4, 8 that the config's own
  view count is not).

Each run pre-trains through ``training.pretrain.run``; ``training.evaluate`` then measures the
weighted kNN top-1 (k=20, T=0.07), a short linear probe's top-1 (``--probe-epochs``, default 25)
on the same held-out split, and RankMe of the train features. Prints a table of mean ± std over
seeds, appends each run to ``bench/results/ssole_ablation.json`` as soon as it is measured (with
the machine record and load averages, ``bench/machine.py``; ``--resume`` skips runs already
there) and draws a bar chart with error bars (``bench/results/ssole_ablation.png``, when
matplotlib is installed)::

    python bench/ssole_ablation.py --seeds 42 1 2
    python bench/ssole_ablation.py --resume                      # finish a run cut short
    python bench/ssole_ablation.py --config training/configs/fashion_mnist_r18.yaml \\
        --set epochs=5 --out bench/results/ssole_ablation_fmnist.json
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
)
from training.config import load_config  # noqa: E402

VIEW_COUNTS = (2, 4, 8)


def ablation_points(base_views: int) -> list[Point]:
    """SSOLE, its two variants, and the view counts of :data:`VIEW_COUNTS` other than
    ``base_views`` (the config's own)."""
    ssole = {"method": "ssole"}
    return [
        Point("ssole", tuple(ssole.items())),
        Point("objective=coupled_ole", (*ssole.items(), ("ssole_objective", "coupled_ole"))),
        Point("centering=none", (*ssole.items(), ("ssole_centering", "none"))),
        *(
            Point(f"views={n}", (*ssole.items(), ("views.num_views", n)))
            for n in VIEW_COUNTS
            if n != base_views
        ),
    ]


def plot(summary: list[dict[str, Any]], path: Path) -> bool:
    """Bar chart of kNN and linear top-1 and of RankMe per point, mean with std error bars.
    Returns ``False`` (and draws nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["point"] for r in summary]
    xs = range(len(names))
    fig, (acc, rank) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(names), 4.2))
    bars = ((-0.2, "knn_top1", "kNN"), (0.2, "linear_top1", "linear"))
    for offset, measure, label in bars:
        means = [r.get(f"{measure}_mean", 0.0) for r in summary]
        stds = [r.get(f"{measure}_std", 0.0) for r in summary]
        acc.bar([x + offset for x in xs], means, 0.4, yerr=stds, capsize=3, label=label)
    acc.set_ylabel("top-1 (%)")
    acc.legend()
    means = [r.get("rankme_mean", 0.0) for r in summary]
    rank.bar(xs, means, 0.6, yerr=[r.get("rankme_std", 0.0) for r in summary], capsize=3)
    rank.set_ylabel("RankMe")
    for ax in (acc, rank):
        ax.set_xticks(list(xs), names, rotation=20, ha="right")
    runs = max((r["runs"] for r in summary), default=0)
    fig.suptitle(f"SSOLE ablation: mean ± std over {runs} seed(s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ablation; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=description(__doc__), formatter_class=HelpFormatter
    )
    add_budget_arguments(parser, RESULTS / "ssole_ablation.json")
    parser.add_argument("--probe-epochs", type=int, default=25, help="linear probe epochs")
    parser.add_argument(
        "--plot", default=str(RESULTS / "ssole_ablation.png"), help="bar chart ('' for none)"
    )
    args = parser.parse_args(argv)
    budget = budget_of(args, ("knn", "linear", "rankme"), probe_epochs=args.probe_epochs)
    base = load_config(budget.config, [*budget.overrides, "method=ssole"])
    grid = ablation_points(base.views.num_views)
    try:
        points = select_points(grid, args.points)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dry_run:
        dry_run(budget, "ablation", points, args.seeds)
        return 0
    out = Path(args.out)
    header = {
        "benchmark": "ssole_ablation",
        "budget": budget_record(budget),
        "grid": {p.name: p.overrides() for p in grid},
    }
    try:
        data = load_results(out, header, args.resume)
    except ValueError as exc:
        parser.error(str(exc))
    summarise = functools.partial(summarise_runs, order=[p.name for p in grid])
    print(f"load average before: {data['machine']['load_average_before']}", flush=True)
    try:
        run_points(budget, "ablation", points, args.seeds, out, data, summarise)
    except KeyboardInterrupt:
        return interrupted(out, data)
    save_results(out, data, summarise)
    print()
    print(format_table(data["summary"]))
    if args.plot:
        drawn = plot(data["summary"], Path(args.plot))
        print(f"wrote {args.plot}" if drawn else "matplotlib is not installed: no chart")
    print(f"load average after: {data['load_average_after']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
