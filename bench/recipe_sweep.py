"""Small-data recipe sweep on digits: one method, a one-factor-at-a-time grid around its published
recipe, several seeds per point, weighted kNN top-1 and RankMe per run.

Every method gets a grid of the same size (16 points) at the digits demo's budget
(``training/configs/digits_demo.yaml``: 3 epochs, 64 images x 4 views of 32 px, crops of scale
(0.4, 1)), centred on the recipe family its peers publish for small models, LARS with a
BatchNorm projector:

- SSOLE: LARS, BatchNorm projector, lr 0.3, weight decay 1e-6, lambda 0.6. The paper's own
  ImageNet recipe (SGD, no BatchNorm in the projector, lr 0.5 at this batch, weight decay 1e-5)
  is the grid's ``recipe=sgd-nobn`` point, and ``optim=sgd`` and ``bn=off`` step towards it;
- VICReg: LARS, BatchNorm projector, lr 0.3, weight decay 1e-6 (the README's example);
- Barlow Twins: LARS, BatchNorm projector, lr 0.2 (its paper's for weights), weight decay 1e-6
  (the grid's level nearest its paper's 1.5e-6);
- SimCLR: LARS, BatchNorm projector, lr 0.3, weight decay 1e-6, temperature 0.2.

Around that base, one factor at a time: the optimiser (SGD <-> LARS), the projector's BatchNorm
(on <-> off), lr x0.5 and x2, weight decay over {0, 1e-6, 1e-5}, 2 views instead of 4, crop scale
(0.2, 1) instead of (0.4, 1), the method's own factor over three levels (SSOLE's lambda
0.3/0.6/1.0, VICReg's invariance=variance weights 10/25/50 with covariance 1, Barlow Twins'
lambda 2.5e-3/5e-3/1e-2, SimCLR's temperature 0.1/0.2/0.5) and the other family's whole recipe
(SGD, no BatchNorm, lr 0.5, weight decay 1e-5: the paper's recipe for SSOLE). A second round
adds the same two points to every grid, past the first round's top lr level (x2, the best or
second-best point of every method): lr x4, and lr x2 with 2 views. A third round goes one step
further on both, since lr x4 was SSOLE's best point and lr x2 with 2 views VICReg's: lr x8, and
lr x4 with 2 views. ``optim.final_lr`` is always lr / 100.

Each run pre-trains through ``training.pretrain.run`` and is evaluated by ``training.evaluate``
(weighted kNN k=20 T=0.07 on the digits' held-out 20%, RankMe of the train features). Each run's
result is appended to ``bench/results/recipe_sweep_<method>.json`` as soon as it finishes, with
the machine record and the load average before and after (``bench/machine.py``); ``--resume``
skips the runs the file already holds. A table sorted by mean kNN closes the run::

    python bench/recipe_sweep.py --method ssole --seeds 42 1 2
    python bench/recipe_sweep.py --method vicreg --dry-run          # the grid, exact overrides
    python bench/recipe_sweep.py --method ssole --points base,optim=lars --resume
    python bench/recipe_sweep.py --method simclr --set epochs=10    # another budget

``--set KEY=VALUE`` changes the shared budget (applied before each point's own overrides).
Checkpoints are deleted once a run is evaluated (``--keep-checkpoints`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import load_average, machine_record  # noqa: E402
from training.config import Config, load_config  # noqa: E402
from training.objectives import METHODS, build_objective  # noqa: E402

DEFAULT_CONFIG = ROOT / "training" / "configs" / "digits_demo.yaml"
RESULTS = ROOT / "bench" / "results"

# What every run of a bench shares: the benches evaluate after training (same kNN protocol as
# the monitor), so the monitor is off, and one checkpoint at a time is enough.
BENCH_OVERRIDES = ("knn.every_epochs=0", "knn.at_start=false", "keep_checkpoints=1")

# The paper's SSOLE recipe (ImageNet's, at the demo's batch) and the LARS + BatchNorm recipe the
# peers publish for small models.
RECIPES: dict[str, dict[str, Any]] = {
    "sgd-nobn": {"optim.name": "sgd", "model.projector_batch_norm": False, "optim.lr": 0.5,
                 "optim.weight_decay": 1e-5},
    "lars-bn": {"optim.name": "lars", "model.projector_batch_norm": True, "optim.lr": 0.3,
                "optim.weight_decay": 1e-6},
}  # fmt: skip
# Each method's grid centre (module docstring): the LARS + BatchNorm family, at the method's own
# published learning rate where it has one.
CENTRES: dict[str, dict[str, Any]] = {
    "ssole": RECIPES["lars-bn"],
    "vicreg": RECIPES["lars-bn"],
    "barlowtwins": {**RECIPES["lars-bn"], "optim.lr": 0.2},
    "simclr": RECIPES["lars-bn"],
}
SHARED_BASE: dict[str, Any] = {"views.num_views": 4, "views.scale": (0.4, 1.0)}
# The method's own factor: its config key, its published value and the two levels around it.
OWN_FACTOR: dict[str, tuple[str, Any, tuple[Any, Any]]] = {
    "ssole": ("ssole_lambda", 0.6, (0.3, 1.0)),
    "vicreg": ("vicreg_weights", (25.0, 25.0, 1.0), ((10.0, 10.0, 1.0), (50.0, 50.0, 1.0))),
    "barlowtwins": ("barlowtwins_lambda", 5e-3, (2.5e-3, 1e-2)),
    "simclr": ("simclr_temperature", 0.2, (0.1, 0.5)),
}
WEIGHT_DECAYS = (0.0, 1e-6, 1e-5)


def yaml_value(value: Any) -> str:
    """``value`` as a config override reads it (``true``, ``0.5``, ``1e-05``, ``[0.2,1.0]``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return "[" + ",".join(yaml_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Point:
    """One point of a grid: a name and the settings it gives the keys the bench varies."""

    name: str
    settings: tuple[tuple[str, Any], ...]

    def overrides(self) -> list[str]:
        """The exact ``key=value`` config overrides of this point."""
        values = dict(self.settings)
        out = [f"{key}={yaml_value(value)}" for key, value in values.items()]
        if "optim.lr" in values:
            out.append(f"optim.final_lr={yaml_value(values['optim.lr'] / 100)}")
        return out


def _point(name: str, base: dict[str, Any], **changes: Any) -> Point:
    return Point(name, tuple({**base, **changes}.items()))


def _level(value: Any) -> str:
    """A setting's value as a point's name shows it (``1e-05``, ``0.3``, ``10/10/1``): no commas,
    which separate the names given to ``--points``."""
    if isinstance(value, tuple | list):
        return "/".join(_level(v) for v in value)
    return f"{value:g}"


def sweep_grid(method: str) -> list[Point]:
    """The one-factor-at-a-time grid around ``method``'s centre (module docstring);
    every method's has the same number of points, the base first."""
    own_key, own_base, own_levels = OWN_FACTOR[method]
    base = {**CENTRES[method], **SHARED_BASE, own_key: own_base}
    optimizer = "lars" if base["optim.name"] == "sgd" else "sgd"
    batch_norm = not base["model.projector_batch_norm"]
    lr = base["optim.lr"]
    other = "lars-bn" if base["optim.name"] == "sgd" else "sgd-nobn"
    grid = [
        _point("base", base),
        _point(f"optim={optimizer}", base, **{"optim.name": optimizer}),
        _point(f"bn={'on' if batch_norm else 'off'}", base,
               **{"model.projector_batch_norm": batch_norm}),
        _point("lr=x0.5", base, **{"optim.lr": lr * 0.5}),
        _point("lr=x2", base, **{"optim.lr": lr * 2}),
        *(_point(f"wd={_level(wd)}", base, **{"optim.weight_decay": wd})
          for wd in WEIGHT_DECAYS if wd != base["optim.weight_decay"]),
        _point("views=2", base, **{"views.num_views": 2}),
        _point("scale=0.2", base, **{"views.scale": (0.2, 1.0)}),
        *(_point(f"{own_key}={_level(level)}", base, **{own_key: level})
          for level in own_levels),
        _point(f"recipe={other}", base, **RECIPES[other]),
        _point("lr=x4", base, **{"optim.lr": lr * 4}),
        _point("lr=x2+views=2", base, **{"optim.lr": lr * 2, "views.num_views": 2}),
        _point("lr=x8", base, **{"optim.lr": lr * 8}),
        _point("lr=x4+views=2", base, **{"optim.lr": lr * 4, "views.num_views": 2}),
    ]  # fmt: skip
    return grid


def select_points(grid: Sequence[Point], names: str | None) -> list[Point]:
    """The points named in the comma list ``names`` (all when ``None``), in grid order.

    Raises:
        ValueError: naming an unknown point and the grid's points.
    """
    if names is None:
        return list(grid)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {p.name for p in grid}
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(
            f"unknown point(s) {', '.join(unknown) or '(none given)'}; "
            f"this grid has: {', '.join(p.name for p in grid)}"
        )
    return [p for p in grid if p.name in wanted]


# --- one run: train, evaluate, clean up -----------------------------------------------------


def slug(name: str) -> str:
    """A file-name-safe form of a point name (``lr=x0.5`` -> ``lr_x0_5``)."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", name).strip("_")


def _eval_dataset(cfg: Config) -> tuple[str, str | None]:
    if cfg.data.dataset == "digits":
        return "digits", None
    if cfg.data.dataset == "fashion-mnist":
        return "fashion-mnist", cfg.data.root
    raise ValueError(f"the benches evaluate digits or fashion-mnist, not {cfg.data.dataset!r}")


_wiring_checked: set[tuple[Any, ...]] = set()


def check_objective_wiring(cfg: Config) -> None:
    """Raise unless the trainer builds the objective ``cfg`` names: a config's objective settings
    (``ssole_objective``, ``vicreg_weights``, ...) that never reach training would silently
    measure the default objective. Checked once per distinct non-default setting (it builds
    the model).

    Raises:
        RuntimeError: if the trainer's objective gives another loss than ``build_objective``
            with ``cfg.objective_options()``.
    """
    import dataclasses

    import torch

    from training.distributed import init_distributed
    from training.trainer import Trainer

    options = cfg.objective_options()
    key = (cfg.method, *options.items())
    if key in _wiring_checked or options == Config().objective_options():  # defaults: no news
        return
    trainer = Trainer(dataclasses.replace(cfg, device="cpu"), init_distributed("cpu"), 1)
    z = torch.randn(8, cfg.views.num_views, 16, generator=torch.Generator().manual_seed(0))
    got = float(trainer.objective(z)["loss"])
    want = float(build_objective(cfg.method, **options)(z)["loss"])
    if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-7):
        raise RuntimeError(
            f"the trainer's {cfg.method} objective gives loss {got:.6g}, the config's "
            f"{want:.6g}: training/trainer.py does not pass the config's objective settings "
            "(build_objective(cfg.method, gather=..., **cfg.objective_options())), so these "
            "runs would train the default objective"
        )
    _wiring_checked.add(key)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def train_and_evaluate(
    cfg: Config, protocols: Sequence[str], eval_options: dict[str, Any], keep: bool = False
) -> dict[str, Any]:
    """Pre-train ``cfg`` (replacing any earlier run in its directory), evaluate its backbone
    with ``protocols`` and return the measures; the checkpoints are deleted unless ``keep``."""
    from bench.quality import median_images_per_s
    from training.evaluate import evaluate
    from training.pretrain import run, run_dir_of
    from training.trainer import NonFiniteLossError

    check_objective_wiring(cfg)
    dataset, data_path = _eval_dataset(cfg)
    started = time.perf_counter()
    try:
        checkpoint = run(cfg, overwrite=True)
    except NonFiniteLossError as exc:  # a result of the grid, not the end of the sweep
        shutil.rmtree(run_dir_of(cfg) / "checkpoints", ignore_errors=True)
        return {"knn_top1": None, "linear_top1": None, "rankme": None,
                "train_s": round(time.perf_counter() - started, 1), "train_images_per_s": None,
                "eval_s": None, "diverged": str(exc).split(";")[0]}  # fmt: skip
    train_s = time.perf_counter() - started
    result = evaluate(
        str(checkpoint), dataset, data_path, protocols, progress=False, **eval_options
    )
    run_dir = run_dir_of(cfg)
    p = result["protocols"]
    measures = {
        "knn_top1": p["knn"]["top1"] if "knn" in p else None,
        "linear_top1": p["linear"]["top1"] if "linear" in p else None,
        "rankme": p.get("rankme"),
        "train_s": round(train_s, 1),
        "train_images_per_s": _round(median_images_per_s(run_dir)),
        "eval_s": result["seconds"],
    }
    if not keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / "final.pt").unlink(missing_ok=True)
    return measures


# --- the results file: appended run by run, resumable ---------------------------------------


def load_results(path: Path, header: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The results to add to: the file's (``resume``; its budget must be ``header``'s) or a
    fresh record with ``header``, this machine's record and no runs yet.

    Raises:
        ValueError: if ``resume`` finds a file of another benchmark or budget.
    """
    machine = machine_record()
    if resume and path.is_file():
        data = json.loads(path.read_text())
        for key in ("benchmark", "budget"):
            if data.get(key) != header.get(key):
                raise ValueError(
                    f"{path} holds another {key} ({data.get(key)!r}, this run: "
                    f"{header.get(key)!r}); resume with the same settings, or write elsewhere "
                    "with --out (without --resume the file is started afresh)"
                )
        earlier = {k: data.get(k) for k in ("machine", "load_average_after")}
        data["earlier_sessions"] = [*data.get("earlier_sessions", []), earlier]
        data.update(header)
        data["machine"] = machine
        return data
    return {**header, "machine": machine, "earlier_sessions": [], "runs": [], "summary": []}


def save_results(path: Path, data: dict[str, Any], summarise: Callable[[list], list]) -> None:
    """Write ``data`` to ``path`` atomically (a run cut short leaves the last complete file),
    with its summary and the load average now."""
    data["summary"] = summarise(data["runs"])
    data["load_average_after"] = load_average()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def finished(data: dict[str, Any], point: str, seed: int, overrides: list[str]) -> bool:
    """Whether ``data`` already holds this run (same point, seed and exact overrides)."""
    return any(
        r["point"] == point and r["seed"] == seed and r["overrides"] == overrides
        for r in data["runs"]
    )


@dataclass
class Budget:
    """What every run of a bench shares: the config, overrides, work folder and evaluation."""

    config: Path
    overrides: list[str]
    work_dir: Path
    protocols: tuple[str, ...]
    eval_options: dict[str, Any]
    keep_checkpoints: bool = False

    def config_for(self, group: str, point: Point, seed: int) -> Config:
        """The config of ``point`` at ``seed``, in ``work_dir/group/<point>-s<seed>``."""
        return load_config(
            self.config,
            [
                *BENCH_OVERRIDES, *self.overrides, *point.overrides(), f"seed={seed}",
                f"output_dir={self.work_dir / group}", f"run_name={slug(point.name)}-s{seed}",
            ],
        )  # fmt: skip


def run_points(
    budget: Budget,
    group: str,
    points: Sequence[Point],
    seeds: Sequence[int],
    out: Path,
    data: dict[str, Any],
    summarise: Callable[[list], list],
) -> dict[str, Any]:
    """Run every (point, seed) that ``data`` does not hold yet, appending each result to
    ``data`` (in place) and writing ``out`` as soon as it is measured; prints a line per run."""
    todo = [(p, s) for p in points for s in seeds]
    durations: list[float] = []
    for i, (point, seed) in enumerate(todo, 1):
        overrides = point.overrides()
        tag = f"[{i}/{len(todo)}] {point.name} seed {seed}"
        if finished(data, point.name, seed, overrides):
            print(f"{tag}: already in {out.name}, skipped", flush=True)
            continue
        started = time.perf_counter()
        cfg = budget.config_for(group, point, seed)
        measures = train_and_evaluate(
            cfg, budget.protocols, budget.eval_options, budget.keep_checkpoints
        )
        durations.append(time.perf_counter() - started)
        data["runs"] = [
            r for r in data["runs"] if not (r["point"] == point.name and r["seed"] == seed)
        ]
        data["runs"].append(
            {
                "point": point.name, "seed": seed, "overrides": overrides, **measures,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "load_average_after": load_average(),
            }
        )  # fmt: skip
        save_results(out, data, summarise)
        print(f"{tag}: {_measures_line(measures)}{_eta(durations, todo[i:], data)}", flush=True)
    return data


def interrupted(out: Path, data: dict[str, Any]) -> int:
    """Say what a run cut short by Ctrl-C kept; returns the exit status (130)."""
    print(
        f"\ninterrupted: {out} keeps the {len(data['runs'])} run(s) measured; run the same "
        "command with --resume to run the rest",
        file=sys.stderr,
    )
    return 130


def _measures_line(m: dict[str, Any]) -> str:
    if m.get("diverged"):
        return f"diverged ({m['diverged']}; train {m['train_s']:.0f} s)"
    shown = [f"kNN {m['knn_top1']:.2f}%"] if m.get("knn_top1") is not None else []
    if m.get("linear_top1") is not None:
        shown.append(f"linear {m['linear_top1']:.2f}%")
    if m.get("rankme") is not None:
        shown.append(f"RankMe {m['rankme']:.1f}")
    return ", ".join(shown) + f" (train {m['train_s']:.0f} s, eval {m['eval_s']:.0f} s)"


def _eta(durations: list[float], rest: Sequence[tuple[Point, int]], data: dict) -> str:
    left = sum(not finished(data, p.name, s, p.overrides()) for p, s in rest)
    if not left:
        return ""
    return f"; {left} to go, about {left * statistics.mean(durations) / 60:.0f} min"


# --- summary and table ----------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise_runs(runs: list[dict[str, Any]], order: Sequence[str] | None = None) -> list[dict]:
    """Per point: the number of runs, how many diverged (counted, not averaged) and the mean and
    std over seeds of each measure of the others; sorted by
    mean kNN (best first), or in ``order`` when given."""
    points = list(dict.fromkeys(r["point"] for r in runs))
    rows = []
    for point in points:
        mine = [r for r in runs if r["point"] == point]
        row: dict[str, Any] = {"point": point, "runs": len(mine)}
        row["diverged"] = sum(bool(r.get("diverged")) for r in mine)
        for measure in ("knn_top1", "linear_top1", "rankme", "train_s"):
            values = [r[measure] for r in mine if r.get(measure) is not None]
            if values:
                mean, std = mean_std(values)
                row[f"{measure}_mean"], row[f"{measure}_std"] = round(mean, 3), round(std, 3)
        rows.append(row)
    if order is not None:
        rank = {name: i for i, name in enumerate(order)}
        return sorted(rows, key=lambda r: rank.get(r["point"], len(rank)))
    return sorted(rows, key=lambda r: -r.get("knn_top1_mean", -1.0))


def format_table(summary: list[dict[str, Any]], changes: dict[str, str] | None = None) -> str:
    """The summary as a Markdown table: mean ± std over seeds of every measure it holds."""
    measures = [
        (m, title)
        for m, title in (("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1"),
                         ("rankme", "RankMe"), ("train_s", "train s"))
        if any(f"{m}_mean" in r for r in summary)
    ]  # fmt: skip
    head = ["point", "runs", "diverged", *(t for _, t in measures)]
    head += ["overrides"] if changes else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (1 + len(measures))]
    lines[1] += "---|" if changes else ""
    for r in summary:
        cells = [r["point"], str(r["runs"]), str(r.get("diverged", 0))]
        for m, _ in measures:
            digits = 1 if m in ("rankme", "train_s") else 2
            mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
            cells.append("-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}")
        if changes:
            cells.append(changes.get(r["point"], ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def changed_overrides(grid: Sequence[Point]) -> dict[str, str]:
    """Per point, the overrides in which it differs from the grid's base (its first point)."""
    base = set(grid[0].overrides())
    return {p.name: " ".join(o for o in p.overrides() if o not in base) for p in grid}


# --- command line ---------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not for flags and unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def description(doc: str | None) -> str:
    """A bench's --help description: its docstring's first paragraph."""
    return " ".join((doc or "").split("\n\n")[0].split())


def add_budget_arguments(parser: argparse.ArgumentParser, out_default: Path) -> None:
    """The options both benches share: budget, seeds, points, files."""
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base YAML config")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override the budget of every run (e.g. --set epochs=10); repeatable",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="per point")
    parser.add_argument("--points", default=None, help="comma list of points (all when unset)")
    parser.add_argument("--resume", action="store_true", help="skip runs the JSON already holds")
    parser.add_argument("--dry-run", action="store_true", help="list the runs; train nothing")
    parser.add_argument("--out", default=str(out_default), help="results JSON")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench"), help="run folders")
    parser.add_argument(
        "--eval-train-images",
        type=int,
        default=None,
        help="kNN/probe train images (all when unset)",
    )
    parser.add_argument(
        "--eval-test-images", type=int, default=None, help="test images (all when unset)"
    )
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep each run's checkpoints"
    )


def budget_of(args: argparse.Namespace, protocols: tuple[str, ...], **eval_kw: Any) -> Budget:
    """The shared budget the parsed ``args`` describe."""
    eval_options = {"train_limit": args.eval_train_images, "test_limit": args.eval_test_images}
    return Budget(
        Path(args.config), list(args.overrides), Path(args.work_dir), protocols,
        {**eval_options, **eval_kw}, args.keep_checkpoints,
    )  # fmt: skip


def budget_record(budget: Budget) -> dict[str, Any]:
    """The budget as the JSON records it (and ``--resume`` compares it): no machine's paths."""
    config = budget.config.resolve()
    return {
        "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else config.name,
        "overrides": [*BENCH_OVERRIDES, *budget.overrides],
        "protocols": list(budget.protocols),
        "evaluation": budget.eval_options,
    }


def dry_run(budget: Budget, group: str, points: Sequence[Point], seeds: Sequence[int]) -> None:
    """Print every run's exact overrides (after the shared ones); each config is validated."""
    shared = " ".join(budget_record(budget)["overrides"])
    print(f"config {budget.config}; shared overrides: {shared}")
    for point in points:
        budget.config_for(group, point, seeds[0])  # raises for a point the config refuses
        print(f"{point.name:<28} {' '.join(point.overrides())}")
    print(f"{len(points)} points x {len(seeds)} seeds ({', '.join(map(str, seeds))}) = "
          f"{len(points) * len(seeds)} runs")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=description(__doc__), formatter_class=HelpFormatter
    )
    parser.add_argument("--method", choices=METHODS, required=True)
    add_budget_arguments(parser, RESULTS / "recipe_sweep_<method>.json")
    args = parser.parse_args(argv)
    grid = sweep_grid(args.method)
    try:
        points = select_points(grid, args.points)
    except ValueError as exc:
        parser.error(str(exc))
    args.overrides = [f"method={args.method}", *args.overrides]  # the config's own is SSOLE
    budget = budget_of(args, ("knn", "rankme"))
    if args.dry_run:
        dry_run(budget, args.method, points, args.seeds)
        return 0
    out = Path(args.out.replace("<method>", args.method))
    header = {
        "benchmark": "recipe_sweep",
        "budget": {"method": args.method, **budget_record(budget)},
        "grid": {p.name: p.overrides() for p in grid},
    }
    try:
        data = load_results(out, header, args.resume)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"load average before: {data['machine']['load_average_before']}", flush=True)
    try:
        run_points(budget, args.method, points, args.seeds, out, data, summarise_runs)
    except KeyboardInterrupt:
        return interrupted(out, data)
    save_results(out, data, summarise_runs)
    print()
    print(format_table(data["summary"], changed_overrides(grid)))
    print(f"\nload average after: {data['load_average_after']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
