"""Batch extraction: corrupt files skipped and listed, killed runs resume, torchrun ranks agree."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from ssole_hub import (
    FeatureExtractor,
    SSOLEModel,
    SSOLEProjector,
    export_hub_folder,
    extract_dataset,
    read_embeddings,
)
from ssole_hub.cli import main
from ssole_hub.images import list_images

REPO = Path(__file__).resolve().parents[2]
BAD = {
    "bad.jpg": "UnsupportedImageError",
    "empty.png": "CorruptImageError",
    "truncated.jpg": "CorruptImageError",
}


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    """A real hub folder (safetensors + timm config.json) of a seeded SSOLE ResNet-18."""
    torch.manual_seed(0)
    encoder = SSOLEModel(timm.create_model("ssole_resnet18"), SSOLEProjector(512, 64, 32, depth=2))
    return export_hub_folder(encoder.eval(), tmp_path_factory.mktemp("hub") / "ssole_resnet18.test")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, photos, photo_jpegs) -> Path:
    """Real photos as JPEGs and, in a sub-folder, PNGs; plus corrupt files and a non-image."""
    root = tmp_path_factory.mktemp("images")
    (root / "png").mkdir()
    for i, (img, jpeg) in enumerate(zip(photos, photo_jpegs, strict=True)):
        (root / f"photo{i}.jpg").write_bytes(jpeg)
        img.save(root / "png" / f"photo{i}.png")
    (root / "bad.jpg").write_bytes(b"this is a text file with a .jpg name\n")
    (root / "empty.png").touch()
    (root / "truncated.jpg").write_bytes(photo_jpegs[1][: len(photo_jpegs[1]) // 2])
    (root / "notes.txt").write_text("not an image and not named like one")
    return root


@pytest.fixture(scope="module")
def clean_run(hub_folder, image_dir, tmp_path_factory) -> Path:
    """One uninterrupted single-process extraction: the reference the other runs must equal."""
    out = tmp_path_factory.mktemp("clean")
    extract_dataset(hub_folder, image_dir, out, batch_size=2, shard_size=4, progress=False)
    return out


def _mtimes(out: Path, k: int) -> dict[str, int]:
    """The modification times of output shard ``k``'s files (data, ids, errors, marker)."""
    files = [*out.glob(f"*-{k:05d}.*"), *(out / "_shards").glob(f"*{k:05d}.json*")]
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in files}


def _good_paths(image_dir: Path) -> list[str]:
    return [p for p in list_images(image_dir)[0] if p not in BAD]


def test_corrupt_files_are_skipped_listed_and_counted(clean_run, image_dir, hub_folder):
    manifest = json.loads((clean_run / "_manifest.json").read_text())
    good = _good_paths(image_dir)
    assert len(good) == 12
    assert manifest["num_inputs"] == 15  # notes.txt is not an image name, so not an input
    assert manifest["num_embedded"] == 12
    assert manifest["num_errors"] == 3
    errors = [json.loads(line) for line in (clean_run / "_errors.jsonl").read_text().splitlines()]
    assert {e["id"]: e["error"] for e in errors} == BAD
    assert all(e["id"] in e["message"] for e in errors)

    emb, paths = read_embeddings(clean_run)
    assert paths == good
    expected = FeatureExtractor.from_pretrained(hub_folder).embed([image_dir / p for p in good])
    np.testing.assert_allclose(emb, expected.numpy(), atol=1e-4)


def test_manifest_records_model_preprocessing_and_shards(clean_run, hub_folder):
    manifest = json.loads((clean_run / "_manifest.json").read_text())
    assert manifest["model_id"] == os.fspath(hub_folder)
    assert manifest["dim"] == 512
    assert manifest["preprocessing"]["input_size"] == [3, 224, 224]
    assert manifest["preprocessing"]["interpolation"] == "bicubic"
    assert len(manifest["shards"]) == 4  # 15 inputs in shards of 4
    assert sum(s["count"] for s in manifest["shards"]) == 12
    for shard in manifest["shards"]:
        assert np.load(clean_run / shard["embeddings"]).shape == (shard["count"], 512)


def test_safetensors_output_and_a_list_file_give_the_same_embeddings(
    clean_run, hub_folder, image_dir, tmp_path
):
    listing = tmp_path / "list.txt"
    good = _good_paths(image_dir)
    # Relative to the list file's folder; plus a missing file, which is listed as an error.
    rel = [os.path.relpath(image_dir / p, tmp_path) for p in good]
    listing.write_text("# images\n" + "\n".join([*rel, "missing.jpg"]) + "\n")
    out = tmp_path / "out"
    manifest = extract_dataset(
        hub_folder,
        listing,
        out,
        batch_size=3,
        shard_size=5,
        file_format="safetensors",
        num_workers=0,
        progress=False,
    )
    assert manifest["num_errors"] == 1
    assert "FileNotFoundError" in (out / "_errors.jsonl").read_text()
    emb, paths = read_embeddings(out)
    assert paths == rel
    np.testing.assert_allclose(emb, read_embeddings(clean_run)[0], atol=1e-5)


