"""The ``quality`` stage: ``bench/quality.py``, SSOLE on Fashion-MNIST, evaluated and exported."""

from __future__ import annotations

from typing import Any

from bench.gpu_stages.stage import FASHION_MNIST_MISSING, Check, Plan, Stage, at_least, read_json


def build_stage(plan: Plan, timeout_s: float, train_budget_s: float) -> Stage | str:
    """``bench/quality.py``: SSOLE on all of Fashion-MNIST for the epochs that fit
    ``train_budget_s``, evaluated against raw pixels and random init, exported as a hub folder."""
    if plan.fashion_mnist is None:
        return FASHION_MNIST_MISSING
    out, export = plan.out("quality"), plan.work / "hub"
    sizes = plan.pick(
        ["--train-images", "100", "--test-images", "50", "--size", "32", "--batch-size", "25",
         "--workers", "0", "--projector-dim", "64", "--probe-epochs", "2",
         "--calibration-steps", "2"],
        ["--train-images", "60000", "--test-images", "10000", "--size", "64",
         "--batch-size", "256", "--workers", "10"],
    )  # fmt: skip
    # SSOLE's small-data recipe, as fashion_mnist_r18.yaml trains it (bench/recipe_sweep.py,
    # bench/recipe_confirm.py): LARS, a BatchNorm projector, weight decay 1e-6; lr 2.4 at batch
    # 64, 4.8 at 256 (square-root scaling, measured on the demo's subset).
    recipe = ["--optimizer", "lars", "--ssole-projector", "bn", "--weight-decay", "1e-6",
              "--lr", "4.8"]  # fmt: skip
    command = [
        plan.python, "bench/quality.py", "--methods", "ssole", "--device", plan.device,
        "--precision", "bf16", "--time-budget", f"{train_budget_s:.0f}", *recipe, *sizes,
        "--data-root", str(plan.fashion_mnist), "--work-dir", str(plan.work / "quality"),
        "--export", str(export), "--out", str(out),
    ]  # fmt: skip

    def judge() -> tuple[dict[str, Any], list[Check]]:
        r = read_json(out)
        rows = {row["method"] or row["model"].replace(" ", "_"): row for row in r["rows"]}
        folder = export / str(r["exported"])
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        figures = {
            "train_images": r["budget"]["train_images"], "epochs": r["budget"]["epochs"],
            "time_budget_s": r["budget"]["time_budget"], "train_s": rows["ssole"]["train_s"],
            "calibration": r["calibration"], "hub_folder": files,
        }  # fmt: skip
        for model in ("ssole", "raw_pixels", "random_init"):
            for key in ("knn_top1", "linear_top1", "rankme"):
                figures[f"{model}_{key}"] = rows[model][key]
        knn = rows["ssole"]["knn_top1"]
        wanted = ["README.md", "config.json", "model.safetensors"]
        card = [f for f in wanted if f in files]
        return figures, [
            at_least("SSOLE kNN top-1 (k=20, T=0.07)", knn, 90),
            at_least("SSOLE kNN - raw-pixel kNN", knn - rows["raw_pixels"]["knn_top1"], 3),
            Check("hub folder", ", ".join(wanted), ", ".join(card) or "none", card == wanted),
        ]

    what = "SSOLE ResNet-18 on Fashion-MNIST, evaluated and exported"
    return Stage("quality", what, command, timeout_s, judge)
