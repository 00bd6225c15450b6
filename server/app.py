"""The HTTP layer: parse and validate requests, hand images to the batcher, map errors.

Nothing here touches the model: decoding and preprocessing go through the backend's ``prepare``
(run in a thread pool, one call per image, so a bad image fails only its own request) and
inference through :class:`~server.batcher.DynamicBatcher`. Every failure leaves as the contract's
JSON error (:mod:`server.errors`).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at
# run time, and the API-key dependency refers to a name local to create_app.

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.backend import BackendLoader, EmbeddingBackend, init_decode_thread, load_backend
from server.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from server.errors import APIError, error_body, error_response
from server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from server.schemas import (
    EmbeddingRequest,
    EmbeddingResponse,
    EncodingFormat,
    ModelCard,
    ModelList,
    Output,
    Status,
)
from server.settings import ServerSettings
from ssole_hub import CorruptImageError, ImageTooLargeError, UnsupportedImageError

__all__ = ["create_app"]

log = logging.getLogger("server")

_DATA_URI = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
# Seconds a client is told to wait while the model loads.
_LOADING_RETRY_AFTER_S = 5


@dataclass
class _State:
    settings: ServerSettings
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    backend: EmbeddingBackend | None = None
    batcher: DynamicBatcher | None = None
    decode_pool: ThreadPoolExecutor | None = None
    load_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.running


# --------------------------------------------------------------------------------------------
# Inputs: base64 / data URIs and uploaded files -> encoded bytes
# --------------------------------------------------------------------------------------------


def _decode_base64_input(text: str, index: int, max_bytes: int) -> bytes:
    """Encoded image bytes from a data URI or bare base64 string; raises :class:`APIError`."""
    where = f"input[{index}]"
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
    payload = _WHITESPACE.sub("", payload)
    if not payload:
        raise APIError.bad_request("invalid_image", f"{where} is empty")
    # 4 base64 characters carry 3 bytes: refuse oversize inputs before decoding them.
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise APIError.too_large(
            "image_too_large",
            f"{where} is too large: about {len(payload) // 4 * 3} bytes, "
            f"the limit is {max_bytes} bytes",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError.bad_request("invalid_base64", f"{where} is not valid base64: {exc}") from exc


def _check_part_type(upload: UploadFile, where: str) -> None:
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


def _image_error(exc: Exception, where: str) -> APIError:
    """Map a decoder error to the contract: 413 too large, 415 not an image, 400 damaged."""
    if isinstance(exc, ImageTooLargeError):
        return APIError.too_large("image_too_large", f"{where}: {exc}")
    if isinstance(exc, UnsupportedImageError):
        return APIError.unsupported_media_type(f"{where}: {exc}")
    if isinstance(exc, CorruptImageError | ValueError):
        return APIError.bad_request("invalid_image", f"{where}: {exc}")
    raise exc


# --------------------------------------------------------------------------------------------
# Middleware: body size limit and request metrics (pure ASGI, so streaming stays untouched)
# --------------------------------------------------------------------------------------------


class _BodyLimit:
    """Refuse bodies over ``max_bytes`` with a JSON 413 before the app reads them.

    The body is read here (it is bounded) and replayed to the app; the app's later ``receive``
    calls go to the server, so it can still notice a client that disconnects.
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
            await self._reject(scope, receive, send, f"{int(declared)} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, f"more than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        exc = APIError.too_large(
            "request_too_large",
            f"request body is too large: {size}, the limit is {self.max_bytes} bytes",
        )
        await error_response(exc)(scope, receive, send)


class _RequestMetrics:
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


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def create_app(settings: ServerSettings, loader: BackendLoader | None = None) -> FastAPI:
    """Build the embedding service for ``settings``.

    The model is loaded (by ``loader``, default :func:`~server.backend.load_backend`) and warmed
    in the background once the server starts: ``/health`` answers at once, ``/ready`` and the
    embedding routes answer 503 until the model is ready.
    """
    state = _State(settings=settings, metrics=ServerMetrics())
    load = loader or load_backend

    async def bring_up() -> None:
        loop = asyncio.get_running_loop()
        try:
            backend = await loop.run_in_executor(None, load, settings)
            if settings.warmup:
                await loop.run_in_executor(None, backend.warmup, settings.max_batch_size)
            batcher = DynamicBatcher(
                backend.infer,
                max_batch_size=settings.max_batch_size,
                max_wait_s=settings.max_batch_wait_ms / 1000,
                max_queue=settings.max_queue,
                metrics=state.metrics,
            )
            await batcher.start()
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("could not load model %r", settings.model)
            return
        state.backend = backend
        state.batcher = batcher
        log.info("model %r ready: %s", settings.model_id, backend.dimensions)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.decode_pool = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="decode", initializer=init_decode_thread
        )
        loading = asyncio.create_task(bring_up())
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            if state.batcher is not None:
                await state.batcher.stop()
            state.decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="SSOLE Hub embedding server",
        version="1",
        summary="Image embeddings from SSOLE self-supervised ResNets, OpenAI-compatible.",
        lifespan=lifespan,
    )
    app.state.ssole = state
    _install_error_handlers(app)
    # Added last = outermost: rejected bodies are counted in the metrics too.
    app.add_middleware(_BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(_RequestMetrics, metrics=state.metrics)

    bearer = HTTPBearer(auto_error=False, description="the server's API key, if it has one")

    async def require_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if settings.api_key is None:
            return
        if credentials is None:
            raise APIError.unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        expected = settings.api_key.get_secret_value().encode()
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise APIError.unauthorized("invalid API key")

    def require_content_type(*accepted: str) -> Callable[[Request], None]:
        def check(request: Request) -> None:
            content_type = request.headers.get("content-type", "")
            media_type = content_type.split(";")[0].strip().lower()
            if media_type not in accepted:
                raise APIError.unsupported_media_type(
                    f"content type {media_type or 'none'!r} is not accepted here; "
                    f"send {' or '.join(accepted)}"
                )

        return check

    def load_failed() -> APIError:
        message = f"model failed to load: {state.load_error}"
        return APIError(503, "model_load_failed", message, type="server_error")

    def ready_parts() -> tuple[EmbeddingBackend, DynamicBatcher]:
        if state.backend is None or state.batcher is None or not state.batcher.running:
            if state.load_error:
                raise load_failed()
            raise APIError.unavailable(
                "model_not_ready", "model is loading; retry shortly", _LOADING_RETRY_AFTER_S
            )
        return state.backend, state.batcher

    def check_model(requested: str | None) -> None:
        if requested and requested not in (settings.model_id, settings.model):
            raise APIError.model_not_found(requested, settings.model_id)

    async def embed(
        request: Request,
        items: Sequence[Callable[[], bytes]],
        names: Sequence[str],
        *,
        encoding_format: EncodingFormat,
        normalize: bool,
        output: Output | None,
    ) -> Response:
        """Decode, queue and embed ``items`` (thunks giving encoded bytes) for one request."""
        started = time.perf_counter()
        backend, batcher = ready_parts()
        if not items:
            raise APIError(422, "validation_error", "no images in the request")
        if len(items) > settings.max_items:
            raise APIError.too_large(
                "too_many_items",
                f"{len(items)} images in one request; the limit is {settings.max_items}",
            )
        chosen = output or settings.default_output
        if chosen not in backend.dimensions:
            raise APIError.bad_request(
                "output_unavailable",
                f"output {chosen!r} is not available for this model; available: "
                f"{', '.join(sorted(backend.dimensions))}",
            )
        try:
            batcher.check_capacity(len(items))
        except QueueFullError as exc:
            state.metrics.rejected.labels("queue_full").inc()
            raise APIError.unavailable("queue_full", str(exc), exc.retry_after_s) from exc

        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(state.decode_pool, _prepare, backend, get) for get in items),
            return_exceptions=True,
        )
        prepared = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                error = result if isinstance(result, APIError) else _image_error(result, name)
                state.metrics.decode_errors.labels(error.code).inc()
                raise error
            prepared.append(result)
        decoded = time.perf_counter()

        work = asyncio.ensure_future(batcher.submit(prepared, key=(chosen, normalize)))
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                # The client went away: drop its queued images instead of computing them.
                work.cancel()
        if work.cancelled():
            return Response(status_code=499)
        try:
            vectors, timing = work.result()
        except QueueFullError as exc:
            state.metrics.rejected.labels("queue_full").inc()
            raise APIError.unavailable("queue_full", str(exc), exc.retry_after_s) from exc
        except BatcherClosedError as exc:
            raise APIError.unavailable("model_not_ready", str(exc), _LOADING_RETRY_AFTER_S) from exc

        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, encoding_format)}
            for i, v in enumerate(vectors)
        ]
        body = {
            "object": "list",
            "data": data,
            "model": settings.model_id,
            "usage": {"prompt_tokens": len(data), "total_tokens": len(data), "images": len(data)},
        }
        headers = {
            "x-decode-time": f"{(decoded - started) * 1000:.2f}",
            "x-queue-time": f"{timing.queue_s * 1000:.2f}",
            "x-inference-time": f"{timing.inference_s * 1000:.2f}",
            "x-total-time": f"{(time.perf_counter() - started) * 1000:.2f}",
        }
        return JSONResponse(body, headers=headers)

    responses: dict[int | str, dict[str, Any]] = {
        code: {
            "description": desc,
            "content": {"application/json": {"example": error_body(desc, "...", "...")}},
        }
        for code, desc in [
            (400, "bad image, bad base64 or malformed body"),
            (401, "missing or wrong API key"),
            (404, "unknown model"),
            (413, "too many bytes, pixels or images"),
            (415, "not an image, or wrong content type"),
            (422, "body does not match the schema"),
            (503, "queue full or model not ready (see Retry-After)"),
        ]
    }

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses=responses,
        dependencies=[
            Depends(require_api_key),
            Depends(require_content_type("application/json")),
        ],
        tags=["embeddings"],
    )
    async def create_embeddings(request: Request, body: EmbeddingRequest) -> Response:
        """Embed images sent as data URIs or bare base64 (OpenAI's embeddings shape)."""
        check_model(body.model)
        inputs = [body.input] if isinstance(body.input, str) else body.input
        max_bytes = settings.max_image_bytes

        def thunk(i: int, text: str) -> Callable[[], bytes]:
            return lambda: _decode_base64_input(text, i, max_bytes)

        return await embed(
            request,
            [thunk(i, t) for i, t in enumerate(inputs)],
            [f"input[{i}]" for i in range(len(inputs))],
            encoding_format=body.encoding_format,
            normalize=body.normalize,
            output=body.output,
        )

    @app.post(
        "/v1/embeddings/upload",
        response_model=EmbeddingResponse,
        responses=responses,
        dependencies=[
            Depends(require_api_key),
            Depends(require_content_type("multipart/form-data")),
        ],
        tags=["embeddings"],
    )
    async def upload_embeddings(
        request: Request,
        files: Annotated[list[UploadFile], File(description="one or more image files")],
        model: Annotated[str | None, Form()] = None,
        encoding_format: Annotated[EncodingFormat, Form()] = "float",
        normalize: Annotated[bool, Form()] = True,
        output: Annotated[Output | None, Form()] = None,
    ) -> Response:
        """Embed images uploaded as multipart ``files`` parts; same options and response."""
        check_model(model)
        names = [f"files[{i}] ({f.filename or 'unnamed'})" for i, f in enumerate(files)]
        if len(files) > settings.max_items:
            raise APIError.too_large(
                "too_many_items",
                f"{len(files)} images in one request; the limit is {settings.max_items}",
            )
        for upload, name in zip(files, names, strict=True):
            _check_part_type(upload, name)
        max_bytes = settings.max_image_bytes

        def thunk(upload: UploadFile) -> Callable[[], bytes]:
            def read() -> bytes:
                # Read one byte past the limit: the decoder then reports the size as too large.
                upload.file.seek(0)
                return upload.file.read(max_bytes + 1)

            return read

        return await embed(
            request,
            [thunk(f) for f in files],
            names,
            encoding_format=encoding_format,
            normalize=normalize,
            output=output,
        )

    @app.get(
        "/v1/models",
        response_model=ModelList,
        tags=["models"],
        dependencies=[Depends(require_api_key)],
        responses={401: responses[401]},
    )
    async def list_models() -> ModelList:
        """The one model this server serves."""
        card = ModelCard(
            id=settings.model_id,
            created=state.created,
            ready=state.ready,
            dimensions=dict(state.backend.dimensions) if state.backend else {},
        )
        return ModelList(data=[card])

    @app.get(
        "/health",
        response_model=Status,
        tags=["operations"],
        responses={503: {"description": "the model failed to load"}},
    )
    async def health() -> Status:
        """Alive: 200 while the process serves requests (503 only if the model failed to load)."""
        if state.load_error:
            raise load_failed()
        return Status(status="ok")

    @app.get(
        "/ready",
        response_model=Status,
        tags=["operations"],
        responses={503: {"description": "model not loaded and warmed yet"}},
    )
    async def ready() -> Status:
        """Ready: 200 once the model is loaded and warmed, 503 (with Retry-After) before."""
        ready_parts()
        return Status(status="ready")

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    )
    async def metrics() -> Response:
        """Prometheus metrics: requests, latency, queue time and depth, batch sizes, errors."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _prepare(backend: EmbeddingBackend, get_bytes: Callable[[], bytes]) -> Any:
    return backend.prepare(get_bytes())


def _encode(vector: np.ndarray, encoding_format: EncodingFormat) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32).tolist()


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _validation_message(errors: Sequence[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
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
        return error_response(APIError(422, "validation_error", _validation_message(errors)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            400: "bad_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "request_too_large",
        }
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400:
            message = f"malformed request body: {message}"
        return error_response(
            APIError(
                exc.status_code,
                codes.get(exc.status_code, "http_error"),
                message,
                headers=dict(exc.headers or {}),
            )
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal_error", "internal server error"))
