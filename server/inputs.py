"""Request inputs to encoded image bytes: JSON bodies, data URIs, bare base64 and multipart parts.

Each function raises :class:`~server.errors.APIError` with the contract's status, naming the
input (``input[2]``, ``files[0] (cat.jpg)``) that was wrong. JSON bodies are parsed by
``orjson`` (:class:`OrjsonRoute`), several times faster than the standard library on bodies that
are mostly one long base64 string.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response, UploadFile
from fastapi.routing import APIRoute

from server.errors import APIError
from ssole_hub import CorruptImageError, ImageTooLargeError, UnsupportedImageError

__all__ = ["OrjsonRoute", "base64_image", "image_error", "upload_reader"]

_DATA_URI = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class _OrjsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            # orjson.JSONDecodeError is a json.JSONDecodeError: FastAPI answers it as before.
            self._json = orjson.loads(await self.body())
        return self._json


class OrjsonRoute(APIRoute):
    """A route whose JSON body is parsed by ``orjson`` (FastAPI's pattern for a custom request
    class); validation, errors and the OpenAPI schema stay FastAPI's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(_OrjsonRequest(request.scope, request.receive))

        return handle


def base64_image(text: str, where: str, max_bytes: int) -> bytes:
    """Encoded image bytes from a data URI or bare base64 string.

    Raises:
        APIError: 415 for a non-image data URI, 400 for bad or empty base64, 413 over
            ``max_bytes``.
    """
    payload = text
    match = _DATA_URI.match(text)
    if match:
        media_type = match["type"].strip().lower()
        params = [p.strip().lower() for p in match["params"].split(";") if p.strip()]
        if media_type and not media_type.startswith("image/"):
            raise APIError.unsupported_media_type(
                f"{where} is a data URI of type {media_type!r}; only image/* is accepted"
            )
        if "base64" not in params:
            raise APIError.bad_request(
                "invalid_base64", f"{where} is a data URI without ';base64'; encode the image"
            )
        payload = text[match.end() :]
    elif text.startswith("data:"):
        raise APIError.bad_request(
            "invalid_base64", f"{where} is a malformed data URI (no ',' before the data)"
        )
    if not payload or payload.isspace():  # isspace() stops at the first other character
        raise APIError.bad_request("invalid_image", f"{where} is empty")
    # 4 base64 characters carry 3 bytes: refuse oversize inputs before decoding them.
    size = len(payload) // 4 * 3
    if size > max_bytes + 2:
        size = len(_WHITESPACE.sub("", payload)) // 4 * 3  # line breaks carry no data
        if size > max_bytes + 2:
            raise APIError.too_large(
                "image_too_large",
                f"{where} is too large: about {size} bytes, the limit is {max_bytes} bytes",
            )
    try:
        # Strict decoding refuses whitespace, so the usual unbroken payload decodes in one pass;
        # only a refused one pays for the scan that removes line breaks (4x the decode's CPU).
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode(_WHITESPACE.sub("", payload), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError.bad_request("invalid_base64", f"{where} is not valid base64: {exc}") from exc


def _check_part_type(upload: UploadFile, where: str) -> None:
    """Refuse a multipart part that declares a non-image content type (415)."""
    media_type = (upload.content_type or "").split(";")[0].strip().lower()
    # Clients that do not know the type send application/octet-stream (or nothing): let the
    # decoder sniff the bytes. A declared non-image type is refused as such.
    if (
        media_type
        and media_type != "application/octet-stream"
        and not media_type.startswith("image/")
    ):
        raise APIError.unsupported_media_type(
            f"{where} has content type {media_type!r}; send image/* or application/octet-stream"
        )


def upload_reader(upload: UploadFile, where: str, max_bytes: int) -> Callable[[], bytes]:
    """A thunk reading an uploaded part: 415 for a part that declares a non-image type, else its
    bytes, one past ``max_bytes`` so that the decoder reports the size as too large."""

    def read() -> bytes:
        _check_part_type(upload, where)
        upload.file.seek(0)
        return upload.file.read(max_bytes + 1)

    return read


def image_error(exc: Exception, where: str) -> APIError:
    """Map a decoder error to the contract: 413 too large, 415 not an image, 400 damaged.

    Raises:
        Exception: ``exc`` itself when it is not a decoder error (a bug, answered 500).
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ImageTooLargeError):
        return APIError.too_large("image_too_large", f"{where}: {exc}")
    if isinstance(exc, UnsupportedImageError):
        return APIError.unsupported_media_type(f"{where}: {exc}")
    if isinstance(exc, CorruptImageError | ValueError):
        return APIError.bad_request("invalid_image", f"{where}: {exc}")
    raise exc
