"""Reporting the GPU check: the table it prints and the commands as its JSON keeps them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.gpu_stages.stage import ROOT


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


def relative_command(command: list[str], work: Path) -> str:
    """A command as the JSON keeps it: no machine's paths."""
    text = " ".join(["python", *command[1:]] if command[0] == sys.executable else command)
    return text.replace(str(work), "<work-dir>").replace(str(ROOT) + "/", "")
