"""``python -m server --model MODEL [--host --port ...]``: serve embeddings with uvicorn."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from server.app import create_app
from server.settings import settings_from_args


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings (flags over ``SSOLE_SERVER_*`` variables) and run the server until stopped.

    Returns the exit status: 2 for invalid settings.
    """
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"python -m server: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    # One process serves one model on one device; scale out with replicas behind a balancer.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
