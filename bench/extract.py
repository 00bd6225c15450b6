"""Throughput of ``extract`` against the model-only bound, measured side by side in one run.

The dataset is real JPEGs of mixed sizes (scikit-image's photos at several scales). Two things are
timed, interleaved, ``--repeats`` times each:

- **bound**: the same images already decoded and preprocessed into batch tensors, through the
  same :class:`~ssole_hub.FeatureExtractor` forward pass (``embed_tensor``): what the model alone
  can do;
- **extract**: :func:`ssole_hub.extract_dataset` from the JPEG files to shards on disk
  (DataLoader decoding workers, sharded writes, manifest; fresh output folder each time);
- **extract --fast-decode**: the same with reduced-scale JPEG decoding (opt-in);
- **decode**: decoding and preprocessing alone, in one thread (``FeatureExtractor.preprocess``);
- with ``--compare-decoding``, **extract --decode-on-device on**: JPEGs decoded in each batch on
  the model's device (nvjpeg on a GPU; torchvision's decoder on a CPU).

The figures that matter are the ratios of the medians to the bound, in wall-clock time and in CPU
time (this process plus its decoding workers; a busy shared machine cannot inflate it). On a CPU,
decoding and the forward pass share the cores, so extraction cannot reach the bound: its ceiling
is ``forward / (forward + decode / cores)`` (all cores busy all the time), printed beside the
ratio. Weights are random (``pretrained=False``): throughput does not depend on them, and nothing
is downloaded. The load average before and after, and the CPU model and flags, go in the JSON.

The Ray engine against the plain one: ``bench/extract_ray.py``.

    python bench/extract.py [--model ssole_resnet18] [--images 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import load_average, machine_record, write_result
from ssole_hub import FeatureExtractor, extract_dataset, load_model

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "cat")
SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)


def write_jpegs(folder: Path, n: int) -> list[Path]:
    """``n`` real JPEGs cycling through the photos and scales (e.g. 150 x 225 to 2000 x 1744)."""
    from skimage import data

    photos = [Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB") for name in PHOTOS]
    paths = []
    for i in range(n):
        img = photos[i % len(photos)]
        scale = SCALES[(i // len(photos)) % len(SCALES)]
        size = (round(img.width * scale), round(img.height * scale))
        path = folder / f"img{i:05d}.jpg"
        img.resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def write_tars(folder: Path, paths: list[Path], count: int) -> str:
    """The JPEGs as ``count`` webdataset tars (``<key>.jpg`` members); returns their brace
    pattern."""
    for n in range(count):
        with tarfile.open(folder / f"data-{n:03d}.tar", "w") as tar:
            for path in paths[n::count]:
                tar.add(path, arcname=path.name)
    return str(folder / f"data-{{000..{count - 1:03d}}}.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ssole_resnet18")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="default: extract's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--compare-decoding",
        action="store_true",
        help="also extract with JPEGs decoded on the model's device (--decode-on-device on)",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "extract.json"))
    args = parser.parse_args()
    machine = machine_record()
    print(f"load average before: {machine['load_average_before']}", flush=True)

    model = load_model(args.model, pretrained=False)
    fx = FeatureExtractor(model, model_id=args.model, device=args.device)
    # Same weights, opt-in reduced-scale JPEG decoding (``--fast-decode``).
    fx_fast = FeatureExtractor(model, model_id=args.model, device=args.device, fast_decode=True)
    fx_device = (
        FeatureExtractor(model, model_id=args.model, device=args.device, device_decode=True)
        if args.compare_decoding
        else None
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        paths = write_jpegs(images, args.images)
        sizes = [Image.open(p).size for p in paths]
        batches = [
            fx.preprocess(paths[i : i + args.batch_size])
            for i in range(0, len(paths), args.batch_size)
        ]
        fx.warmup(args.batch_size)

        def cpu_seconds() -> float:
            # This process and its reaped children (the DataLoader workers): CPU time is what a
            # busy shared machine cannot steal, so it backs up the wall-clock ratio.
            own = resource.getrusage(resource.RUSAGE_SELF)
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

        def bound() -> float:
            if fx.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in batches:
                fx.embed_tensor(batch)  # returns on the CPU, so the GPU work is finished
            return time.perf_counter() - start

        def extract(rep: int, extractor: FeatureExtractor, name: str) -> float:
            start = time.perf_counter()
            manifest = extract_dataset(
                extractor,
                images,
                root / f"{name}{rep}",
                batch_size=args.batch_size,
                num_workers=args.workers,
                progress=False,
            )
            elapsed = time.perf_counter() - start
            assert manifest["num_embedded"] == len(paths), manifest
            return elapsed

        def decode(rep: int) -> float:
            start = time.perf_counter()
            fx.preprocess(paths)
            return time.perf_counter() - start

        runs = {
            "bound": lambda rep: bound(),
            "decode": decode,
            "extract": lambda rep: extract(rep, fx, "exact"),
            "extract_fast": lambda rep: extract(rep, fx_fast, "fast"),
        }
        if fx_device is not None:
            runs["extract_device"] = lambda rep: extract(rep, fx_device, "device")
        times: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for rep in range(args.repeats):
            for name, run in runs.items():
                before = cpu_seconds()
                times[name].append(run(rep))
                cpu[name].append(cpu_seconds() - before)
            print(
                f"repeat {rep + 1}/{args.repeats}: "
                + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in runs)
            )

    machine["load_average_after"] = load_average()
    rate = {k: len(paths) / statistics.median(v) for k, v in times.items()}
    cores = 1 if fx.device.type == "cuda" else len(os.sched_getaffinity(0))
    forward_s, decode_s = (statistics.median(times[k]) for k in ("bound", "decode"))
    # All cores busy all the time: the forward pass's time plus the decode work spread over them.
    ceiling = forward_s / (forward_s + decode_s / cores) if fx.device.type == "cpu" else 1.0
    ratio = {k: rate[k] / rate["bound"] for k in runs}
    cpu_ms = {k: 1e3 * statistics.median(v) / len(paths) for k, v in cpu.items()}
    cpu_ratio = {k: cpu_ms["bound"] / cpu_ms[k] for k in runs}
    pixels = [w * h for w, h in sizes]
    print()
    print(f"{args.images} JPEGs, {min(pixels) / 1e6:.2f}-{max(pixels) / 1e6:.2f} MP, {fx}")
    labels = {
        "bound": "model only (pre-decoded tensors)",
        "extract": "extract (JPEG files -> shards)",
        "extract_fast": "extract --fast-decode",
        "extract_device": "extract --decode-on-device on",
        "decode": "decode + preprocess only, 1 thread",
    }
    labels = {k: v for k, v in labels.items() if k in runs}
    print(f"| {'pipeline':<34} | images/s | ratio | CPU ms/image | CPU ratio |")
    print(f"| {'-' * 34} | -------: | ----: | -----------: | --------: |")
    for key, label in labels.items():
        print(
            f"| {label:<34} | {rate[key]:>8.1f} | {ratio[key]:>5.2f} | {cpu_ms[key]:>12.0f} "
            f"| {cpu_ratio[key]:>9.2f} |"
        )
    print(
        f"\nceiling of extract / bound on {cores} CPU cores: forward / (forward + decode / cores)"
        f" = {ceiling:.2f}; extract reaches {ratio['extract'] / ceiling:.2f} of it"
    )
    print(f"load average before {machine['load_average_before']}, after {load_average()}")

    result = {
        "benchmark": "extract",
        "command": "python bench/extract.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        "device": str(fx.device),
        "cuda": torch.cuda.get_device_name() if fx.device.type == "cuda" else None,
        "model": args.model,
        "dtype": str(fx.dtype),
        "images": args.images,
        "megapixels": [min(pixels) / 1e6, max(pixels) / 1e6],
        "batch_size": args.batch_size,
        "workers": args.workers,
        "repeats": args.repeats,
        "seconds": times,
        "cpu_seconds": cpu,
        "images_per_s": rate,
        "ratio_to_bound": ratio,
        "cpu_ms_per_image": cpu_ms,
        "cpu_ratio_to_bound": cpu_ratio,
        "ceiling_ratio_to_bound": ceiling,
        "extract_vs_ceiling": ratio["extract"] / ceiling,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
