"""The end-to-end demo behind ``make demo``: pre-train -> evaluate -> export -> serve.

On a fresh machine with no GPU and no internet it pre-trains an SSOLE ResNet-18 on an embedded
dataset (scikit-learn's 8x8 digits by default; Fashion-MNIST with ``--dataset fashion-mnist`` when
Debian's ``dataset-fashion-mnist`` is installed), measures its kNN top-1 against the same
architecture at random init, exports it as a hub folder with its model card, writes a sample
photo, prints copy-paste examples (curl, vanilla timm, ``torch.hub``) and serves the model on
127.0.0.1:8000 until Ctrl-C. A second run reuses the trained checkpoint (``--retrain`` trains
again)::

    python -m training.demo [--out demo_out] [--retrain] [--no-serve] [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from ssole_hub import export_hub_folder, load_model
from training.config import load_config
from training.data import labelled_splits
from training.evaluate import evaluate
from training.pretrain import run

__all__ = [
    "RawPixels",
    "demo_verdict",
    "example_commands",
    "main",
    "raw_pixel_knn_top1",
    "run_demo",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "digits": REPO_ROOT / "training/configs/digits_demo.yaml",
    "fashion-mnist": REPO_ROOT / "training/configs/fashion_mnist_r18.yaml",
}
# Fashion-MNIST at the demo's budget: a few epochs on a 4k-image subset, evaluated on 10k images, fit the 5-minute limit.
DATASET_OVERRIDES = {
    "digits": [],
    "fashion-mnist": ["epochs=3", "data.max_images=4000", "knn.every_epochs=3"],
}


def _banner(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _train(out: Path, dataset: str, retrain: bool, overrides: Sequence[str]) -> Path:
    checkpoint = out / "run" / "final.pt"
    if checkpoint.is_file() and not retrain:
        _banner(f"Reusing the trained checkpoint {checkpoint} (--retrain trains again)")
        return checkpoint
    _banner(f"Pre-training an SSOLE ResNet-18 on {dataset} (CPU is fine; progress below)")
    cfg = load_config(
        CONFIGS[dataset],
        [f"output_dir={out}", "run_name=run", *DATASET_OVERRIDES[dataset], *overrides],
    )
    return run(cfg, overwrite=True)  # the demo's run directory is its own


class RawPixels(nn.Module):
    """A "backbone" whose features are an image's own pixels: the raw-pixel kNN baseline.

    Its ``pretrained_cfg`` keeps images at their native ``height x width`` and only scales them to
    [0, 1] (no mean, no std), so the kNN protocol, which L2-normalises features and compares them
    by cosine similarity, sees the pixels as the dataset stores them, flattened.
    """

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.num_features = 3 * height * width
        self.pretrained_cfg = {
            "architecture": "raw_pixels",
            "input_size": (3, height, width),
            "crop_pct": 1.0,
            "interpolation": "bicubic",  # unused: the images keep their size
            "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0),
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` pixels in [0, 1] -> ``(n, 3 * H * W)``."""
        return images.flatten(1)


def raw_pixel_knn_top1(dataset: str, limit: int | None = None) -> float:
    """The weighted-kNN top-1 (%) of ``dataset``'s raw pixels: :func:`training.evaluate.evaluate`
    with a :class:`RawPixels` backbone, so the protocol, splits and subsets are the models'.

    Raises:
        ValueError: for a dataset without labels; FileNotFoundError: for missing files.
    """
    train, _ = labelled_splits(dataset)
    width, height = train[0][0].size
    result = evaluate(
        RawPixels(height, width), dataset, protocols=("knn",), train_limit=limit, test_limit=limit
    )
    return result["protocols"]["knn"]["top1"]


def demo_verdict(dataset: str, scores: Mapping[str, float]) -> str:
    """The sentence printed under the kNN scores: what the demo model is for, and where it stands
    against raw pixels (``scores`` has ``ssole`` and ``raw_pixels``, in %)."""
    gap = scores["ssole"] - scores["raw_pixels"]
    where = f"{abs(gap):.1f} points {'below' if gap < 0 else 'above'} raw pixels on {dataset}"
    return (
        "This model checks the pipeline (train, evaluate, export, serve); it is not a good model "
        f"({where} after minutes of CPU training): for useful features, pre-train longer on more "
        "images (README, 'Pre-training on your own images')."
    )


def _knn(checkpoint: Path, dataset: str, limit: int | None) -> dict[str, Any]:
    _banner(
        "Evaluating: weighted kNN (k=20, T=0.07) of the trained backbone, random init, raw pixels"
    )
    trained = load_model(str(checkpoint))
    torch.manual_seed(0)
    random_init = timm.create_model(trained.pretrained_cfg["architecture"]).eval()
    random_init.pretrained_cfg = trained.pretrained_cfg  # same preprocessing for both
    scores = {}
    for name, model in (("ssole", trained), ("random_init", random_init)):
        result = evaluate(model, dataset, protocols=("knn",), train_limit=limit, test_limit=limit)
        scores[name] = result["protocols"]["knn"]["top1"]
    scores["raw_pixels"] = raw_pixel_knn_top1(dataset, limit)
    print(
        f"kNN top-1 on {dataset}: SSOLE {scores['ssole']:.1f}%  "
        f"random init {scores['random_init']:.1f}%  raw pixels {scores['raw_pixels']:.1f}%"
    )
    print(demo_verdict(dataset, scores))
    return {
        "dataset": dataset,
        "protocols": {"knn": {"top1": scores["ssole"], "k": 20, "T": 0.07}},
        "random_init_knn_top1": scores["random_init"],
        "raw_pixels_knn_top1": scores["raw_pixels"],
    }


