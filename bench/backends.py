"""Images/s of each CPU inference backend, measured side by side in one run, with its fidelity.

For ResNet-18 and ResNet-50 at 224 px, the forward passes below are timed on the same
preprocessed batches of real photos (scikit-image's), at batch 1 and 32, ``--repeats`` times
each, interleaved so that a change in the machine's load touches every backend alike:

- **torch eager fp32**: :class:`~ssole_hub.models.SSOLEModel` on contiguous (NCHW) tensors;
- **torch**: the ``torch`` backend of :class:`~ssole_hub.FeatureExtractor` (channels_last,
  float32), and **torch compile**, the same with ``compile=True`` (``torch.compile``, compiled
  during the warm-up pass of each batch size);
- **onnx**, **onnx-bf16** and **onnx-int8**: the extractor's OpenVINO backends on the folder's
  ``onnx/model.onnx`` (float32 and bfloat16 precision) and ``onnx/model_int8.onnx``, written by
  :func:`ssole_hub.export_onnx` with the int8 file calibrated on the photos (export refuses an
  int8 file below its limits; the refusal is then recorded instead of a figure);
- **onnxruntime fp32** and **onnxruntime int8**: ONNX Runtime on the same two files, the runtime
  the project measured against OpenVINO and does not ship for inference (it only quantizes).

Only the forward pass is timed (images are decoded and preprocessed once, beforehand). Each
row gives the median images/s, the ratio to torch eager fp32 at the same batch size, and the
smallest cosine similarity of its backbone features to eager fp32 on the photos. Every backend
uses the same number of intra-op threads (torch's default, one per core). Weights are random
(``pretrained=False``, fixed seed): speed does not depend on them and nothing is downloaded; the
fidelity of trained weights is what ``export_onnx`` records in each hub folder. The CPU model
and flags and the load average before and after go in the JSON.

With ``--knn``, it instead pre-trains an SSOLE ResNet-18 briefly on Fashion-MNIST (the
``fashion_mnist_r18`` recipe, ``--knn-steps`` steps), exports it with its ONNX files (int8
calibrated on 64 Fashion-MNIST train images) and reports the kNN top-1 (k = 20, T = 0.07) of its
features through each backend, against float32 torch, with the export's guard figures. When the
guard refuses the int8 file, the refusal is recorded and the file is written once more without
the guard, to measure what it would have cost.

    python bench/backends.py [--models ssole_resnet18 ssole_resnet50] [--images 64] [--repeats 3]
    python bench/backends.py --knn [--knn-train 4000 --knn-test 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import load_average, machine_record, write_result
from ssole_hub import FeatureExtractor, export_hub_folder, export_onnx, load_model
from ssole_hub.runtimes.backends import ONNX_FILES

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "cat")
BATCH_SIZES = (1, 32)

Forward = Callable[[torch.Tensor], torch.Tensor]


def write_photos(folder: Path) -> list[Path]:
    """scikit-image's photos as JPEG files (the int8 calibration set)."""
    from skimage import data

    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.jpg"
        Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").save(path, quality=90)
        paths.append(path)
    return paths


def export_folder(model_name: str, root: Path, photo_dir: Path) -> tuple[Path, dict]:
    """A hub folder of a seeded random ``model_name`` with its ONNX files; the export record
    (or the int8 refusal, when the guard refused it)."""
    torch.manual_seed(0)
    backbone = timm.create_model(model_name, pretrained=False, num_classes=0).eval()
    folder = export_hub_folder(backbone, root / model_name)
    try:
        return folder, export_onnx(folder, calibration=photo_dir)
    except ValueError as exc:  # the int8 guard: keep the float32 file and say why
        record = export_onnx(folder)
        record["int8_refused"] = str(exc)
        return folder, record


def forwards(folder: Path, record: dict) -> dict[str, Forward]:
    """One forward pass (preprocessed batch -> raw backbone features) per available backend."""
    eager = load_model(folder, with_projector=None).eval()

    def eager_forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return eager(x.contiguous(), "backbone")

    runs: dict[str, Forward] = {"torch eager fp32": eager_forward}
    for backend in ("torch", "onnx", "onnx-bf16", "onnx-int8"):
        if backend == "onnx-int8" and "int8_refused" in record:
            continue
        fx = FeatureExtractor.from_pretrained(folder, backend=backend, device="cpu")
        runs[backend] = lambda x, fx=fx: fx.embed_tensor(x, "backbone", normalize=False)
    compiled = FeatureExtractor.from_pretrained(folder, device="cpu", compile=True)
    runs["torch compile"] = lambda x: compiled.embed_tensor(x, "backbone", normalize=False)
    return runs | onnxruntime_forwards(folder, record)


