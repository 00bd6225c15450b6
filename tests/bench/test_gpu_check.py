"""The one-command GPU check (``bench/gpu_check.py``, its stages in ``bench/gpu_stages/``): its dry
run end to end on the CPU, the stage runner's failure and time-out handling, and the choice of
carried wheels to install."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _load_gpu_check():
    # bench/ is not a package and pytest imports tests with importlib: load the script by path.
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()
# Loading the entry point put the repository root on sys.path: its stage modules import from there.
runner = importlib.import_module("bench.gpu_stages.runner")
stage_types = importlib.import_module("bench.gpu_stages.stage")
wheels = importlib.import_module("bench.gpu_stages.wheels")


def _in_zygote(zygote):
    """:func:`runner.run_command` with the stage's command run by a child of the zygote
    (``tests/zygote.py``): the same program and arguments, without a new interpreter's imports of
    torch. Servers and torchrun's workers that a stage starts are still new processes."""

    def run_command(command, env, log, timeout_s):
        _, first, *rest = command
        kind, target, args = (
            ("module", rest[0], rest[1:]) if first == "-m" else ("script", first, rest)
        )
        try:
            done = zygote.run(kind, target, args, runner.ROOT, dict(env), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return "timeout", None
        log.write_text(done.stdout + done.stderr)
        return ("ok" if done.returncode == 0 else "failed"), done.returncode

    return run_command


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_dry_run_runs_every_stage_and_records_status_figures_and_targets(
    tmp_path, monkeypatch, capsys, zygote
):
    """The whole check in this process, each stage's command in a child of the zygote (the
    stage runner's own process handling is tested below)."""
    out = tmp_path / "gpu_check.json"
    argv = [
        "--dry-run", "--fashion-mnist", str(FASHION_MNIST), "--work-dir", str(tmp_path / "work"),
        "--out", str(out),
    ]  # fmt: skip
    monkeypatch.setattr(runner, "run_command", _in_zygote(zygote))
    started = time.monotonic()
    code = gpu_check.main(argv)
    seconds = time.monotonic() - started
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]

    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    assert report["wall_s"] <= round(seconds, 1) + 0.1  # its clock starts inside ours; rounded
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == list(gpu_check.STAGES)
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage.get("log_tail"))
        assert stage["figures"], name
        assert stage["checks"], name
        for check in stage["checks"]:
            assert check["target"] and check["measured"] is not None, (name, check)
            assert isinstance(check["met"], bool), (name, check)
        assert "<work-dir>" in stage["command"] and str(tmp_path) not in stage["command"]

    # Figures that only a real run of each path produces.
    cuda = stages["cuda_tests"]["figures"]
    assert cuda["skipped"] >= 2 and cuda["failed"] == 0  # no CUDA here: skipped, not failed
    assert "tests/ssole_hub/test_loss.py" in cuda["modules"]
    assert not any(m.startswith("tests/bench/") for m in cuda["modules"])
    assert stages["loss"]["checks"][1]["met"]  # the fast loss agrees with the SVD one
    assert stages["train_compile"]["figures"]["bound_images_per_s"] > 0
    assert stages["ddp"]["figures"]["steps"] == 3
    _assert_two_ranks_trained_and_wrote_one_checkpoint(tmp_path / "work" / "ddp")
    # JPEGs decoded on the device against the CPU (here torchvision's CPU decoder), both measured
    assert stages["extract"]["figures"]["device_decode_ratio"] > 0
    assert set(stages["serve"]["figures"]["device_vs_cpu_decoding"]) == {"1", "32"}
    quality = stages["quality"]["figures"]
    assert quality["epochs"] >= 1 and quality["calibration"]["images_per_s"] > 0
    assert {"README.md", "config.json", "model.safetensors"} <= set(quality["hub_folder"])
    assert 0 <= quality["ssole_knn_top1"] <= 100
    assert "| stage | status | s | check | target | measured | met |" in printed


def _assert_two_ranks_trained_and_wrote_one_checkpoint(run_dir: Path) -> None:
    """The ddp stage's run: ``training.pretrain`` under torchrun, two new ranks on gloo."""
    import torch

    checkpoints = sorted((run_dir / "checkpoints").glob("*.pt"))
    assert [p.name for p in checkpoints] == ["step_00000003.pt"]
    state = torch.load(checkpoints[0], weights_only=True)
    assert state["world_size"] == 2 and state["global_step"] == 3
    assert len(state["rng"]) == 2  # one RNG state per rank
    # The DDP wrapper is not part of the saved names: they stay timm's.
    assert "backbone.bn1.running_mean" in state["model"]
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["images_per_s"] > 0 for r in train)


