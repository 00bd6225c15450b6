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
