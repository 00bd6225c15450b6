"""The Ray engine on a real local Ray instance (``ray_cluster``, started once per test run): its
output equals the plain engine's for a folder, a list file, webdataset tars and parquet; bad
records are listed, never fatal; a killed run resumes to the same output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ssole_hub.cli import main
from ssole_hub.extract import extract_dataset, read_embeddings
from ssole_hub.ray import Resources, _resources

pytest.importorskip("ray", reason="the Ray engine needs the [ray] extra")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, photo_jpegs) -> Path:
    """Six real JPEG photos, a text file named like a JPEG, and a list file of them all plus a
    file that does not exist."""
    root = tmp_path_factory.mktemp("ray-images")
    for i, jpeg in enumerate(photo_jpegs):
        (root / f"photo{i}.jpg").write_bytes(jpeg)
    (root / "notes.jpg").write_text("not a photo\n")
    names = sorted(p.name for p in root.iterdir())
    (root / "list.txt").write_text("\n".join([*names[:4], "gone.jpg", *names[4:]]) + "\n")
    return root


def _inputs(name, image_folder, webdataset_tars, parquet_files):
    if name == "folder":
        return image_folder, {"shard_size": 3}
    if name == "list":
        return image_folder / "list.txt", {"shard_size": 3}
    if name == "webdataset":
        return webdataset_tars.inputs, {}
    return parquet_files.inputs, {"image_column": "picture", "id_column": "uid"}


def _errors(out: Path) -> dict[str, str]:
    lines = (out / "errors.jsonl").read_text().splitlines()
    return {e["id"]: e["error"] for e in map(json.loads, lines)}


@pytest.mark.parametrize(
    ("name", "file_format"),
    [("folder", "npy"), ("list", "safetensors"), ("webdataset", "parquet"), ("parquet", "npy")],
)
def test_the_ray_engine_writes_what_the_plain_engine_writes(
    name, file_format, ray_cluster, hub_folder, image_folder, webdataset_tars, parquet_files,
    tmp_path,
):  # fmt: skip
    inputs, options = _inputs(name, image_folder, webdataset_tars, parquet_files)
    common = dict(batch_size=2, file_format=file_format, progress=False, **options)
    plain = extract_dataset(hub_folder, inputs, tmp_path / "plain", num_workers=0, **common)
    ray = extract_dataset(hub_folder, inputs, tmp_path / "ray", engine="ray", concurrency=1,
                          **common)  # fmt: skip
    assert (ray["engine"], plain["engine"]) == ("ray", "plain")
    assert ray["fingerprint"] == plain["fingerprint"]
    assert [s["count"] for s in ray["shards"]] == [s["count"] for s in plain["shards"]]
    emb, ids = read_embeddings(tmp_path / "ray")
    plain_emb, plain_ids = read_embeddings(tmp_path / "plain")
    assert ids == plain_ids and len(ids) >= 4
    np.testing.assert_allclose(emb, plain_emb, atol=1e-5)
    errors = _errors(tmp_path / "ray")
    assert errors == _errors(tmp_path / "plain")
    expected = {
        "folder": {"notes.jpg": "UnsupportedImageError"},
        "list": {"notes.jpg": "UnsupportedImageError", "gone.jpg": "FileNotFoundError"},
        "webdataset": webdataset_tars.errors,  # a truncated JPEG member, a sample without image
        "parquet": parquet_files.errors,  # a row of garbage bytes, a null cell
    }[name]
    assert errors == expected


_KILLED_RUN = """
import os, signal, sys
import ssole_hub.extract_output as output
from ssole_hub.cli import main

write = output.write_atomic

def dies_before_second_marker(path, data):
    if path.name == "shard-00001.json":
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a preempted driver
    write(path, data)

