"""CPU per image of the two CPU paths changed for serving torch: preprocessing and the forward pass.

- **Preprocessing**: timm's step-by-step eval transform (resize the shorter side, centre crop,
  to tensor, normalise) against :class:`~ssole_hub.preprocessing.CropResize` (one box resample,
  one tensor conversion), in thread CPU ms per image on one thread, on the serving benchmark's
  photos decoded as the server decodes them (reduced DCT scale). Agreement: both transforms on
  scikit-image photos the tests do not use, resized and cut to random sizes (fixed seed): mean
  and largest difference in levels of 255, the share of values that differ, and the smallest
  cosine between a random-weight ``ssole_resnet18``'s features of the two.
- **Forward**: the ``torch`` backend's model (BatchNorm folded, channels last, float32) run
  eagerly against the same model with its convolutions fused with the adds and ReLUs after them
  (:func:`~ssole_hub.runtimes.conv_fusion.fuse_conv_activations`), process CPU ms per image on
  torch's default threads, ``--rounds`` interleaved rounds (medians), with the largest absolute
  difference of their outputs.

    python bench/cpu_inference.py [--rounds 5] [--out bench/results/cpu_inference.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import load_average, machine_record, write_result
from bench.serve import photo_jpegs
from ssole_hub.images import decode_image
from ssole_hub.preprocessing import resolve_preprocessing
from ssole_hub.runtimes.conv_fusion import fuse_conv_activations
from ssole_hub.runtimes.eager import inference_model

UNSEEN_PHOTOS = ("cat", "immunohistochemistry", "retina", "coins", "page", "brick", "gravel")


def preprocessing_cost(rounds: int) -> dict[str, float]:
    """Thread CPU ms per image of timm's steps and of CropResize (medians of ``rounds``), on
    one torch thread, as the server's decode threads run them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config, ours = resolve_preprocessing(timm.create_model("ssole_resnet18"))
    theirs = create_transform(**config, is_training=False)
    images = [decode_image(j, draft_size=256) for j in photo_jpegs()]
    times: dict[str, list[float]] = {"timm steps": [], "one resample": []}
    try:
        for _ in range(rounds):
            for name, transform in (("timm steps", theirs), ("one resample", ours)):
                start = time.thread_time()
                for _ in range(10):
                    for img in images:
                        transform(img)
                times[name].append((time.thread_time() - start) * 1000 / (10 * len(images)))
    finally:
        torch.set_num_threads(threads)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def preprocessing_agreement(samples_per_photo: int = 12) -> dict[str, float]:
    """How far CropResize's tensors and features are from timm's steps on unseen photos."""
    from skimage import data

    rng = random.Random(0)
    config, ours = resolve_preprocessing(timm.create_model("ssole_resnet18"))
    theirs = create_transform(**config, is_training=False)
    std = torch.tensor(config["std"])[:, None, None]
    a, b, levels = [], [], []
    for name in UNSEEN_PHOTOS:
        photo = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
        for _ in range(samples_per_photo):
            w, h = rng.randint(64, photo.width), rng.randint(64, photo.height)
            img = photo.resize((w, h)) if rng.random() < 0.5 else photo.crop((0, 0, w, h))
            a.append(theirs(img))
            b.append(ours(img))
            levels.append(((a[-1] - b[-1]).abs() * std * 255).flatten())
    every = torch.cat(levels)
    torch.manual_seed(0)
    model = inference_model(timm.create_model("ssole_resnet18"))
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(model(torch.stack(a)), model(torch.stack(b)))
    return {
        "images": len(a),
        "mean_levels": round(every.mean().item(), 4),
        "max_levels": round(every.max().item(), 2),
        "share_differing": round((every > 1e-3).float().mean().item(), 5),
        "min_feature_cosine": round(cos.min().item(), 7),
    }


def forward_cost(arch: str, batch_sizes: list[int], rounds: int) -> list[dict]:
    """Process CPU ms per image of the folded model eagerly and fused, interleaved."""
    torch.manual_seed(0)
    model = inference_model(timm.create_model(arch)).to(memory_format=torch.channels_last)
    fused = fuse_conv_activations(model.backbone)
    rows = []
    for n in batch_sizes:
        x = torch.randn(n, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        passes = max(2, 64 // n)
        times: dict[str, list[float]] = {"eager": [], "fused": []}
        with torch.inference_mode():
            diff = (model.backbone(x) - fused(x)).abs().max().item()
            for _ in range(rounds):
                for name, run in (("eager", model.backbone), ("fused", fused)):
                    run(x)
                    start = time.process_time()
                    for _ in range(passes):
                        run(x)
                    times[name].append((time.process_time() - start) * 1000 / (passes * n))
        eager, fast = statistics.median(times["eager"]), statistics.median(times["fused"])
        rows.append({"arch": arch, "batch": n, "eager_ms": round(eager, 2),
                     "fused_ms": round(fast, 2), "fused_over_eager": round(fast / eager, 3),
                     "max_abs_diff": diff})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--archs", nargs="+", default=["ssole_resnet18", "ssole_resnet50"])
    parser.add_argument("--out", default="bench/results/cpu_inference.json")
    args = parser.parse_args(argv)
    record = machine_record()
    print(f"load average before: {record['load_average_before']}")
    threads = torch.get_num_threads()
    cost = preprocessing_cost(args.rounds)
    agreement = preprocessing_agreement()
    print("\n| preprocessing | thread CPU ms per image |\n| --- | ---: |")
    for name, ms in cost.items():
        print(f"| {name} | {ms:.3f} |")
    print(f"agreement on {agreement['images']} unseen photos: {agreement}")
    rows = [r for arch in args.archs for r in forward_cost(arch, args.batch_sizes, args.rounds)]
    print(f"\nforward, {threads} threads, process CPU ms per image (median of {args.rounds})")
    print("| model | batch | eager | fused | fused / eager | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['arch']} | {r['batch']} | {r['eager_ms']:.2f} | {r['fused_ms']:.2f} | "
              f"{r['fused_over_eager']:.3f} | {r['max_abs_diff']:.1e} |")  # fmt: skip
    record.update(preprocessing=cost, agreement=agreement, forward=rows,
                  torch_threads=threads, load_average_after=load_average())  # fmt: skip
    print(f"load average after: {record['load_average_after']}")
    write_result(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
