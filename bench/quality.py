"""Quality benchmark: SSOLE against VICReg, Barlow Twins and SimCLR at one budget on Fashion-MNIST.

Every method trains the same ResNet-18 (``ssole_resnet18``) with the same projector, views,
augmentations, optimiser, schedule, seed and number of steps through ``training.pretrain.run``;
only ``method`` differs. The peers are ``lightly``'s 2-view losses averaged over all N*(N-1)/2
pairs of the N views (``training.objectives``); ``--peer-projector bn`` (or ``shared,bn``) also
trains them with BatchNorm in the projector, as VICReg and Barlow Twins publish, and
``--ssole-projector`` gives SSOLE the same choice (its released projector has no BatchNorm). Two baselines:
kNN on raw pixels and the random-init backbone (the trainer's own initialisation, same seed). Each
model is evaluated by ``training.evaluate`` (weighted kNN k=20 T=0.07, linear probe, RankMe of the
train features).

The default is a quick CPU budget (2,048 images, 1 epoch, 32 px). The CPU table in BENCHMARKS.md::

    python bench/quality.py --train-images 4096 --test-images 10000 --epochs 32 --size 64 \\
        --precision bf16 --peer-projector shared,bn

and on a GPU::

    python bench/quality.py --train-images 60000 --test-images 10000 --epochs 50 --size 64 \\
        --batch-size 256 --workers 8 --peer-projector shared,bn

``--reuse`` evaluates finished runs of the same budget instead of retraining them
(``--evaluate-only`` trains nothing and skips the rest). ``--time-budget SECONDS`` replaces
``--epochs`` with the largest epoch count whose training fits that time, estimated from a short
calibration run of the same config; ``--export DIR`` writes SSOLE's checkpoint as a hub folder with
its model card and the measured results. Prints a table and writes ``bench/results/quality.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import ssole_hub  # noqa: E402, F401  (registers the ssole_* models with timm)
from training.config import Config, config_to_dict, load_config  # noqa: E402
from training.data import FASHION_MNIST_DIR, labelled_splits  # noqa: E402
from training.evaluate import evaluate, evaluate_features, resolve_device  # noqa: E402
from training.objectives import METHODS  # noqa: E402
from training.pretrain import run, run_dir_of  # noqa: E402
from training.trainer import training_pretrained_cfg  # noqa: E402

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _balanced(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    take = [idx[: n // len(classes) + (i < n % len(classes))] for i, idx in enumerate(per_class)]
    return np.sort(np.concatenate(take))


def write_subset(
    out: Path, train_images: int, test_images: int, seed: int, source: str = FASHION_MNIST_DIR
) -> Path:
    """Write a class-balanced subset of the Fashion-MNIST idx files in ``source`` as idx files, so
    the project's one loader (``data.root``) reads it unchanged. Returns the folder."""
    out.mkdir(parents=True, exist_ok=True)
    train, test = labelled_splits("fashion-mnist", source)
    for split, ds, n in (("train", train, train_images), ("test", test, test_images)):
        keep = _balanced(ds.labels, n, seed)
        _write_idx(out / IDX_FILES[split][0], ds.images[keep])
        _write_idx(out / IDX_FILES[split][1], ds.labels[keep].astype(np.uint8))
    return out


def _yaml_float(x: float) -> str:
    # YAML 1.1 (PyYAML) reads "1e-05" as a string; "1.000000e-05" is a float.
    return f"{x:.6e}"


def budget_overrides(args: argparse.Namespace, data_root: Path, runs: Path) -> list[str]:
    """The config every method shares: only ``method`` and ``run_name`` are added per method."""
    return [
        "data.dataset=fashion-mnist",
        f"data.root={data_root}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.5,0.5,0.5]",
        "data.eval_crop_pct=1.0",
        f"views.num_views={args.views}",
        f"views.size={args.size}",
        "views.scale=[0.3,1.0]",
        "views.color_jitter=[0.4,0.4,0.0,0.0]",
        "views.grayscale_p=0.0",
        "views.blur_p=0.2",
        "views.solarize_p=0.0",
        "views.backend=batch",
        "model.arch=ssole_resnet18",
        f"model.projector_hidden={args.projector_dim}",
        f"model.projector_out={args.projector_dim}",
        f"optim.name={args.optimizer}",
        f"optim.lr={_yaml_float(args.lr)}",
        f"optim.final_lr={_yaml_float(args.lr / 100)}",
        f"optim.weight_decay={_yaml_float(args.weight_decay)}",
        f"optim.warmup_epochs={_yaml_float(args.warmup_epochs)}",
        f"epochs={args.epochs}",
        f"seed={args.seed}",
        f"device={args.device}",
        f"precision={args.precision}",
        "knn.every_epochs=0",
        "log_every_steps=10",
        f"output_dir={runs}",
    ]


