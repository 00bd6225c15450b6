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

    Returns the exit status: 2 for invalid settings, 1 if the model could not be loaded (the
    server stops as soon as loading fails, with the reason on stderr).
    """
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"python -m server: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    server: uvicorn.Server | None = None

    def stop_on_load_failure() -> None:
        assert server is not None
        server.should_exit = True

    app = create_app(settings, on_load_failure=stop_on_load_failure)
    # One process serves one model on one device; scale out with replicas behind a balancer.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    error = app.state.service.load_error
    if error:
        print(
            f"python -m server: could not load the model {settings.model!r}: {error}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
