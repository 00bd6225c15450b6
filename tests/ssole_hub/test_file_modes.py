"""Exported folders and checkpoints get the modes the umask gives ordinary files, so that other
users (a container running as uid 10001, a colleague) can read them."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ssole_hub import export_hub_folder
from ssole_hub.file_modes import current_umask
from training.checkpointing import save_atomic


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_exported_folder_has_the_umask_modes(checkpoint_path, tmp_path, umask):
    out = export_hub_folder(checkpoint_path, tmp_path / "exported" / "model")
    assert _mode(out) == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "README.md"}
    for path in files:
        assert _mode(path) == 0o666 & ~umask, path


def test_training_checkpoint_has_the_umask_mode(tmp_path, umask):
    path = save_atomic({"step": torch.tensor(3)}, tmp_path / "checkpoints" / "step_3.pt")
    assert _mode(path) == 0o666 & ~umask
    assert torch.load(path, weights_only=True)["step"] == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_another_user_can_read_an_export(checkpoint_path):
    old = os.umask(0o022)
    base = Path(tempfile.mkdtemp(prefix="ssole-modes-"))  # under /tmp, which anyone can enter
    try:
        os.chmod(base, 0o755)  # mkdtemp's own 0700 is not what is being tested
        weights = export_hub_folder(checkpoint_path, base / "model") / "model.safetensors"
        read = subprocess.run(
            ["cat", str(weights)], user=65534, group=65534, capture_output=True, timeout=60
        )
        assert read.returncode == 0, read.stderr
        assert read.stdout == weights.read_bytes()
    finally:
        os.umask(old)
        shutil.rmtree(base, ignore_errors=True)
