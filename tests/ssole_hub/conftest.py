"""Fixtures for the hub tests: a small trained-looking SSOLE checkpoint, its exported hub folder,
real photos on disk, and a loopback stand-in for the Hugging Face Hub (see ``tests/hub_server.py``)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch

import ssole_hub
from ssole_hub.hub.checkpoint import model_checkpoint_state
from ssole_hub.models import SSOLEModel, SSOLEProjector

REPO_ROOT = Path(__file__).resolve().parents[2]
# Non-default preprocessing, so tests can tell the checkpoint's config from the architecture's.
CKPT_PRETRAINED_CFG = {"input_size": (3, 160, 160), "crop_pct": 0.9, "interpolation": "bilinear"}
PROJECTOR = {"in_dim": 512, "hidden_dim": 64, "out_dim": 32, "depth": 3}


def _load_hub_server():
    # pytest runs with --import-mode=importlib and tests/ is not a package: load the module by path.
    spec = importlib.util.spec_from_file_location(
        "hub_server", REPO_ROOT / "tests" / "hub_server.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


hub_server = _load_hub_server()


@pytest.fixture(scope="session")
def export_settings() -> dict:
    """What the test checkpoint declares: its preprocessing and projector config."""
    return {"pretrained_cfg": dict(CKPT_PRETRAINED_CFG), "projector": dict(PROJECTOR)}


@pytest.fixture(scope="session")
def encoder() -> SSOLEModel:
    """A ResNet-18 SSOLE encoder with a small projector and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    backbone = timm.create_model("ssole_resnet18")
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return SSOLEModel(backbone, SSOLEProjector(**PROJECTOR)).eval()


@pytest.fixture(scope="session")
def checkpoint_path(encoder, tmp_path_factory) -> Path:
    """A training checkpoint of ``encoder`` in the shared checkpoint format."""
    state = model_checkpoint_state(
        encoder,
        "ssole_resnet18",
        encoder.projector.config,
        CKPT_PRETRAINED_CFG,
        {"dataset": "imagenet-100", "epochs": 2, "views": 4, "eval_results": {"knn_top1": 31.5}},
    )
    state["optimizer"] = {"state": {}, "param_groups": []}  # training's own keys ride along
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def hub_folder(checkpoint_path, tmp_path_factory) -> Path:
    """The hub folder exported from ``checkpoint_path`` (treat as read-only; copy to modify)."""
    out = tmp_path_factory.mktemp("export") / "ssole_resnet18-test"
    return ssole_hub.export_hub_folder(
        checkpoint_path, out, eval_results={"linear_top1": 40.25, "rankme": 120.0}
    )


@pytest.fixture(scope="session")
def pca_folder(encoder, photo_crops, tmp_path_factory) -> Path:
    """``encoder`` exported at 64 px with a PCA of its 512-d backbone embeddings fitted on the
    150 photo crops (``dimensions`` 1 to 149); treat as read-only, copy to modify."""
    torch.manual_seed(0)
    backbone = timm.create_model(
        "ssole_resnet18", pretrained_cfg_overlay={"input_size": (3, 64, 64), "crop_pct": 1.0}
    )
    backbone.load_state_dict(encoder.backbone.state_dict())
    small = SSOLEModel(backbone, encoder.projector).eval()
    folder = ssole_hub.export_hub_folder(small, tmp_path_factory.mktemp("pca") / "tiny-pca")
    ssole_hub.fit_hub_pca(folder, photo_crops, progress=False, num_workers=0, backend="torch")
    return folder


@pytest.fixture(scope="session")
def hub_photos(photos) -> list:
    """Three of the real photos (colour, grayscale-turned-RGB, astronomy): enough to compare
    features, few enough to keep CPU forward passes short."""
    return [photos[0], photos[4], photos[5]]


