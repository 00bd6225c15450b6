"""The ``ssole-hub`` command line (also ``python -m ssole_hub``).

Each subcommand parses its arguments here and calls one public function of the library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ssole_hub.onnx_backend import BACKENDS


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssole-hub",
        description="Export, convert, validate and publish SSOLE hub folders, and embed whole datasets "
        "(also python -m ssole_hub).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    _add_convert(sub)
    _add_validate_and_push(sub)
    _add_engine_options(_add_extract(sub))
    return parser


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a training checkpoint as a timm-compatible hub folder (--onnx: add ONNX files)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="training checkpoint (.pt); without it, --onnx adds ONNX files to the folder --out",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write onnx/model.onnx (float32), checked against torch on real photos",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="real photos (folder or list file) to calibrate and check onnx/model_int8.onnx on",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument(
        "--eval-results", default=None, help="JSON file of measured results for the model card"
    )
    p.add_argument("--repo", default=None, help="Hub repo id the card's examples name, ORG/NAME")
    p.set_defaults(func=_export)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official SSOLE (Lightning) or torchvision ResNet checkpoint to a hub folder",
    )
    p.add_argument(
        "checkpoint", help="the checkpoint file, read with torch.load(weights_only=True)"
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=("ssole-official", "torchvision"),
        help="ssole-official: a Lightning checkpoint of the official SSOLE code (backbone and "
        "projector); torchvision: a torchvision ResNet state dict (its classifier is dropped)",
    )
    p.add_argument("--arch", required=True, choices=("resnet18", "resnet50"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--projector-bn",
        action="store_true",
        help="the official projector has BatchNorm layers (its config's mlp_bn: true)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--repo", default=None, help="Hub repo id the card's examples name, ORG/NAME")
    p.set_defaults(func=_convert)


def _add_validate_and_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check that a hub folder is complete and loads in timm")
    p.add_argument("folder")
    p.set_defaults(func=_validate)

    p = sub.add_parser("push", help="publish a validated hub folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("--repo", required=True, help="repo id, ORG/NAME")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--private", action="store_true")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=_push)


def _add_extract(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "extract",
        help="embed images, webdataset tars or parquet files into sharded files (resumable; "
        "runs under torchrun, or on a Ray cluster with --engine ray)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model name, hf-hub:ORG/NAME, local-dir:PATH, a hub folder or a training checkpoint",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="a folder of images, a text file of image paths, or webdataset .tar / .parquet files "
        "(several, or a brace pattern such as 'shards/data-{000..009}.tar')",
    )
    p.add_argument(
        "--image-column",
        default=None,
        help="parquet: the encoded-image column (default image); tar: the image member's suffix",
    )
    p.add_argument("--id-column", default=None, help="parquet: the id column (default id)")
    p.add_argument("--out", required=True, help="output folder (reuse it to resume)")
    p.add_argument("--output", choices=("backbone", "projector"), default="backbone")
    p.add_argument("--no-normalize", action="store_true", help="keep raw (not unit-norm) rows")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="decoding processes per rank")
    p.add_argument(
        "--shard-size",
        type=int,
        default=10_000,
        help="images per output shard for image files (a tar or parquet file is one shard)",
    )
    p.add_argument("--format", choices=("npy", "safetensors", "parquet"), default="npy")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="compute dtype; auto = bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-bytes", type=int, default=None, help="skip larger files")
    p.add_argument("--max-pixels", type=int, default=None, help="skip larger images")
    p.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode large JPEGs at a reduced scale (faster; embeddings differ slightly)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_extract)
    return p


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """What runs an extraction: the forward pass (``--backend``) and the engine."""
    p.add_argument(
        "--backend",
        default="torch",
        choices=BACKENDS,
        help="forward pass: torch, or OpenVINO on the CPU with the folder's onnx/ files (onnx: "
        "float32, onnx-bf16, onnx-int8); auto = the fastest checked one the folder has",
    )
    p.add_argument(
        "--engine",
        choices=("plain", "ray"),
        default="plain",
        help="plain: this machine (or torchrun ranks); ray: a Ray cluster (extra [ray])",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: local)")
    p.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=None,
        help="Ray: GPUs per embedding actor (default 1 when the cluster has GPUs)",
    )
    p.add_argument(
        "--num-cpus-per-worker",
        type=float,
        default=None,
        help="Ray: CPUs per actor, and its decoding (and CPU forward) threads (default: its share "
        "of its node's CPUs, one of which is left unreserved for reading)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="Ray: embedding actors (default: one per GPU, or one per node without GPUs)",
    )


def _export(args: argparse.Namespace) -> int:
    from ssole_hub.hub.export import export_hub_folder
    from ssole_hub.onnx_export import export_onnx

    if args.checkpoint is None:
        if not args.onnx:
            raise ValueError("give --checkpoint, or --onnx to add ONNX files to the folder --out")
        _print_onnx(export_onnx(args.out, calibration=args.calibration))
        return 0
    if args.calibration and not args.onnx:
        raise ValueError("--calibration calibrates the int8 ONNX file: add --onnx")
    results = None
    if args.eval_results:
        results = json.loads(Path(args.eval_results).read_text())
        if not isinstance(results, dict):
            raise ValueError(f"{args.eval_results} must hold a JSON object of results")
    out = export_hub_folder(
        args.checkpoint,
        args.out,
        overwrite=args.overwrite,
        eval_results=results,
        repo_id=args.repo,
    )
    print(out)
    if args.onnx:
        _print_onnx(export_onnx(out, calibration=args.calibration))
    return 0


def _print_onnx(record: dict) -> None:
    for backend, figures in record["backends"].items():
        cosines = ", ".join(f"{k} {v:.6f}" for k, v in figures["min_cosine"].items())
        shares = ", ".join(f"{k} {v:.4f}" for k, v in figures["neighbour_agreement"].items())
        verdict = (
            "passed" if figures["passed"] else "NOT passed: " + "; ".join(figures["shortfalls"])
        )
        print(
            f"{backend} ({figures['file']}, {figures['precision']}): min cosine to torch "
            f"{cosines} (limit {figures['limit']}); neighbour agreement {shares or 'n/a'} "
            f"(limit {figures['neighbour_agreement_limit']}); {verdict}"
        )


def _convert(args: argparse.Namespace) -> int:
    from ssole_hub.hub.convert import convert_checkpoint
    from ssole_hub.hub.export import validate_hub_folder

    out = convert_checkpoint(
        args.checkpoint,
        args.out,
        source=args.source,
        arch=args.arch,
        projector_bn=args.projector_bn,
        overwrite=args.overwrite,
        repo_id=args.repo,
    )
    info = validate_hub_folder(out)
    dropped = info.metadata.get("converted_from", {}).get("dropped_keys")
    if dropped:
        print(
            f"dropped {', '.join(dropped)}: the torchvision classifier (a hub folder holds features)"
        )
    print(info)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ssole_hub.hub.export import validate_hub_folder

    print(validate_hub_folder(args.folder))
    return 0


def _push(args: argparse.Namespace) -> int:
    from ssole_hub.hub.publish import push_to_hub

    print(
        push_to_hub(
            args.folder,
            args.repo,
            revision=args.revision,
            private=args.private,
            commit_message=args.message,
        )
    )
    return 0


def _extract(args: argparse.Namespace) -> int:
    from ssole_hub.extract import extract_dataset

    limits = {
        k: v
        for k, v in (("max_bytes", args.max_bytes), ("max_pixels", args.max_pixels))
        if v is not None
    }
    ray_options = {
        k: getattr(args, k)
        for k in ("ray_address", "num_gpus_per_worker", "num_cpus_per_worker", "concurrency")
        if getattr(args, k) is not None
    }
    manifest = extract_dataset(
        args.model,
        args.input[0] if len(args.input) == 1 else args.input,
        args.out,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shard_size=args.shard_size,
        file_format=args.format,
        output=args.output,
        normalize=not args.no_normalize,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        fast_decode=args.fast_decode,
        backend=args.backend,
        progress=not args.no_progress,
        image_column=args.image_column,
        id_column=args.id_column,
        engine=args.engine,
        **ray_options,
        **limits,
    )
    if "num_embedded" in manifest:  # rank 0 (or a single process) has the whole picture
        print(
            f"embedded {manifest['num_embedded']} of {manifest['num_inputs']} images "
            f"({manifest['dim']}-d) into {args.out}; skipped {manifest['num_errors']} "
            f"unreadable (listed in {manifest['errors_file']})"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ssole-hub`` command line; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as exc:  # OSError: missing files, Hub HTTP errors
        print(f"ssole-hub {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
