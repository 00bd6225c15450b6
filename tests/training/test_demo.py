"""The `make demo` pipeline at a reduced size: train -> evaluate -> export -> serve, and the printed
examples run against a real server on loopback; the raw-pixel baseline it prints beside SSOLE is
checked against an independent kNN on the same split."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ssole_hub.preprocessing import resolve_preprocessing
from training.data import labelled_splits
from training.demo import REPO_ROOT, RawPixels, demo_verdict, raw_pixel_knn_top1, run_demo


def independent_pixel_knn(dataset: str, limit: int | None = None) -> float:
    """DINO's weighted kNN (k=20, T=0.07, cosine) written again in numpy on the dataset's stored
    pixels, on the split of :func:`training.data.labelled_splits` and, with ``limit``, the evenly
    spaced subsets that evaluation takes."""
    train, test = labelled_splits(dataset)

    def features(ds) -> tuple[np.ndarray, np.ndarray]:
        n = len(ds.images)
        keep = (
            np.arange(n)
            if limit is None or limit >= n
            else np.floor(np.arange(limit) * (n / limit))
        )
        x = ds.images[keep.astype(int)].reshape(len(keep), -1).astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True), ds.labels[keep.astype(int)]

    (xa, ya), (xb, yb) = features(train), features(test)
    sim = xb @ xa.T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :20]
    weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / 0.07)
    votes = np.stack([(weights * (ya[nearest] == c)).sum(1) for c in range(ya.max() + 1)], 1)
    return float(100 * (votes.argmax(1) == yb).mean())


def test_raw_pixel_features_are_the_stored_pixels_flattened():
    train, _ = labelled_splits("digits")
    image, _ = train[0]
    model = RawPixels(*image.size[::-1])
    x = resolve_preprocessing(model).transform(image)
    expected = np.asarray(image, dtype=np.float32).transpose(2, 0, 1).reshape(-1) / 255
    np.testing.assert_allclose(model(x.unsqueeze(0))[0].numpy(), expected, atol=1e-6)


def test_raw_pixel_baseline_matches_an_independent_knn_on_the_same_split():
    assert raw_pixel_knn_top1("digits") == pytest.approx(independent_pixel_knn("digits"), abs=1e-3)


@pytest.mark.parametrize(
    ("ssole", "word"), [(60.0, "12.0 points below"), (80.0, "8.0 points above")]
)
def test_the_verdict_says_where_the_model_stands_against_raw_pixels(ssole, word):
    sentence = demo_verdict("digits", {"ssole": ssole, "raw_pixels": 72.0})
    assert f"{word} raw pixels on digits" in sentence
    assert "not a good model" in sentence and "Pre-training on your own images" in sentence


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc, stderr: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {stderr.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"server not ready at {url} after {timeout} s")


def _run_example(command: str, zygote) -> str:
    """Run one printed example as printed: a ``python -c CODE`` line in a child of the zygote
    (``tests/zygote.py``, which runs it as a new interpreter would), the rest in ``bash``;
    returns its stdout."""
    words = shlex.split(command)
    if len(words) == 3 and words[:2] == [sys.executable, "-c"]:
        done = zygote.run("code", words[2], [], Path.cwd(), dict(os.environ), timeout=300)
    else:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (command, done.stderr[-3000:])
    return done.stdout


@pytest.mark.slow
def test_demo_pipeline_serves_and_its_printed_examples_return_embeddings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], zygote
) -> None:
    port = _free_port()
    out = tmp_path / "demo"
    model_dir, commands = run_demo(
        out,
        port=port,
        eval_limit=200,
        overrides=["epochs=1", "data.max_images=64", "knn.every_epochs=0"],
    )

    results = json.loads((out / "eval.json").read_text())
    knn = results["protocols"]["knn"]["top1"]
    assert 0 < knn <= 100 and 0 < results["random_init_knn_top1"] <= 100
    raw = results["raw_pixels_knn_top1"]
    assert raw == pytest.approx(independent_pixel_knn("digits", limit=200), abs=1e-3)
    printed = capsys.readouterr().out
    assert (
        f"kNN top-1 on digits: SSOLE {knn:.1f}%  random init {results['random_init_knn_top1']:.1f}%"
        f"  raw pixels {raw:.1f}%"
    ) in printed
    assert demo_verdict("digits", {"ssole": knn, "raw_pixels": raw}) in printed
    assert "raw_pixels_knn_top1" in (model_dir / "README.md").read_text()  # the card shows it too
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

    # the server and the examples: children of the zygote (tests/zygote.py)
    args, stderr = ["--model", f"local-dir:{model_dir}", "--port", str(port)], tmp_path / "err"
    server = zygote.start("module", "server", args, REPO_ROOT, dict(os.environ), stderr=stderr)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ready", server, stderr)
        outputs = [_run_example(c, zygote) for c in commands]
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


def test_demo_with_its_port_taken_stops_before_training(tmp_path: Path, zygote) -> None:
    """`make demo` used to train, evaluate and export for minutes and only then die on
    `address already in use`: the port is now checked first, and the error says how out. (The
    demo runs in a child of the zygote, ``tests/zygote.py``.)"""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = ["--out", str(tmp_path / "demo"), "--port", str(port)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        done = zygote.run("module", "training.demo", args, REPO_ROOT, env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"127.0.0.1:{port} is already in use" in done.stderr
    assert "make demo PORT=" in done.stderr and "Nothing was trained" in done.stderr
    assert not (tmp_path / "demo").exists()