def _example_image(out: Path) -> Path:
    from skimage import data

    path = out / "example.jpg"
    Image.fromarray(np.asarray(data.astronaut())).save(path, quality=90)
    return path


def example_commands(
    model_dir: Path, image: Path, port: int, python: str = sys.executable
) -> list[str]:
    """Shell commands that use the served and exported model; they work as printed."""
    url = f"http://127.0.0.1:{port}"
    model_dir, image = model_dir.resolve(), image.resolve()
    timm_code = (
        "import timm, torch; from PIL import Image; "
        f'm = timm.create_model("local-dir:{model_dir}", pretrained=True).eval(); '
        "t = timm.data.create_transform(**timm.data.resolve_model_data_config(m)); "
        f'x = t(Image.open("{image}").convert("RGB")).unsqueeze(0); '
        'print("timm features", tuple(m(x).shape))'
    )
    hub_code = (
        "import torch; "
        f'm = torch.hub.load("{REPO_ROOT}", "load_model", "local-dir:{model_dir}", source="local"); '
        'print("torch.hub features", tuple(m(torch.rand(1, 3, 64, 64)).shape))'
    )
    return [
        f"curl -s -F files=@{shlex.quote(str(image))} {url}/v1/embeddings/upload | head -c 300; echo",
        # The JSON body goes through a pipe: a large image would exceed a shell argument's limit.
        f"(printf '{{\"input\": \"'; base64 -w0 {shlex.quote(str(image))}; printf '\"}}') "
        f"| curl -s {url}/v1/embeddings -H 'Content-Type: application/json' --data-binary @- "
        "| head -c 300; echo",
        f"{shlex.quote(python)} -c '{timm_code}'",
        f"{shlex.quote(python)} -c '{hub_code}'",
    ]


def run_demo(
    out: Path,
    dataset: str = "digits",
    retrain: bool = False,
    port: int = 8000,
    eval_limit: int | None = None,
    overrides: Sequence[str] = (),
) -> tuple[Path, list[str]]:
    """Train (or reuse), evaluate, export and write the examples; returns the hub folder and the
    example commands (also written to ``out/examples.sh``)."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = _train(out, dataset, retrain, overrides)
    if eval_limit is None and dataset == "fashion-mnist":
        eval_limit = 10_000
    results = _knn(checkpoint, dataset, eval_limit)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    _banner("Exporting a timm-compatible hub folder with its model card")
    model_dir = export_hub_folder(
        checkpoint, out / f"ssole_resnet18-{dataset}", overwrite=True, eval_results=results
    )
    print(f"hub folder: {model_dir} ({', '.join(sorted(p.name for p in model_dir.iterdir()))})")
    commands = example_commands(model_dir, _example_image(out), port)
    (out / "examples.sh").write_text("#!/usr/bin/env bash\nset -e\n" + "\n".join(commands) + "\n")
    return model_dir, commands


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.demo",
        description="The end-to-end demo behind make demo: pre-train an SSOLE ResNet-18 on an "
        "embedded dataset, evaluate it (kNN against random init and raw pixels), export it as a "
        "hub folder with its model card, print copy-paste examples and serve it until Ctrl-C. A "
        "second run reuses the trained checkpoint.",
    )
    p.add_argument(
        "--out",
        default="demo_out",
        type=Path,
        help="where the run, hub folder and examples go (default: %(default)s)",
    )
    p.add_argument(
        "--dataset",
        choices=sorted(CONFIGS),
        default="digits",
        help="embedded dataset to train and evaluate on (fashion-mnist needs the Debian package "
        "dataset-fashion-mnist; default: %(default)s)",
    )
    p.add_argument("--retrain", action="store_true", help="train again even if a checkpoint exists")
    p.add_argument("--no-serve", action="store_true", help="stop after export instead of serving")
    p.add_argument(
        "--host", default="127.0.0.1", help="address the server binds (default: %(default)s)"
    )
    p.add_argument(
        "--port", type=int, default=8000, help="port the server binds (default: %(default)s)"
    )
    p.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        help="evaluate on at most this many images (default: all of digits, 10000 of "
        "fashion-mnist)",
    )
    p.add_argument(
        "overrides", nargs="*", help="training config overrides, key=value (e.g. epochs=2)"
    )
    return p


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound now (another server holds it). Binds as uvicorn
    does (``SO_REUSEADDR``), so a port left in TIME_WAIT by a stopped server counts as free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    args = _parser().parse_args(argv)
    if not args.no_serve and port_in_use(args.host, args.port):
        print(
            f"python -m training.demo: error: {args.host}:{args.port} is already in use, so the "
            f"demo could not serve its model there; choose another port (make demo PORT=8001, "
            f"or --port 8001) or stop what holds it. Nothing was trained.",
            file=sys.stderr,
        )
        return 2
    model_dir, commands = run_demo(
        args.out, args.dataset, args.retrain, args.port, args.eval_limit, args.overrides
    )
    _banner("Try it (copy-paste; also in " + str(args.out / "examples.sh") + ")")
    print("\n".join(commands))
    if args.no_serve:
        return 0
    _banner(f"Serving on http://{args.host}:{args.port} (docs at /docs; Ctrl-C to stop)")
    server = [
        sys.executable,
        "-m",
        "server",
        "--model",
        f"local-dir:{model_dir.resolve()}",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    try:
        return subprocess.call(server, cwd=REPO_ROOT)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
