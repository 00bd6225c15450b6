"""Evaluate a frozen backbone: weighted kNN, linear probe and RankMe on a labelled dataset.

Usage::

    python -m training.evaluate --model ssole_resnet18.in100_m4 --dataset fashion-mnist
    python -m training.evaluate --model run/checkpoint.pt --dataset folder data/pets \\
        --protocol knn,rankme --out eval.json

``--model`` takes whatever :func:`ssole_hub.load_model` takes (a name, ``local-dir:PATH``,
``hf-hub:REPO`` or a training checkpoint). Features are the backbone's pooled output, computed
with the model's evaluation transform (from its ``pretrained_cfg``).

The protocols (see the SSOLE method notes):

- ``knn``: DINO's weighted kNN on L2-normalised features, cosine similarity, k = 20, T = 0.07;
- ``linear``: a linear layer trained by SGD on frozen features (100 epochs, lr 0.3 x batch / 256,
  no weight decay); with ``--probe-augment`` the train features are recomputed every epoch from
  random-resized-crop + flip views, otherwise from the evaluation transform (much cheaper);
- ``rankme``: the effective rank of the train features (label-free).

The JSON written (and returned by :func:`evaluate`) is what the model card renders::

    {"model": ..., "dataset": ..., "train_samples": ..., "test_samples": ..., "feature_dim": ...,
     "protocols": {"knn": {"top1": ..., "k": 20, "T": 0.07},
                   "linear": {"top1": ..., "epochs": 100, "batch_size": 256, "lr": 0.3,
                              "augment": false},
                   "rankme": ...}}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ssole_hub.extractor import FeatureExtractor
from ssole_hub.preprocessing import resolve_preprocessing
from training.linear_probe import linear_probe_top1
from training.metrics import knn_top1, rankme

__all__ = [
    "PROTOCOLS",
    "evaluate",
    "evaluate_backbone",
    "evaluate_features",
    "extract_features",
    "format_table",
    "labelled_datasets",
    "main",
    "resolve_device",
]

PROTOCOLS = ("knn", "linear", "rankme")


def _check_protocols(protocols: Sequence[str]) -> tuple[str, ...]:
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(
            f"unknown protocol(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(PROTOCOLS)}"
        )
    return tuple(dict.fromkeys(protocols))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`; ``None`` or ``"auto"`` pick CUDA when available."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def extract_features(
    model: nn.Module | FeatureExtractor,
    loader: DataLoader,
    device: str | torch.device | None = None,
    desc: str = "features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features and labels of every ``(images, labels)`` batch of ``loader``.

    The forward pass is :meth:`ssole_hub.FeatureExtractor.embed_tensor` (raw, not normalised):
    an eval-mode copy of ``model`` on ``device`` (bf16 autocast on CUDA), so ``model`` itself is
    left as it was. Features come back as float32 on the CPU, in loader order.

    Raises:
        ValueError: if the loader is empty or the model gives non-finite features.
    """
    fx = model if isinstance(model, FeatureExtractor) else FeatureExtractor(model, device=device)
    feats, labels = [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        feats.append(fx.embed_tensor(images, "backbone", normalize=False))
        labels.append(torch.as_tensor(targets).long())
    if not feats:
        raise ValueError(f"{desc}: the dataset is empty")
    features = torch.cat(feats)
    if not torch.isfinite(features).all():
        raise ValueError(f"{desc}: the backbone produced NaN or infinite features")
    return features, torch.cat(labels)


def evaluate_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    protocols: Sequence[str] = PROTOCOLS,
    *,
    k: int = 20,
    temperature: float = 0.07,
    probe_epochs: int = 100,
    probe_batch_size: int = 256,
    probe_lr: float | None = None,
    probe_train_features: Callable[[int], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the protocols on precomputed features; returns the ``"protocols"`` part of the JSON.

    Args:
        train_features, train_labels, test_features, test_labels: ``(n, d)`` features and
            ``(n,)`` class indices.
        protocols: any of :data:`PROTOCOLS`.
        k, temperature: the kNN's neighbours and vote temperature.
        probe_epochs, probe_batch_size, probe_lr: the linear probe's SGD settings (``probe_lr``
            defaults to ``0.3 * batch / 256``).
        probe_train_features: ``epoch -> (n, d)`` features of augmented train images for the
            probe (same order as ``train_labels``); ``None`` trains on ``train_features``.
        device: where the kNN and the probe run (default: CUDA when available).
        progress: show progress bars.

    Raises:
        ValueError: for an unknown protocol or empty, mismatched or non-finite features.
    """
    protocols = _check_protocols(protocols)
    device = resolve_device(device)
    train, test = (train_features, train_labels), (test_features, test_labels)
    results: dict[str, Any] = {}
    if "knn" in protocols:
        results["knn"] = _knn_result(train, test, k, temperature, device)
    if "linear" in protocols:
        results["linear"] = _linear_probe_result(
            train,
            test,
            probe_train_features,
            epochs=probe_epochs,
            batch_size=probe_batch_size,
            lr=0.3 * probe_batch_size / 256 if probe_lr is None else probe_lr,
            device=device,
            progress=progress,
        )
    if "rankme" in protocols:
        results["rankme"] = round(rankme(train_features.to(device)), 3)
    return results


_LabelledFeatures = tuple[torch.Tensor, torch.Tensor]
"""``(n, d)`` features and their ``(n,)`` class indices."""


def _knn_result(
    train: _LabelledFeatures,
    test: _LabelledFeatures,
    k: int,
    temperature: float,
    device: torch.device,
) -> dict[str, Any]:
    """The ``knn`` protocol's part of the results."""
    (train_features, train_labels), (test_features, test_labels) = train, test
    top1 = knn_top1(
        train_features.to(device),
        train_labels,
        test_features.to(device),
        test_labels,
        k,
        temperature,
    )
    return {"top1": round(top1, 3), "k": k, "T": temperature}


def _linear_probe_result(
    train: _LabelledFeatures,
    test: _LabelledFeatures,
    augmented_train_features: Callable[[int], torch.Tensor] | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    """The ``linear`` protocol's part of the results; the probe trains on
    ``augmented_train_features`` (per epoch) when given, else on ``train``'s features."""
    (train_features, train_labels), (test_features, test_labels) = train, test
    top1 = linear_probe_top1(
        augmented_train_features or train_features,
        train_labels,
        test_features,
        test_labels,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=device,
        progress=progress,
    )
    return {
        "top1": round(top1, 3),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "augment": augmented_train_features is not None,
    }


def evaluate_backbone(
    backbone: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    protocols: Sequence[str] = PROTOCOLS,
    *,
    augmented_train_set: Dataset | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    **protocol_kwargs: Any,
) -> dict[str, Any]:
    """Extract a backbone's features of ``(image, label)`` datasets and run the protocols.

    Args:
        backbone: maps image batches to pooled features (any timm model with ``num_classes=0``).
        train_set, test_set: datasets of ``(image tensor, label)`` with the evaluation transform.
        protocols: any of :data:`PROTOCOLS`.
        augmented_train_set: the train set with random-resized-crop + flip; when given, the linear
            probe recomputes its train features from it every epoch.
        batch_size, num_workers: feature extraction loaders.
        device: default CUDA when available.
        progress: show progress bars.
        protocol_kwargs: passed to :func:`evaluate_features` (``k``, ``temperature``,
            ``probe_epochs``, ``probe_batch_size``, ``probe_lr``).

    Returns:
        ``{"train_samples", "test_samples", "feature_dim", "protocols"}``.
    """
    protocols = _check_protocols(protocols)
    device = resolve_device(device)

    def loader(dataset: Dataset) -> DataLoader:
        return _feature_loader(dataset, batch_size, num_workers, device)

    fx = FeatureExtractor(backbone, device=device)
    train_features, train_labels = extract_features(
        fx, loader(train_set), device, "train features", progress
    )
    test_features, test_labels = extract_features(
        fx, loader(test_set), device, "test features", progress
    )
    probe_train_features = None
    if augmented_train_set is not None and "linear" in protocols:
        probe_train_features = _per_epoch_features(fx, loader(augmented_train_set), device)
    return {
        "train_samples": int(train_features.shape[0]),
        "test_samples": int(test_features.shape[0]),
        "feature_dim": int(train_features.shape[1]),
        "protocols": evaluate_features(
            train_features,
            train_labels,
            test_features,
            test_labels,
            protocols,
            probe_train_features=probe_train_features,
            device=device,
            progress=progress,
            **protocol_kwargs,
        ),
    }


def _feature_loader(
    dataset: Dataset, batch_size: int, num_workers: int, device: torch.device
) -> DataLoader:
    """A loader over ``dataset`` in order, for feature extraction."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def _per_epoch_features(
    fx: FeatureExtractor, augmented: DataLoader, device: torch.device
) -> Callable[[int], torch.Tensor]:
    """``epoch -> features`` of a fresh pass over the augmented train set's ``loader``."""

    def features_of_epoch(epoch: int) -> torch.Tensor:
        return extract_features(fx, augmented, device, f"augmented epoch {epoch}", False)[0]

    return features_of_epoch


def _evenly_spaced(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    if limit < 1:
        raise ValueError(f"a sample limit must be >= 1, got {limit}")
    # Evenly spaced rather than the first ones: datasets stored sorted by class stay balanced.
    step = len(dataset) / limit  # type: ignore[arg-type]
    return Subset(dataset, [math.floor(i * step) for i in range(limit)])


def labelled_datasets(
    dataset: str,
    backbone: nn.Module,
    data_path: str | Path | None = None,
    augmented: bool = False,
) -> tuple[Dataset, Dataset, Dataset | None]:
    """Train and test sets of ``(image tensor, label)`` with ``backbone``'s evaluation transform,
    and, if ``augmented``, the train set with random-resized-crop + flip (else ``None``).

    ``folder`` reads ``data_path/train`` and ``data_path/val`` (or ``test``), each with one
    sub-folder per class; for ``fashion-mnist``, ``data_path`` is an optional folder of the four
    idx files (default: the Debian package's).

    Raises:
        ValueError: for an unknown dataset or a folder without labelled splits.
        FileNotFoundError: if the dataset's files are missing.
    """
    from timm.data import create_transform

    from training.data import LABELLED_DATASETS, TransformedDataset, labelled_splits

    if dataset not in LABELLED_DATASETS:
        raise ValueError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(LABELLED_DATASETS)}"
        )
    if dataset == "folder":
        if data_path is None:
            raise ValueError("the folder dataset needs a path: --dataset folder PATH")
        root = Path(data_path)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        held_out = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
        if not (root / "train").is_dir() or held_out is None:
            raise ValueError(
                f"{root} must hold train/ and val/ (or test/) folders, each with one sub-folder "
                "per class"
            )
        train, test = labelled_splits("folder", root / "train", held_out)
    elif dataset == "fashion-mnist":
        train, test = labelled_splits(dataset, data_path)
    else:
        train, test = labelled_splits(dataset)
    config, transform = resolve_preprocessing(backbone)
    augmented_train = None
    if augmented:
        # The probe protocol's augmentation is random-resized-crop + flip only, no colour jitter.
        augment = create_transform(**config, is_training=True, hflip=0.5, color_jitter=None)
        augmented_train = TransformedDataset(train, augment)
    return (
        TransformedDataset(train, transform),
        TransformedDataset(test, transform),
        augmented_train,
    )


def evaluate(
    model: str | nn.Module,
    dataset: str,
    data_path: str | Path | None = None,
    protocols: Sequence[str] = PROTOCOLS,
    *,
    pretrained: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
    probe_augment: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    **protocol_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a model on a labelled dataset; returns the JSON-ready results (module docstring).

    Args:
        model: anything :func:`ssole_hub.load_model` accepts, or a loaded backbone (whose
            ``pretrained_cfg`` sets the evaluation transform).
        dataset: ``fashion-mnist``, ``digits`` or ``folder`` (with ``data_path``).
        data_path: the image folder for ``folder``; for ``fashion-mnist``, optionally a folder of
            its idx files.
        protocols: any of :data:`PROTOCOLS`.
        pretrained: load the weights of a named model; ``False`` evaluates the random-init
            architecture (a baseline).
        train_limit, test_limit: evaluate on an evenly spaced subset of this many samples.
        probe_augment: train the linear probe on random-resized-crop + flip views.
        batch_size, num_workers, device, progress: as :func:`evaluate_backbone`.
        protocol_kwargs: passed to :func:`evaluate_features`.

    Raises:
        ValueError: for an unknown protocol or dataset, or bad settings.
        FileNotFoundError: for a missing model or dataset.
    """
    from ssole_hub import load_model

    protocols = _check_protocols(protocols)
    backbone = load_model(model, pretrained=pretrained) if isinstance(model, str) else model
    train_set, test_set, augmented = labelled_datasets(
        dataset, backbone, data_path, augmented=probe_augment and "linear" in protocols
    )
    started = time.perf_counter()
    results = evaluate_backbone(
        backbone,
        _evenly_spaced(train_set, train_limit),
        _evenly_spaced(test_set, test_limit),
        protocols,
        augmented_train_set=None if augmented is None else _evenly_spaced(augmented, train_limit),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
        **protocol_kwargs,
    )
    random_init = isinstance(model, str) and not pretrained
    return {
        # A baseline must never pass for the model's own results, wherever the JSON goes.
        "model": f"{_model_name(model)} (random init)" if random_init else _model_name(model),
        "random_init": random_init,
        "dataset": dataset if data_path is None else f"{dataset}:{Path(data_path).name}",
        "preprocessing": resolve_preprocessing(backbone).config,
        **results,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _model_name(model: str | nn.Module) -> str:
    """The model as the results name it: its name, a local folder's name (no machine's paths),
    or a loaded module's class name."""
    if not isinstance(model, str):
        return type(model).__name__
    if Path(model.removeprefix("local-dir:")).exists():
        return Path(model.removeprefix("local-dir:")).name
    return model


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of one :func:`evaluate` result."""
    rows = [
        ("model", str(results.get("model", "?"))),
        ("dataset", str(results.get("dataset", "?"))),
    ]
    protocols = results.get("protocols", results)
    if "knn" in protocols:
        knn = protocols["knn"]
        rows.append((f"kNN top-1 (k={knn['k']}, T={knn['T']})", f"{knn['top1']:.2f}"))
    if "linear" in protocols:
        lin = protocols["linear"]
        rows.append((f"linear top-1 ({lin['epochs']} epochs)", f"{lin['top1']:.2f}"))
    if "rankme" in protocols:
        rows.append(("RankMe", f"{protocols['rankme']:.1f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not for flags and required options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__.splitlines()[0],
        formatter_class=_ShowDefaults,
    )
    parser.add_argument(
        "--model", required=True, help="name, local-dir:PATH, hf-hub:REPO or checkpoint .pt"
    )
    parser.add_argument(
        "--dataset",
        required=True,
        nargs="+",
        metavar="NAME",
        help="fashion-mnist [IDX_FOLDER] | digits | folder PATH",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate the architecture without its weights, with the model's preprocessing (a "
        "baseline; the results are marked random init)",
    )
    parser.add_argument("--protocol", default=",".join(PROTOCOLS), help="comma-separated")
    parser.add_argument("--k", type=int, default=20, help="kNN neighbours")
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    parser.add_argument("--probe-epochs", type=int, default=100, help="linear probe epochs")
    parser.add_argument("--probe-batch-size", type=int, default=256, help="linear probe batch")
    parser.add_argument("--probe-lr", type=float, default=None, help="default: 0.3 x batch / 256")
    parser.add_argument(
        "--probe-augment",
        action="store_true",
        help="train the probe on random-resized-crop + flip views (re-extracted every epoch)",
    )
    parser.add_argument(
        "--train-limit", type=int, default=None, help="use N train samples (default: all)"
    )
    parser.add_argument(
        "--test-limit", type=int, default=None, help="use N test samples (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="feature extraction batch")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    dataset, *rest = args.dataset
    if len(rest) > 1 or (rest and dataset == "digits") or (dataset == "folder" and not rest):
        parser.error("--dataset takes fashion-mnist [IDX_FOLDER], digits, or folder PATH")
    try:
        results = evaluate(
            args.model,
            dataset,
            rest[0] if rest else None,
            [p.strip() for p in args.protocol.split(",") if p.strip()],
            pretrained=not args.random_init,
            train_limit=args.train_limit,
            test_limit=args.test_limit,
            probe_augment=args.probe_augment,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
            k=args.k,
            temperature=args.temperature,
            probe_epochs=args.probe_epochs,
            probe_batch_size=args.probe_batch_size,
            probe_lr=args.probe_lr,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"training.evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