def onnxruntime_forwards(folder: Path, record: dict) -> dict[str, Forward]:
    """ONNX Runtime on the folder's ONNX files (the runtime compared against OpenVINO)."""
    import onnxruntime as ort

    runs: dict[str, Forward] = {}
    for label, file in (
        ("onnxruntime fp32", ONNX_FILES["onnx"]),
        ("onnxruntime int8", ONNX_FILES["onnx-int8"]),
    ):
        if label.endswith("int8") and "int8_refused" in record:
            continue
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(folder / file), options, providers=["CPUExecutionProvider"]
        )

        def forward(x: torch.Tensor, session=session) -> torch.Tensor:
            return torch.from_numpy(
                session.run(["backbone"], {"images": x.contiguous().numpy()})[0]
            )

        runs[label] = forward
    return runs


def batches(photos: torch.Tensor, batch_size: int, images: int) -> list[torch.Tensor]:
    """``images`` preprocessed photos (cycled) cut into batches of ``batch_size``."""
    index = torch.arange(max(images, batch_size)) % len(photos)
    return list(photos[index].split(batch_size))


def time_once(forward: Forward, work: list[torch.Tensor]) -> float:
    """Images per second of one pass over ``work``."""
    start = time.perf_counter()
    for x in work:
        forward(x)
    return sum(len(x) for x in work) / (time.perf_counter() - start)


def measure(runs: dict[str, Forward], photos: torch.Tensor, images: int, repeats: int) -> list:
    """Median images/s per backend and batch size, interleaved repeats, after a warm-up pass."""
    rows = []
    for batch_size in BATCH_SIZES:
        work = batches(photos, batch_size, images)
        for forward in runs.values():
            forward(work[0])
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, forward in runs.items():
                samples[name].append(time_once(forward, work))
        eager = statistics.median(samples["torch eager fp32"])
        for name, values in samples.items():
            median = statistics.median(values)
            rows.append(
                {
                    "backend": name,
                    "batch_size": batch_size,
                    "images_per_s": round(median, 2),
                    "samples": [round(v, 2) for v in values],
                    "ratio_to_eager_fp32": round(median / eager, 3),
                }
            )
    return rows


def min_cosines(runs: dict[str, Forward], photos: torch.Tensor) -> dict[str, float]:
    """Smallest cosine of each backend's backbone features to eager fp32's, on the photos."""
    reference = runs["torch eager fp32"](photos)
    return {
        name: round(float(F.cosine_similarity(run(photos), reference, dim=1).min()), 6)
        for name, run in runs.items()
    }


def bench_model(model_name: str, root: Path, photo_paths: list[Path], args) -> dict:
    folder, record = export_folder(model_name, root, photo_paths[0].parent)
    runs = forwards(folder, record)
    transform = FeatureExtractor.from_pretrained(folder, device="cpu").transform
    photos = torch.stack([transform(Image.open(p).convert("RGB")) for p in photo_paths])
    assert photos.shape[-1] == 224, "the bench measures 224 px inputs"
    cosines = min_cosines(runs, photos)
    rows = measure(runs, photos, args.images, args.repeats)
    for row in rows:
        row.update(model=model_name, min_cosine=cosines[row["backend"]])
    return {"model": model_name, "export": record, "rows": rows}


def knn_through_backends(root: Path, args) -> dict:
    """kNN top-1 of a briefly trained Fashion-MNIST model through each shipped backend."""
    from training.config import load_config
    from training.data import labelled_splits, subset_indices
    from training.metrics import knn_top1
    from training.pretrain import run

    train, test = labelled_splits("fashion-mnist")
    overrides = [
        f"output_dir={root}", "run_name=knn", f"data.max_images={args.knn_steps * 256}",
        "epochs=1", "knn.every_epochs=0", "knn.at_start=false", "data.num_workers=0",
    ]  # fmt: skip
    started = time.perf_counter()
    checkpoint = run(load_config("training/configs/fashion_mnist_r18.yaml", overrides))
    train_s = time.perf_counter() - started
    calibration = root / "calibration"
    calibration.mkdir()
    for i in subset_indices(len(train), 64, seed=1):
        train[i][0].save(calibration / f"{i}.png")
    folder = export_hub_folder(checkpoint, root / "fashion-mnist-brief")
    record = export_guarded_or_measured(folder, calibration)
    train_idx = subset_indices(len(train), args.knn_train)
    test_idx = subset_indices(len(test), args.knn_test)
    rows = {}
    for backend in ("torch", "onnx", "onnx-bf16", "onnx-int8"):
        fx = FeatureExtractor.from_pretrained(folder, backend=backend, device="cpu")

        def features(dataset, index, fx=fx):
            images = [dataset[i][0] for i in index]
            return fx.embed(images, batch_size=256, normalize=False)

        labels = [
            torch.tensor([d[i][1] for i in ix]) for d, ix in ((train, train_idx), (test, test_idx))
        ]
        top1 = knn_top1(features(train, train_idx), labels[0], features(test, test_idx), labels[1])
        rows[backend] = round(top1, 2)
    return {"train_seconds": round(train_s, 1), "export": record, "knn_top1": rows,
            "train_images": len(train_idx), "test_images": len(test_idx)}  # fmt: skip


