"""The import graph keeps the layout the contracts in ``pyproject.toml`` state, checked by the real
``lint-imports`` (import-linter): layers inside ``ssole_hub``, no cycles, the two extraction
engines independent, the library apart from the applications."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages under ``root``, with ``root``'s ``pyproject.toml``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_the_checkout_keeps_every_import_contract():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.fixture
def copy_of_the_packages(tmp_path: Path) -> Path:
    for package in ("ssole_hub", "training", "server"):
        shutil.copytree(
            REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the ground importing a higher layer
        ("ssole_hub/models.py", "from ssole_hub.hub import load", "ssole_hub.models is not allowed to import ssole_hub.hub"),
        # a cycle inside one layer: the folder format importing the exporter built on it
        ("ssole_hub/hub/folder.py", "from ssole_hub.hub import export", "No cycles are allowed in ssole_hub.hub"),
        # one engine importing the other
        ("ssole_hub/extract/plain.py", "from ssole_hub.extract import ray", "ssole_hub.extract.plain is not allowed to import ssole_hub.extract.ray"),
        # the library importing an application
        ("ssole_hub/loss.py", "import server.settings", "ssole_hub is not allowed to import server"),
    ],
)  # fmt: skip
def test_an_import_that_breaks_a_contract_fails_the_check(
    copy_of_the_packages, module, line, broken
):
    target = copy_of_the_packages / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    done = lint_imports(copy_of_the_packages)
    assert done.returncode != 0
    assert broken in done.stdout, done.stdout
