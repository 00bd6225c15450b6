"""GPU verification in one command: every GPU path run once and every GPU target measured, in
under nine minutes of one GPU.

Made for a GPU machine without registry access that has Python 3.12 with torch, torchvision, timm,
safetensors, huggingface_hub, scikit-learn, scikit-image, prometheus-client, pyyaml and httpx
installed, and no virtualenv. What it lacks (fastapi, uvicorn, pydantic, kornia, lightly, ...)
travels with the repository as wheels, with Fashion-MNIST beside them::

    make wheelhouse gpu-data        # here, once: .whl/ and .gpu-data/fashion-mnist/ (git-ignored)
    python3 bench/gpu_check.py      # there, from the repository root (or: make gpu-check)

Each stage is a subprocess with a time limit; a stage that fails or runs out of time is recorded
as such and the next one runs. In order:

- ``cuda_tests``: the test suite's CUDA tests (marked ``gpu`` or named for CUDA);
- ``loss``: ``bench/loss.py``, fp32, B=256, N=8, d=4096, against the SVD formulation;
- ``train_eager`` and ``train_compile``: ``bench/train_throughput.py``, the ResNet-18 recipe at
  224 px x 4 views with the views made on the GPU (kornia), bf16, channels_last, against the
  pre-made-views bound, without and with ``torch.compile``;
- ``ddp``: ``training.pretrain`` under torchrun, NCCL and SyncBatchNorm (needs two GPUs: NCCL
  takes one process per GPU, so on one GPU the stage says so and is skipped);
- ``extract`` and ``serve``: ``bench/extract.py`` and ``bench/serve.py`` on CUDA against their
  bounds;
- ``quality``: ``bench/quality.py``, SSOLE ResNet-18 on all 60k Fashion-MNIST images for the most
  epochs that fit the time left (at most ``--quality-budget`` s of training, calibrated), kNN
  (k=20, T=0.07), linear probe and RankMe against raw pixels and random init, exported as a hub
  folder with its model card.

``--dry-run`` runs the same stages at toy sizes on the CPU, in a couple of minutes; the test suite
runs it. Writes one JSON file (``bench/results/gpu_check.json``) and prints one table: per stage,
each target, what was measured, and whether it was met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.parser import Parser
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIRS = (
    ROOT / ".gpu-data" / "fashion-mnist",
    Path("/usr/share/datasets/fashion-mnist"),
)

# What the GPU machine may lack, pinned at download time to the versions installed where the test
# suite passes. The last six are there already; they travel only as fallbacks, installed when a
# carried package needs a newer version than the machine's.
WHEELS = (
    "fastapi", "starlette", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv",
    "annotated-types", "typing-inspection", "uvicorn", "python-multipart", "kornia", "kornia-rs",
    "lightly",
    "typing-extensions", "anyio", "annotated-doc", "h11", "click", "idna",
)  # fmt: skip
# pip matches each manylinux tag exactly: name every glibc level such a machine can load.
PLATFORMS = (
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
)  # fmt: skip
GPU_PYTHON = "3.12"
# A test module holds CUDA tests when it marks one or asks whether CUDA is there.
CUDA_TEST = r"pytest\.mark\.gpu|torch\.cuda\.is_available\(\)"
# Set for every stage, so that a stage never starts this check again (its dry run is a test).
NESTED = "SSOLE_GPU_CHECK_STAGE"


# --- the wheelhouse -------------------------------------------------------------------------


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download_wheels(dest: Path, names: Iterable[str] = WHEELS) -> list[Path]:
    """Download the wheels of ``names`` for the GPU machine's CPython into ``dest`` (emptied of
    wheels first: two versions of one package stop an install), each at the version installed
    here. Returns the wheel files.

    Raises:
        metadata.PackageNotFoundError: if one of ``names`` is not installed here.
        subprocess.CalledProcessError: if pip cannot download one.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={metadata.version(name)}" for name in names]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--python-version", GPU_PYTHON, "--implementation", "cp",
            *platforms, "--dest", str(dest), *pins,
        ],
        check=True,
    )  # fmt: skip
    return sorted(dest.glob("*.whl"))


@dataclass(frozen=True)
class Wheel:
    """A wheel file's project name (canonical), version and unconditional requirements."""

    path: Path
    name: str
    version: str
    requires: tuple[str, ...]


