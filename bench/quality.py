"""Quality benchmark: SSOLE against VICReg, Barlow Twins and SimCLR at one budget on Fashion-MNIST.

Every method trains the same ResNet-18 (``ssole_resnet18``) with the same projector, views,
augmentations, optimiser, schedule, seed and number of steps through ``training.pretrain.run``;
only ``method`` differs. The peers are ``lightly``'s 2-view losses averaged over all N*(N-1)/2
pairs of the N views (``training.objectives``). Two baselines: kNN on raw pixels and the
random-init backbone (the trainer's own initialisation, same seed). Each model is evaluated by
``training.evaluate`` (weighted kNN k=20 T=0.07, linear probe, RankMe of the train features).

Default: a CPU budget (a class-balanced Fashion-MNIST subset, 32 px, few steps). On a GPU::

    python bench/quality.py --train-images 60000 --test-images 10000 --epochs 50 \\
        --batch-size 256 --workers 8

Prints a table and writes ``bench/results/quality.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import ssole_hub  # noqa: E402, F401  (registers the ssole_* models with timm)
from training.config import load_config  # noqa: E402
from training.data import FASHION_MNIST_DIR, labelled_splits  # noqa: E402
from training.evaluate import evaluate, evaluate_features, resolve_device  # noqa: E402
from training.objectives import METHODS  # noqa: E402
from training.pretrain import run  # noqa: E402
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


def write_subset(out: Path, train_images: int, test_images: int, seed: int) -> Path:
    """Write a class-balanced Fashion-MNIST subset as idx files, so the project's one loader
    (``data.root``) reads it unchanged. Returns the folder."""
    out.mkdir(parents=True, exist_ok=True)
    train, test = labelled_splits("fashion-mnist", FASHION_MNIST_DIR)
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


def _row(
    name: str, result: dict[str, Any], train_s: float | None, method: str | None = None
) -> dict[str, Any]:
    p = result["protocols"]
    return {
        "model": name,
        "method": method,
        "knn_top1": p["knn"]["top1"],
        "linear_top1": p["linear"]["top1"],
        "rankme": p["rankme"],
        "train_s": None if train_s is None else round(train_s, 1),
        "eval_s": result.get("seconds"),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the result rows as a Markdown table."""
    print("| model | kNN top-1 | linear top-1 | RankMe | train wall s | eval wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        train = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
        ev = "-" if r["eval_s"] is None else f"{r['eval_s']:.0f}"
        print(
            f"| {r['model']} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} | "
            f"{r['rankme']:.1f} | {train} | {ev} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
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
        choices=("shared", "bn"),
        default="shared",
        help="shared: every method trains SSOLE's projector (no BatchNorm); bn: the peers put "
        "BatchNorm after each hidden layer, as VICReg and Barlow Twins publish",
    )
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="training precision (auto: bf16 on CUDA, fp32 on CPU; bf16 also pays on CPUs with "
        "AVX512-BF16 or AMX)",
    )
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "quality"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    work = Path(args.work_dir)
    data_root = write_subset(work / "data", args.train_images, args.test_images, args.seed)
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

    for method in methods:
        # SSOLE keeps its released projector; --peer-projector bn gives each peer its own.
        batch_norm = method != "ssole" and args.peer_projector == "bn"
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
        started = time.perf_counter()
        checkpoint = run(cfg)
        train_s = time.perf_counter() - started
        result = evaluate(str(checkpoint), "fashion-mnist", data_root, **eval_kw)
        rows.append(_row(name, result, train_s, method))
        print_table(rows[-1:])

    print()
    print_table(rows)
    budget = {
        k: getattr(args, k)
        for k in (
            "train_images", "test_images", "epochs", "views", "size", "batch_size",
            "projector_dim", "optimizer", "lr", "weight_decay", "warmup_epochs", "probe_epochs",
            "precision", "peer_projector", "seed",
        )
    }  # fmt: skip
    trained = {r["method"]: r["knn_top1"] for r in rows if r["method"]}
    summary = {}
    if "ssole" in trained and len(trained) > 1:
        best_peer = max((v, k) for k, v in trained.items() if k != "ssole")
        summary = {
            "ssole_minus_best_peer_knn": round(trained["ssole"] - best_peer[0], 2),
            "best_peer": best_peer[1],
            "ssole_minus_raw_pixels_knn": round(trained["ssole"] - rows[0]["knn_top1"], 2),
        }
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
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
