"""The Ray engine on a real local Ray instance (``ray_cluster``, started once per test run): its
output equals the plain engine's for a folder, a list file (with compact embeddings), webdataset
tars and parquet (ids with line breaks too); bad records and unreadable input files are listed,
never fatal; a killed run, or one whose unreadable inputs were fixed or dropped, resumes to the
same output; a wrong cluster address fails fast."""

from __future__ import annotations

import json
import os
import socket
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ssole_hub import extract_dataset, read_embeddings
from ssole_hub.cli import main
from ssole_hub.extract.ray import Resources, _resources

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


def _inputs(name, image_folder, parquet_files):
    if name == "folder":
        return image_folder, {"shard_size": 3}
    return parquet_files.inputs, {"image_column": "picture", "id_column": "uid"}


def _manifest(out: Path) -> dict:
    return json.loads((out / "_manifest.json").read_text())


def _input_errors(out: Path) -> dict[str, dict[str, str]]:
    """The lines of ``_errors.jsonl`` about whole input files, by path."""
    lines = (out / "_errors.jsonl").read_text().splitlines()
    return {e["input"]: e for e in map(json.loads, lines) if "input" in e}


def _errors(out: Path) -> dict[str, str]:
    """The lines of ``_errors.jsonl`` about single records: id -> exception name."""
    lines = (out / "_errors.jsonl").read_text().splitlines()
    return {e["id"]: e["error"] for e in map(json.loads, lines) if "id" in e}


@pytest.mark.parametrize("name", ["folder", "parquet"])
def test_the_ray_engine_writes_what_the_plain_engine_writes(
    name, ray_cluster, hub_folder, image_folder, parquet_files, tmp_path
):
    """Also in other tests below: a list file with compact embeddings into safetensors (the
    killed run), webdataset tars into parquet (with unreadable tars), odd ids and unreadable
    parquet files."""
    inputs, options = _inputs(name, image_folder, parquet_files)
    common = dict(batch_size=2, file_format="npy", progress=False, **options)
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
        "parquet": parquet_files.errors,  # a row of garbage bytes, a null cell
    }[name]
    assert errors == expected


