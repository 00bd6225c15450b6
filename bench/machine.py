"""What a benchmark records about the machine it ran on: CPU model and flags, cores, load.

Every benchmark stores :func:`machine_record` before its runs and :func:`load_average` after,
so a reader can tell whether the machine was idle while it measured, and writes its JSON with
:func:`write_result`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (``uptime``)."""
    return [round(x, 2) for x in os.getloadavg()]


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def machine_record() -> dict[str, Any]:
    """CPU model and flags, core count, Python / torch versions, the date and the load now."""
    import torch

    cpu = _lscpu()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu.get("Model name") or platform.processor(),
        "cpu_flags": cpu.get("Flags", "").split(),
        "cpu_count": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_before": load_average(),
    }


def write_result(out: str | Path, record: dict[str, Any]) -> None:
    """Write a benchmark's JSON record to ``out`` (creating its folder) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwrote {out}")
