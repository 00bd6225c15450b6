"""The `make demo` pipeline at a reduced size: train -> evaluate -> export -> serve, and the printed
examples run against a real server on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from training.demo import REPO_ROOT, run_demo

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"server not ready at {url} after {timeout} s")


def test_demo_pipeline_serves_and_its_printed_examples_return_embeddings(tmp_path: Path) -> None:
    port = _free_port()
    out = tmp_path / "demo"
    model_dir, commands = run_demo(
        out,
        port=port,
        eval_limit=200,
        overrides=["epochs=1", "data.max_images=128", "knn.every_epochs=0"],
    )

    results = json.loads((out / "eval.json").read_text())
    knn = results["protocols"]["knn"]["top1"]
    assert 0 < knn <= 100 and 0 < results["random_init_knn_top1"] <= 100
    assert {p.name for p in model_dir.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "projector.safetensors",
        "ssole.json",
        "README.md",
    }
    assert (out / "examples.sh").read_text().count("\n") >= len(commands)

    # A second run reuses the checkpoint instead of training again.
    checkpoint = out / "run" / "final.pt"
    mtime = checkpoint.stat().st_mtime_ns
    run_demo(out, port=port, eval_limit=50)
    assert checkpoint.stat().st_mtime_ns == mtime

    server = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", f"local-dir:{model_dir}", "--port", str(port)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ready", server)
        outputs = [
            subprocess.run(
                ["bash", "-c", c], capture_output=True, text=True, timeout=300, check=True
            ).stdout
            for c in commands
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)
    curl_upload, curl_json, timm_out, hub_out = outputs
    for body in (curl_upload, curl_json):
        assert body.startswith(
            '{"object":"list","data":[{"object":"embedding","index":0,"embedding":['
        )
    assert "timm features (1, 512)" in timm_out
    assert "torch.hub features (1, 512)" in hub_out