def _stage(name: str, code: str, timeout_s: float = 60) -> object:
    return stage_types.Stage(
        name, f"test stage {name}", [sys.executable, "-c", code], timeout_s, lambda: ({}, [])
    )


def test_a_failing_stage_is_recorded_with_its_output_and_the_next_one_runs(tmp_path, monkeypatch):
    fail = "import sys; print('the reason it failed'); sys.exit(3)"
    succeed = "print('fine')"
    monkeypatch.setitem(gpu_check.BUILDERS, "loss", lambda plan, t: _stage("loss", fail, t))
    monkeypatch.setitem(
        gpu_check.BUILDERS, "extract", lambda plan, t: _stage("extract", succeed, t)
    )
    plan = stage_types.Plan(dry_run=True, work=tmp_path, fashion_mnist=None, gpus=0)

    records = gpu_check.run_stages(plan, ["loss", "ddp", "extract"], {}, (300, 10))

    assert [r["status"] for r in records] == ["failed", "skipped", "ok"]
    assert records[0]["returncode"] == 3
    assert "the reason it failed" in records[0]["log_tail"]
    assert "Fashion-MNIST" in records[1]["reason"]
    assert "log_tail" not in records[2]


def test_a_stage_past_its_time_limit_is_ended_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)"
    )
    started = time.monotonic()

    record = runner.run_stage(_stage("slow", code, timeout_s=3), {}, tmp_path)

    assert record["status"] == "timeout" and record["returncode"] is None
    assert time.monotonic() - started < 30
    # The group was signalled; the kernel ends the child asynchronously, so give it a moment.
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    deadline = time.monotonic() + 10
    while not _ended(stat) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ended(stat), stat.read_text()


def _ended(stat: Path) -> bool:
    """The process is gone, or a zombie waiting to be reaped."""
    try:
        return stat.read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_stage_cannot_start_the_check_again(monkeypatch, capsys):
    monkeypatch.setenv(gpu_check.NESTED, "1")

    assert gpu_check.main(["--dry-run", "--stages", "loss"]) == 2
    assert "inside one of its own stages" in capsys.readouterr().err


def _wheel(name: str, version: str, *requires: str) -> object:
    return wheels.Wheel(Path(f"{name}-{version}.whl"), name, version, requires)


def test_only_missing_wheels_and_those_too_old_for_them_are_installed():
    carried = {
        w.name: w
        for w in (
            _wheel("fastapi", "1.0", "starlette>=1.0", "pydantic>=2", "httpx; extra == 'all'"),
            _wheel("pydantic", "2.14", "typing-extensions>=4.14", "annotated-types>=0.6"),
            _wheel("starlette", "1.10", "anyio>=3"),
            _wheel("typing-extensions", "4.16"),
            _wheel("annotated-types", "0.8"),
            _wheel("anyio", "4.16"),
            _wheel("httpx", "0.28"),
        )
    }
    installed = {"starlette": "1.2", "typing-extensions": "4.12.2", "anyio": "4.0", "httpx": "0.1"}

    chosen = wheels.wheels_to_install(carried, installed)

    # starlette 1.2 and anyio 4.0 satisfy what is asked of them; typing-extensions 4.12 does not;
    # httpx is only asked for by an extra.
    assert chosen == ["annotated-types", "fastapi", "pydantic", "typing-extensions"]


def _write_wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            zf.writestr(arcname, text)
    return path


def test_missing_wheels_install_without_a_registry_and_foreign_ones_are_left_out(tmp_path):
    wheelhouse = tmp_path / "whl"
    wheelhouse.mkdir()
    _write_wheel(wheelhouse, "ssole_gpu_check_probe", "1.0")
    _write_wheel(wheelhouse, "pytest", "1.0")  # installed here, and no package asks for 1.0
    foreign = "lib-1.0-cp39-cp39-manylinux_2_17_aarch64.whl"
    (wheelhouse / foreign).write_bytes(b"")
    site = tmp_path / "site"

    report = wheels.install_missing(wheelhouse, site)

    assert report["installed"] == ["ssole-gpu-check-probe==1.0"]
    assert report["not_for_this_python"] == [foreign]
    assert [w.split("==")[0] for w in report["already_there"]] == ["pytest"]
    assert not (site / "pytest.py").exists()
    assert (site / "ssole_gpu_check_probe.py").read_text() == "VALUE = 42\n"
