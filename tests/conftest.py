"""Shared fixtures: real photos from scikit-image, encoded as real JPEG/PNG files, and a zygote
(``tests/zygote.py``) that runs Python programs without a new interpreter's imports."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# make test runs two pytest-xdist workers on two cores, each with torch's default of one intra-op
# thread per core, and many tests start more torch processes. OpenMP threads that spin while they
# wait then take the cores from each other's work: two ResNet forward loops at once each took 16x
# as long as one alone, and 1.7x with this setting (bench/omp_wait.py, BENCHMARKS.md). Set before
# torch is imported; the test processes' children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
from PIL import Image

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


def _photo(name: str) -> Image.Image:
    from skimage import data

    arr = getattr(data, name)()
    img = Image.fromarray(np.asarray(arr))
    return img.convert("RGB")


def _load_zygote_module():
    # tests/ is not a package and pytest imports with importlib: load the module by its path.
    spec = importlib.util.spec_from_file_location("zygote", Path(__file__).with_name("zygote.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def zygote() -> Iterator:
    """A :class:`zygote.Zygote` of this worker: ``zygote.run(kind, target, args, cwd, env)``."""
    z = _load_zygote_module().Zygote(Path.cwd(), dict(os.environ))
    yield z
    z.close()


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Real photographs bundled with scikit-image, as RGB PIL images of mixed sizes."""
    return [_photo(n) for n in PHOTO_NAMES]


@pytest.fixture(scope="session")
def photo_jpegs(photos) -> list[bytes]:
    """The same photos encoded as JPEG bytes."""
    out = []
    for img in photos:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


CROPS_PER_PHOTO = 25
"""150 crops in all: more than 129 images, so a PCA fitted on them offers 128 dimensions."""


@pytest.fixture(scope="session")
def photo_crops(photos, tmp_path_factory) -> Path:
    """A folder of 150 JPEGs: square crops of the real photos at random places and scales
    (fixed seed), 96 px. Enough images to fit a PCA with 128 dimensions and more."""
    folder = tmp_path_factory.mktemp("photo-crops")
    rng = np.random.default_rng(0)
    for i, img in enumerate(photos):
        w, h = img.size
        for j in range(CROPS_PER_PHOTO):
            side = int(rng.uniform(0.3, 0.9) * min(w, h))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = img.crop((x, y, x + side, y + side)).resize((96, 96))
            crop.save(folder / f"crop{i}-{j:02d}.jpg", quality=90)
    return folder


# The modules that take longest (``pytest --durations``), started first: make test hands whole
# modules to its two workers in collection order (``--dist loadfile --no-loadscope-reorder``), and
# a long module handed out last keeps one worker busy while the other waits.
LONGEST_FIRST = (
    "test_readme.py",
    "test_gpu_check.py",
    "test_extract_ray.py",
    "test_hub_remote.py",
    "test_extract.py",
    "test_quality_bench.py",
    "test_run_directory.py",
    "test_demo.py",
    "test_onnx.py",
    "test_pretrain.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the modules of :data:`LONGEST_FIRST` first, in that order; the rest keep theirs."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
