"""One run per run directory: a new run refuses an occupied one, --overwrite replaces it, and
--resume continues only its own run's checkpoints. Ctrl-C says how to resume."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from training import pretrain
from training.pretrain import RunDirectoryError

REPO = Path(__file__).resolve().parents[2]
SHORT = ["max_steps=2", "checkpoint_every_steps=1", "data.max_images=64"]

pytestmark = pytest.mark.slow


def _steps_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["event"] == "train"]


def test_a_second_run_into_an_occupied_run_dir_refuses_and_changes_nothing(tiny_config):
    first = pretrain.run(tiny_config(*SHORT, "run_name=shared"))
    run_dir = first.parent.parent
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    with pytest.raises(RunDirectoryError) as info:
        pretrain.run(tiny_config(*SHORT, "run_name=shared", "method=vicreg"))
    message = str(info.value)
    for hint in ("--resume", "run_name=", "--overwrite", str(run_dir)):
        assert hint in message, message
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


def test_overwrite_replaces_the_earlier_run_and_keeps_other_files(tiny_config):
    first = pretrain.run(tiny_config("max_steps=3", "checkpoint_every_steps=1", "run_name=r"))
    run_dir = first.parent.parent
    (run_dir / "notes.txt").write_text("mine")
    second = pretrain.run(tiny_config(*SHORT, "run_name=r", "method=vicreg"), overwrite=True)

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000001.pt",
        "step_00000002.pt",
    ]
    assert torch.load(second, weights_only=True)["metadata"]["method"] == "vicreg"
    assert "method: vicreg" in (run_dir / "config.yaml").read_text()
    assert _steps_logged(run_dir) == [1, 2]  # the first run's log is gone, not appended to
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_overwrite_and_resume_together_are_refused(tiny_config):
    with pytest.raises(ValueError, match="overwrite and resume"):
        pretrain.run(tiny_config("resume=latest"), overwrite=True)


def test_resume_continues_only_its_own_runs_checkpoints(tiny_config):
    # Two runs side by side; the newer, longer one must not leak into the other's resume.
    pretrain.run(tiny_config("max_steps=2", "checkpoint_every_steps=1", "run_name=a"))
    pretrain.run(tiny_config("max_steps=5", "checkpoint_every_steps=1", "run_name=b"))
    resumed = pretrain.run(
        tiny_config("max_steps=3", "checkpoint_every_steps=1", "run_name=a", "resume=latest")
    )
    assert resumed.parent.parent.name == "a"
    assert torch.load(resumed, weights_only=True)["global_step"] == 3
    assert _steps_logged(resumed.parent.parent) == [1, 2, 3]


def test_resume_refuses_a_checkpoint_another_method_wrote(tiny_config):
    done = pretrain.run(tiny_config(*SHORT, "run_name=ssole_run"))
    with pytest.raises(RunDirectoryError, match=r"method 'ssole'.*'vicreg'"):
        pretrain.run(
            tiny_config("max_steps=3", "run_name=vicreg_run", "method=vicreg", f"resume={done}")
        )


def test_ctrl_c_prints_how_to_resume_instead_of_a_traceback(tmp_path, zygote):
    """The run is a child of the zygote (``tests/zygote.py``) with SIGINT as a terminal's Ctrl-C
    meets it: a suite started in the background by a non-interactive shell (``cmd &``) ignores
    SIGINT, its children inherit that, and Python then never turns SIGINT into
    KeyboardInterrupt."""
    args = [
        "--config", "training/configs/digits_demo.yaml", f"output_dir={tmp_path}", "run_name=cut",
        "checkpoint_every_steps=1", "data.num_workers=0", "knn.at_start=false",
        "knn.every_epochs=0", "device=cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "stderr.log"
    proc = zygote.start(
        "module", "training.pretrain", args, REPO, env, stderr=log, sigint_default=True
    )
    checkpoints = tmp_path / "cut" / "checkpoints"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(checkpoints.glob("step_*.pt")):  # older ones are pruned: any step will do
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 130, text
    assert "Traceback" not in text, text
    assert "interrupted; the newest checkpoint is" in text
    assert "--resume" in text and "run_name=cut" in text