def test_an_output_folder_of_another_run_is_refused(clean_run, hub_folder, image_dir, tmp_path):
    with pytest.raises(ValueError, match="different extraction"):
        extract_dataset(hub_folder, image_dir, clean_run, shard_size=4, normalize=False)
    with pytest.raises(ValueError, match="different extraction"):  # another path list
        extract_dataset(hub_folder, _good_paths(image_dir), clean_run, shard_size=4)
    old = tmp_path / "old"  # the layout of earlier versions: manifest.json beside the shards
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=r"earlier ssole-hub version \(manifest.json\)"):
        extract_dataset(hub_folder, image_dir, old, shard_size=4)


_KILLED_RUN = """
import os, signal, sys
from ssole_hub.cli import main
from ssole_hub.extractor import FeatureExtractor

forward = FeatureExtractor.embed_tensor
calls = 0

def dies_on_third_batch(self, batch, *args, **kwargs):
    global calls
    calls += len(batch) <= 2  # the run's batches, not the decoding guard's 12 photos at load
    if calls == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a preempted job
    return forward(self, batch, *args, **kwargs)

FeatureExtractor.embed_tensor = dies_on_third_batch
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_run_resumes_skipping_finished_shards(
    clean_run, hub_folder, image_dir, tmp_path, capsys, zygote
):
    """The killed run is a process of its own (a child of the zygote, ``tests/zygote.py``)."""
    out = tmp_path / "out"
    script = tmp_path / "killed_run.py"
    script.write_text(textwrap.dedent(_KILLED_RUN))
    args = ["extract", "--model", str(hub_folder), "--input", str(image_dir), "--out", str(out)]
    args += ["--batch-size", "2", "--shard-size", "4", "--no-progress"]
    proc = zygote.run("script", str(script), args, REPO, dict(os.environ))
    assert proc.returncode == -9, proc.stderr[-2000:]
    # Shard 0 is bad.jpg, empty.png (a batch that needs no forward pass), photo0, photo1; the
    # third forward pass, in shard 1, killed the process.
    assert (out / "_shards" / "00000.json").is_file()
    assert not (out / "_shards" / "00001.json").exists()
    assert not (out / "_manifest.json").exists()
    finished = _mtimes(out, 0)
    assert len(finished) == 4  # embeddings, ids, errors, marker

    assert main(args) == 0
    printed = capsys.readouterr()
    assert "embedded 12 of 15" in printed.out
    assert "1 of 4 shards are already finished and are skipped" in printed.err
    assert _mtimes(out, 0) == finished
    emb, paths = read_embeddings(out)
    clean_emb, clean_paths = read_embeddings(clean_run)
    assert paths == clean_paths
    np.testing.assert_allclose(emb, clean_emb, atol=1e-5)


@pytest.mark.slow
def test_two_rank_torchrun_equals_one_process_and_resumes_after_bad_tars_are_fixed_or_dropped(
    hub_folder, tars_with_bad_ones, same_extraction, tmp_path, zygote
):
    """Two ranks under torchrun (its launcher a child of the zygote, ``tests/zygote.py``; each
    rank a new process) write what one process writes, each rank's unreadable tars listed in
    the one errors file. Re-run after the bad tars were fixed or dropped, finished shards that
    changed position are moved once (by rank 0, between barriers that every rank reaches)
    before the ranks take their shards; that run reads with a DataLoader worker per rank."""
    tars = tars_with_bad_ones
    out = tmp_path / "out"
    args = ["--nproc_per_node", "2", "--standalone", "-m", "ssole_hub", "extract", "--model"]
    args += [str(hub_folder), "--out", str(out), "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(inputs, workers):
        command = [*args, "--workers", str(workers), "--input", *inputs]
        return zygote.run("module", "torch.distributed.run", command, REPO, env, 300)

    proc = torchrun(tars.first, 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["failed_inputs"] == [p for p in tars.first if p in tars.bad]
    errors = [json.loads(e) for e in (out / "_errors.jsonl").read_text().splitlines()]
    assert sorted(e["input"] for e in errors) == sorted(tars.bad)  # from both ranks' shards
    first = tmp_path / "first"
    extract_dataset(hub_folder, tars.first, first, batch_size=2, num_workers=0, progress=False)
    same_extraction(out, first)

    tars.fix()
    proc = torchrun(tars.second, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("2 finished shard(s) moved") == 1  # rank 0 only
    reference = tmp_path / "reference"
    extract_dataset(hub_folder, tars.second, reference, batch_size=2, num_workers=0,
                    progress=False)  # fmt: skip
    same_extraction(out, reference)