def read_wheel(path: Path) -> Wheel:
    """Name, version and ``Requires-Dist`` of a wheel, from its ``METADATA``."""
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    return Wheel(
        path, _canonical(meta["Name"]), meta["Version"], tuple(meta.get_all("Requires-Dist") or ())
    )


def wheels_to_install(wheels: Mapping[str, Wheel], installed: Mapping[str, str]) -> list[str]:
    """The carried wheels to install: each one whose package is not installed, then, repeatedly,
    each one whose installed version fails a requirement of a wheel already chosen. Names are
    canonical; requirements with an extra or a marker false for this interpreter are ignored."""
    from packaging.requirements import Requirement

    chosen = [name for name in wheels if name not in installed]
    queue = list(chosen)
    while queue:
        for line in wheels[queue.pop()].requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = _canonical(req.name)
            if name in wheels and name not in chosen and installed[name] not in req.specifier:
                chosen.append(name)
                queue.append(name)
    return sorted(chosen)


def install_missing(wheelhouse: Path, target: Path) -> dict[str, Any]:
    """Install into ``target`` (put it first on ``PYTHONPATH``) the carried wheels this
    interpreter lacks, without a registry; returns what was installed, what was already there,
    and the wheels left out because they do not fit this interpreter.

    Raises:
        subprocess.CalledProcessError: if pip fails.
    """
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    supported = set(sys_tags())
    wheels, unfit = {}, []
    for path in sorted(wheelhouse.glob("*.whl")):
        if set(parse_wheel_filename(path.name)[3]) & supported:
            wheel = read_wheel(path)
            wheels[wheel.name] = wheel
        else:
            unfit.append(path.name)
    installed = {
        _canonical(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if d.metadata["Name"]  # a broken install can leave a nameless record
    }
    names = wheels_to_install(wheels, installed)
    if names:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                *(str(wheels[n].path) for n in names),
            ],
            check=True,
        )  # fmt: skip
    return {
        "installed": [f"{n}=={wheels[n].version}" for n in names],
        "already_there": sorted(f"{n}=={installed[n]}" for n in wheels if n not in names),
        "not_for_this_python": unfit,
    }


# --- stages ---------------------------------------------------------------------------------


@dataclass
class Check:
    """One target: what is compared, the target as text, the measured value, and whether it
    was met (None when nothing was measured)."""

    check: str
    target: str
    measured: Any
    met: bool | None


@dataclass
class Stage:
    """A subprocess with a time limit, and how to read its results: ``judge`` returns the
    stage's figures and its checks once the command has succeeded."""

    name: str
    what: str
    command: list[str]
    timeout_s: float
    judge: Callable[[], tuple[dict[str, Any], list[Check]]]


@dataclass
class Plan:
    """Where and at which sizes the stages run."""

    dry_run: bool
    work: Path
    fashion_mnist: Path | None
    gpus: int
    python: str = sys.executable

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def out(self, name: str) -> Path:
        """Where a stage's benchmark writes its JSON."""
        return self.work / f"{name}.json"

    def pick(self, toy: Any, full: Any) -> Any:
        """``toy`` in the dry run, ``full`` on the GPU."""
        return toy if self.dry_run else full


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _num(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def at_least(check: str, measured: float, bound: float, unit: str = "") -> Check:
    """A check that ``measured`` reaches ``bound``."""
    return Check(check, f">= {bound:g}{unit}", _num(measured), measured >= bound)


def below(check: str, measured: float, bound: float) -> Check:
    """A check that ``measured`` stays under ``bound``."""
    return Check(check, f"< {bound:g}", _num(measured), measured < bound)


def cuda_tests(plan: Plan, timeout_s: float) -> Stage:
    """The CUDA tests: marked ``gpu`` or named for CUDA (``-k`` also matches marker names). Only
    the modules that hold such tests are collected, so that the rest of the suite's dependencies
    (schemathesis, ...) need not travel; this script's own tests are never among them."""
    modules = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if p.parent.name != "bench" and re.search(CUDA_TEST, p.read_text())
    )
    report = plan.work / "cuda_tests.xml"
    command = [
        plan.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
        "-k", "gpu or cuda", f"--junitxml={report}", *modules,
    ]  # fmt: skip

    def judge() -> tuple[dict[str, Any], list[Check]]:
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = n["failures"] + n["errors"]
        passed = n["tests"] - failed - n["skipped"]
        measured = f"{passed} passed, {n['skipped']} skipped, {failed} failed"
        met = n["tests"] > 0 and passed == n["tests"]
        figures = {"passed": passed, "skipped": n["skipped"], "failed": failed, "modules": modules}
        return figures, [Check("CUDA tests", "all pass, none skipped", measured, met)]

    return Stage("cuda_tests", "tests marked gpu or named for CUDA", command, timeout_s, judge)


