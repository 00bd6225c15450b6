"""ONNX backends (OpenVINO): export guarded against torch on real photos, loading, failures, extract."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import onnx
import pytest
import timm
import torch
import torch.nn.functional as F

from ssole_hub import (
    FeatureExtractor,
    HubFolderError,
    SSOLEModel,
    SSOLEProjector,
    export_hub_folder,
    export_onnx,
    read_embeddings,
    validate_hub_folder,
)
from ssole_hub.cli import main
from ssole_hub.extract.output import MANIFEST_FILE
from ssole_hub.hub.load import guarded_backends
from ssole_hub.hub.onnx_export import OnnxFileRefusedWarning, neighbour_agreement
from ssole_hub.runtimes.backends import FIDELITY_LIMITS, ONNX_FILES, fastest_backend

REPO = Path(__file__).resolve().parents[2]
PX = 64


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory) -> Path:
    """A real hub folder of a seeded SSOLE ResNet-18 at 64 px with a 512 -> 64 -> 32 projector."""
    torch.manual_seed(0)
    backbone = timm.create_model(
        "ssole_resnet18",
        num_classes=0,
        pretrained_cfg_overlay={"input_size": (3, PX, PX), "crop_pct": 1.0},
    )
    encoder = SSOLEModel(backbone, SSOLEProjector(512, 64, 32, depth=2)).eval()
    return export_hub_folder(encoder, tmp_path_factory.mktemp("hub") / "tiny")


@pytest.fixture(scope="module")
def jpeg_dir(photo_jpegs, tmp_path_factory) -> Path:
    """scikit-image's photos as JPEG files: calibration and test images."""
    root = tmp_path_factory.mktemp("jpegs")
    for i, jpeg in enumerate(photo_jpegs):
        (root / f"photo{i}.jpg").write_bytes(jpeg)
    return root


@pytest.fixture(scope="module")
def onnx_folder(plain_folder, jpeg_dir, tmp_path_factory) -> Path:
    """The folder with both ONNX files, int8 calibrated on the JPEGs."""
    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    shutil.copytree(plain_folder, folder)
    export_onnx(folder, calibration=jpeg_dir)
    return folder