_KILLED_RUN = """
import os, signal, sys
import ssole_hub.extract.output as output
from ssole_hub.cli import main

write = output.write_atomic

def dies_before_second_marker(path, data):
    if path.name == "00001.json":  # shard 1's done-marker
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a preempted driver
    write(path, data)

output.write_atomic = dies_before_second_marker
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_ray_run_of_compact_embeddings_resumes_to_the_plain_engines_output(
    ray_cluster, pca_folder, image_folder, tmp_path, capsys, zygote
):
    """A real driver process (a child of the zygote, ``tests/zygote.py``), joined to the test's
    Ray instance with ``--ray-address``, extracting a list file (a text file named like a JPEG
    and a missing file among its photos) as compact embeddings (the folder's PCA, 64
    dimensions) into safetensors shards, is SIGKILLed just before shard 1's done-marker is
    written (its embeddings are on disk by then): partial output. The re-run, in this process,
    must skip shard 0 only and end identical to an uninterrupted plain run."""
    out = tmp_path / "out"
    script = tmp_path / "killed_run.py"
    script.write_text(textwrap.dedent(_KILLED_RUN))
    args = ["extract", "--model", str(pca_folder), "--input", str(image_folder / "list.txt")]
    args += ["--out", str(out), "--batch-size", "2", "--shard-size", "2", "--no-progress"]
    args += ["--engine", "ray", "--concurrency", "1", "--dimensions", "64"]
    args += ["--format", "safetensors"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = zygote.run("script", str(script), [*args, "--ray-address", ray_cluster], REPO, env, 300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (out / "_shards" / "00000.json").is_file()
    assert (out / "embeddings-00001.safetensors").is_file()
    assert not (out / "_shards" / "00001.json").exists() and not (out / "_manifest.json").exists()
    finished = (out / "embeddings-00000.safetensors").stat().st_mtime_ns

    assert main(args) == 0
    printed = capsys.readouterr()
    assert "1 of 4 shards are already finished and are skipped" in printed.err
    assert "embedded 6 of 8 images" in printed.out
    assert (out / "embeddings-00000.safetensors").stat().st_mtime_ns == finished
    reference = tmp_path / "reference"
    plain = extract_dataset(pca_folder, image_folder / "list.txt", reference, batch_size=2,
                            shard_size=2, num_workers=0, progress=False, dimensions=64,
                            file_format="safetensors")  # fmt: skip
    ray = _manifest(out)
    assert ray["fingerprint"] == plain["fingerprint"]
    assert (ray["dim"], ray["dimensions"], ray["pca"]) == (64, 64, plain["pca"]) and plain["pca"]
    emb, ids = read_embeddings(out)
    ref_emb, ref_ids = read_embeddings(reference)
    assert ids == ref_ids and emb.shape == (6, 64)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    errors = _errors(out)
    assert errors == _errors(reference)
    assert errors == {"notes.jpg": "UnsupportedImageError", "gone.jpg": "FileNotFoundError"}


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


def test_unreadable_tars_are_listed_and_a_rerun_after_fixing_them_resumes(
    ray_cluster, hub_folder, tars_with_bad_ones, webdataset_tars, same_extraction, tmp_path, capsys
):  # fmt: skip
    """As the plain engine's test of the same name (test_extract_inputs.py), on Ray, into
    parquet shards, with the two webdataset tars of ``webdataset_tars`` (a PNG member, a
    truncated JPEG member, a sample without an image) after them: the good tars are embedded,
    the bad records and tars named; after three tars are dropped and one fixed, the re-run
    computes only the fixed one and equals a plain run on the new list; the folder reads as
    one table."""
    import pyarrow.parquet as pq

    tars = tars_with_bad_ones
    folder = Path(tars.first[0]).parent
    webdataset = [str(folder / f"data-00{n}.tar") for n in (0, 1)]
    for path in webdataset:  # beside the others: ids are relative to the inputs' common folder
        Path(path).write_bytes((Path(webdataset_tars.inputs).parent / Path(path).name).read_bytes())
    out = tmp_path / "out"
    args = ["extract", "--model", str(hub_folder), "--out", str(out), "--batch-size", "2"]
    args += ["--engine", "ray", "--concurrency", "1", "--format", "parquet", "--no-progress"]
    assert main([*args, "--input", *tars.first, *webdataset]) == 0
    printed = capsys.readouterr()
    assert _manifest(out)["failed_inputs"] == [p for p in tars.first if p in tars.bad]
    failures = _input_errors(out)
    assert set(failures) == set(tars.bad)
    for path, entry in failures.items():
        assert entry["error"] == "UnreadableInputError"
        assert entry["message"].startswith(path), entry
        assert path in printed.out
    assert _errors(out) == webdataset_tars.errors
    ids = pq.read_table(out).column("id").to_pylist()
    assert ids == [*tars.first_ids, *webdataset_tars.images]
    assert not (out / "embeddings-00006.parquet").exists()  # nothing of the tar cut at a member
    good_shards = [(out / f"embeddings-{k:05d}.parquet").stat().st_mtime_ns for k in (0, 2, 4)]

    tars.fix()
    assert main([*args, "--input", *tars.second, *webdataset]) == 0
    printed = capsys.readouterr()
    assert "5 of 6 shards are already finished and are skipped" in printed.err
    assert "embedded 12 of 14 images" in printed.out and "could not be read" not in printed.out
    moved = [(out / f"embeddings-{k:05d}.parquet").stat().st_mtime_ns for k in (0, 1, 2)]
    assert moved == good_shards
    reference = tmp_path / "reference"
    extract_dataset(hub_folder, [*tars.second, *webdataset], reference, batch_size=2,
                    file_format="parquet", num_workers=0, progress=False)  # fmt: skip
    same_extraction(out, reference)
    ids = pq.read_table(out).column("id").to_pylist()
    assert ids == [*tars.second_ids, *webdataset_tars.images]


def test_unreadable_parquet_files_are_named_odd_ids_kept_and_the_rest_is_the_plain_output(
    ray_cluster, hub_folder, bad_parquet_files, parquet_odd_ids, tmp_path, capsys
):
    """A parquet file of odd ids (line breaks, a null id, a repeated one) and a good file among
    two unreadable ones, into safetensors shards: the unreadable files are named, the ids kept
    (a null one named by its file and row), and the output is the plain engine's."""
    inputs = [*parquet_odd_ids.inputs, *bad_parquet_files.inputs]
    out = tmp_path / "out"
    args = ["extract", "--model", str(hub_folder), "--out", str(out), "--engine", "ray"]
    args += ["--format", "safetensors", "--no-progress"]
    assert main([*args, "--input", *inputs]) == 0
    printed = capsys.readouterr()
    bad = bad_parquet_files.errors
    manifest = _manifest(out)
    assert manifest["failed_inputs"] == list(bad)
    failures = _input_errors(out)
    assert set(failures) == set(bad)
    for path, entry in failures.items():
        assert entry["message"].startswith(f"{path} is not a readable parquet file"), entry
        assert path in printed.out
    emb, ids = read_embeddings(out)
    # a null id is named by its file's path under the inputs' common folder, and its row
    folder = Path(parquet_odd_ids.inputs[0]).parent.name
    odd = [f"{folder}/{i}" if i == "odd.parquet#4" else i for i in parquet_odd_ids.ids]
    assert ids == [*odd, "p0", "p1"] and odd != parquet_odd_ids.ids
    assert (manifest["num_duplicate_ids"], manifest["duplicate_ids"]) == (1, ["twice"])
    plain = extract_dataset(hub_folder, inputs, tmp_path / "plain", file_format="safetensors",
                            num_workers=0, progress=False)  # fmt: skip
    assert plain["fingerprint"] == manifest["fingerprint"]
    plain_emb, plain_ids = read_embeddings(tmp_path / "plain")
    assert ids == plain_ids
    np.testing.assert_allclose(emb, plain_emb, atol=1e-5)
    assert _input_errors(out) == _input_errors(tmp_path / "plain")
    # A readable file without the image column is refused up front, by name, before Ray runs.
    good = bad_parquet_files.inputs[1]
    assert main([*args, "--input", good, "--image-column", "picture"]) == 2
    assert f"{good} has no column 'picture'" in capsys.readouterr().err


def test_a_wrong_ray_address_fails_fast_naming_it(hub_folder, photo_dir, tmp_path, zygote):
    """``python -m ssole_hub extract`` in a process not joined to any Ray (a child of the zygote,
    ``tests/zygote.py``, which has not imported Ray) pointed at a port where nothing listens: one
    error line naming the address, well within 30 s (Ray's own retries took over 2 minutes)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    args = ["extract", "--engine", "ray", "--ray-address", address, "--model", str(hub_folder)]
    args += ["--input", str(photo_dir), "--out", str(tmp_path / "out"), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    start = time.monotonic()
    proc = zygote.run("module", "ssole_hub", args, REPO, env, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"ssole-hub extract: error: cannot reach the Ray cluster at {address} (Connection "
        "refused); is Ray running there (ray start --head), and is the address right?"
    ]
    assert elapsed < 30, elapsed
    assert not (tmp_path / "out").exists()
