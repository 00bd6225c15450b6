"""``python -m server --model MODEL [--host --port ...]``: serve embeddings with uvicorn."""

from __future__ import annotations

import copy
import logging.config
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import ValidationError

from server.app import create_app
from server.settings import settings_from_args

APP_LOGGERS = ("server", "ssole_hub")
"""The loggers of the server and the library (model loaded, the backend ``auto`` chose)."""


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging configuration plus a stderr handler, in uvicorn's format with the
    logger's name, for :data:`APP_LOGGERS` at ``level`` (e.g. ``"info"``)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["app"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
        "use_colors": None,
    }
    config["handlers"]["app"] = {
        "formatter": "app",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    for name in APP_LOGGERS:
        config["loggers"][name] = {"handlers": ["app"], "level": level.upper(), "propagate": False}
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings (flags over ``SSOLE_SERVER_*`` variables) and run the server until stopped.

    Returns the exit status: 2 for invalid settings, 1 if the model could not be loaded (the
    server stops as soon as loading fails, with the reason on stderr). The server's own log
    lines (the model loaded and ready, the backend ``auto`` chose) go to stderr beside
    uvicorn's, at ``--log-level``.
    """
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"python -m server: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging_config = log_config(settings.log_level)
    logging.config.dictConfig(logging_config)
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
        log_config=logging_config,
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