def loss_stage(plan: Plan, timeout_s: float) -> Stage:
    """``bench/loss.py``: the SSOLE loss against the SVD formulation, forward + backward, fp32,
    at B=256, N=8, d=4096."""
    out = plan.out("loss")
    sizes = plan.pick(["--shape", "16", "4", "64", "--repeats", "2"], ["--quick", "--repeats", "5"])
    command = [plan.python, "bench/loss.py", "--device", plan.device, *sizes, "--out", str(out)]

    def judge() -> tuple[dict[str, Any], list[Check]]:
        row = _read_json(out)["results"][0]
        keys = ("B", "N", "d", "ssole_loss_ms", "svd_ms", "speedup", "loss_rel_diff")
        diff = row["loss_rel_diff"]
        return {k: row[k] for k in keys}, [
            at_least("speed-up over the SVD formulation", row["speedup"], 10, "x"),
            Check("agrees with the SVD formulation", "rel. diff <= 1e-4", diff, diff <= 1e-4),
        ]

    return Stage("loss", "fp32 loss forward + backward vs generic SVD", command, timeout_s, judge)


def train_stage(plan: Plan, timeout_s: float, compiled: bool) -> Stage:
    """``bench/train_throughput.py``: the released recipe's ResNet-18 at 224 px x 4 views (toy:
    32 px) with the views made on the device, bf16, channels_last, against the pre-made-views
    bound, on synthetic images (the loader's cost without a dataset to carry)."""
    name = "train_compile" if compiled else "train_eager"
    out = plan.out(name)
    toy = [
        "data.synthetic_size=40", "views.size=32", "data.batch_size=8", "data.num_workers=0",
        "model.projector_hidden=256", "model.projector_out=256",
    ]  # fmt: skip
    full = ["data.synthetic_size=256", "data.batch_size=128", "data.num_workers=10"]
    steps = plan.pick(["1", "1", "1"], ["6", "3", "3"])
    command = [
        plan.python, "bench/train_throughput.py",
        "--config", "training/configs/imagenet100_r18_m4.yaml", "--out", str(out),
        "--steps", steps[0], "--repeats", steps[1], "--warmup", steps[2],
        "data.dataset=synthetic", "data.synthetic_images=4096", "views.backend=batch",
        "precision=bf16", "model.channels_last=true", f"model.compile={str(compiled).lower()}",
        f"device={plan.device}", *plan.pick(toy, full),
    ]  # fmt: skip

    def judge() -> tuple[dict[str, Any], list[Check]]:
        r = _read_json(out)
        med, ratio = r["median_images_per_s"], r["ratio_pipeline_to_bound"]
        figures = {
            "pipeline_images_per_s": _num(med["pipeline"], 1),
            "bound_images_per_s": _num(med["bound"], 1),
            "ratio": _num(ratio), "views": r["views"], "precision": r["precision"],
            "batch": r["batch_per_process"], "device": r["device"],
        }  # fmt: skip
        return figures, [at_least("pipeline / bound (views on the device)", ratio, 0.85)]

    what = f"training throughput, bf16, channels_last, {'torch.compile' if compiled else 'eager'}"
    return Stage(name, what, command, timeout_s, judge)


