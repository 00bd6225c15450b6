"""The server's start-up choice of batch size, start after start: how stable is it?

At start-up ``python -m server`` times its forward pass at batch sizes 1, 2, 4, ... up to
``--max-batch-size`` and aims its batches at the largest size within 5% of the cheapest
(:func:`server.batcher.efficient_batch`). This starts the server ``--starts`` times, one at a
time, on the same model and reads each start's choice and timings from ``/v1/models``: a
table of each size's time relative to that start's cheapest, and how often each size was chosen.
Load average before and after, and the CPU model and flags, go into the JSON.

    python bench/batch_pick.py                      # random-weight ssole_resnet18, torch, 8 starts
    python bench/batch_pick.py --backend onnx-bf16 --starts 4
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import load_average, machine_record, write_result  # noqa: E402
from bench.serve import (  # noqa: E402
    BACKENDS,
    export_onnx_files,
    free_port,
    photo_jpegs,
    random_model_folder,
    start,
    stop,
)


def one_start(model: str, backend: str, max_batch: int) -> dict:
    """Start the server once, read its card, stop it: the chosen size and the timings."""
    import httpx

    port = free_port()
    cmd = [
        sys.executable, "-m", "server", "--model", model, "--port", str(port),
        "--device", "cpu", "--backend", backend, "--max-batch-size", str(max_batch),
        "--log-level", "warning",
    ]  # fmt: skip
    proc = start(cmd, port)
    try:
        card = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]
    finally:
        stop(proc)
    timings = {int(n): ms for n, ms in card["batch_timings"].items()}
    return {"batch_size": card["batch_size"], "backend": card["backend"], "ms_per_image": timings}


def print_table(starts: list[dict]) -> None:
    """Each start's times relative to its cheapest size, its cheapest and its choice."""
    sizes = sorted(starts[0]["ms_per_image"])
    print("| start | " + " | ".join(f"{n}" for n in sizes) + " | cheapest | chosen |")
    print("| ---: " * (len(sizes) + 3) + "|")
    for i, s in enumerate(starts, 1):
        ms = s["ms_per_image"]
        least = min(ms.values())
        cells = " | ".join(f"{ms[n] / least:.3f}" for n in sizes)
        print(f"| {i} | {cells} | {min(ms, key=ms.__getitem__)} | {s['batch_size']} |")
    print("chosen:", dict(collections.Counter(s["batch_size"] for s in starts)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model spec (default: random ssole_resnet18)")
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--starts", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "batch_pick.json"))
    args = p.parse_args(argv)
    if args.starts < 1:
        p.error(f"--starts must be at least 1, got {args.starts}")
    machine = machine_record()
    print(f"load average before: {machine['load_average_before']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_model_folder(Path(tmp), 224)
        if args.backend != "torch" and args.model is None:  # auto times the ONNX files too
            export_onnx_files(model, photo_jpegs(), Path(tmp))
        starts = []
        for i in range(args.starts):
            starts.append(one_start(model, args.backend, args.max_batch_size))
            print(f"start {i + 1}/{args.starts}: batches of {starts[-1]['batch_size']}", flush=True)
    print_table(starts)
    machine["load_average_after"] = load_average()
    print(f"load average before {machine['load_average_before']}, "
          f"after {machine['load_average_after']}")  # fmt: skip
    record = {
        "benchmark": "batch_pick",
        "command": "python bench/batch_pick.py " + " ".join(argv if argv else sys.argv[1:]),
        "machine": machine,
        "settings": vars(args),
        "starts": starts,
    }
    write_result(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
