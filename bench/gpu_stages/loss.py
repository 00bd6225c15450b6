"""The ``loss`` stage: ``bench/loss.py``, the SSOLE loss against the SVD formulation."""

from __future__ import annotations

from typing import Any

from bench.gpu_stages.stage import Check, Plan, Stage, at_least, read_json


def build_stage(plan: Plan, timeout_s: float) -> Stage:
    """``bench/loss.py``: the SSOLE loss against the SVD formulation, forward + backward, fp32,
    at B=256, N=8, d=4096."""
    out = plan.out("loss")
    sizes = plan.pick(["--shape", "16", "4", "64", "--repeats", "2"], ["--quick", "--repeats", "5"])
    command = [plan.python, "bench/loss.py", "--device", plan.device, *sizes, "--out", str(out)]

    def judge() -> tuple[dict[str, Any], list[Check]]:
        row = read_json(out)["results"][0]
        keys = ("B", "N", "d", "ssole_loss_ms", "svd_ms", "speedup", "loss_rel_diff")
        diff = row["loss_rel_diff"]
        return {k: row[k] for k in keys}, [
            at_least("speed-up over the SVD formulation", row["speedup"], 10, "x"),
            Check("agrees with the SVD formulation", "rel. diff <= 1e-4", diff, diff <= 1e-4),
        ]

    return Stage("loss", "fp32 loss forward + backward vs generic SVD", command, timeout_s, judge)
