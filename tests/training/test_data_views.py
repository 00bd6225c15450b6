"""Datasets (real digits, Fashion-MNIST, image folders of real photos), views and the sampler."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ssole_hub.preprocessing import resolve_preprocessing
from training.config import DataConfig, ViewsConfig
from training.data import (
    FASHION_MNIST_DIR,
    DatasetNotFoundError,
    ImageFolder,
    build_dataset,
    labelled_splits,
)
from training.sampler import ResumableSampler
from training.views import BatchViews, MultiViewDataset, normalize_views, pil_views

SMALL_VIEWS = ViewsConfig(num_views=3, size=24, scale=(0.3, 1.0))


def test_digits_splits_are_disjoint_stratified_and_labelled():
    train, test = labelled_splits("digits")
    assert len(train) + len(test) == 1797
    assert 0.18 < len(test) / 1797 < 0.22
    assert set(np.unique(test.labels)) == set(range(10))
    img, label = train[0]
    assert img.mode == "RGB" and img.size == (8, 8) and 0 <= label < 10
    train_rows = {a.tobytes() for a in train.images}
    assert sum(a.tobytes() in train_rows for a in test.images) < 10  # a few duplicate digits exist


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_fashion_mnist_reads_debians_idx_files():
    train, test = labelled_splits("fashion-mnist")
    assert (len(train), len(test)) == (60000, 10000)
    img, label = test[0]
    assert img.size == (28, 28) and label == 9  # the first test image is an ankle boot


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion-mnist", "train", tmp_path)


def test_a_corrupt_idx_file_is_reported(tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x0d\x03" + b"\x00" * 16)
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        build_dataset("fashion-mnist", "train", tmp_path)


def test_image_folder_with_classes_gives_labels_and_flat_folder_gives_none(tmp_path, photos):
    for i, img in enumerate(photos[:4]):
        cls = tmp_path / "classes" / ("cats" if i % 2 else "dogs")
        cls.mkdir(parents=True, exist_ok=True)
        img.save(cls / f"{i}.jpg")
        (tmp_path / "flat").mkdir(exist_ok=True)
        img.save(tmp_path / "flat" / f"{i}.png")
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    labelled = ImageFolder(tmp_path / "classes")
    assert labelled.classes == ["cats", "dogs"] and sorted(labelled.labels) == [0, 0, 1, 1]
    flat = ImageFolder(tmp_path / "flat")
    assert len(flat) == 4 and set(flat.labels) == {-1}
    img, _ = flat[0]
    assert img.mode == "RGB"
    with pytest.raises(DatasetNotFoundError, match="image folder not found"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(tmp_path / "empty")


def test_the_resolver_builds_the_eval_transform_of_a_pretrained_cfg(photos):
    cfg = {"input_size": (3, 40, 40), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0,
           "interpolation": "bicubic"}  # fmt: skip
    x = resolve_preprocessing(cfg).transform(photos[1])
    assert x.shape == (3, 40, 40) and float(x.min()) >= -1.01 and float(x.max()) <= 1.01


def test_pil_views_are_random_per_view_and_reproducible_per_seed(photos):
    ds = MultiViewDataset(build_dataset("digits"), SMALL_VIEWS, DataConfig())
    a, b, c = ds[(5, 123)], ds[(5, 123)], ds[(5, 124)]
    assert a.shape == (3, 3, 24, 24) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])
    views = pil_views(SMALL_VIEWS)(photos[0])
    assert views.shape == (3, 3, 24, 24)


def test_batch_views_draw_their_own_parameters_for_every_sample(photos):
    imgs = torch.stack(
        [torch.from_numpy(np.array(p.resize((32, 32)))).permute(2, 0, 1) for p in photos]
    )
    torch.manual_seed(0)
    views = BatchViews(SMALL_VIEWS)(imgs)
    assert views.shape == (len(photos), 3, 3, 24, 24) and views.dtype == torch.float32
    assert float(views.min()) >= 0.0 and float(views.max()) <= 1.0
    # Views of one image differ from each other (independent crops / colours).
    assert all(not torch.allclose(v[0], v[1]) for v in views)
    x = normalize_views(
        views, torch.tensor([0.5] * 3), torch.tensor([0.25] * 3), channels_last=True
    )
    assert x.shape == views.shape and abs(float(x.mean())) < 3


def test_sampler_splits_ranks_disjointly_and_resumes_mid_epoch():
    ranks = [list(ResumableSampler(103, 10, rank=r, world_size=2, seed=1)) for r in range(2)]
    idx = [[i for i, _ in r] for r in ranks]
    assert len(idx[0]) == len(idx[1]) == 50 and not set(idx[0]) & set(idx[1])
    s = ResumableSampler(103, 10, rank=1, world_size=2, seed=1)
    s.set_epoch(0, start_step=3)
    assert list(s) == ranks[1][30:]
    s.set_epoch(1)
    assert [i for i, _ in s] != idx[1]  # a new order each epoch
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableSampler(5, 10)