def ddp_stage(plan: Plan, timeout_s: float) -> Stage | str:
    """``training.pretrain`` under torchrun with two processes: NCCL and SyncBatchNorm on two GPUs
    (gloo on the CPU in the dry run). Returns the reason instead when it cannot run here."""
    if plan.fashion_mnist is None:
        return "Fashion-MNIST not found (--fashion-mnist PATH, or make gpu-data)"
    if not plan.dry_run and plan.gpus < 2:
        return f"{plan.gpus} GPU: NCCL takes one process per GPU, so DDP + SyncBatchNorm need 2"
    steps = int(plan.pick("3", "30"))
    run_dir = plan.work / "ddp"
    toy = [
        "data.max_images=64", "data.batch_size=8", "data.num_workers=0", "log_every_steps=1",
        "model.projector_hidden=256", "model.projector_out=256",
    ]  # fmt: skip
    full = ["data.num_workers=4", "log_every_steps=5", "precision=bf16", "model.channels_last=true"]
    command = [
        plan.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "training.pretrain", "--config", "training/configs/fashion_mnist_r18.yaml",
        f"data.root={plan.fashion_mnist}", f"output_dir={plan.work}", "run_name=ddp",
        f"max_steps={steps}", "epochs=1", "knn.every_epochs=0", "knn.at_start=false",
        "model.sync_batchnorm=true", f"device={plan.device}", *plan.pick(toy, full),
    ]  # fmt: skip

    def judge() -> tuple[dict[str, Any], list[Check]]:
        lines = (run_dir / "log.jsonl").read_text().splitlines()
        train = [e for e in map(json.loads, lines) if e.get("event") == "train"]
        checkpoints = len(list((run_dir / "checkpoints").glob("*")))
        finite = all(e.get("loss") is not None for e in train)
        figures = {
            "processes": 2, "backend": plan.pick("gloo", "nccl"),
            "sync_batchnorm": not plan.dry_run, "steps": train[-1]["step"],
            "last_loss": train[-1].get("loss"), "images_per_s": _num(train[-1]["images_per_s"], 1),
            "checkpoints": checkpoints,
        }  # fmt: skip
        ok = finite and train[-1]["step"] == steps and checkpoints > 0
        measured = f"{train[-1]['step']} steps, {'finite' if finite else 'non-finite'} loss"
        target = f"{steps} steps, finite loss"
        return figures, [Check("trains and checkpoints under torchrun", target, measured, ok)]

    return Stage("ddp", "DDP + SyncBatchNorm under torchrun", command, timeout_s, judge)


def extract_stage(plan: Plan, timeout_s: float) -> Stage:
    """``bench/extract.py``: batch extraction from JPEG files against the model-only bound."""
    out = plan.out("extract")
    sizes = plan.pick(
        ["--images", "8", "--batch-size", "4", "--workers", "0", "--repeats", "1"],
        ["--images", "512", "--batch-size", "128", "--workers", "12", "--repeats", "3"],
    )
    command = [plan.python, "bench/extract.py", "--device", plan.device, *sizes, "--out", str(out)]

    def judge() -> tuple[dict[str, Any], list[Check]]:
        r = _read_json(out)
        rate, ratio = r["images_per_s"], r["ratio_to_bound"]
        figures = {
            "bound_images_per_s": _num(rate["bound"], 1),
            "extract_images_per_s": _num(rate["extract"], 1),
            "ratio": _num(ratio["extract"]), "fast_decode_ratio": _num(ratio["extract_fast"]),
            "dtype": r["dtype"], "device": r["device"],
        }  # fmt: skip
        return figures, [at_least("extract / model-only bound", ratio["extract"], 0.9)]

    return Stage("extract", "batch extraction JPEG -> shards", command, timeout_s, judge)


def serve_stage(plan: Plan, timeout_s: float) -> Stage:
    """``bench/serve.py``: the batched server under closed-loop load against the offline bound;
    its targets hold at concurrency 32 and above."""
    out = plan.out("serve")
    sizes = plan.pick(
        ["--input-px", "64", "--batch-size", "4", "--requests", "8", "--repeats", "1",
         "--concurrency", "1", "32"],
        ["--batch-size", "64", "--requests", "256", "--repeats", "2", "--decode-threads", "8",
         "--concurrency", "1", "8", "32", "64"],
    )  # fmt: skip
    command = [plan.python, "bench/serve.py", "--device", plan.device, *sizes, "--out", str(out)]

    def judge() -> tuple[dict[str, Any], list[Check]]:
        r = _read_json(out)
        levels = {
            lv["concurrency"]: {
                "images_per_s": _num(lv["server_images_per_s"], 1),
                "vs_bound": _num(lv["server_vs_bound"]),
                "p99_ms": _num(lv["server_p99_ms"], 1),
                "p99_over_batch": _num(lv["p99_over_full_batch"]),
            }
            for lv in r["levels"]
        }
        high = [v for c, v in levels.items() if c >= 32]
        errors = sum(lv["server_errors"] for lv in r["levels"])
        figures = {
            "bound_images_per_s": _num(r["bound_images_per_s"], 1),
            "full_batch_ms": _num(r["full_batch_ms"], 1),
            "levels": levels,
        }
        worst_ratio = min(v["vs_bound"] for v in high)
        worst_p99 = max(v["p99_over_batch"] for v in high)
        return figures, [
            at_least("server / bound, c >= 32 (worst)", worst_ratio, 0.85),
            below("p99 / one full batch, c >= 32 (worst)", worst_p99, 2),
            Check("server errors", "0", errors, errors == 0),
        ]

    return Stage("serve", "HTTP server with dynamic batching", command, timeout_s, judge)