def finished_run(cfg: Config) -> Path | None:
    """The final checkpoint of an earlier run of exactly ``cfg`` (same saved ``config.yaml``),
    or None when there is none or its config differs."""
    run_dir = run_dir_of(cfg)
    final, saved = run_dir / "final.pt", run_dir / "config.yaml"
    if not (final.is_file() and saved.is_file()):
        return None
    # Round-trip through YAML so that both sides have the types the saved file has.
    wanted = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if yaml.safe_load(saved.read_text()) != wanted:
        print(f"{run_dir.name}: the saved config differs from this budget; retraining")
        return None
    return final


def _train_events(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == "train"]


def logged_train_seconds(run_dir: Path) -> float:
    """Wall seconds from the run's first to its last logged training step (``log.jsonl``): a
    reused run's training time (a few seconds short of the whole run: start-up, the steps before
    the first log line and the last checkpoint are outside it)."""
    times = [e["time"] for e in _train_events(run_dir)]
    return times[-1] - times[0]


def median_images_per_s(run_dir: Path) -> float | None:
    """Median training throughput over the run's logged steps after the first (which includes
    start-up): unlike the wall time, robust to a short burst of other load on the machine."""
    rates = [e["images_per_s"] for e in _train_events(run_dir)[1:]]
    return float(np.median(rates)) if rates else None


