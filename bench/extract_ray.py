"""The Ray engine against the plain engine on the same webdataset tars, side by side in one run.

The input is real JPEGs of mixed sizes (:func:`bench.extract.write_jpegs`) in ``--tars``
webdataset tars. Each repeat, interleaved:

- **plain**: :func:`ssole_hub.extract_dataset` on the tars, with no Ray running (its idle
  daemons would slow the plain engine down), then on a **small** input (one tar of ``--small``
  images): the engine's fixed cost (decoding workers starting, the manifest, ...);
- **Ray**: a local Ray instance is started with every core (timed apart, as ``ray start``),
  then ``--engine ray`` on the small input (its fixed cost: actors starting, each importing torch
  and timm and loading the model) and on the tars, as a job on a running cluster would; then Ray
  is shut down.

Reported, from the medians: images/s end to end, the fixed cost, and the rate after it
(``(images - small) / (time - small input's time)``), each engine against the plain one. Weights
are random (``pretrained=False``): throughput does not depend on them. The load average before
and after, and the CPU model and flags, go in the JSON.

    python bench/extract_ray.py [--model ssole_resnet18] [--images 1440] [--tars 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.extract import write_jpegs, write_tars
from bench.machine import load_average, machine_record, write_result
from ssole_hub import extract_dataset, load_model

RUNS = ("plain", "plain_small", "ray_start", "ray_small", "ray")


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def one_repeat(model: torch.nn.Module, inputs: dict[str, str], out: Path, batch: int) -> dict:
    """One interleaved round of the five timings (seconds); see the module docstring."""
    import ray

    def extract(source: str, engine: str = "plain") -> Callable[[], object]:
        def run() -> None:
            folder = out / f"{source}-{engine}-{time.monotonic_ns()}"
            manifest = extract_dataset(
                model,
                inputs[source],
                folder,
                engine=engine,
                batch_size=batch,
                progress=False,
            )
            assert manifest["num_errors"] == 0 and manifest["num_embedded"] > 0, manifest

        return run

    cores = len(os.sched_getaffinity(0))
    seconds = {
        "plain": timed(extract("tars")),
        "plain_small": timed(extract("small")),
        "ray_start": timed(
            lambda: ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ),
    }
    try:
        seconds["ray_small"] = timed(extract("small", "ray"))
        seconds["ray"] = timed(extract("tars", "ray"))
    finally:
        ray.shutdown()
    return seconds


def summary(seconds: dict[str, list[float]], images: int, small: int) -> dict[str, dict]:
    """Per engine, from the medians: end-to-end time and rate, the fixed cost, the rate after it,
    and the rates' ratios to the plain engine's. ``ray_with_start`` adds starting Ray."""
    median = {k: statistics.median(v) for k, v in seconds.items()}
    runs = {
        "plain": (median["plain"], median["plain_small"]),
        "ray": (median["ray"], median["ray_small"]),
        "ray_with_start": (median["ray"] + median["ray_start"],
                           median["ray_small"] + median["ray_start"]),
    }  # fmt: skip
    rows = {}
    for engine, (total, fixed) in runs.items():
        rows[engine] = {
            "seconds": total,
            "images_per_s": images / total,
            "fixed_cost_s": fixed,
            "images_per_s_after_start": (images - small) / (total - fixed),
        }
    for row in rows.values():
        for key in ("images_per_s", "images_per_s_after_start"):
            row[f"{key}_vs_plain"] = row[key] / rows["plain"][key]
    return rows


def print_table(rows: dict[str, dict], args: argparse.Namespace) -> None:
    labels = {
        "plain": "plain engine",
        "ray": "Ray engine (Ray running)",
        "ray_with_start": "Ray engine + starting Ray",
    }
    print(f"\n{args.images} JPEGs in {args.tars} tars, {args.model}, batch {args.batch_size}")
    print("| engine | images/s | vs plain | fixed cost s | images/s after it | vs plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key, label in labels.items():
        r = rows[key]
        print(
            f"| {label} | {r['images_per_s']:.1f} | {r['images_per_s_vs_plain']:.2f} | "
            f"{r['fixed_cost_s']:.1f} | {r['images_per_s_after_start']:.1f} | "
            f"{r['images_per_s_after_start_vs_plain']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ssole_resnet18")
    parser.add_argument("--images", type=int, default=1440)
    parser.add_argument("--tars", type=int, default=4)
    parser.add_argument("--small", type=int, default=8, help="images in the fixed-cost run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    default_out = Path(__file__).parent / "results" / "extract_ray.json"
    parser.add_argument("--out", default=str(default_out))
    args = parser.parse_args()
    machine = machine_record()
    print(f"load average before: {machine['load_average_before']}", flush=True)
    model = load_model(args.model, pretrained=False)
    seconds: dict[str, list[float]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "small").mkdir()
        paths = write_jpegs(root / "images", args.images)
        inputs = {
            "tars": write_tars(root, paths, args.tars),
            "small": write_tars(root / "small", paths[: args.small], 1),
        }
        for rep in range(args.repeats):
            for name, value in one_repeat(model, inputs, root, args.batch_size).items():
                seconds[name].append(value)
            print(
                f"repeat {rep + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()),
                flush=True,
            )
    machine["load_average_after"] = load_average()
    rows = summary(seconds, args.images, args.small)
    print_table(rows, args)
    print(f"load average before {machine['load_average_before']}, after {load_average()}")
    result = {
        "benchmark": "extract_ray",
        "command": "python bench/extract_ray.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        "ray": __import__("ray").__version__,
        "model": args.model,
        "images": args.images,
        "tars": args.tars,
        "small": args.small,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds": seconds,
        "engines": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