def quality_stage(plan: Plan, timeout_s: float, train_budget_s: float) -> Stage | str:
    """``bench/quality.py``: SSOLE on all of Fashion-MNIST for the epochs that fit
    ``train_budget_s``, evaluated against raw pixels and random init, exported as a hub folder."""
    if plan.fashion_mnist is None:
        return "Fashion-MNIST not found (--fashion-mnist PATH, or make gpu-data)"
    out, export = plan.out("quality"), plan.work / "hub"
    sizes = plan.pick(
        ["--train-images", "256", "--test-images", "128", "--size", "32", "--batch-size", "32",
         "--workers", "0", "--projector-dim", "256", "--probe-epochs", "5",
         "--calibration-steps", "2"],
        ["--train-images", "60000", "--test-images", "10000", "--size", "64",
         "--batch-size", "256", "--workers", "10"],
    )  # fmt: skip
    command = [
        plan.python, "bench/quality.py", "--methods", "ssole", "--device", plan.device,
        "--precision", "bf16", "--time-budget", f"{train_budget_s:.0f}", *sizes,
        "--data-root", str(plan.fashion_mnist), "--work-dir", str(plan.work / "quality"),
        "--export", str(export), "--out", str(out),
    ]  # fmt: skip

    def judge() -> tuple[dict[str, Any], list[Check]]:
        r = _read_json(out)
        rows = {row["model"].replace(" ", "_"): row for row in r["rows"]}
        folder = export / str(r["exported"])
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        figures = {
            "train_images": r["budget"]["train_images"], "epochs": r["budget"]["epochs"],
            "time_budget_s": r["budget"]["time_budget"], "train_s": rows["ssole"]["train_s"],
            "calibration": r["calibration"], "hub_folder": files,
        }  # fmt: skip
        for model in ("ssole", "raw_pixels", "random_init"):
            for key in ("knn_top1", "linear_top1", "rankme"):
                figures[f"{model}_{key}"] = rows[model][key]
        knn = rows["ssole"]["knn_top1"]
        wanted = ["README.md", "config.json", "model.safetensors"]
        card = [f for f in wanted if f in files]
        return figures, [
            at_least("SSOLE kNN top-1 (k=20, T=0.07)", knn, 90),
            at_least("SSOLE kNN - raw-pixel kNN", knn - rows["raw_pixels"]["knn_top1"], 3),
            Check("hub folder", ", ".join(wanted), ", ".join(card) or "none", card == wanted),
        ]

    what = "SSOLE ResNet-18 on Fashion-MNIST, evaluated and exported"
    return Stage("quality", what, command, timeout_s, judge)


# --- running --------------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    """End the stage's process group (servers, loader workers, torchrun's workers with it): a
    polite signal, up to 10 s for the stage to exit, then SIGKILL for whatever is left, so that
    nothing holds the GPU into the next stage."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # the stage exited and left nothing behind
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_stage(stage: Stage, env: Mapping[str, str], logs: Path) -> dict[str, Any]:
    """Run one stage within its time limit; returns its record (status ``ok``, ``failed`` or
    ``timeout``, seconds, figures, checks, and the end of its output unless it went well)."""
    log = logs / f"{stage.name}.log"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            stage.command, cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=stage.timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        _kill_group(proc)
    record: dict[str, Any] = {
        "name": stage.name, "what": stage.what, "status": status, "returncode": rc,
        "seconds": round(time.monotonic() - started, 1), "timeout_s": round(stage.timeout_s),
        "figures": {}, "checks": [],
    }  # fmt: skip
    if status == "ok":
        try:
            figures, checks = stage.judge()
            record.update(figures=figures, checks=[c.__dict__ for c in checks])
        except (OSError, KeyError, ValueError, TypeError, IndexError, ET.ParseError) as exc:
            record.update(status="failed", error=f"reading its results: {exc!r}")
    if record["status"] != "ok":
        record["log_tail"] = log.read_bytes()[-3000:].decode(errors="replace")
    return record