@pytest.fixture(scope="module")
def onnx_pca_folder(onnx_folder, photo_crops, tmp_path_factory) -> Path:
    """The folder with both ONNX files and a PCA fitted by ``ssole-hub fit-pca`` on 150 photo
    crops (backbone, ``dimensions`` 1 to 149)."""
    folder = tmp_path_factory.mktemp("onnx-pca") / "tiny"
    shutil.copytree(onnx_folder, folder)
    argv = ["fit-pca", str(folder), "--input", str(photo_crops), "--backend", "torch",
            "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _embed(folder: Path, backend: str, images: list, output: str, normalize: bool):
    fx = FeatureExtractor.from_pretrained(
        folder, backend=backend, with_projector=None, device="cpu"
    )
    return fx.embed(images, batch_size=4, output=output, normalize=normalize)


@pytest.mark.parametrize("output", ["backbone", "projector"])
@pytest.mark.parametrize("normalize", [False, True])
def test_float32_onnx_equals_torch_on_real_photos(onnx_folder, jpeg_dir, output, normalize):
    images = sorted(jpeg_dir.glob("*.jpg"))
    reference = _embed(onnx_folder, "torch", images, output, normalize)
    got = _embed(onnx_folder, "onnx", images, output, normalize)
    assert got.shape == reference.shape == (len(images), 512 if output == "backbone" else 32)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("output", ["backbone", "projector"])
def test_int8_keeps_cosine_to_float32_above_its_limit(onnx_folder, jpeg_dir, output):
    images = sorted(jpeg_dir.glob("*.jpg"))
    reference = _embed(onnx_folder, "torch", images, output, False)
    got = _embed(onnx_folder, "onnx-int8", images, output, False)
    cosine = F.cosine_similarity(got, reference, dim=1)
    assert cosine.min() >= 0.99
    assert not torch.allclose(got, reference, atol=1e-6)  # it really is another computation


def test_export_records_its_figures_in_ssole_json_and_the_card(onnx_folder):
    record = json.loads((onnx_folder / "ssole.json").read_text())["onnx"]
    assert record["guard_photos"] == {"source": "calibration", "count": 6}
    assert set(record["backends"]) == {"onnx", "onnx-bf16", "onnx-int8"}
    assert set(record["runtime"]) == {"openvino", "onnxruntime_quantizer"}
    for backend, figures in record["backends"].items():
        assert figures["passed"] is True
        assert set(figures["min_cosine"]) == set(figures["neighbour_agreement"])
        assert set(figures["min_cosine"]) == {"backbone", "projector"}
        assert min(figures["min_cosine"].values()) >= FIDELITY_LIMITS[backend]
        assert min(figures["neighbour_agreement"].values()) >= figures["neighbour_agreement_limit"]
    assert record["backends"]["onnx"]["precision"] == "f32"
    card = (onnx_folder / "README.md").read_text()
    int8 = record["backends"]["onnx-int8"]
    share = int8["neighbour_agreement"]["backbone"]
    row = f"| onnx-int8 | `onnx/model_int8.onnx` | f32 | backbone | {int8['min_cosine']['backbone']:.6f}"
    assert f"{row} (0.99) | {share:.6f} | True |" in card
    assert card.count("### ONNX backends") == 1
    assert card.index("### ONNX backends") < card.index("## Citation")


def test_bf16_keeps_its_limit_and_reports_the_precision_it_runs_at(onnx_folder, jpeg_dir):
    """bfloat16 where this CPU has it (OpenVINO keeps float32 elsewhere); the record says which."""
    images = sorted(jpeg_dir.glob("*.jpg"))
    fx = FeatureExtractor.from_pretrained(onnx_folder, backend="onnx-bf16", device="cpu")
    record = json.loads((onnx_folder / "ssole.json").read_text())["onnx"]["backends"]
    assert fx.model.precision == record["onnx-bf16"]["precision"]
    reference = _embed(onnx_folder, "torch", images, "backbone", False)
    got = fx.embed(images, batch_size=4, output="backbone", normalize=False)
    assert F.cosine_similarity(got, reference, dim=1).min() >= FIDELITY_LIMITS["onnx-bf16"]
    if fx.model.precision == "bf16":
        assert not torch.allclose(got, reference, atol=1e-4)  # it really is another computation


def test_neighbour_agreement_counts_the_neighbours_that_stay():
    torch.manual_seed(0)
    points = torch.randn(12, 8)
    assert neighbour_agreement(points, points * 3.0, k=3) == 1.0
    shuffled = points[torch.randperm(12)]
    assert neighbour_agreement(points, shuffled, k=3) < 0.5


def test_onnx_files_take_images_and_give_both_outputs_with_dynamic_batch(onnx_folder):
    graph = onnx.load(str(onnx_folder / ONNX_FILES["onnx"])).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["backbone", "projector"]
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    info = validate_hub_folder(onnx_folder)
    assert info.onnx_files == list(ONNX_FILES.values())


def test_vanilla_timm_ignores_the_onnx_files(onnx_folder, photos):
    model = timm.create_model(f"local-dir:{onnx_folder}", pretrained=True).eval()
    config = timm.data.resolve_model_data_config(model)
    x = timm.data.create_transform(**config, is_training=False)(photos[0]).unsqueeze(0)
    with torch.inference_mode():
        features = model(x)
    expected = _embed(onnx_folder, "torch", [photos[0]], "backbone", False)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_auto_times_every_backend_that_passed_and_keeps_the_fastest(
    onnx_folder, plain_folder, tmp_path, caplog
):
    """On the machine it runs on: every ONNX backend that passed its guard, and torch, are timed
    on one batch; the fastest is kept, its figures logged and kept on the extractor. A backend
    that missed its guard is never timed."""

    def auto(folder):
        with caplog.at_level(logging.INFO, logger="ssole_hub"):
            return FeatureExtractor.from_pretrained(folder, backend="auto", device="cpu")

    fx = auto(onnx_folder)
    timed = [*guarded_backends(onnx_folder), "torch"]
    assert len(timed) == 4 and list(fx.backend_timings) == timed
    assert all(ms > 0 for ms in fx.backend_timings.values())
    assert fx.backend == min(fx.backend_timings, key=fx.backend_timings.get)
    assert f"backend auto: using {fx.backend} for {onnx_folder}" in caplog.text
    assert f"{fx.backend} {fx.backend_timings[fx.backend]:g}" in caplog.text
    plain = auto(plain_folder)  # no ONNX files: nothing to time
    assert (plain.backend, plain.backend_timings) == ("torch", {})

    failed = _copy(onnx_folder, tmp_path / "failed")
    ssole = json.loads((failed / "ssole.json").read_text())
    ssole["onnx"]["backends"]["onnx-int8"]["passed"] = False  # as if it had missed its guard
    (failed / "ssole.json").write_text(json.dumps(ssole))
    assert list(auto(failed).backend_timings) == ["onnx", "onnx-bf16", "torch"]
    float_only = _copy(onnx_folder, tmp_path)
    assert main(["export", "--out", str(float_only), "--onnx"]) == 0
    assert not (float_only / ONNX_FILES["onnx-int8"]).exists()
    record = json.loads((float_only / "ssole.json").read_text())["onnx"]
    assert record["guard_photos"] == {"source": "scikit-image", "count": 6}
    assert "onnx-int8" not in auto(float_only).backend_timings


def test_fastest_backend_takes_the_smallest_median_over_interleaved_rounds():
    calls = []

    def forward(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)

        return run

    chosen, ms = fastest_backend(
        {"torch": forward("torch", 0.03), "onnx-bf16": forward("onnx-bf16", 0.005)}, images=5
    )
    assert chosen == "onnx-bf16"
    assert 6.0 <= ms["torch"] < 20 and ms["onnx-bf16"] < ms["torch"]  # 30 ms for 5 images
    assert calls == ["torch", "onnx-bf16"] * 4  # one untimed pass each, then 3 rounds in turn


def test_export_command_writes_folder_and_onnx_files_from_a_checkpoint(
    checkpoint_path, jpeg_dir, tmp_path, capsys
):
    out = tmp_path / "model"
    argv = ["export", "--checkpoint", str(checkpoint_path), "--out", str(out)]
    assert main([*argv, "--calibration", str(jpeg_dir)]) == 2
    assert "add --onnx" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--onnx", "--calibration", str(jpeg_dir)]) == 0
    printed = capsys.readouterr().out
    for line in ("onnx (onnx/model.onnx, f32)", "onnx-int8 (onnx/model_int8.onnx, f32)"):
        assert f"{line}: min cosine to torch backbone" in printed
    assert "onnx-bf16 (onnx/model.onnx," in printed and "NOT passed" not in printed
    assert validate_hub_folder(out).onnx_files == list(ONNX_FILES.values())


STRICT_INT8 = 0.99999
"""A stricter int8 limit than the default 0.99: the calibrated int8 file really misses it (its
figures are checked below), so the refusal is honest, not faked."""


def test_int8_missing_its_limit_keeps_float32_and_records_the_refusal(
    onnx_folder, jpeg_dir, tmp_path
):
    """Only int8 misses its guard: the float32 file that passed is written, the int8 file is
    not (an older one is gone too), and ssole.json, the card and the warning say why."""
    folder = _copy(onnx_folder, tmp_path)
    assert (folder / ONNX_FILES["onnx-int8"]).is_file()
    with pytest.warns(OnnxFileRefusedWarning) as warned:
        record = export_onnx(folder, calibration=jpeg_dir, limits={"onnx-int8": STRICT_INT8})
    int8 = record["backends"]["onnx-int8"]
    assert int8["limit"] == STRICT_INT8 and min(int8["min_cosine"].values()) < STRICT_INT8
    assert int8["passed"] is False and int8["written"] is False
    assert record["backends"]["onnx"]["passed"] and record["backends"]["onnx"]["written"]
    assert (folder / ONNX_FILES["onnx"]).is_file()
    assert not (folder / ONNX_FILES["onnx-int8"]).exists()
    assert json.loads((folder / "ssole.json").read_text())["onnx"] == record
    assert validate_hub_folder(folder).onnx_files == [ONNX_FILES["onnx"]]
    assert "onnx-int8" not in guarded_backends(folder) and "onnx" in guarded_backends(folder)

    message = str(warned[0].message)
    worst = min(int8["min_cosine"], key=int8["min_cosine"].get)
    assert f"on the {worst} output is {int8['min_cosine'][worst]:.6f}" in message
    assert f"below the limit {STRICT_INT8}" in message and "on 6 calibration photos" in message
    assert "onnx/model.onnx (float32) passed and was written" in message
    assert f"ssole-hub export --out {folder} --onnx --calibration PHOTOS" in message
    assert "leave out --calibration" in message
    card = (folder / "README.md").read_text()
    assert "| False (file refused, not written) |" in card
    assert "`onnx/model_int8.onnx` was refused at export and is not in this folder" in card
    assert "--backend onnx  # or onnx-bf16, torch, auto" in card


def test_the_export_command_warns_about_a_refused_int8_file_and_runs_again_on_the_folder(
    onnx_folder, checkpoint_path, jpeg_dir, tmp_path, capsys
):
    """The command writes what passed and exits 0 with one warning line naming the figures and
    the ways out; the same folder then takes another ``--out DIR --onnx`` run."""
    folder = _copy(onnx_folder, tmp_path)
    add_onnx = ["export", "--out", str(folder), "--onnx", "--calibration", str(jpeg_dir)]
    assert main([*add_onnx, "--int8-min-cosine", str(STRICT_INT8)]) == 0
    printed = capsys.readouterr()
    warnings = [line for line in printed.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("ssole-hub export: warning: ")
    assert "onnx/model_int8.onnx was refused and not written: min cosine" in warnings[0]
    assert "NOT passed" in printed.out and "file refused, not written" in printed.out
    assert not (folder / ONNX_FILES["onnx-int8"]).exists()

    # Exporting the checkpoint again into the folder names both ways on.
    again = ["export", "--checkpoint", str(checkpoint_path), "--out", str(folder), "--onnx"]
    assert main(again) == 2
    error = capsys.readouterr().err
    assert "already exists; pass --overwrite" in error and "leave out --checkpoint" in error

    assert main(add_onnx) == 0  # the default limit: int8 passes on the same photos
    assert "warning" not in capsys.readouterr().err
    record = json.loads((folder / "ssole.json").read_text())["onnx"]
    assert record["backends"]["onnx-int8"]["passed"] and record["backends"]["onnx-int8"]["written"]
    assert validate_hub_folder(folder).onnx_files == list(ONNX_FILES.values())


def test_export_with_missing_calibration_photos_writes_no_folder(checkpoint_path, tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["export", "--checkpoint", str(checkpoint_path), "--out", str(out), "--onnx"]
    assert main([*argv, "--calibration", str(tmp_path / "no-such-photos")]) == 2
    assert "no-such-photos does not exist" in capsys.readouterr().err
    assert not out.exists()  # so the same command, corrected, runs as it would have


def test_bad_limits_are_refused_naming_them(plain_folder, capsys):
    with pytest.raises(ValueError, match=r"no fidelity limit for backend 'onnx-fp8'"):
        export_onnx(plain_folder, limits={"onnx-fp8": 0.9})
    with pytest.raises(
        ValueError, match=r"limit of onnx-int8 must be a number in \(0, 1\], got 1.5"
    ):
        export_onnx(plain_folder, limits={"onnx-int8": 1.5})
    with pytest.raises(SystemExit) as exited:
        main(["export", "--out", str(plain_folder), "--onnx", "--int8-min-cosine", "0"])
    assert exited.value.code == 2
    assert (
        "--int8-min-cosine: expected a cosine limit in (0, 1], got '0'" in capsys.readouterr().err
    )
    assert not (plain_folder / "onnx").exists()


def test_a_file_that_changes_retrieval_is_refused_naming_the_check(
    onnx_folder, jpeg_dir, tmp_path, monkeypatch
):
    """With the neighbour-agreement limit above 1, no file can pass: the first is refused by
    that check alone (its cosine is fine), and the folder keeps its files."""
    import ssole_hub.hub.onnx_export as onnx_export

    folder = _copy(onnx_folder, tmp_path)
    before = (folder / ONNX_FILES["onnx"]).read_bytes()
    monkeypatch.setattr(onnx_export, "NEIGHBOUR_AGREEMENT_LIMIT", 1.01)
    with pytest.raises(ValueError, match=r"model.onnx: neighbour agreement .* below the limit"):
        onnx_export.export_onnx(folder, calibration=jpeg_dir)
    assert (folder / ONNX_FILES["onnx"]).read_bytes() == before


def test_bf16_missing_its_limit_is_marked_not_passed_and_skipped_by_auto(onnx_folder, tmp_path):
    """bfloat16 runs the float32 file, so missing its limit keeps the file (float32 passed) and
    only marks the backend, which ``auto`` then skips."""
    folder = _copy(onnx_folder, tmp_path)
    if FeatureExtractor.from_pretrained(folder, backend="onnx-bf16").model.precision != "bf16":
        pytest.skip("this CPU has no bfloat16: OpenVINO runs onnx-bf16 in float32")
    bf16 = export_onnx(folder, limits={"onnx-bf16": 0.9999999})["backends"]["onnx-bf16"]
    assert bf16["passed"] is False and "min cosine" in bf16["shortfalls"][0]
    assert (folder / ONNX_FILES["onnx"]).is_file()
    assert "onnx-bf16" not in guarded_backends(folder)
    assert "onnx" in guarded_backends(folder)


def test_a_folder_without_onnx_files_names_the_export_command(plain_folder):
    with pytest.raises(FileNotFoundError, match=r"no onnx/model.onnx.*ssole-hub export .*--onnx"):
        FeatureExtractor.from_pretrained(plain_folder, backend="onnx", device="cpu")
    with pytest.raises(ValueError, match="needs a hub folder"):
        FeatureExtractor.from_pretrained("ssole_resnet18", backend="onnx-int8", pretrained=False)


def test_a_truncated_onnx_file_fails_naming_it(onnx_folder, tmp_path):
    folder = _copy(onnx_folder, tmp_path)
    path = folder / ONNX_FILES["onnx"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(HubFolderError, match=r"onnx/model.onnx.*not a loadable ONNX model"):
        FeatureExtractor.from_pretrained(folder, backend="onnx", device="cpu")
    with pytest.raises(HubFolderError, match=r"onnx/model\.onnx"):
        validate_hub_folder(folder)


def test_a_foreign_onnx_file_fails_naming_it(onnx_folder, tmp_path):
    folder = _copy(onnx_folder, tmp_path)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    foreign = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    foreign.ir_version = 8
    onnx.save(foreign, str(folder / ONNX_FILES["onnx-int8"]))
    with pytest.raises(HubFolderError, match=r"model_int8.onnx: expected one input 'images'"):
        FeatureExtractor.from_pretrained(folder, backend="onnx-int8", device="cpu")


def test_extract_with_int8_writes_the_rows_of_torch(onnx_folder, jpeg_dir, tmp_path):
    runs = {}
    for backend in ("torch", "onnx-int8"):
        out = tmp_path / backend
        argv = ["extract", "--model", str(onnx_folder), "--input", str(jpeg_dir)]
        argv += ["--out", str(out), "--backend", backend, "--batch-size", "4", "--no-progress"]
        assert main([*argv, "--workers", "0"]) == 0
        assert json.loads((out / MANIFEST_FILE).read_text())["backend"] == backend
        runs[backend] = read_embeddings(out)
    (torch_rows, torch_paths), (int8_rows, int8_paths) = runs["torch"], runs["onnx-int8"]
    assert int8_paths == torch_paths and len(torch_paths) == 6
    cosine = F.cosine_similarity(torch.from_numpy(int8_rows), torch.from_numpy(torch_rows))
    assert cosine.min() >= 0.99


def test_extract_defaults_to_auto_and_keeps_torch_for_torch_only_options(
    onnx_folder, jpeg_dir, tmp_path
):
    """Like the server, extract times the backends that passed their export check and keeps the
    fastest unless told otherwise (the manifest records the figures); a dtype that only torch
    runs (bfloat16 on the CPU) keeps torch. A resumed run keeps the backend of its finished
    shards instead of timing again."""
    chosen = {}
    for name, extra in [("default", []), ("bf16", ["--dtype", "bfloat16"])]:
        out = tmp_path / name
        argv = ["extract", "--model", str(onnx_folder), "--input", str(jpeg_dir), "--out", str(out)]
        assert main([*argv, "--workers", "0", "--no-progress", *extra]) == 0
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        chosen[name] = manifest["backend"], manifest["backend_timings"]
    backend, timings = chosen["default"]
    assert backend == min(timings, key=timings.get) and len(timings) == 4
    assert chosen["bf16"] == ("torch", {})

    # Resuming: the finished shards' backend is kept, without timing the backends again.
    out = tmp_path / "default"
    (out / MANIFEST_FILE).unlink()
    marker = out / "_shards" / "00000.json"
    assert json.loads(marker.read_text())["backend"] == backend
    argv = ["extract", "--model", str(onnx_folder), "--input", str(jpeg_dir), "--out", str(out)]
    assert main([*argv, "--workers", "0", "--no-progress"]) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert (manifest["backend"], manifest["backend_timings"]) == (backend, {})


def test_without_onnx_packages_import_works_and_auto_uses_torch(onnx_folder, zygote):
    """In a child of the zygote (``tests/zygote.py``), which has imported no ONNX package."""
    script = (
        "import sys\n"
        "sys.modules.update(onnx=None, onnxruntime=None, openvino=None)  # importing fails\n"
        "import ssole_hub\n"
        f"fx = ssole_hub.FeatureExtractor.from_pretrained({str(onnx_folder)!r}, device='cpu',"
        " backend='auto')\n"
        "print(fx.backend, sys.modules['openvino'])\n"
    )
    done = zygote.run("code", script, [], REPO, dict(os.environ), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch", "None"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's stack_t")
def test_opening_a_file_leaves_the_threads_signal_stack_as_it_was(onnx_folder):
    """OpenVINO's CPU plugin gives the compiling thread an alternate signal stack that it may
    free later; the thread's next signal then killed the process (a SIGSEGV in training after
    ``validate_hub_folder``). Checked in fresh threads, where OpenVINO has installed none yet."""
    import ctypes
    import threading

    from ssole_hub.runtimes.signal_stack import _SignalStack

    libc = ctypes.CDLL(None)

    def signal_stack() -> tuple:
        stack = _SignalStack()
        libc.sigaltstack(None, ctypes.byref(stack))
        return stack.ss_sp, stack.ss_flags, stack.ss_size

    seen = []

    def open_both() -> None:
        before = signal_stack()
        FeatureExtractor.from_pretrained(onnx_folder, backend="onnx", device="cpu")
        validate_hub_folder(onnx_folder)
        seen.append((before, signal_stack()))

    for _ in range(2):
        thread = threading.Thread(target=open_both)
        thread.start()
        thread.join()
    assert len(seen) == 2 and all(before == after for before, after in seen)


def test_fit_pca_on_a_folder_with_onnx_files_keeps_them(onnx_folder, onnx_pca_folder):
    for name in ONNX_FILES.values():
        assert (onnx_pca_folder / name).read_bytes() == (onnx_folder / name).read_bytes()
    ssole = json.loads((onnx_pca_folder / "ssole.json").read_text())
    before = json.loads((onnx_folder / "ssole.json").read_text())
    assert ssole["onnx"] == before["onnx"] and ssole["pca"]["max_dimensions"] == 149
    card = (onnx_pca_folder / "README.md").read_text()
    assert card.count("### ONNX backends") == card.count("### Compact embeddings") == 1
    info = validate_hub_folder(onnx_pca_folder)
    assert info.onnx_files == list(ONNX_FILES.values()) and info.pca == ssole["pca"]
    # Exporting the ONNX files again leaves the PCA and its card section alone.
    again = _copy(onnx_pca_folder, onnx_pca_folder.parent / "again")
    export_onnx(again)
    assert validate_hub_folder(again).pca == ssole["pca"]
    assert (again / "README.md").read_text().count("### Compact embeddings") == 1


@pytest.mark.parametrize("backend", ["onnx", "onnx-bf16", "onnx-int8"])
def test_every_backend_gives_compact_embeddings_within_its_guard(
    onnx_pca_folder, photo_crops, backend
):
    images = sorted(photo_crops.iterdir())[::10]  # 15 crops of the 6 photos
    reference = _embed_sized(onnx_pca_folder, "torch", images)
    got = _embed_sized(onnx_pca_folder, backend, images)
    assert got.shape == reference.shape == (15, 128)
    assert F.cosine_similarity(got, reference, dim=1).min() >= FIDELITY_LIMITS[backend]


def _embed_sized(folder: Path, backend: str, images: list) -> torch.Tensor:
    fx = FeatureExtractor.from_pretrained(folder, backend=backend, device="cpu")
    return fx.embed(images, batch_size=8, dimensions=128)
