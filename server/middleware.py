"""Pure-ASGI middleware: the request-body check, request metrics (streaming stays untouched) and
the CORS policy."""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response
from server.metrics import ServerMetrics

__all__ = ["BodyCheck", "CORSPolicy", "RequestMetrics"]


def _multipart_boundary(scope: Scope) -> bytes | None:
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    media_type, _, params = content_type.partition(b";")
    if media_type.strip().lower() != b"multipart/form-data":
        return None
    for param in params.split(b";"):
        name, _, value = param.strip().partition(b"=")
        if name.lower() == b"boundary" and value:
            return value.strip(b'"')
    return None


class BodyCheck:
    """Read the (bounded) body once and refuse what the app must not parse.

    - over ``max_bytes``: a JSON 413, before the app reads anything;
    - a multipart body without its closing boundary: a JSON 400 (the multipart parser would
      silently drop the unfinished part and report a missing field instead).

    The body is replayed to the app; the app's later ``receive`` calls go to the server, so it
    can still notice a client that disconnects.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, self._too_large(f"{int(declared)} bytes"))
            return
        body, too_large = await self._read(receive)
        if too_large:
            exc = self._too_large(f"more than {self.max_bytes} bytes")
            await self._reject(scope, receive, send, exc)
            return
        if body is None:  # the client went away
            return
        boundary = _multipart_boundary(scope)
        if boundary is not None and b"--" + boundary + b"--" not in body:
            message = (
                "malformed request body: the multipart body has no closing boundary "
                f"'--{boundary.decode(errors='replace')}--' (was it cut off?)"
            )
            await self._reject(scope, receive, send, APIError.bad_request("bad_request", message))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> tuple[bytes | None, bool]:
        """The whole body (``None`` if the client went away), and whether it was too large."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None, True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    def _too_large(self, size: str) -> APIError:
        return APIError.too_large(
            "request_too_large",
            f"request body is too large: {size}, the limit is {self.max_bytes} bytes",
        )

    async def _reject(self, scope: Scope, receive: Receive, send: Send, exc: APIError) -> None:
        await error_response(exc)(scope, receive, send)


class RequestMetrics:
    """Count requests by route template and status, and time them."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            # Label by template, never the raw path: unknown paths must not grow the series.
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_latency.labels(label).observe(time.perf_counter() - started)


# Response headers a page on another origin may read: the timing headers and Retry-After.
_EXPOSED_HEADERS = (
    "x-decode-time",
    "x-queue-time",
    "x-inference-time",
    "x-total-time",
    "retry-after",
)


class CORSPolicy(CORSMiddleware):
    """Starlette's CORS middleware for the API's own methods and headers; ``*`` allows any origin.

    A preflight it refuses (origin, method or request headers not allowed) gets the contract's
    JSON 400 ``cors_preflight_refused`` with no ``Access-Control-*`` header at all, rather than
    Starlette's plain-text 400 that still lists the allowed methods and headers.
    """

    def __init__(self, app: ASGIApp, allow_origins: Sequence[str]) -> None:
        super().__init__(
            app,
            allow_origins=allow_origins,
            allow_methods=("GET", "POST"),
            allow_headers=("Authorization", "Content-Type"),
            expose_headers=_EXPOSED_HEADERS,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        message = (
            f"CORS preflight refused for origin {request_headers['origin']!r}: "
            f"{refused.removeprefix('Disallowed CORS ')} not allowed"
        )
        return error_response(APIError.bad_request("cors_preflight_refused", message))