def machine_info(python: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Python, torch and the GPUs, asked of a child interpreter so that this process holds no
    CUDA context while the stages run."""
    probe = (
        "import json, platform, torch\n"
        "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
        "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__,"
        " 'cuda': torch.version.cuda, 'gpus': n,"
        " 'gpu_names': [torch.cuda.get_device_name(i) for i in range(n)]}))"
    )
    done = subprocess.run(
        [python, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return {**info, "platform": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count()}


def print_table(records: list[dict[str, Any]], dry_run: bool) -> None:
    """One Markdown table: a row per check (a stage without checks gets one row)."""
    if dry_run:
        print("\nDry run: toy sizes on the CPU; the targets are the GPU run's, so most are missed.")
    print("\n| stage | status | s | check | target | measured | met |")
    print("| --- | --- | ---: | --- | --- | --- | --- |")
    for r in records:
        why = r.get("reason") or r.get("error") or "-"
        checks = r["checks"] or [{"check": why, "target": "-", "measured": "-", "met": None}]
        for c in checks:
            met = {True: "yes", False: "**no**", None: "-"}[c["met"]]
            cells = [r["name"], r["status"], f"{r['seconds']:.0f}", c["check"], c["target"]]
            measured = c["measured"]
            measured = f"{measured:.4g}" if isinstance(measured, float) else str(measured)
            print("| " + " | ".join([*cells, measured, met]) + " |")


def _relative(command: list[str], work: Path) -> str:
    """A command as the JSON keeps it: no machine's paths."""
    text = " ".join(["python", *command[1:]] if command[0] == sys.executable else command)
    return text.replace(str(work), "<work-dir>").replace(str(ROOT) + "/", "")


# --- the command ----------------------------------------------------------------------------

# Per-stage time limits in seconds (GPU run, dry run); the quality stage gets what is left.
LIMITS = {
    "cuda_tests": (120, 180),
    "loss": (60, 90),
    "train_eager": (120, 180),
    "train_compile": (200, 300),
    "ddp": (120, 240),
    "extract": (90, 180),
    "serve": (150, 240),
}
STAGES = (*LIMITS, "quality")
# The quality stage's time outside training (start-up, data, baselines, calibration, evaluation,
# export), and the least training time worth running it with (GPU run, dry run).
QUALITY_OVERHEAD_S = (100, 90)
QUALITY_MIN_TRAIN_S = (60, 5)
BUILDERS: dict[str, Callable[[Plan, float], Stage | str]] = {
    "cuda_tests": cuda_tests,
    "loss": loss_stage,
    "train_eager": lambda plan, t: train_stage(plan, t, compiled=False),
    "train_compile": lambda plan, t: train_stage(plan, t, compiled=True),
    "ddp": ddp_stage,
    "extract": extract_stage,
    "serve": serve_stage,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same stages at toy sizes on the CPU")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list, in this order")
    p.add_argument("--fashion-mnist", type=Path, default=None, help="folder of its idx files")
    p.add_argument("--total-budget", type=float, default=None, help="seconds (540; dry run 900)")
    p.add_argument(
        "--quality-budget",
        type=float,
        default=None,
        help="most seconds of quality training (300; dry run 15)",
    )
    p.add_argument("--wheelhouse", type=Path, default=ROOT / ".whl")
    p.add_argument("--download-wheels", action="store_true", help="fill --wheelhouse and exit")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "gpu_check")
    p.add_argument("--out", type=Path, default=None, help="JSON (bench/results/gpu_check.json)")
    return p


def clear_results(work: Path) -> None:
    """Remove an earlier run's results from ``work`` (logs append, and a stage must not be judged
    on what it did not write); the installed wheels stay."""
    work.mkdir(parents=True, exist_ok=True)
    for name in [f"{s}.json" for s in STAGES] + ["cuda_tests.xml"]:
        (work / name).unlink(missing_ok=True)
    for folder in ("ddp", "quality", "hub", "logs"):
        shutil.rmtree(work / folder, ignore_errors=True)


