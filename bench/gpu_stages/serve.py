"""The ``serve`` stage: ``bench/serve.py``, the batched HTTP server against the offline bound."""

from __future__ import annotations

from typing import Any

from bench.gpu_stages.stage import Check, Plan, Stage, at_least, below, read_json, rounded


def build_stage(plan: Plan, timeout_s: float) -> Stage:
    """``bench/serve.py``: the batched server under closed-loop load against the offline bound;
    its targets hold at concurrency 32 and above."""
    out = plan.out("serve")
    sizes = plan.pick(
        ["--input-px", "64", "--batch-size", "4", "--requests", "8", "--repeats", "1",
         "--concurrency", "1", "32"],
        ["--batch-size", "64", "--requests", "256", "--repeats", "2", "--decode-threads", "8",
         "--concurrency", "1", "8", "32", "64"],
    )  # fmt: skip
    # torch: what auto serves on a GPU, and on the dry run's CPU no ONNX export or second server.
    # JPEGs decoded in each batch on the device (nvjpeg; on the dry run's CPU, torchvision's
    # decoder), against a server that decodes them in its decode threads, in the same rounds.
    # The naive endpoint is not judged here: not started.
    command = [plan.python, "bench/serve.py", "--device", plan.device, "--backend", "torch",
               "--decode-on-device", "on", "--compare-decoding", "--no-naive", *sizes,
               "--out", str(out)]  # fmt: skip

    def judge() -> tuple[dict[str, Any], list[Check]]:
        r = read_json(out)
        levels = {
            lv["concurrency"]: {
                "images_per_s": rounded(lv["server_images_per_s"], 1),
                "vs_bound": rounded(lv["server_vs_bound"]),
                "p99_ms": rounded(lv["server_p99_ms"], 1),
                "p99_over_batch": rounded(lv["p99_over_full_batch"]),
            }
            for lv in r["levels"]
        }
        high = [v for c, v in levels.items() if c >= 32]
        errors = sum(lv["server_errors"] for lv in r["levels"])
        figures = {
            "bound_images_per_s": rounded(r["bound_images_per_s"], 1),
            "full_batch_ms": rounded(r["full_batch_ms"], 1),
            "levels": levels,
            "device_vs_cpu_decoding": {
                lv["concurrency"]: rounded(lv["server_vs_cpu_decoding"]) for lv in r["levels"]
            },
        }
        worst_ratio = min(v["vs_bound"] for v in high)
        worst_p99 = max(v["p99_over_batch"] for v in high)
        decoding = min(v for c, v in figures["device_vs_cpu_decoding"].items() if c >= 32)
        return figures, [
            at_least("server / bound, c >= 32 (worst)", worst_ratio, 0.85),
            below("p99 / one full batch, c >= 32 (worst)", worst_p99, 2),
            at_least("img/s, JPEGs decoded on the GPU / CPU, c >= 32 (worst)", decoding, 1.0),
            Check("server errors", "0", errors, errors == 0),
        ]

    return Stage("serve", "HTTP server with dynamic batching", command, timeout_s, judge)
