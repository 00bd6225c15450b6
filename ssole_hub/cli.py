"""The ``ssole-hub`` command line (also ``python -m ssole_hub``).

Each subcommand parses its arguments here and calls one public function of the library.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ssole_hub.device_decode import DEVICE_DECODE_CHOICES
from ssole_hub.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ssole_hub.runtimes.backends import BACKENDS, FIDELITY_LIMITS


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one: not for flags, required options, or a
    ``None`` default (whose help says in words what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _subcommand(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> Any:
    """A subcommand parser whose help shows the defaults (subparsers do not inherit it)."""
    return sub.add_parser(
        name, formatter_class=_ShowDefaults, description=kwargs.get("help"), **kwargs
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssole-hub",
        description="Export, convert, validate and publish SSOLE hub folders, embed whole datasets "
        "and fit the PCA behind compact embeddings (also python -m ssole_hub).",
        formatter_class=_ShowDefaults,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    _add_convert(sub)
    _add_validate_and_push(sub)
    _add_engine_options(_add_extract(sub))
    _add_engine_options(_add_fit_pca(sub))
    return parser


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(
        sub,
        "export",
        help="export a training checkpoint as a timm-compatible hub folder (--onnx: add ONNX files)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="training checkpoint (.pt) to write as the hub folder --out; leave it out to add "
        "(or replace) the ONNX files of the existing folder --out, with --onnx",
    )
    p.add_argument(
        "--out",
        required=True,
        help="hub folder to write; without --checkpoint, the existing folder to add ONNX files to",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write onnx/model.onnx (float32), checked against torch on real photos",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="real photos (folder or list file) to calibrate and check onnx/model_int8.onnx on "
        "(default: none, so no int8 file, and the float32 file is checked on scikit-image's "
        "bundled photos)",
    )
    p.add_argument(
        "--int8-min-cosine",
        type=_cosine_limit,
        default=FIDELITY_LIMITS["onnx-int8"],
        help="smallest cosine to float32 torch that the int8 file must keep on every calibration "
        "photo and output (higher is stricter); a file below it is not written",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing folder --out (--checkpoint)"
    )
    p.add_argument(
        "--eval-results",
        default=None,
        help="JSON file of measured results for the model card (default: none)",
    )
    p.add_argument(
        "--repo",
        default=None,
        help="Hub repo id the card's examples name, ORG/NAME (default: SSOLE_HUB_ORG/the folder "
        "name)",
    )
    p.set_defaults(func=_export)


def _cosine_limit(text: str) -> float:
    """A min-cosine limit in (0, 1], for argparse."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a cosine limit in (0, 1], got {text!r}")
    return value


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(
        sub,
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
    p.add_argument(
        "--arch",
        required=True,
        choices=("resnet18", "resnet50"),
        help="the ResNet the checkpoint holds (weights of the other one are refused, naming it)",
    )
    p.add_argument("--out", required=True, help="hub folder to write")
    p.add_argument(
        "--projector-bn",
        action="store_true",
        help="the official projector has BatchNorm layers (its config's mlp_bn: true)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder --out")
    p.add_argument(
        "--repo",
        default=None,
        help="Hub repo id the card's examples name, ORG/NAME (default: SSOLE_HUB_ORG/the folder "
        "name)",
    )
    p.set_defaults(func=_convert)


def _add_validate_and_push(sub: argparse._SubParsersAction) -> None:
    p = _subcommand(sub, "validate", help="check that a hub folder is complete and loads in timm")
    p.add_argument("folder", help="the hub folder to check")
    p.set_defaults(func=_validate)

    p = _subcommand(sub, "push", help="publish a validated hub folder to the Hugging Face Hub")
    p.add_argument("folder", help="the hub folder to publish (validated first)")
    p.add_argument("--repo", required=True, help="repo id, ORG/NAME (created if needed)")
    p.add_argument(
        "--revision", default=None, help="branch to push to, created if needed (default: main)"
    )
    p.add_argument(
        "--private", action="store_true", help="create the repo private (if it does not exist)"
    )
    p.add_argument(
        "--message", default=None, help="commit message (default: Upload SSOLE ARCH hub folder)"
    )
    p.set_defaults(func=_push)


def _add_extract(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _subcommand(
        sub,
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
        help="parquet: the encoded-image column; tar: the image member's suffix (default: image "
        "for parquet; for tars, the first image member a sample has: jpg, jpeg, png, ...)",
    )
    p.add_argument("--id-column", default=None, help="parquet: the id column (default: id)")
    p.add_argument("--out", required=True, help="output folder (reuse it to resume)")
    p.add_argument(
        "--output",
        choices=("backbone", "projector"),
        default="backbone",
        help="which embedding to write: backbone features or projector outputs",
    )
    p.add_argument("--no-normalize", action="store_true", help="keep raw (not unit-norm) rows")
    p.add_argument(
        "--dimensions",
        type=int,
        default=None,
        help="write compact embeddings of this size, from the PCA fitted for the model "
        "(ssole-hub fit-pca; unit rows); default: the full embedding",
    )
    _add_reading_options(p)
    p.add_argument(
        "--shard-size",
        type=int,
        default=10_000,
        help="images per output shard for image files (a tar or parquet file is one shard)",
    )
    p.add_argument(
        "--format",
        choices=("npy", "safetensors", "parquet"),
        default="npy",
        help="file format of the embedding shards",
    )
    p.add_argument("--no-progress", action="store_true", help="show no progress bar")
    _add_compute_options(p)
    p.set_defaults(func=_extract)
    return p


def _add_reading_options(p: argparse.ArgumentParser) -> None:
    """How ``extract`` and ``fit-pca`` feed the model: batch size, decoding workers, progress."""
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes per rank (default: the rank's CPU cores, at most 8)",
    )


def _add_fit_pca(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _subcommand(
        sub,
        "fit-pca",
        help="fit the PCA behind compact embeddings (dimensions) on your images and write it "
        "into a hub folder (pca.safetensors, ssole.json, the card)",
    )
    p.add_argument("folder", help="the hub folder (ONNX files and all stay as they are)")
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="images like the ones the model will embed, more than the largest size wanted: "
        "a folder, a text file of image paths, or webdataset .tar / .parquet files",
    )
    p.add_argument(
        "--image-column", default=None, help="parquet: the image column; tar: the image suffix"
    )
    p.add_argument("--id-column", default=None, help="parquet: the id column (default: id)")
    p.add_argument(
        "--output",
        choices=("backbone", "projector"),
        default="backbone",
        help="the embedding the PCA applies to",
    )
    p.add_argument(
        "--whiten",
        action="store_true",
        help="PCA-whitening: scale each axis to unit variance before the final normalisation",
    )
    _add_reading_options(p)
    p.add_argument("--no-progress", action="store_true", help="show no progress bar")
    _add_compute_options(p)
    p.set_defaults(func=_fit_pca)
    return p


def _add_compute_options(p: argparse.ArgumentParser) -> None:
    """Where and how ``extract`` decodes and embeds: device, dtype, compile, decoder limits."""
    p.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda:LOCAL_RANK if available, else cpu)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="compute dtype; auto = bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help=f"skip larger files (default: {DEFAULT_MAX_BYTES} bytes, 32 MiB)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help=f"skip images with more pixels, width x height (default: {DEFAULT_MAX_PIXELS})",
    )
    decoding = p.add_mutually_exclusive_group()
    decoding.add_argument(
        "--fast-decode",
        dest="fast_decode",
        action="store_const",
        const=True,
        default=None,
        help="always decode large JPEGs at a reduced DCT scale (default: only when the model's "
        "embeddings of real photos pass the guard)",
    )
    decoding.add_argument(
        "--full-decode",
        dest="fast_decode",
        action="store_const",
        const=False,
        help="always decode JPEGs in full (the pixels exactly as older versions decoded them)",
    )
    p.add_argument(
        "--decode-on-device",
        choices=tuple(DEVICE_DECODE_CHOICES),
        default="auto",
        help="decode JPEGs on the model's device in each batch (nvjpeg on a GPU), other formats "
        "on the CPU; auto (default): on a GPU if the model's embeddings of guard photos agree "
        "with CPU decoding; on: wherever torchvision can; off: never",
    )


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """What runs an extraction: the forward pass (``--backend``) and the engine."""
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="forward pass: torch, or OpenVINO on the CPU with the folder's onnx/ files (onnx: "
        "float32, onnx-bf16, onnx-int8); auto = torch on a GPU, with --compile or with a "
        "--dtype other than auto or float32, else each backend the folder has that passed its "
        "export check, and torch, timed here on one batch: the fastest (a resumed run keeps "
        "its finished shards' backend)",
    )
    p.add_argument(
        "--engine",
        choices=("plain", "ray"),
        default="plain",
        help="plain: this machine (or torchrun ranks); ray: a Ray cluster (extra [ray])",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (default: the one this process is connected to, else "
        "RAY_ADDRESS, else a new local one)",
    )
    p.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=None,
        help="Ray: GPUs per embedding actor (default: 1 when the cluster has GPUs)",
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

    out = Path(args.out)
    if args.checkpoint is None:
        if not args.onnx:
            raise ValueError("give --checkpoint, or --onnx to add ONNX files to the folder --out")
        if not out.is_dir():
            raise FileNotFoundError(
                f"no hub folder at {out} to add ONNX files to; export one with --checkpoint CKPT"
            )
        return _export_onnx(args, out)
    if args.calibration and not args.onnx:
        raise ValueError("--calibration calibrates the int8 ONNX file: add --onnx")
    if args.onnx:
        _check_onnx_request(args.calibration)
    if out.exists() and not args.overwrite:
        raise FileExistsError(
            f"{out} already exists; pass --overwrite to replace it"
            + (
                f", or leave out --checkpoint to add or replace only its ONNX files "
                f"(ssole-hub export --out {out} --onnx ...)"
                if args.onnx
                else ""
            )
        )
    out = export_hub_folder(
        args.checkpoint,
        out,
        overwrite=args.overwrite,
        eval_results=_eval_results(args.eval_results),
        repo_id=args.repo,
    )
    print(out)
    if not args.onnx:
        return 0
    try:
        return _export_onnx(args, out)
    except (ValueError, OSError, ImportError) as exc:
        raise ValueError(
            f"{exc}. The hub folder {out} was written without ONNX files; once that is fixed, "
            f"add them with: ssole-hub export --out {out} --onnx [--calibration PHOTOS]"
        ) from exc


def _check_onnx_request(calibration: str | None) -> None:
    """Before a hub folder is written: the ``[onnx]`` packages are there and the calibration
    photos exist, so a typo does not leave a folder without its ONNX files.

    Raises:
        ImportError: a package of the ``[onnx]`` extra is missing (names it).
        FileNotFoundError, ValueError: no such calibration folder or file, or no images in it.
    """
    missing = [m for m in ("onnx", "onnxruntime", "openvino") if find_spec(m) is None]
    if missing:
        raise ImportError(f"--onnx needs {', '.join(missing)}: pip install 'ssole-hub[onnx]'")
    if calibration is not None:
        from ssole_hub.images import list_images

        list_images(calibration)


def _eval_results(path: str | None) -> dict | None:
    if not path:
        return None
    results = json.loads(Path(path).read_text())
    if not isinstance(results, dict):
        raise ValueError(f"{path} must hold a JSON object of results")
    return results


def _export_onnx(args: argparse.Namespace, out: Path) -> int:
    """Write the folder's ONNX files; a refused int8 file is a warning (the float32 file is
    written and the refusal recorded), so the exit status is 0 when the float32 file is."""
    from ssole_hub.hub.onnx_export import OnnxFileRefusedWarning, export_onnx, refusal_message

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OnnxFileRefusedWarning)  # printed below, once
        record = export_onnx(
            out, calibration=args.calibration, limits={"onnx-int8": args.int8_min_cosine}
        )
    _print_onnx(record)
    refused = refusal_message(out, record)
    if refused:
        print(f"ssole-hub export: warning: {refused}", file=sys.stderr)
    return 0


