"""Extraction inputs beyond image folders (webdataset tars, parquet) and every output format,
through the plain engine; the Ray engine must match these (test_extract_ray.py)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from ssole_hub import FeatureExtractor, extract_dataset, read_embeddings
from ssole_hub.cli import main
from ssole_hub.extract.inputs import expand_braces


def _errors(out) -> dict[str, str]:
    lines = (out / "_errors.jsonl").read_text().splitlines()
    return {e["id"]: e["error"] for e in map(json.loads, lines)}


def _input_errors(out) -> dict[str, dict[str, str]]:
    """The lines of ``_errors.jsonl`` about whole input files, by path."""
    lines = (out / "_errors.jsonl").read_text().splitlines()
    return {e["input"]: e for e in map(json.loads, lines) if "input" in e}


def _manifest(out) -> dict:
    return json.loads((out / "_manifest.json").read_text())


def test_brace_patterns_expand_to_padded_ranges_and_choices():
    assert expand_braces("s/data-{008..011}.tar") == [f"s/data-{i:03d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}.parquet") == ["a-1.parquet", "a-2.parquet",
                                                     "b-1.parquet", "b-2.parquet"]  # fmt: skip
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="two integers"):
        expand_braces("data-{a..c}.tar")


def test_webdataset_tars_embed_every_sample_under_its_tar_and_key(
    hub_folder, webdataset_tars, tmp_path
):
    out = tmp_path / "out"
    manifest = extract_dataset(
        hub_folder, webdataset_tars.inputs, out, batch_size=2, num_workers=1, progress=False
    )
    assert manifest["input_kind"] == "webdataset"
    assert [s["count"] for s in manifest["shards"]] == [3, 2]  # one output shard per tar
    assert (manifest["num_inputs"], manifest["num_errors"]) == (7, 2)
    assert _errors(out) == webdataset_tars.errors
    emb, ids = read_embeddings(out)
    assert ids == list(webdataset_tars.images)
    expected = FeatureExtractor.from_pretrained(hub_folder).embed(
        list(webdataset_tars.images.values())
    )
    np.testing.assert_allclose(emb, expected.numpy(), atol=1e-5)


def test_parquet_rows_embed_under_their_ids_into_parquet_output(
    hub_folder, parquet_files, tmp_path
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    manifest = extract_dataset(
        hub_folder,
        parquet_files.inputs,
        out,
        image_column="picture",
        id_column="uid",
        file_format="parquet",
        batch_size=2,
        num_workers=0,
        progress=False,
    )
    assert manifest["input_kind"] == "parquet" and manifest["num_errors"] == 2
    assert _errors(out) == parquet_files.errors
    table = pq.read_table(out / "embeddings-00000.parquet")
    assert table.column_names == ["id", "embedding"]
    column = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(column) and column.list_size == 512
    assert column.value_type == pa.float32()
    assert table.column("id").to_pylist() == ["10", "11", "12"]
    emb, ids = read_embeddings(out)
    assert ids == list(parquet_files.images)
    # The folder itself is the table: the errors file, manifest and markers are skipped.
    assert (out / "_errors.jsonl").is_file() and (out / "_shards").is_dir()
    folder = pq.read_table(out)
    assert folder.column("id").to_pylist() == ids
    np.testing.assert_array_equal(np.stack(folder.column("embedding").to_numpy(False)), emb)
    pd = pytest.importorskip("pandas")
    assert pd.read_parquet(out)["id"].tolist() == ids
    expected = FeatureExtractor.from_pretrained(hub_folder).embed(
        list(parquet_files.images.values())
    )
    np.testing.assert_allclose(emb, expected.numpy(), atol=1e-5)


def test_read_embeddings_reads_every_output_format(hub_folder, photo_dir, tmp_path):
    runs = {}
    for file_format in ("npy", "safetensors", "parquet"):
        out = tmp_path / file_format
        extract_dataset(hub_folder, photo_dir, out, shard_size=2, file_format=file_format,
                        num_workers=0, progress=False)  # fmt: skip
        assert (out / f"embeddings-00001.{file_format}").is_file()
        runs[file_format] = read_embeddings(out)
    expected = FeatureExtractor.from_pretrained(hub_folder).embed(sorted(photo_dir.iterdir()))
    for emb, ids in runs.values():
        assert ids == ["0.png", "1.png", "2.png"]
        assert emb.dtype == np.float32
        np.testing.assert_allclose(emb, expected.numpy(), atol=1e-5)


def test_the_command_line_takes_several_tars_and_names_missing_columns(
    hub_folder, webdataset_tars, parquet_files, tmp_path, capsys
):
    tars = expand_braces(webdataset_tars.inputs)
    args = ["extract", "--model", str(hub_folder), "--out", str(tmp_path / "tars")]
    assert main([*args, "--input", *tars, "--workers", "0", "--no-progress"]) == 0
    assert read_embeddings(tmp_path / "tars")[1] == list(webdataset_tars.images)
    assert "embedded 5 of 7 images" in capsys.readouterr().out

    args = ["extract", "--model", str(hub_folder), "--out", str(tmp_path / "pq")]
    assert main([*args, "--input", *parquet_files.inputs, "--id-column", "uid"]) == 2
    err = capsys.readouterr().err
    assert "has no column 'image' (its columns: uid, picture)" in err
    assert main([*args, "--input", str(tmp_path / "nope-{0..1}.tar")]) == 2
    assert "2 input file(s) do not exist" in capsys.readouterr().err


def test_the_ray_engine_without_ray_names_the_extra(hub_folder, photo_dir, tmp_path, monkeypatch):
    """Ray is installed here, so its absence is simulated: ``sys.modules["ray"] = None`` makes
    ``import ray`` fail as it does where the extra is not installed."""
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"ssole-hub\[ray\]"):
        extract_dataset(hub_folder, photo_dir, tmp_path / "out", engine="ray")
    with pytest.raises(ValueError, match="need engine='ray'"):
        extract_dataset(hub_folder, photo_dir, tmp_path / "out", concurrency=2)


def _embeddings_mtimes(out, shards: list[int]) -> list[int]:
    return [(out / f"embeddings-{k:05d}.npy").stat().st_mtime_ns for k in shards]


def test_unreadable_tars_are_listed_and_a_rerun_after_fixing_them_resumes(
    hub_folder, tars_with_bad_ones, same_extraction, tmp_path, capsys
):
    """An empty, a garbage and two cut tars among good ones: the run embeds the good ones and
    names the bad ones. Dropping three of them and fixing the fourth, a re-run moves the good
    shards to their new positions without recomputing them and computes the fixed tar only;
    its output equals an uninterrupted run's on the new list."""
    tars = tars_with_bad_ones
    out = tmp_path / "out"
    args = ["extract", "--model", str(hub_folder), "--out", str(out), "--batch-size", "2"]
    args += ["--workers", "0", "--no-progress"]
    assert main([*args, "--input", *tars.first]) == 0
    printed = capsys.readouterr()
    bad_in_order = [p for p in tars.first if p in tars.bad]
    assert _manifest(out)["failed_inputs"] == bad_in_order
    failures = _input_errors(out)
    assert set(failures) == set(tars.bad)
    for path, entry in failures.items():
        assert entry["error"] == "UnreadableInputError"
        assert entry["message"].startswith(path), entry
        assert path in printed.out and path in printed.err  # the summary, and a warning
    assert "4 input file(s) could not be read" in printed.out
    assert read_embeddings(out)[1] == tars.first_ids
    # The tar cut at a member boundary gave one whole sample before the cut: none of it is kept.
    assert not (out / "embeddings-00006.npy").exists()
    good_shards = _embeddings_mtimes(out, [0, 2, 4])  # a.tar, b.tar, c.tar

    tars.fix()
    assert main([*args, "--input", *tars.second]) == 0
    printed = capsys.readouterr()
    assert "2 finished shard(s) moved" in printed.err  # b.tar: 2 -> 1, c.tar: 4 -> 2
    assert "3 of 4 shards are already finished and are skipped" in printed.err
    assert "embedded 7 of 7 images" in printed.out and "could not be read" not in printed.out
    assert _embeddings_mtimes(out, [0, 1, 2]) == good_shards
    assert read_embeddings(out)[1] == tars.second_ids
    reference = tmp_path / "reference"
    extract_dataset(hub_folder, tars.second, reference, batch_size=2, num_workers=0,
                    progress=False)  # fmt: skip
    same_extraction(out, reference)

    # Output of other inputs, or of other options, is refused.
    with pytest.raises(ValueError, match=r"'b.tar', which is not .*among the inputs"):
        extract_dataset(hub_folder, [tars.second[0], *tars.second[2:]], out, progress=False)
    with pytest.raises(ValueError, match="different extraction"):
        extract_dataset(hub_folder, tars.second, out, normalize=False, progress=False)


