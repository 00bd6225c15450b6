"""The ``train_eager`` and ``train_compile`` stages: ``bench/train_throughput.py``, training
throughput with the views made on the device, without and with ``torch.compile``."""

from __future__ import annotations

from typing import Any

from bench.gpu_stages.stage import Check, Plan, Stage, at_least, read_json, rounded


def build_stage(plan: Plan, timeout_s: float, compiled: bool) -> Stage:
    """``bench/train_throughput.py``: the released recipe's ResNet-18 at 224 px x 4 views (toy:
    32 px) with the views made on the device, bf16, channels_last, against the pre-made-views
    bound, on synthetic images (the loader's cost without a dataset to carry)."""
    name = "train_compile" if compiled else "train_eager"
    out = plan.out(name)
    toy = [
        "data.synthetic_size=40", "views.size=32", "data.batch_size=8", "data.num_workers=0",
        "model.projector_hidden=256", "model.projector_out=256",
    ]  # fmt: skip
    full = ["data.synthetic_size=256", "data.batch_size=128", "data.num_workers=10"]
    steps = plan.pick(["1", "1", "1"], ["6", "3", "3"])
    command = [
        plan.python, "bench/train_throughput.py",
        "--config", "training/configs/imagenet100_r18_m4.yaml", "--out", str(out),
        "--steps", steps[0], "--repeats", steps[1], "--warmup", steps[2],
        "data.dataset=synthetic", "data.synthetic_images=4096", "views.backend=batch",
        "precision=bf16", "model.channels_last=true", f"model.compile={str(compiled).lower()}",
        f"device={plan.device}", *plan.pick(toy, full),
    ]  # fmt: skip

    def judge() -> tuple[dict[str, Any], list[Check]]:
        r = read_json(out)
        med, ratio = r["median_images_per_s"], r["ratio_pipeline_to_bound"]
        figures = {
            "pipeline_images_per_s": rounded(med["pipeline"], 1),
            "bound_images_per_s": rounded(med["bound"], 1),
            "ratio": rounded(ratio), "views": r["views"], "precision": r["precision"],
            "batch": r["batch_per_process"], "device": r["device"],
        }  # fmt: skip
        return figures, [at_least("pipeline / bound (views on the device)", ratio, 0.85)]

    what = f"training throughput, bf16, channels_last, {'torch.compile' if compiled else 'eager'}"
    return Stage(name, what, command, timeout_s, judge)