output.write_atomic = dies_before_second_marker
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_ray_run_resumes_to_the_uninterrupted_output(
    ray_cluster, hub_folder, image_folder, tmp_path, capsys
):
    """A real driver process, joined to the test's Ray instance with ``--ray-address``, is
    SIGKILLed just before shard 1's done-marker is written (its embeddings are on disk by then):
    partial output. The re-run, in this process, must skip shard 0 only and end identical to an
    uninterrupted plain run."""
    out = tmp_path / "out"
    script = tmp_path / "killed_run.py"
    script.write_text(textwrap.dedent(_KILLED_RUN))
    args = ["extract", "--model", str(hub_folder), "--input", str(image_folder / "list.txt")]
    args += ["--out", str(out), "--batch-size", "2", "--shard-size", "2", "--no-progress"]
    args += ["--engine", "ray", "--concurrency", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), *args, "--ray-address", ray_cluster],
                          cwd=REPO, env=env, capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]
    assert (out / "shard-00000.json").is_file() and (out / "embeddings-00001.npy").is_file()
    assert not (out / "shard-00001.json").exists() and not (out / "manifest.json").exists()
    finished = (out / "embeddings-00000.npy").stat().st_mtime_ns

    assert main(args) == 0
    printed = capsys.readouterr()
    assert "1 of 4 shards are already finished and are skipped" in printed.err
    assert "embedded 6 of 8 images" in printed.out
    assert (out / "embeddings-00000.npy").stat().st_mtime_ns == finished
    reference = tmp_path / "reference"
    extract_dataset(hub_folder, image_folder / "list.txt", reference, batch_size=2, shard_size=2,
                    num_workers=0, progress=False)  # fmt: skip
    emb, ids = read_embeddings(out)
    ref_emb, ref_ids = read_embeddings(reference)
    assert ids == ref_ids
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
    assert _errors(out) == _errors(reference)


class _Cluster:
    """Stands in for the ``ray`` module's ``nodes()`` only: multi-node and GPU clusters cannot
    exist here. The local case is checked on the real Ray instance below."""

    def __init__(self, *nodes: dict[str, float]) -> None:
        self._nodes = [{"Alive": True, "Resources": r} for r in nodes]
        self._nodes.append({"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}})

    def nodes(self) -> list[dict]:
        return self._nodes


@pytest.mark.parametrize(
    ("nodes", "given", "expected"),
    [
        # One actor per node without GPUs; it reserves all CPUs but one, runs on all of them.
        ([{"CPU": 2.0}], {}, Resources(0, 1.0, 2, 1)),
        ([{"CPU": 32.0}] * 3, {}, Resources(0, 31.0, 32, 3)),
        ([{"CPU": 16.0}], {"concurrency": 4}, Resources(0, 3.75, 4, 4)),
        ([{"CPU": 1.0}], {}, Resources(0, 0.0, 1, 1)),
        ([{"CPU": 0.0}, *[{"CPU": 8.0}] * 2], {}, Resources(0, 7.0, 8, 2)),
        # One actor per GPU, on GPU nodes only (a CPU-only head node runs none).
        ([{"CPU": 16.0, "GPU": 1.0}], {}, Resources(1, 15.0, 16, 1)),
        ([{"CPU": 8.0}, *[{"CPU": 96.0, "GPU": 8.0}] * 2], {}, Resources(1, 11.875, 12, 16)),
        ([{"CPU": 8.0, "GPU": 1.0}], {"num_gpus": 0.5}, Resources(0.5, 3.5, 4, 2)),
        # Given CPUs are both the reservation and the threads.
        ([{"CPU": 16.0}], {"num_cpus": 2.5}, Resources(0, 2.5, 3, 1)),
    ],
)
def test_the_actors_fill_the_cluster_unless_told_otherwise(nodes, given, expected):
    args = (given.get("num_gpus"), given.get("concurrency"), given.get("num_cpus"))
    assert _resources(_Cluster(*nodes), *args) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ((2, None, None), "the largest node of the Ray cluster has 1 GPUs; an actor cannot have 2"),
        ((None, 0, None), "concurrency >= 1"),
        ((None, None, 0), "num_cpus_per_worker > 0"),
        ((-1, None, None), "num_gpus_per_worker >= 0"),
        ((0.5, None, None), "no node of the Ray cluster has a CPU and 0.5 GPUs"),
    ],
)
def test_impossible_actor_resources_are_refused_by_name(given, message):
    with pytest.raises(ValueError, match=message):
        _resources(_Cluster({"CPU": 8.0}, {"CPU": 0.0, "GPU": 1.0}), *given)


def test_on_the_local_ray_one_actor_reserves_all_cpus_but_one_and_uses_both(ray_cluster):
    import ray

    assert _resources(ray, None, None, None) == Resources(0, 1.0, 2, 1)