@pytest.fixture(scope="session")
def photo_dir(hub_photos, tmp_path_factory) -> Path:
    """The hub test photos written as PNG files."""
    folder = tmp_path_factory.mktemp("photos")
    for i, img in enumerate(hub_photos):
        img.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def reference_features(encoder, hub_photos) -> dict[str, torch.Tensor]:
    """Backbone features and raw projector outputs of the source encoder on the photos, with the
    preprocessing the checkpoint declares."""
    backbone = timm.create_model(
        "ssole_resnet18", pretrained_cfg_overlay=dict(CKPT_PRETRAINED_CFG)
    ).eval()
    backbone.load_state_dict(encoder.backbone.state_dict())
    config = timm.data.resolve_model_data_config(backbone)
    transform = timm.data.create_transform(**config, is_training=False)
    batch = torch.stack([transform(img) for img in hub_photos])
    with torch.inference_mode():
        feats = encoder.backbone(batch)
        return {"features": feats, "projected": encoder.projector(feats)}


@pytest.fixture
def make_loopback_hub():
    """``make(**kwargs)``: start a loopback Hub stand-in (``LoopbackHub`` arguments); stopped after
    the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(hub_server.LoopbackHub(**kwargs))


@pytest.fixture
def loopback_hub(make_loopback_hub):
    """A running loopback stand-in for the Hub that requires the token ``test-token`` to write."""
    return make_loopback_hub(token="test-token")


@pytest.fixture
def hub_env(tmp_path) -> dict[str, str]:
    """Environment for a subprocess that uses the HF client: its own HF_HOME / cache / torch hub
    dir under tmp, no inherited token or endpoint, telemetry off."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_", "SSOLE_HUB_")) and k != "TORCH_HOME"
    }
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_CACHE=str(tmp_path / "hf_home" / "hub"),
        TORCH_HOME=str(tmp_path / "torch_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    return env


@pytest.fixture
def python_subprocess(zygote):
    """``run(script, env, cwd) -> dict``: run a script as ``python -c`` would, in a process that
    has imported nothing of this project (a child of the zygote, ``tests/zygote.py``); it prints
    one JSON object last, which is returned."""

    def run(script: str, env: dict[str, str], cwd: Path) -> dict:
        proc = zygote.run("code", script, [], cwd, env, timeout=600)
        assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


# --- extraction inputs: webdataset tars and parquet files of real photos ----------------------


@dataclass(frozen=True)
class RecordSet:
    """An extraction input and what it must give: the embeddable records (id -> encoded bytes) in
    order, and the records that must be listed as errors (id -> exception name)."""

    inputs: str | list[str]
    images: dict[str, bytes]
    errors: dict[str, str]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def webdataset_tars(photos, photo_jpegs, tmp_path_factory) -> RecordSet:
    """Two webdataset tars of real photos (``.jpg`` / ``.png`` plus a ``.cls`` label per sample),
    named by a brace pattern; the second holds a truncated JPEG member and a sample without an
    image."""
    folder = tmp_path_factory.mktemp("webdataset")
    truncated = photo_jpegs[4][:300]
    samples = [
        [("s000", "jpg", photo_jpegs[0]), ("s001", "jpg", photo_jpegs[1]), ("s002", "jpg", photo_jpegs[2])],
        [("s003", "png", _png(photos[3])), ("s004", "jpg", truncated), ("s005", None, None),
         ("s006", "jpg", photo_jpegs[5])],
    ]  # fmt: skip
    for n, shard in enumerate(samples):
        with tarfile.open(folder / f"data-{n:03d}.tar", "w") as tar:
            for key, suffix, data in shard:
                if suffix:
                    _add_member(tar, f"{key}.{suffix}", data)
                _add_member(tar, f"{key}.cls", str(n).encode())
    images = {f"data-{n:03d}.tar/{key}": data for n, shard in enumerate(samples)
              for key, suffix, data in shard if suffix and data is not truncated}  # fmt: skip
    errors = {"data-001.tar/s004": "CorruptImageError", "data-001.tar/s005": "MissingImageError"}
    return RecordSet(str(folder / "data-{000..001}.tar"), images, errors)


@pytest.fixture(scope="session")
def parquet_files(photos, photo_jpegs, tmp_path_factory) -> RecordSet:
    """Two parquet files with columns ``uid`` (int) and ``picture`` (encoded bytes) of real
    photos; the second holds a row of garbage bytes and a null picture."""
    pa = pytest.importorskip("pyarrow", reason="parquet needs the [parquet] extra")
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("parquet")
    rows = [
        [(10, photo_jpegs[0]), (11, _png(photos[1])), (12, photo_jpegs[2])],
        [(13, b"definitely not an image"), (14, None), (15, photo_jpegs[5])],
    ]
    files = []
    for n, part in enumerate(rows):
        table = pa.table(
            {"uid": [r[0] for r in part], "picture": pa.array([r[1] for r in part], pa.binary())}
        )
        files.append(str(folder / f"part-{n}.parquet"))
        pq.write_table(table, files[-1])
    images = {str(uid): data for part in rows for uid, data in part if uid not in (13, 14)}
    return RecordSet(files, images, {"13": "UnsupportedImageError", "14": "MissingImageError"})


@pytest.fixture(scope="module")
def ray_cluster() -> str:
    """One local Ray instance for the Ray tests' module (2 CPUs, a 256 MiB object store, no
    dashboard), shut down after it so that Ray's daemons do not take CPU from the tests after;
    returns its address, for subprocesses to join."""
    ray = pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra")
    context = ray.init(
        num_cpus=2,
        object_store_memory=256 * 2**20,
        include_dashboard=False,
        configure_logging=False,
    )
    yield context.address_info["gcs_address"]
    ray.shutdown()


# --- unreadable input files and awkward ids ---------------------------------------------------


def _tar_bytes(samples: list[tuple[str, bytes]]) -> bytes:
    """A webdataset tar: ``<key>.jpg`` and ``<key>.cls`` per sample."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, jpeg in samples:
            _add_member(tar, f"{key}.jpg", jpeg)
            _add_member(tar, f"{key}.cls", b"0")
    return buf.getvalue()


def _member_offsets(data: bytes) -> list[tuple[int, int]]:
    """``(header offset, data offset)`` of each member of a tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.offset, m.offset_data) for m in tar.getmembers()]


