"""What a stage of the GPU check is: its command and checks (:class:`Stage`, :class:`Check`), where
and at which sizes it runs (:class:`Plan`), and the helpers its ``judge`` uses."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the stages run from there."""


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
        """``cpu`` in the dry run, ``cuda`` on the GPU."""
        return "cpu" if self.dry_run else "cuda"

    def out(self, name: str) -> Path:
        """Where a stage's benchmark writes its JSON."""
        return self.work / f"{name}.json"

    def pick(self, toy: Any, full: Any) -> Any:
        """``toy`` in the dry run, ``full`` on the GPU."""
        return toy if self.dry_run else full


FASHION_MNIST_MISSING = "Fashion-MNIST not found (--fashion-mnist PATH, or make gpu-data)"
"""Why a stage that trains on Fashion-MNIST cannot run."""


def read_json(path: Path) -> dict[str, Any]:
    """A benchmark's JSON output."""
    return json.loads(path.read_text())


def rounded(x: float | None, digits: int = 3) -> float | None:
    """``x`` rounded for the report (``None`` stays ``None``)."""
    return None if x is None else round(float(x), digits)


def at_least(check: str, measured: float, bound: float, unit: str = "") -> Check:
    """A check that ``measured`` reaches ``bound``."""
    return Check(check, f">= {bound:g}{unit}", rounded(measured), measured >= bound)


def below(check: str, measured: float, bound: float) -> Check:
    """A check that ``measured`` stays under ``bound``."""
    return Check(check, f"< {bound:g}", rounded(measured), measured < bound)
