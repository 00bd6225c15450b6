"""Running one stage: a subprocess in its own process group, within its time limit, its output in
a log file; and what machine the stages run on."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.gpu_stages.stage import ROOT, Stage


def kill_group(proc: subprocess.Popen) -> None:
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


def run_command(
    command: list[str], env: Mapping[str, str], log: Path, timeout_s: float
) -> tuple[str, int | None]:
    """Run a stage's command from the repository root in a process group of its own, its output
    in ``log``, within ``timeout_s``; then end whatever it left running. Returns its status
    (``ok``, ``failed`` or ``timeout``) and exit status (None after a time-out)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        kill_group(proc)
    return status, rc


def run_stage(stage: Stage, env: Mapping[str, str], logs: Path) -> dict[str, Any]:
    """Run one stage within its time limit (:func:`run_command`); returns its record (status
    ``ok``, ``failed`` or ``timeout``, seconds, figures, checks, and the end of its output unless
    it went well)."""
    log = logs / f"{stage.name}.log"
    started = time.monotonic()
    status, rc = run_command(stage.command, env, log, stage.timeout_s)
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
