"""The ``extract`` stage: ``bench/extract.py``, batch extraction against the model-only bound."""

from __future__ import annotations

from typing import Any

from bench.gpu_stages.stage import Check, Plan, Stage, at_least, read_json, rounded


def build_stage(plan: Plan, timeout_s: float) -> Stage:
    """``bench/extract.py``: batch extraction from JPEG files against the model-only bound."""
    out = plan.out("extract")
    sizes = plan.pick(
        ["--images", "8", "--batch-size", "4", "--workers", "0", "--repeats", "1"],
        ["--images", "512", "--batch-size", "128", "--workers", "12", "--repeats", "3"],
    )
    command = [plan.python, "bench/extract.py", "--device", plan.device, "--compare-decoding",
               *sizes, "--out", str(out)]  # fmt: skip

    def judge() -> tuple[dict[str, Any], list[Check]]:
        r = read_json(out)
        rate, ratio = r["images_per_s"], r["ratio_to_bound"]
        figures = {
            "bound_images_per_s": rounded(rate["bound"], 1),
            "extract_images_per_s": rounded(rate["extract"], 1),
            "ratio": rounded(ratio["extract"]), "fast_decode_ratio": rounded(ratio["extract_fast"]),
            "device_decode_ratio": rounded(ratio["extract_device"]),
            "device_vs_cpu_decoding": rounded(ratio["extract_device"] / ratio["extract"]),
            "dtype": r["dtype"], "device": r["device"],
        }  # fmt: skip
        return figures, [at_least("extract / model-only bound", ratio["extract"], 0.9)]

    return Stage("extract", "batch extraction JPEG -> shards", command, timeout_s, judge)
