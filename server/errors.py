"""The error contract: every failure is ``{"error": {"message", "type", "code"}}`` with its status.

==========  =======================  ==============================================================
status      type                     codes
==========  =======================  ==============================================================
400         invalid_request_error    invalid_image (damaged/truncated/empty), invalid_base64,
                                     invalid_json, empty_body, output_unavailable, bad_request
                                     (malformed multipart), cors_preflight_refused (an origin,
                                     method or header that --cors-allow-origin does not allow),
                                     invalid_dimensions (no fitted PCA, a size out of its range,
                                     or not a whole number, as OpenAI answers it)
401         authentication_error     invalid_api_key (with ``WWW-Authenticate: Bearer``)
404         not_found_error          model_not_found (``model`` names another model), not_found
405         invalid_request_error    method_not_allowed
413         invalid_request_error    image_too_large (encoded bytes or decoded pixels),
                                     too_many_items, request_too_large
415         invalid_request_error    unsupported_media_type (not an image, a non-image data URI
                                     or part, or the wrong request content type)
422         invalid_request_error    validation_error (the body does not fit the schema)
503         overloaded_error         queue_full, model_not_ready (both with ``Retry-After``)
503         server_error             model_load_failed
500         server_error             internal_error (a bug, never caused by input)
==========  =======================  ==============================================================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "error_body", "error_response", "install_error_handlers"]

log = logging.getLogger("server")


class APIError(Exception):
    """An error that the HTTP layer answers with ``status_code`` and the contract's JSON body."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.type = type or _default_type(status_code)
        self.headers = headers or {}

    # One constructor per rejection keeps status, type and code consistent across routes.
    @classmethod
    def bad_request(cls, code: str, message: str) -> APIError:
        return cls(400, code, message)

    @classmethod
    def too_large(cls, code: str, message: str) -> APIError:
        return cls(413, code, message)

    @classmethod
    def unsupported_media_type(cls, message: str) -> APIError:
        return cls(415, "unsupported_media_type", message)

    @classmethod
    def unauthorized(cls, message: str) -> APIError:
        return cls(401, "invalid_api_key", message, headers={"WWW-Authenticate": "Bearer"})

    @classmethod
    def model_not_found(cls, requested: str, served: str) -> APIError:
        return cls(
            404,
            "model_not_found",
            f"model {requested!r} is not served here; this server serves {served!r}",
        )

    @classmethod
    def unavailable(cls, code: str, message: str, retry_after_s: int) -> APIError:
        return cls(503, code, message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


def _default_type(status_code: int) -> str:
    if status_code == 401:
        return "authentication_error"
    if status_code == 404:
        return "not_found_error"
    if status_code == 503:
        return "overloaded_error"
    if status_code >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, type: str, code: str) -> dict[str, Any]:
    """The contract's error JSON."""
    return {"error": {"message": message, "type": type, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    """The response for ``exc``: its status, headers and the contract's JSON body."""
    return JSONResponse(
        error_body(exc.message, exc.type, exc.code),
        status_code=exc.status_code,
        headers=exc.headers,
    )


def _validation_message(errors: Sequence[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        where = detail.get("ctx", {}).get("error", "")
        return error_response(
            APIError.bad_request("invalid_json", f"request body is not valid JSON: {where}")
        )
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
        return error_response(
            APIError.bad_request("empty_body", "request body is empty; send a JSON object")
        )
    if errors and all(_field(e) == "dimensions" for e in errors):
        return error_response(
            APIError.bad_request(
                "invalid_dimensions",
                f"{_validation_message(errors)}: dimensions must be a whole number, from 1 to "
                "the largest size /v1/models lists (pca.max_dimensions)",
            )
        )
    return error_response(APIError(422, "validation_error", _validation_message(errors)))


def _field(error: dict[str, Any]) -> str | None:
    """The body field a validation error is about (JSON key or form field)."""
    loc = [p for p in error.get("loc", ()) if p != "body"]
    return str(loc[0]) if loc else None


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 400:
        message = f"malformed request body: {message}"
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(APIError(exc.status_code, code, message, headers=dict(exc.headers or {})))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(APIError(500, "internal_error", "internal server error"))


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure with the contract's JSON: API errors, schema errors (422, or 400
    for bad JSON and empty bodies), Starlette's HTTP errors, and a logged 500 for bugs."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
