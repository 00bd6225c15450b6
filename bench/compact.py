"""Compact embeddings: what each size costs in retrieval, for PCA, PCA-whitening and truncation.

The model is the one ``make demo DATASET=fashion-mnist`` trains (an SSOLE ResNet-18 from
``training/configs/fashion_mnist_r18.yaml``, 3 epochs on 4,000 Fashion-MNIST images, about two
minutes on 2 cores), trained into ``--work-dir`` and exported there as a hub folder (reused on
later runs; ``--model FOLDER`` takes any hub folder instead). Its backbone embeddings of
``--train-images`` train images (the bank, and the images the PCA is fitted on) and of
``--test-images`` test images (the queries) are computed once. Then, for each size (full, and
512 / 256 / 128 / 64 / 32 where below the width) and method:

- **pca**: :func:`ssole_hub.fit_pca` on the train embeddings, projected with
  :meth:`ssole_hub.PCA.transform`, exactly what ``dimensions=k`` serves;
- **pca-whiten**: the same with whitening (``ssole-hub fit-pca --whiten``);
- **truncate**: the first k coordinates, L2-normalised (what servers that truncate give);

it measures weighted-kNN top-1 of the queries against the bank (k=20, T=0.07, the project's
evaluation protocol, ``training.metrics.knn_top1``), **neighbour agreement@10** (the share of each
query's 10 nearest bank images at full size that are still among its 10 nearest), the bytes per
image (float32) and the **brute-force search time** per query over the bank: one query at a time,
its similarity to every bank row and the top 10, on one thread; every configuration is timed on
the same queries in interleaved rounds (side by side), median. The table is printed and the JSON
(with the machine, its load average before and after, and the model's training record) goes to
``bench/results/compact.json``::

    python bench/compact.py [--train-images 10000] [--test-images 10000] [--queries 300]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import load_average, machine_record, write_result  # noqa: E402
from ssole_hub import FeatureExtractor, export_hub_folder, fit_pca  # noqa: E402
from ssole_hub.pca import SIZES  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import FASHION_MNIST_DIR, labelled_splits, subset_indices  # noqa: E402
from training.demo import CONFIGS, DATASET_OVERRIDES  # noqa: E402
from training.metrics import knn_top1  # noqa: E402
from training.pretrain import run  # noqa: E402

METHODS = ("pca", "pca-whiten", "truncate")
NEIGHBOURS = 10


def demo_model(work_dir: Path, retrain: bool) -> Path:
    """The hub folder of ``make demo DATASET=fashion-mnist``'s model, trained into ``work_dir``
    (reused when there, unless ``retrain``)."""
    folder = work_dir / "ssole_resnet18-fashion-mnist"
    if folder.is_dir() and not retrain:
        print(f"reusing {folder} (--retrain trains again)")
        return folder
    cfg = load_config(
        CONFIGS["fashion-mnist"],
        [f"output_dir={work_dir}", "run_name=run", *DATASET_OVERRIDES["fashion-mnist"]],
    )
    checkpoint = run(cfg, overwrite=True)
    return export_hub_folder(checkpoint, folder, overwrite=True)


def embed_split(fx: FeatureExtractor, split, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw backbone embeddings and labels of ``limit`` images of ``split`` (a fixed subset)."""
    keep = list(subset_indices(len(split.labels), limit, seed=0))
    images = [split.images[i] for i in keep]
    raw = fx.embed(images, batch_size=256, progress=True, normalize=False)
    return raw, torch.as_tensor(split.labels[keep]).long()


def neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each query's ``k`` nearest bank rows by cosine (rows are unit vectors)."""
    return torch.cat([(q @ bank.T).topk(k, dim=1).indices for q in queries.split(1024)])


def agreement(reference: torch.Tensor, found: torch.Tensor) -> float:
    """Mean share of each row of ``reference`` (neighbour indices) that ``found`` also has."""
    same = (reference[:, :, None] == found[:, None, :]).any(2).float()
    return float(same.mean())


