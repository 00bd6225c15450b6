"""The ``ssole-hub`` command line (also ``python -m ssole_hub``).

Each subcommand parses its arguments here and calls one public function of the library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssole-hub", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    # --- export / validate / push (ssole_hub.hub) ---------------------------------------------
    p = sub.add_parser(
        "export", help="export a training checkpoint as a timm-compatible hub folder"
    )
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(func=_export)

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

    # --- extract (ssole_hub.extract) ------------------------------------------------------------
    p = sub.add_parser("extract", help="embed a folder or list of images into sharded files")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="folder of images, or a text file of paths")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_extract)
    return parser


def _export(args: argparse.Namespace) -> int:
    from ssole_hub.hub import export_hub_folder

    out = export_hub_folder(args.checkpoint, args.out, overwrite=args.overwrite)
    print(out)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ssole_hub.hub import validate_hub_folder

    print(validate_hub_folder(args.folder))
    return 0


def _push(args: argparse.Namespace) -> int:
    from ssole_hub.hub import push_to_hub

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

    extract_dataset(args.model, args.input, args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ssole-hub`` command line; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"ssole-hub {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