def _print_onnx(record: dict) -> None:
    for backend, figures in record["backends"].items():
        cosines = ", ".join(f"{k} {v:.6f}" for k, v in figures["min_cosine"].items())
        shares = ", ".join(f"{k} {v:.4f}" for k, v in figures["neighbour_agreement"].items())
        verdict = (
            "passed" if figures["passed"] else "NOT passed: " + "; ".join(figures["shortfalls"])
        )
        if figures.get("written") is False:
            verdict += "; file refused, not written"
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


def _extraction_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options ``extract`` and ``fit-pca`` pass on to the extraction: reading, compute,
    engine and decoder limits."""
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
    backend = args.backend
    if backend == "auto" and (args.compile or args.dtype not in ("auto", "float32")):
        backend = "torch"  # what the user asked for runs on torch only
    return dict(
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        fast_decode=args.fast_decode,
        device_decode=DEVICE_DECODE_CHOICES[args.decode_on_device],
        backend=backend,
        progress=not args.no_progress,
        image_column=args.image_column,
        id_column=args.id_column,
        engine=args.engine,
        **ray_options,
        **limits,
    )


def _extract(args: argparse.Namespace) -> int:
    from ssole_hub.extract.dataset import extract_dataset
    from ssole_hub.extract.resume import summary

    manifest = extract_dataset(
        args.model,
        args.input[0] if len(args.input) == 1 else args.input,
        args.out,
        shard_size=args.shard_size,
        file_format=args.format,
        output=args.output,
        normalize=not args.no_normalize,
        dimensions=args.dimensions,
        **_extraction_options(args),
    )
    if "num_embedded" in manifest:  # rank 0 (or a single process) has the whole picture
        print(summary(manifest, args.out))
    return 0


def _fit_pca(args: argparse.Namespace) -> int:
    from ssole_hub.extract.compact import fit_hub_pca

    pca = fit_hub_pca(
        args.folder,
        args.input[0] if len(args.input) == 1 else args.input,
        output=args.output,
        whiten=args.whiten,
        **_extraction_options(args),
    )
    kept = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in pca.variance_table().items())
    print(
        f"fitted a PCA of the {pca.input_dimensions}-d {pca.output} embeddings of {pca.images} "
        f"images{' with whitening' if pca.whiten else ''} into {args.folder}: dimensions 1 to "
        f"{pca.max_dimensions}; variance kept {kept}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ssole-hub`` command line; returns the exit status (2 on an error, which is
    printed as one line ``ssole-hub COMMAND: error: ...`` on stderr)."""
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as exc:  # OSError: missing files, Hub HTTP errors
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"ssole-hub {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