def _fashion_mnist(given: Path | None) -> Path | None:
    candidates = [given] if given else FASHION_MNIST_DIRS
    return next(
        (p.resolve() for p in candidates if (p / "train-images-idx3-ubyte.gz").is_file()), None
    )


def _environment(site: Path | None) -> dict[str, str]:
    paths = [str(site)] if site else []
    paths += [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONUNBUFFERED": "1",
        NESTED: "1",
    }


def run_stages(
    plan: Plan, names: list[str], env: dict[str, str], budget: tuple[float, float]
) -> list[dict[str, Any]]:
    """Run the stages in order within ``budget`` (total seconds, most quality training seconds):
    every stage but the last leaves the quality stage its overhead and least training time."""
    total_s, quality_s = budget
    k = int(plan.dry_run)
    deadline = time.monotonic() + total_s
    keep_for_quality = QUALITY_OVERHEAD_S[k] + QUALITY_MIN_TRAIN_S[k] if "quality" in names else 0
    logs = plan.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    records = []
    for name in names:
        left = deadline - time.monotonic()
        if name == "quality":
            train_s = min(quality_s, left - QUALITY_OVERHEAD_S[k])
            timeout = left
            stage = (
                quality_stage(plan, timeout, train_s)
                if train_s >= QUALITY_MIN_TRAIN_S[k]
                else f"{left:.0f} s left"
            )
        else:
            timeout = min(LIMITS[name][k], left - keep_for_quality)
            stage = BUILDERS[name](plan, timeout) if timeout >= 15 else f"{left:.0f} s left"
        if isinstance(stage, str):
            record = {
                "name": name,
                "status": "skipped",
                "reason": stage,
                "seconds": 0.0,
                "figures": {},
                "checks": [],
            }
        else:
            print(f"==> {name}: {stage.what} (at most {stage.timeout_s:.0f} s)", flush=True)
            record = run_stage(stage, env, logs)
            record["command"] = _relative(stage.command, plan.work)
        print(
            f"    {record['status']} in {record['seconds']:.0f} s {record.get('reason', '')}",
            flush=True,
        )
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns 0 when every stage ran (targets met or not), 1 when one failed or
    timed out, 2 for bad usage (no GPU without ``--dry-run``, unknown stage, or started by one of
    its own stages)."""
    args = _parser().parse_args(argv)
    if os.environ.get(NESTED):
        print("bench/gpu_check.py does not run inside one of its own stages", file=sys.stderr)
        return 2
    if args.download_wheels:
        files = download_wheels(args.wheelhouse)
        print(
            f"{len(files)} wheels, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB "
            f"in {args.wheelhouse}"
        )
        return 0
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := sorted(set(names) - set(STAGES)):
        print(
            f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    work = args.work_dir.resolve()
    clear_results(work)
    site, wheels = None, {"wheelhouse": "none"}
    if args.wheelhouse.is_dir():
        site = work / "site"
        try:
            wheels = install_missing(args.wheelhouse, site)
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:
            wheels = {"error": repr(exc)}  # the stages that need them fail, and say why
    env = _environment(site)
    machine = machine_info(sys.executable, env)
    if not args.dry_run and machine["gpus"] == 0:
        print("no CUDA GPU here: run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    plan = Plan(args.dry_run, work, _fashion_mnist(args.fashion_mnist), machine["gpus"])
    k = int(args.dry_run)
    total = args.total_budget or (540, 900)[k]
    quality = args.quality_budget or (300, 15)[k]
    records = run_stages(plan, names, env, (total - (time.monotonic() - started), quality))
    print_table(records, args.dry_run)
    report = {
        "benchmark": "gpu_check",
        "command": _relative([sys.executable, "bench/gpu_check.py", *(argv or sys.argv[1:])], work),
        "dry_run": args.dry_run,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "fashion_mnist": None if plan.fashion_mnist is None else plan.fashion_mnist.name,
        "wheels": wheels,
        "budget_s": total,
        "wall_s": round(time.monotonic() - started, 1),
        "stages": records,
    }
    out = args.out or ROOT / "bench" / "results" / (
        "gpu_check_dry_run.json" if args.dry_run else "gpu_check.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{report['wall_s']:.0f} s in all; wrote {out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
