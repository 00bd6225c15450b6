"""GPU verification in one command: every GPU path run once and every GPU target measured, in
under nine minutes of one GPU.

Made for a GPU machine without registry access that has Python 3.12 with torch, torchvision, timm,
safetensors, huggingface_hub, scikit-learn, scikit-image, prometheus-client, pyyaml and httpx
installed, and no virtualenv. What it lacks (fastapi, uvicorn, pydantic, kornia, lightly, ...)
travels with the repository as wheels, with Fashion-MNIST beside them::

    make wheelhouse gpu-data        # here, once: .whl/ and .gpu-data/fashion-mnist/ (git-ignored)
    python3 bench/gpu_check.py      # there, from the repository root (or: make gpu-check)

Each stage is a subprocess with a time limit; a stage that fails or runs out of time is recorded
as such and the next one runs. In order:

- ``cuda_tests``: the test suite's CUDA tests (marked ``gpu`` or named for CUDA);
- ``loss``: ``bench/loss.py``, fp32, B=256, N=8, d=4096, against the SVD formulation;
- ``train_eager`` and ``train_compile``: ``bench/train_throughput.py``, the ResNet-18 recipe at
  224 px x 4 views with the views made on the GPU (kornia), bf16, channels_last, against the
  pre-made-views bound, without and with ``torch.compile``;
- ``ddp``: ``training.pretrain`` under torchrun, NCCL and SyncBatchNorm (needs two GPUs: NCCL
  takes one process per GPU, so on one GPU the stage says so and is skipped);
- ``extract`` and ``serve``: ``bench/extract.py`` and ``bench/serve.py`` on CUDA against their
  bounds;
- ``quality``: ``bench/quality.py``, SSOLE ResNet-18 on all 60k Fashion-MNIST images for the most
  epochs that fit the time left (at most ``--quality-budget`` s of training, calibrated), kNN
  (k=20, T=0.07), linear probe and RankMe against raw pixels and random init, exported as a hub
  folder with its model card.

``--dry-run`` runs the same stages at toy sizes on the CPU, in a couple of minutes; the test suite
runs it. Writes one JSON file (``bench/results/gpu_check.json``) and prints one table: per stage,
each target, what was measured, and whether it was met.

This file only orchestrates: each stage (its command, time limit and targets) lives in its own
module under ``bench/gpu_stages/``, with the wheelhouse, the stage runner and the report beside
them. Like those modules, it imports only the standard library at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: bench.gpu_stages is importable

from bench.gpu_stages import cuda_tests, ddp, extract, loss, quality, serve, train  # noqa: E402
from bench.gpu_stages.report import print_table, relative_command  # noqa: E402
from bench.gpu_stages.runner import machine_info, run_stage  # noqa: E402
from bench.gpu_stages.stage import Plan, Stage  # noqa: E402
from bench.gpu_stages.wheels import download_wheels, install_missing  # noqa: E402

FASHION_MNIST_DIRS = (
    ROOT / ".gpu-data" / "fashion-mnist",
    Path("/usr/share/datasets/fashion-mnist"),
)
# Set for every stage, so that a stage never starts this check again (its dry run is a test).
NESTED = "SSOLE_GPU_CHECK_STAGE"

# Per-stage time limits in seconds (GPU run, dry run); the quality stage gets what is left.
LIMITS = {
    "cuda_tests": (120, 180),
    "loss": (60, 90),
    "train_eager": (120, 180),
    "train_compile": (200, 300),
    "ddp": (120, 240),
    "extract": (90, 180),
    "serve": (150, 240),
}
STAGES = (*LIMITS, "quality")
# The quality stage's time outside training (start-up, data, baselines, calibration, evaluation,
# export), and the least training time worth running it with (GPU run, dry run).
QUALITY_OVERHEAD_S = (100, 90)
QUALITY_MIN_TRAIN_S = (60, 2)
BUILDERS: dict[str, Callable[[Plan, float], Stage | str]] = {
    "cuda_tests": cuda_tests.build_stage,
    "loss": loss.build_stage,
    "train_eager": lambda plan, t: train.build_stage(plan, t, compiled=False),
    "train_compile": lambda plan, t: train.build_stage(plan, t, compiled=True),
    "ddp": ddp.build_stage,
    "extract": extract.build_stage,
    "serve": serve.build_stage,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same stages at toy sizes on the CPU")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list, in this order")
    p.add_argument("--fashion-mnist", type=Path, default=None, help="folder of its idx files")
    p.add_argument("--total-budget", type=float, default=None, help="seconds (540; dry run 900)")
    p.add_argument(
        "--quality-budget",
        type=float,
        default=None,
        help="most seconds of quality training (300; dry run 3)",
    )
    p.add_argument("--wheelhouse", type=Path, default=ROOT / ".whl")
    p.add_argument("--download-wheels", action="store_true", help="fill --wheelhouse and exit")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "gpu_check")
    p.add_argument("--out", type=Path, default=None, help="JSON (bench/results/gpu_check.json)")
    return p


def clear_results(work: Path) -> None:
    """Remove an earlier run's results from ``work`` (logs append, and a stage must not be judged
    on what it did not write); the installed wheels stay."""
    work.mkdir(parents=True, exist_ok=True)
    for name in [f"{s}.json" for s in STAGES] + ["cuda_tests.xml"]:
        (work / name).unlink(missing_ok=True)
    for folder in ("ddp", "quality", "hub", "logs"):
        shutil.rmtree(work / folder, ignore_errors=True)


def _fashion_mnist(given: Path | None) -> Path | None:
    candidates = [given] if given else FASHION_MNIST_DIRS
    return next(
        (p.resolve() for p in candidates if (p / "train-images-idx3-ubyte.gz").is_file()), None
    )


def _environment(site: Path | None) -> dict[str, str]:
    paths = [str(site)] if site else []
    paths += [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONUNBUFFERED": "1",
        NESTED: "1",
    }


def _install_wheels(wheelhouse: Path, work: Path) -> tuple[Path | None, dict[str, Any]]:
    """Install the carried wheels this interpreter lacks into ``work/site``; returns that folder
    (``None`` without a wheelhouse) and what was installed. A failed install is recorded, not
    raised: the stages that need the wheels then fail, and say why."""
    if not wheelhouse.is_dir():
        return None, {"wheelhouse": "none"}
    site = work / "site"
    try:
        return site, install_missing(wheelhouse, site)
    except (subprocess.CalledProcessError, OSError, ValueError) as exc:
        return site, {"error": repr(exc)}


def _build_stage(
    plan: Plan, name: str, left_s: float, keep_for_quality_s: float, quality_s: float
) -> Stage | str:
    """Stage ``name`` with ``left_s`` seconds left, or why it is skipped: each stage but the
    quality one leaves that stage ``keep_for_quality_s``; the quality stage trains for at most
    ``quality_s`` of what is left after its overhead."""
    k = int(plan.dry_run)
    if name == "quality":
        train_s = min(quality_s, left_s - QUALITY_OVERHEAD_S[k])
        if train_s < QUALITY_MIN_TRAIN_S[k]:
            return (
                f"{left_s:.0f} s left: {train_s:.0f} s of training, under the least "
                f"({QUALITY_MIN_TRAIN_S[k]} s)"
            )
        return quality.build_stage(plan, left_s, train_s)
    timeout = min(LIMITS[name][k], left_s - keep_for_quality_s)
    return BUILDERS[name](plan, timeout) if timeout >= 15 else f"{left_s:.0f} s left"


def run_stages(
    plan: Plan, names: list[str], env: dict[str, str], budget: tuple[float, float]
) -> list[dict[str, Any]]:
    """Run the stages in order within ``budget`` (total seconds, most quality training seconds):
    every stage but the last leaves the quality stage its overhead and least training time."""
    total_s, quality_s = budget
    k = int(plan.dry_run)
    deadline = time.monotonic() + total_s
    keep_for_quality = QUALITY_OVERHEAD_S[k] + QUALITY_MIN_TRAIN_S[k] if "quality" in names else 0
    logs = plan.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    records = []
    for name in names:
        stage = _build_stage(plan, name, deadline - time.monotonic(), keep_for_quality, quality_s)
        if isinstance(stage, str):
            record = {
                "name": name,
                "status": "skipped",
                "reason": stage,
                "seconds": 0.0,
                "figures": {},
                "checks": [],
            }
        else:
            print(f"==> {name}: {stage.what} (at most {stage.timeout_s:.0f} s)", flush=True)
            record = run_stage(stage, env, logs)
            record["command"] = relative_command(stage.command, plan.work)
        print(
            f"    {record['status']} in {record['seconds']:.0f} s {record.get('reason', '')}",
            flush=True,
        )
        records.append(record)
    return records


def _write_report(report: dict[str, Any], out: Path | None) -> Path:
    """Write the JSON report to ``out`` (default ``bench/results/gpu_check.json``, or
    ``gpu_check_dry_run.json`` for a dry run); returns where it went."""
    out = out or ROOT / "bench" / "results" / (
        "gpu_check_dry_run.json" if report["dry_run"] else "gpu_check.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0 when every stage ran (targets met or not), 1 when one failed or
    timed out, 2 for bad usage (no GPU without ``--dry-run``, unknown stage, or started by one of
    its own stages)."""
    args = _parser().parse_args(argv)
    if os.environ.get(NESTED):
        print("bench/gpu_check.py does not run inside one of its own stages", file=sys.stderr)
        return 2
    if args.download_wheels:
        files = download_wheels(args.wheelhouse)
        size_mib = sum(f.stat().st_size for f in files) / 2**20
        print(f"{len(files)} wheels, {size_mib:.1f} MiB in {args.wheelhouse}")
        return 0
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := sorted(set(names) - set(STAGES)):
        print(
            f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    work = args.work_dir.resolve()
    clear_results(work)
    site, wheels = _install_wheels(args.wheelhouse, work)
    env = _environment(site)
    machine = machine_info(sys.executable, env)
    if not args.dry_run and machine["gpus"] == 0:
        print("no CUDA GPU here: run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    plan = Plan(args.dry_run, work, _fashion_mnist(args.fashion_mnist), machine["gpus"])
    k = int(args.dry_run)
    total = args.total_budget or (540, 900)[k]
    quality_s = args.quality_budget or (300, 3)[k]
    records = run_stages(plan, names, env, (total - (time.monotonic() - started), quality_s))
    print_table(records, args.dry_run)
    command = [sys.executable, "bench/gpu_check.py", *(argv or sys.argv[1:])]
    report = {
        "benchmark": "gpu_check",
        "command": relative_command(command, work),
        "dry_run": args.dry_run,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "fashion_mnist": None if plan.fashion_mnist is None else plan.fashion_mnist.name,
        "wheels": wheels,
        "budget_s": total,
        "wall_s": round(time.monotonic() - started, 1),
        "stages": records,
    }
    out = _write_report(report, args.out)
    print(f"\n{report['wall_s']:.0f} s in all; wrote {out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