def configurations(
    train: torch.Tensor, test: torch.Tensor, sizes: list[int]
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Every (size, method): its bank and queries (unit rows); and the variance each PCA size
    keeps."""
    configs: dict[str, dict[str, Any]] = {
        "full": {
            "size": "full",
            "method": "full",
            "bank": F.normalize(train, dim=1),
            "queries": F.normalize(test, dim=1),
        }
    }
    pcas = {m: fit_pca(train, output="backbone", whiten=m == "pca-whiten") for m in METHODS[:2]}
    kept = {str(k): round(pcas["pca"].variance_kept(k), 4) for k in sizes}
    for k in sizes:
        for method in METHODS:
            if method == "truncate":
                bank, queries = (F.normalize(x[:, :k], dim=1) for x in (train, test))
            else:
                bank, queries = (pcas[method].transform(x, k) for x in (train, test))
            configs[f"{method}-{k}"] = {
                "size": k,
                "method": method,
                "bank": bank.contiguous(),
                "queries": queries,
            }
    return configs, kept


def search_times(configs: dict[str, dict[str, Any]], queries: int, seed: int) -> dict[str, float]:
    """Median milliseconds of one brute-force search (similarity to every bank row, top 10) per
    configuration, one thread; the same queries for all, interleaved in a shuffled order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = random.Random(seed)
    picks = rng.sample(range(len(next(iter(configs.values()))["queries"])), queries)
    times: dict[str, list[float]] = {name: [] for name in configs}
    try:
        with torch.inference_mode():
            for c in configs.values():  # warm-up
                (c["bank"] @ c["queries"][0]).topk(NEIGHBOURS)
            for i in tqdm(picks, desc="search", unit="query"):
                order = list(configs)
                rng.shuffle(order)
                for name in order:
                    bank, query = configs[name]["bank"], configs[name]["queries"][i]
                    start = time.perf_counter()
                    (bank @ query).topk(NEIGHBOURS)
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def measure(
    configs: dict[str, dict[str, Any]],
    train_labels: torch.Tensor,
    test_labels: torch.Tensor,
    search_ms: dict[str, float],
) -> list[dict[str, Any]]:
    """One row per configuration: kNN top-1, agreement@10 with full size, bytes, search time."""
    full = configs["full"]
    reference = neighbours(full["queries"], full["bank"], NEIGHBOURS)
    rows = []
    for name, c in tqdm(configs.items(), desc="kNN", unit="config"):
        top1 = knn_top1(c["bank"], train_labels, c["queries"], test_labels, k=20, temperature=0.07)
        found = reference if name == "full" else neighbours(c["queries"], c["bank"], NEIGHBOURS)
        dims = c["bank"].shape[1]
        rows.append(
            {
                "size": c["size"],
                "method": c["method"],
                "dimensions": dims,
                "knn_top1": round(top1, 2),
                "agreement_at_10": round(agreement(reference, found), 4),
                "bytes_per_image": 4 * dims,
                "search_ms_median": round(search_ms[name], 4),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], kept: dict[str, float]) -> str:
    """The printed table: one line per size and method."""
    head = (
        f"{'size':>5} {'method':<11} {'kNN top-1':>9} {'agree@10':>9} {'bytes':>6} "
        f"{'search ms':>10} {'var. kept':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        share = kept.get(str(r["size"])) if r["method"] != "truncate" else None
        lines.append(
            f"{r['size']!s:>5} {r['method']:<11} {r['knn_top1']:>9.2f} "
            f"{r['agreement_at_10']:>9.4f} {r['bytes_per_image']:>6} "
            f"{r['search_ms_median']:>10.4f} {'' if share is None else f'{share:.3f}':>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="a hub folder (default: train the demo's)")
    parser.add_argument("--work-dir", default="runs/bench/compact", help="where to train")
    parser.add_argument("--retrain", action="store_true", help="train the model again")
    parser.add_argument("--data-root", default=FASHION_MNIST_DIR, help="Fashion-MNIST idx files")
    parser.add_argument("--train-images", type=int, default=10000, help="bank and PCA images")
    parser.add_argument("--test-images", type=int, default=10000, help="query images")
    parser.add_argument("--queries", type=int, default=300, help="timed searches per config")
    parser.add_argument("--seed", type=int, default=0, help="which queries are timed")
    parser.add_argument("--out", default=str(ROOT / "bench/results/compact.json"))
    args = parser.parse_args(argv)
    record: dict[str, Any] = {"benchmark": "compact", "command": " ".join(sys.argv)}
    record["machine"] = machine_record()
    started = time.perf_counter()
    folder = Path(args.model) if args.model else demo_model(Path(args.work_dir), args.retrain)
    fx = FeatureExtractor.from_pretrained(folder, backend="torch", device="cpu", dtype="float32")
    train_split, test_split = labelled_splits("fashion-mnist", args.data_root)
    train, train_labels = embed_split(fx, train_split, args.train_images)
    test, test_labels = embed_split(fx, test_split, args.test_images)
    sizes = [k for k in SIZES if k <= min(train.shape[1], len(train) - 1)]
    configs, kept = configurations(train, test, sizes)
    search_ms = search_times(configs, args.queries, args.seed)
    rows = measure(configs, train_labels, test_labels, search_ms)
    print()
    print(format_table(rows, kept))
    ssole = json.loads((folder / "ssole.json").read_text())
    record.update(
        model={
            "name": folder.name,
            "num_features": ssole["num_features"],
            "metadata": {
                k: v for k, v in (ssole.get("metadata") or {}).items() if not isinstance(v, dict)
            },
        },
        data={"dataset": "fashion-mnist", "train_images": len(train), "test_images": len(test)},
        protocol={"knn": {"k": 20, "T": 0.07}, "agreement_k": NEIGHBOURS,
                  "search": {"queries": args.queries, "threads": 1, "top": NEIGHBOURS}},
        variance_kept=kept,
        rows=rows,
        seconds=round(time.perf_counter() - started, 1),
        load_average_after=load_average(),
    )  # fmt: skip
    write_result(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