@dataclass(frozen=True)
class BadTars:
    """Webdataset tars of real photos with unreadable tars among them, in a test's folder.

    ``first`` lists them all; ``bad`` maps each unreadable one to how it is broken. For the
    second run the empty, garbage and mid-member-cut tars are dropped and the tar cut at a
    member boundary (which ``tarfile`` alone reads as a shorter tar) is rewritten whole by
    :meth:`fix`: ``second`` is that list. ``first_ids`` / ``second_ids``: what each run embeds.
    """

    first: list[str]
    bad: dict[str, str]
    second: list[str]
    first_ids: list[str]
    second_ids: list[str]
    whole: bytes

    def fix(self) -> None:
        """Rewrite the tar that was cut at a member boundary whole."""
        Path(self.second[-1]).write_bytes(self.whole)


@pytest.fixture
def tars_with_bad_ones(photo_jpegs, tmp_path) -> BadTars:
    """See :class:`BadTars`; the good tars hold 2, 2 and 1 photos, the fixable one 2."""
    folder = tmp_path / "tars"
    folder.mkdir()
    good = {"a.tar": [0, 1], "b.tar": [2, 3], "c.tar": [4], "d.tar": [5, 0]}
    contents = {
        name: _tar_bytes([(f"s{n}{i}", photo_jpegs[i]) for n, i in enumerate(photos)])
        for name, photos in good.items()
    }
    cut = contents["c.tar"]
    whole = contents["d.tar"]
    contents.update(
        {
            "empty.tar": b"",
            "garbage.tar": b"this is a text file named like a tar\n" * 40,
            "cut-mid.tar": cut[: _member_offsets(cut)[0][1] + 700],  # inside the first JPEG
            "d.tar": whole[: _member_offsets(whole)[2][0]],  # after the first sample, whole
        }
    )
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    order = ["a.tar", "empty.tar", "b.tar", "garbage.tar", "c.tar", "cut-mid.tar", "d.tar"]
    bad = {"empty.tar": "0 bytes", "garbage.tar": "not a tar", "cut-mid.tar": "cut in a member",
           "d.tar": "cut at a member boundary"}  # fmt: skip

    def ids(names: list[str]) -> list[str]:
        return [f"{n}/s{i}{p}" for n in names for i, p in enumerate(good[n])]

    return BadTars(
        first=[str(folder / n) for n in order],
        bad={str(folder / n): why for n, why in bad.items()},
        second=[str(folder / n) for n in ("a.tar", "b.tar", "c.tar", "d.tar")],
        first_ids=ids(["a.tar", "b.tar", "c.tar"]),
        second_ids=ids(["a.tar", "b.tar", "c.tar", "d.tar"]),
        whole=whole,
    )