def export_guarded_or_measured(folder: Path, calibration: Path) -> dict:
    """Export the ONNX files; if the guard refuses the int8 file, record why, then write it
    without the guard so that its kNN cost can still be measured."""
    import ssole_hub.hub.onnx_export as onnx_export

    try:
        return export_onnx(folder, calibration=calibration)
    except ValueError as exc:
        refused = str(exc)
    limits = dict(onnx_export.FIDELITY_LIMITS)
    agreement = onnx_export.NEIGHBOUR_AGREEMENT_LIMIT
    onnx_export.FIDELITY_LIMITS["onnx-int8"], onnx_export.NEIGHBOUR_AGREEMENT_LIMIT = 0.0, 0.0
    try:
        record = export_onnx(folder, calibration=calibration)
    finally:
        onnx_export.FIDELITY_LIMITS.update(limits)
        onnx_export.NEIGHBOUR_AGREEMENT_LIMIT = agreement
    return record | {"int8_refused": refused}


def print_table(results: list[dict]) -> None:
    print(f"{'model':16} {'backend':20} {'batch':>5} {'img/s':>9} {'x eager':>8} {'min cos':>9}")
    for result in results:
        for r in result["rows"]:
            print(
                f"{r['model']:16} {r['backend']:20} {r['batch_size']:>5} "
                f"{r['images_per_s']:>9.1f} {r['ratio_to_eager_fp32']:>8.2f} {r['min_cosine']:>9.6f}"
            )
        if "int8_refused" in result["export"]:
            print(
                f"{result['model']}: onnx-int8 refused at export: {result['export']['int8_refused']}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ssole_resnet18", "ssole_resnet50"])
    parser.add_argument("--images", type=int, default=64, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="default: bench/results/backends[_knn].json")
    parser.add_argument("--knn", action="store_true", help="the kNN of a trained model instead")
    parser.add_argument("--knn-steps", type=int, default=16, help="pre-training steps (batch 256)")
    parser.add_argument("--knn-train", type=int, default=4000, help="kNN bank images")
    parser.add_argument("--knn-test", type=int, default=2000, help="kNN test images")
    args = parser.parse_args()
    name = "backends_knn.json" if args.knn else "backends.json"
    args.out = args.out or str(Path(__file__).parent / "results" / name)
    if args.knn:
        main_knn(args)
        return

    machine = machine_record()
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        root = Path(tmp)
        (root / "photos").mkdir()
        photo_paths = write_photos(root / "photos")
        results = [bench_model(name, root, photo_paths, args) for name in args.models]
    print_table(results)
    result = {
        "benchmark": "backends",
        "command": "python bench/backends.py " + " ".join(sys.argv[1:]),
        "settings": {
            "images": args.images,
            "repeats": args.repeats,
            "batch_sizes": list(BATCH_SIZES),
            "input_px": 224,
            "photos": list(PHOTOS),
            "threads": torch.get_num_threads(),
        },
        "machine": machine,
        "results": results,
        "load_average_after": load_average(),
    }
    write_result(args.out, result)


def main_knn(args) -> None:
    """``--knn``: train briefly, export, and compare kNN top-1 across backends."""
    machine = machine_record()
    with tempfile.TemporaryDirectory(prefix="bench-backends-knn-") as tmp:
        result = knn_through_backends(Path(tmp), args)
    torch_top1 = result["knn_top1"]["torch"]
    print(f"{'backend':10} {'kNN top-1':>9} {'vs torch':>9}")
    for backend, top1 in result["knn_top1"].items():
        print(f"{backend:10} {top1:>9.2f} {top1 - torch_top1:>+9.2f}")
    record = {
        "benchmark": "backends-knn",
        "command": "python bench/backends.py " + " ".join(sys.argv[1:]),
        "machine": machine,
        **result,
        "load_average_after": load_average(),
    }
    write_result(args.out, record)


if __name__ == "__main__":
    main()
