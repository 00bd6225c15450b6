"""The decoding guards on photos the tests never use: reduced-DCT JPEG decoding, and JPEG
decoding on the model's device, each against full CPU decoding.

The guards (:mod:`ssole_hub.hub.decode_check`) turn a faster decoding on only where a model's
embeddings of real photos keep their cosine and their nearest neighbours. At export and at load
they are measured on scikit-image's six guard photos, which the test suite also uses. This
benchmark measures them on 13 other real images: scikit-image's cat, clock, coins,
immunohistochemistry, retina, motorcycle (left), moon, brick, grass, gravel and page, and
scikit-learn's china and flower photos, as JPEGs whose shorter side is 2 or 4 times the model's
resize size (so that libjpeg reduces them at 1/2 and 1/4). Models: random-weight
``ssole_resnet18`` and ``ssole_resnet50`` at 224 px, as the serving benchmarks use (no weights
can be downloaded here), and optionally a hub folder (``--model``).

Device decoding runs here on the CPU (torchvision's decoder and resampling, the code path a GPU
runs with nvjpeg). Prints a table and writes JSON with the machine and load average.

    python bench/decode_guard.py [--model local-dir:PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import load_average, machine_record, write_result
from ssole_hub import FeatureExtractor, load_model
from ssole_hub.hub.decode_check import (
    check_device_decoding,
    check_reduced_decoding,
    resize_side,
    scaled_jpegs,
)

SKIMAGE_OTHERS = ("cat", "clock", "coins", "immunohistochemistry", "retina", "stereo_motorcycle",
                  "moon", "brick", "grass", "gravel", "page")  # fmt: skip
"""scikit-image images the tests never use (the tests use the guard's six photos)."""


def other_photos() -> list[Image.Image]:
    """The 13 real images of the module docstring, as RGB PIL images."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = []
    for name in SKIMAGE_OTHERS:
        arr = getattr(data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr  # the stereo pair's left image
        photos.append(Image.fromarray(np.asarray(arr)).convert("RGB"))
    photos += [Image.fromarray(img) for img in load_sample_images().images]
    return photos


def measure(name: str, fx: FeatureExtractor, photos: list[Image.Image]) -> list[dict]:
    """Both guards' figures for one extractor on ``photos``."""
    side = resize_side(fx.data_config)
    jpegs = scaled_jpegs(photos, side)
    embed = fx.embed_tensor
    reduced = check_reduced_decoding(embed, fx.transform, side, jpegs).to_dict()
    device = FeatureExtractor(fx.model, device="cpu", device_decode=True)
    on_device = check_device_decoding(embed, fx.transform, device.device_decoder, side, jpegs)
    return [{"model": name, "decoding": "reduced DCT scale", **reduced},
            {"model": name, "decoding": "on the device (torchvision)", **on_device}]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="also this model (repeatable)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_guard.json"))
    args = p.parse_args(argv)
    machine = machine_record()
    print(f"load average before: {machine['load_average_before']}", flush=True)
    photos = other_photos()
    rows = []
    torch.manual_seed(0)
    for arch in ("ssole_resnet18", "ssole_resnet50"):
        model = load_model(arch, pretrained=False)
        rows += measure(f"{arch} (random weights)", FeatureExtractor(model), photos)
    for spec in args.model:
        rows += measure(spec, FeatureExtractor.from_pretrained(spec, device="cpu"), photos)
    print("\n| model | decoding | photos | min cosine | neighbour agreement | passes |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['decoding']} | {r['photos']} | {r['min_cosine']:.5f} "
              f"| {r['neighbour_agreement']:.3f} | {'yes' if r['passed'] else 'no'} |")  # fmt: skip
    machine["load_average_after"] = load_average()
    print(f"\nlimits: min cosine {rows[0]['min_cosine_limit']}, neighbour agreement "
          f"{rows[0]['neighbour_agreement_limit']}; load average after "
          f"{machine['load_average_after']}")  # fmt: skip
    write_result(args.out, {
        "benchmark": "decode_guard",
        "command": "python bench/decode_guard.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine, "photos": [*SKIMAGE_OTHERS, "china", "flower"], "rows": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