@dataclass(frozen=True)
class IdRecords:
    """A parquet input and the ids it must give, in order, with the photos they name."""

    inputs: list[str]
    ids: list[str]
    images: list[bytes]


ODD_IDS = ["line\nfeed", "carriage\rreturn", "line\u2028separator", "next\x85line", None,
           "twice", "crlf\r\n", "twice"]  # fmt: skip
"""Ids with each line break, a null and a repeated one."""


@pytest.fixture(scope="session")
def parquet_odd_ids(photo_jpegs, tmp_path_factory) -> IdRecords:
    """One parquet file (columns ``id``, ``image``) of 8 real photos under :data:`ODD_IDS`."""
    pa = pytest.importorskip("pyarrow", reason="parquet needs the [parquet] extra")
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("odd-ids")
    images = [photo_jpegs[i % len(photo_jpegs)] for i in range(len(ODD_IDS))]
    path = folder / "odd.parquet"
    pq.write_table(pa.table({"id": ODD_IDS, "image": pa.array(images, pa.binary())}), path)
    ids = [f"odd.parquet#{row}" if i is None else i for row, i in enumerate(ODD_IDS)]
    return IdRecords([str(path)], ids, images)


@pytest.fixture(scope="session")
def bad_parquet_files(photo_jpegs, tmp_path_factory) -> RecordSet:
    """A good parquet file of 2 photos between a garbage file and a parquet file cut in half
    (no footer); ``errors`` maps each bad file's path to how it is broken."""
    pa = pytest.importorskip("pyarrow", reason="parquet needs the [parquet] extra")
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("bad-parquet")
    table = pa.table({"id": ["p0", "p1"], "image": pa.array(photo_jpegs[:2], pa.binary())})
    pq.write_table(table, folder / "good.parquet")
    whole = (folder / "good.parquet").read_bytes()
    (folder / "garbage.parquet").write_bytes(b"PAR1 but not really a parquet file\n" * 20)
    (folder / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    files = [str(folder / n) for n in ("garbage.parquet", "good.parquet", "cut.parquet")]
    bad = {files[0]: "garbage", files[2]: "cut in half"}
    return RecordSet(files, dict(zip(["p0", "p1"], photo_jpegs[:2], strict=True)), bad)


def _assert_same_extraction(out: Path, reference: Path) -> None:
    """``out`` holds what ``reference`` holds: the same files, ids (and ids files), rows (to
    float tolerance), errors, counts and shard list."""
    import numpy as np

    from ssole_hub import read_embeddings

    def listing(folder: Path) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    assert listing(out) == listing(reference)
    emb, ids = read_embeddings(out)
    ref_emb, ref_ids = read_embeddings(reference)
    assert ids == ref_ids
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
    for name in ["_errors.jsonl", *(p.name for p in reference.glob("ids-*.jsonl"))]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    manifest, expected = (json.loads((f / "_manifest.json").read_text()) for f in (out, reference))
    keys = ("fingerprint", "num_inputs", "num_embedded", "num_errors", "failed_inputs", "shards")
    assert {k: manifest[k] for k in keys} == {k: expected[k] for k in keys}


@pytest.fixture
def same_extraction():
    """``check(out, reference)``: assert that two extraction folders hold the same output."""
    return _assert_same_extraction