def test_unreadable_parquet_files_are_named_and_the_others_embedded(
    hub_folder, bad_parquet_files, tmp_path, capsys
):
    out = tmp_path / "out"
    args = ["extract", "--model", str(hub_folder), "--out", str(out), "--format", "parquet"]
    assert main([*args, "--input", *bad_parquet_files.inputs, "--workers", "0"]) == 0
    printed = capsys.readouterr()
    bad = bad_parquet_files.errors
    assert _manifest(out)["failed_inputs"] == list(bad)
    failures = _input_errors(out)
    assert set(failures) == set(bad)
    for path, entry in failures.items():
        assert entry["message"].startswith(f"{path} is not a readable parquet file"), entry
        assert path in printed.out
    assert read_embeddings(out)[1] == ["p0", "p1"]
    import pyarrow.parquet as pq

    assert pq.read_table(out).column("id").to_pylist() == ["p0", "p1"]


@pytest.mark.parametrize("file_format", ["npy", "safetensors"])
def test_ids_with_line_breaks_a_null_and_a_repeat_round_trip(
    file_format, hub_folder, parquet_odd_ids, tmp_path, capsys
):
    out = tmp_path / "out"
    args = ["extract", "--model", str(hub_folder), "--input", *parquet_odd_ids.inputs]
    args += ["--out", str(out), "--format", file_format, "--workers", "0", "--no-progress"]
    with pytest.warns(UserWarning, match=r"1 null id\(s\) in column 'id', recorded as"):
        assert main(args) == 0
    assert "1 id(s) belong to more than one row, e.g. 'twice'" in capsys.readouterr().out
    manifest = _manifest(out)
    assert (manifest["num_duplicate_ids"], manifest["duplicate_ids"]) == (1, ["twice"])
    emb, ids = read_embeddings(out)
    assert ids == parquet_odd_ids.ids  # each line break, the null as odd.parquet#4, both twice
    assert "odd.parquet#4" in ids and ids.count("twice") == 2
    expected = FeatureExtractor.from_pretrained(hub_folder).embed(parquet_odd_ids.images)
    np.testing.assert_allclose(emb, expected.numpy(), atol=1e-5)
    ids_file = out / "ids-00000.jsonl"
    # One line per row, whichever line breaks a reader splits at (str.splitlines: all of them).
    assert len(ids_file.read_text().splitlines()) == emb.shape[0] == 8

    # A damaged ids file (a line lost) is refused, not read as misaligned ids.
    ids_file.write_bytes(b"".join(ids_file.read_bytes().splitlines(keepends=True)[1:]))
    with pytest.raises(ValueError, match=r"has 8 rows but ids-00000.jsonl has 7 ids"):
        read_embeddings(out)


def test_file_names_with_line_breaks_are_recorded(hub_folder, photo_jpegs, tmp_path):
    folder = tmp_path / "odd names"
    folder.mkdir()
    names = ["a\nb.jpg", "c\rd.jpg", "e\u2028f.jpg", "g\x85h.jpg"]
    for name, jpeg in zip(names, photo_jpegs, strict=False):
        (folder / name).write_bytes(jpeg)
    out = tmp_path / "out"
    extract_dataset(hub_folder, folder, out, shard_size=3, num_workers=0, progress=False)
    emb, ids = read_embeddings(out)
    assert ids == sorted(names) and emb.shape == (4, 512)
    assert [len(p.read_text().splitlines()) for p in sorted(out.glob("ids-*"))] == [3, 1]


def test_a_missing_input_is_said_not_to_exist(hub_folder, tmp_path, capsys):
    args = ["extract", "--model", str(hub_folder), "--out", str(tmp_path / "out")]
    assert main([*args, "--input", str(tmp_path / "no-such-folder")]) == 2
    assert f"input {tmp_path / 'no-such-folder'} does not exist" in capsys.readouterr().err
