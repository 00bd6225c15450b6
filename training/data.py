"""The one loader of image datasets for pre-training and evaluation.

Every dataset is a sequence of ``(PIL RGB image, label)`` pairs (label ``-1`` when unknown):

- ``folder``: an image folder, either with one sub-folder per class (labels are the sorted
  sub-folder names) or flat (no labels); files are decoded by :func:`ssole_hub.images.decode_image`;
- ``fashion-mnist``: Debian's idx files (``apt-get install dataset-fashion-mnist``);
- ``digits``: scikit-learn's 8x8 digits, split 80/20 per class with a fixed seed;
- ``synthetic``: deterministic random images, for benchmarking only.

:func:`labelled_splits` gives the labelled train / held-out pair used by the kNN monitor and by
offline evaluation; their preprocessing comes from
:func:`ssole_hub.preprocessing.resolve_preprocessing`.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ssole_hub.images import decode_image, is_image_path

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "LABELLED_DATASETS",
    "ArrayImages",
    "DatasetName",
    "DatasetNotFoundError",
    "ImageFolder",
    "SyntheticImages",
    "build_dataset",
    "labelled_splits",
    "subset_indices",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

DatasetName = Literal["folder", "fashion-mnist", "digits", "synthetic"]
"""The datasets this module reads: an image folder, Fashion-MNIST, scikit-learn's digits, and
synthetic images (for benchmarks)."""
DATASETS: tuple[str, ...] = get_args(DatasetName)
LABELLED_DATASETS: tuple[str, ...] = ("fashion-mnist", "digits", "folder")
"""Those with labels (a folder's labels are its class sub-folders): what evaluation takes."""
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "test")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where they were looked for and how to get them."""


class ArrayImages(Dataset):
    """Images held in memory as a ``(n, H, W)`` or ``(n, H, W, 3)`` uint8 array, with labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
            raise ValueError(
                f"images must be uint8 (n, H, W[, 3]) matching {len(labels)} labels, "
                f"got {images.dtype} {images.shape}"
            )
        self.images = images
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]).convert("RGB"), int(self.labels[index])


class ImageFolder(Dataset):
    """Image files under ``root``: class sub-folders give labels, a flat folder gives ``-1``.

    Raises:
        DatasetNotFoundError: if ``root`` is not a directory.
        ValueError: if it holds no image files.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder not found: {self.root}")
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        samples: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            for dirpath, _, files in os.walk(self.root / name, followlinks=True):
                samples += [
                    (os.path.join(dirpath, f), label) for f in sorted(files) if is_image_path(f)
                ]
        flat = sorted(str(p) for p in self.root.iterdir() if p.is_file() and is_image_path(p))
        if flat and samples:
            raise ValueError(
                f"{self.root} mixes image files with class sub-folders; put every image in a "
                "class sub-folder, or all of them directly in the folder (no labels)"
            )
        if flat:
            classes, samples = [], [(p, -1) for p in flat]
        if not samples:
            raise ValueError(f"no image files found under {self.root}")
        self.classes = classes
        self.samples = sorted(samples)
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return decode_image(path), label


class SyntheticImages(Dataset):
    """``n`` deterministic random RGB images of ``size`` px (labels ``index % 10``); benchmarks only."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed
        self.labels = np.arange(n, dtype=np.int64) % 10

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        rng = np.random.default_rng((self.seed, index))
        # Smooth blobs rather than white noise so crops and blur do real work.
        small = rng.integers(0, 256, (self.size // 8 + 1, self.size // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((self.size, self.size), Image.BILINEAR)
        return img, int(self.labels[index])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {magic:#x})")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(root: str | None, split: str) -> ArrayImages:
    folder = Path(root or FASHION_MNIST_DIR)
    paths = [folder / name for name in _FASHION_FILES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files not found: {', '.join(map(str, missing))}. Install them "
            f"with `apt-get install dataset-fashion-mnist` (they go to {FASHION_MNIST_DIR}), or set "
            "data.root to a folder holding the four *-ubyte.gz idx files"
        )
    return ArrayImages(_read_idx(paths[0]), _read_idx(paths[1]))


def _digits(split: str, seed: int = 0) -> ArrayImages:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 grey levels to 0..255.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: len(idx) // 5]] = True
    keep = test if split == "test" else ~test
    return ArrayImages(images[keep], labels[keep])


def build_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    *,
    synthetic_images: int = 4096,
    synthetic_size: int = 64,
) -> Dataset:
    """Return dataset ``name`` (``folder``, ``fashion-mnist``, ``digits``, ``synthetic``).

    For ``folder``, ``root`` is the folder and ``split`` is ignored (pass the held-out folder as
    ``root`` to get it).

    Raises:
        ValueError: for an unknown name or split, or an empty folder.
        DatasetNotFoundError: if the dataset's files are missing (with how to get them).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "folder":
        if root is None:
            raise ValueError("the folder dataset needs a root folder")
        return ImageFolder(root)
    if name == "fashion-mnist":
        return _fashion_mnist(None if root is None else str(root), split)
    if name == "digits":
        return _digits(split)
    if name == "synthetic":
        # Train and test differ by seed so a held-out split is really held out.
        return SyntheticImages(synthetic_images, synthetic_size, seed=SPLITS.index(split))
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def labelled_splits(
    name: str,
    root: str | os.PathLike | None = None,
    val_root: str | os.PathLike | None = None,
    **kwargs: Any,
) -> tuple[Dataset, Dataset]:
    """The labelled ``(train, held-out)`` pair of a dataset, for kNN and linear evaluation.

    Raises:
        ValueError: if a folder split has no class sub-folders (no labels), or no ``val_root``.
        DatasetNotFoundError: if files are missing.
    """
    if name == "folder":
        if val_root is None:
            raise ValueError("a labelled held-out split of an image folder needs val_root")
        train, test = ImageFolder(root), ImageFolder(val_root)  # type: ignore[arg-type]
        for ds in (train, test):
            if not ds.classes:
                raise ValueError(f"{ds.root} has no class sub-folders, so it has no labels")
        if train.classes != test.classes:
            raise ValueError(f"{train.root} and {test.root} have different class sub-folders")
        return train, test
    return build_dataset(name, "train", root, **kwargs), build_dataset(name, "test", root, **kwargs)


class TransformedDataset(Dataset):
    """``(PIL image, label)`` pairs of a dataset of this module, through a transform."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), label


def subset_indices(n: int, limit: int, seed: int = 0) -> Sequence[int]:
    """At most ``limit`` of ``range(n)``: a fixed random subset, sorted (all when ``limit >= n``)."""
    if limit >= n:
        return range(n)
    return sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())