def epochs_for_budget(
    overrides: list[str], seconds: float, train_images: int, steps: int
) -> tuple[int, dict[str, float]]:
    """The largest epoch count whose SSOLE training should fit ``seconds``, and the calibration.

    A calibration run of the same config trains two short epochs of ``steps`` steps each, logging
    every step: its steady images/s (median, leaving out each epoch's first step), the cost of an
    epoch boundary (checkpoint, loader restart) and the one-time start-up give
    ``start-up + epochs * (one epoch's images / images per s + boundary)``.

    Raises:
        RuntimeError: if the calibration run logged too few steps to measure.
    """
    base = load_config(None, overrides)
    batch = base.data.batch_size
    cfg = load_config(
        None,
        [
            *overrides, "method=ssole", "run_name=calibration", "epochs=2", "log_every_steps=1",
            f"data.max_images={min(batch * steps, train_images)}", "checkpoint_every_steps=0",
        ],
    )  # fmt: skip
    shutil.rmtree(run_dir_of(cfg), ignore_errors=True)  # its log appends
    started = time.time()
    run(cfg)
    events = _train_events(run_dir_of(cfg))
    by_epoch = [[e for e in events if e["epoch"] == k] for k in (0, 1)]
    if min(len(e) for e in by_epoch) < 2:
        raise RuntimeError(f"calibration logged too few steps: {[len(e) for e in by_epoch]}")
    rate = float(np.median([e["images_per_s"] for ep in by_epoch for e in ep[1:]]))
    step_s = batch / rate
    boundary_s = max(by_epoch[1][0]["time"] - by_epoch[0][-1]["time"] - step_s, 0.0)
    startup_s = max(by_epoch[0][0]["time"] - started - step_s, 0.0)
    epoch_s = (train_images // batch) * step_s + boundary_s
    epochs = max(1, int((seconds - startup_s) // epoch_s))
    calibration = {
        "images_per_s": round(rate, 1),
        "epoch_s": round(epoch_s, 2),
        "epoch_boundary_s": round(boundary_s, 2),
        "startup_s": round(startup_s, 2),
        "predicted_train_s": round(startup_s + epochs * epoch_s, 1),
        "calibration_wall_s": round(time.time() - started, 1),
    }
    return epochs, calibration


def export_ssole(
    checkpoint: Path, out: Path, own: dict[str, Any], rows: list[dict[str, Any]]
) -> Path:
    """Export SSOLE's checkpoint as a hub folder whose card holds this benchmark's results (its
    own row ``own``, with either projector, and the raw-pixel and random-init baselines' in
    ``rows``). Returns the folder."""
    from ssole_hub import export_hub_folder

    by_name = {r["model"]: r for r in rows}
    results = {
        "fashion-mnist": {
            "knn_top1 (k=20, T=0.07)": own["knn_top1"],
            "linear_top1": own["linear_top1"],
            "rankme": own["rankme"],
            "raw_pixels_knn_top1": by_name["raw pixels"]["knn_top1"],
            "random_init_knn_top1": by_name["random init"]["knn_top1"],
        }
    }
    return export_hub_folder(
        checkpoint, out / "ssole_resnet18-fashion-mnist", overwrite=True, eval_results=results
    )


def _row(
    name: str,
    result: dict[str, Any],
    train_s: float | None = None,
    method: str | None = None,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    p = result["protocols"]
    images_per_s = median_images_per_s(run_dir) if run_dir else None
    return {
        "model": name,
        "method": method,
        "knn_top1": p["knn"]["top1"],
        "linear_top1": p["linear"]["top1"],
        "rankme": p["rankme"],
        "train_s": None if train_s is None else round(train_s, 1),
        "train_images_per_s": None if images_per_s is None else round(images_per_s, 1),
        "eval_s": result.get("seconds"),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the result rows as a Markdown table."""
    print(
        "| model | kNN top-1 | linear top-1 | RankMe | train wall s | train img/s (median) "
        "| eval wall s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    for r in rows:
        print(
            f"| {r['model']} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} | "
            f"{r['rankme']:.1f} | {fmt(r['train_s'])} | {fmt(r['train_images_per_s'])} "
            f"| {fmt(r['eval_s'])} |"
        )


def _projectors(parser: argparse.ArgumentParser, option: str, value: str) -> list[bool]:
    """``--peer-projector`` / ``--ssole-projector``: whether each projector asked for has
    BatchNorm, in the order given."""
    projectors = list(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))
    if not projectors or set(projectors) - {"shared", "bn"}:
        parser.error(f"{option}: {value!r} is not a comma list of shared, bn")
    return [p == "bn" for p in projectors]


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """SSOLE's best variant against the best peer variant and raw pixels (kNN top-1); empty
    unless SSOLE and a peer were trained."""
    trained = [r for r in rows if r["method"]]
    ssole = max((r for r in trained if r["method"] == "ssole"), key=_knn, default=None)
    peer = max((r for r in trained if r["method"] != "ssole"), key=_knn, default=None)
    if ssole is None or peer is None:
        return {}
    return {
        "ssole": ssole["model"],
        "ssole_minus_best_peer_knn": round(ssole["knn_top1"] - peer["knn_top1"], 2),
        "best_peer": peer["model"],
        "ssole_minus_raw_pixels_knn": round(ssole["knn_top1"] - rows[0]["knn_top1"], 2),
    }


def _knn(row: dict[str, Any]) -> float:
    return row["knn_top1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="instead of --epochs: the most epochs whose training fits SECONDS (calibrated)",
    )
    parser.add_argument(
        "--calibration-steps", type=int, default=20, help="steps per calibration epoch"
    )
    parser.add_argument(
        "--data-root", default=FASHION_MNIST_DIR, help="folder of the Fashion-MNIST idx files"
    )
    parser.add_argument(
        "--export", default=None, metavar="DIR", help="export SSOLE as a hub folder under DIR"
    )
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--projector-dim", type=int, default=1024)
    parser.add_argument("--optimizer", choices=("sgd", "lars"), default="lars")
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--warmup-epochs", type=float, default=0.25)
    parser.add_argument(
        "--peer-projector",
        default="shared",
        help="comma list of shared (every method trains SSOLE's projector, no BatchNorm) and bn "
        "(the peers put BatchNorm after each hidden layer, as VICReg and Barlow Twins publish)",
    )
    parser.add_argument(
        "--ssole-projector",
        default="shared",
        help="the same for SSOLE: shared (its released projector, no BatchNorm) and/or bn",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="evaluate a method's earlier run in --work-dir instead of retraining it when its "
        "saved config is exactly this budget's (e.g. to finish an interrupted benchmark)",
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="train nothing: like --reuse, but skip the methods with no finished run",
    )
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="training precision (auto: bf16 on CUDA, fp32 on CPU; bf16 autocast also runs on CPU)",
    )
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "quality"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    batch_norm = {
        option: _projectors(parser, option, getattr(args, option[2:].replace("-", "_")))
        for option in ("--peer-projector", "--ssole-projector")
    }
    # Each method trains once per projector asked for it.
    variants = [
        (method, bn)
        for method in methods
        for bn in batch_norm["--ssole-projector" if method == "ssole" else "--peer-projector"]
    ]

    work = Path(args.work_dir)
    data_root = write_subset(
        work / "data", args.train_images, args.test_images, args.seed, args.data_root
    )
    overrides = budget_overrides(args, data_root, work / "runs")
    device = resolve_device(None if args.device == "auto" else args.device)
    eval_kw = dict(probe_epochs=args.probe_epochs, device=device, progress=False)
    rows: list[dict[str, Any]] = []

    # Baseline 1: raw pixels (28x28 in [0, 1]) through the same protocols.
    train, test = labelled_splits("fashion-mnist", data_root)

    def pixels(ds) -> torch.Tensor:
        return torch.from_numpy(ds.images.reshape(len(ds), -1).astype(np.float32) / 255.0)

    started = time.perf_counter()
    raw = {
        "protocols": evaluate_features(
            pixels(train),
            torch.from_numpy(train.labels),
            pixels(test),
            torch.from_numpy(test.labels),
            **eval_kw,
        )
    }
    raw["seconds"] = round(time.perf_counter() - started, 1)
    rows.append(_row("raw pixels", raw, None))
    print_table(rows[-1:])

    # Baseline 2: the trainer's initialisation (same seed), preprocessing of the training size.
    cfg = load_config(None, [*overrides, "run_name=random-init"])
    torch.manual_seed(cfg.seed)
    backbone = timm.create_model(
        cfg.model.arch, num_classes=0, pretrained_cfg_overlay=training_pretrained_cfg(cfg)
    )
    result = evaluate(backbone, "fashion-mnist", data_root, **eval_kw)
    rows.append(_row("random init", result, None))
    print_table(rows[-1:])

    calibration = None
    if args.time_budget is not None:
        args.epochs, calibration = epochs_for_budget(
            overrides, args.time_budget, args.train_images, args.calibration_steps
        )
        overrides = budget_overrides(args, data_root, work / "runs")
        print(f"time budget {args.time_budget:.0f} s: {args.epochs} epochs ({calibration})")
    exported = None
    for method, batch_norm in variants:
        name = f"{method} (BN projector)" if batch_norm else method
        cfg = load_config(
            None,
            [
                *overrides,
                f"method={method}",
                f"model.projector_batch_norm={str(batch_norm).lower()}",
                f"run_name={method}{'-bn' if batch_norm else ''}",
            ],
        )
        checkpoint = finished_run(cfg) if args.reuse or args.evaluate_only else None
        reused = checkpoint is not None
        if not reused and args.evaluate_only:
            print(f"{cfg.run_name}: no finished run of this budget; skipped")
            continue
        if reused:
            print(f"{cfg.run_name}: reusing its finished run")
            train_s = logged_train_seconds(checkpoint.parent)
        else:
            started = time.perf_counter()
            checkpoint = run(cfg, overwrite=True)  # no finished run of this budget to keep
            train_s = time.perf_counter() - started
        result = evaluate(str(checkpoint), "fashion-mnist", data_root, **eval_kw)
        rows.append({**_row(name, result, train_s, method, checkpoint.parent), "reused": reused})
        print_table(rows[-1:])
        if args.export and method == "ssole" and exported is None:
            exported = export_ssole(checkpoint, Path(args.export), rows[-1], rows)
            print(f"exported {exported}")

    print()
    print_table(rows)
    budget = {
        k: getattr(args, k)
        for k in (
            "train_images", "test_images", "epochs", "views", "size", "batch_size",
            "projector_dim", "optimizer", "lr", "weight_decay", "warmup_epochs", "probe_epochs",
            "precision", "peer_projector", "ssole_projector", "seed", "time_budget",
        )
    }  # fmt: skip
    summary = summarise(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "quality",
                "dataset": "fashion-mnist",
                "budget": budget,
                # Relative to the work folder, so the file names no machine's paths.
                "config_overrides": [o.replace(str(work), "<work-dir>") for o in overrides],
                "device": str(device),
                "machine": platform.machine(),
                "torch": torch.__version__,
                "rows": rows,
                "summary": summary,
                "calibration": calibration,
                "exported": None if exported is None else exported.name,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
