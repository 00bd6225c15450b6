"""Extraction inputs beyond image folders (webdataset tars, parquet) and every output format,
through the plain engine; the Ray engine must match these (test_extract_ray.py)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from ssole_hub import FeatureExtractor
from ssole_hub.cli import main
from ssole_hub.extract import extract_dataset, read_embeddings
from ssole_hub.extract_inputs import expand_braces


def _errors(out) -> dict[str, str]:
    lines = (out / "errors.jsonl").read_text().splitlines()
    return {e["id"]: e["error"] for e in map(json.loads, lines)}


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
