"""The HTTP app: :func:`create_app` wires the service, middleware and error handlers; the
routes below it only parse, validate and answer.

Nothing here touches the model: the routes hand their images to
:class:`~server.service.EmbeddingService` (``app.state.service``), which decodes them in a thread
pool and embeds them through the batcher. Every failure leaves as the contract's JSON error
(:mod:`server.errors`).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at
# run time.

import contextlib
import hmac
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.backend import BackendLoader, load_backend
from server.errors import APIError, error_body, install_error_handlers
from server.inputs import OrjsonRoute, base64_image, upload_reader
from server.metrics import CONTENT_TYPE_LATEST
from server.middleware import BodyCheck, CORSPolicy, RequestMetrics
from server.outputs import embeddings_body
from server.schemas import (
    DIMENSIONS_HELP,
    CompactSizes,
    EmbeddingRequest,
    EmbeddingResponse,
    EncodingFormat,
    ModelCard,
    ModelList,
    Output,
    Status,
)
from server.service import Embedded, EmbeddingService
from server.settings import ServerSettings

__all__ = ["create_app", "router"]


def create_app(
    settings: ServerSettings,
    loader: BackendLoader | None = None,
    on_load_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the embedding service for ``settings``.

    The model is loaded (by ``loader``, default :func:`~server.backend.load_backend`) and warmed
    in the background once the server starts: ``/health`` answers at once, ``/ready`` and the
    embedding routes answer 503 until the model is ready. If loading fails, every route but
    ``/metrics`` answers 503 ``model_load_failed`` and ``on_load_failure`` is called.
    """
    service = EmbeddingService(settings, loader or load_backend, on_load_failure)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="SSOLE Hub embedding server",
        version="1",
        summary="Image embeddings from SSOLE self-supervised ResNets, OpenAI-compatible.",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.include_router(router)
    # Added last = outermost: rejected bodies are counted in the metrics too, and carry the CORS
    # headers, so that a page on an allowed origin can read why it was refused.
    app.add_middleware(BodyCheck, max_bytes=settings.max_request_bytes)
    if settings.cors_allow_origin:
        app.add_middleware(CORSPolicy, allow_origins=settings.cors_allow_origin)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    return app


# --------------------------------------------------------------------------------------------
# Dependencies
# --------------------------------------------------------------------------------------------


def get_service(request: Request) -> EmbeddingService:
    """The app's :class:`~server.service.EmbeddingService`."""
    return request.app.state.service


_bearer = HTTPBearer(auto_error=False, description="the server's API key, if it has one")


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless the request carries the server's API key (when it has one)."""
    api_key = get_service(request).settings.api_key
    if api_key is None:
        return
    if credentials is None:
        raise APIError.unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(
        credentials.credentials.encode(), api_key.get_secret_value().encode()
    ):
        raise APIError.unauthorized("invalid API key")


def require_content_type(*accepted: str) -> Callable[[Request], None]:
    """A dependency answering 415 unless the request's media type is one of ``accepted``."""

    async def check(request: Request) -> None:  # async: no thread-pool hop per request
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in accepted:
            raise APIError.unsupported_media_type(
                f"content type {media_type or 'none'!r} is not accepted here; "
                f"send {' or '.join(accepted)}"
            )

    return check


def check_model(service: EmbeddingService, requested: str | None) -> None:
    """404 if the request names a model this server does not serve."""
    settings = service.settings
    if requested and requested not in (settings.model_id, settings.model):
        raise APIError.model_not_found(requested, settings.model_id)


def embedding_response(
    service: EmbeddingService, embedded: Embedded | None, encoding_format: EncodingFormat
) -> Response:
    """The OpenAI-shaped body and timing headers; 499 if the client went away."""
    if embedded is None:
        return Response(status_code=499)
    timing = embedded.timing
    headers = {
        "x-decode-time": f"{embedded.decode_s * 1000:.2f}",
        "x-queue-time": f"{timing.queue_s * 1000:.2f}",
        "x-inference-time": f"{timing.inference_s * 1000:.2f}",
        "x-total-time": f"{embedded.total_s * 1000:.2f}",
    }
    body = embeddings_body(embedded.vectors, service.settings.model_id, encoding_format)
    return Response(body, media_type="application/json", headers=headers)


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {
        "description": desc,
        "content": {"application/json": {"example": error_body(desc, "...", "...")}},
    }
    for code, desc in [
        (400, "bad image, bad base64, malformed body, or dimensions the model cannot give"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "too many bytes, pixels or images"),
        (415, "not an image, or wrong content type"),
        (422, "body does not match the schema"),
        (503, "queue full or model not ready (see Retry-After)"),
    ]
}

# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------

router = APIRouter(route_class=OrjsonRoute)


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=_ERROR_RESPONSES,
    dependencies=[Depends(require_api_key), Depends(require_content_type("application/json"))],
    tags=["embeddings"],
)
async def create_embeddings(request: Request, body: EmbeddingRequest) -> Response:
    """Embed images sent as data URIs or bare base64 (OpenAI's embeddings shape)."""
    service = get_service(request)
    check_model(service, body.model)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    names = [f"input[{i}]" for i in range(len(inputs))]
    max_bytes = service.settings.max_image_bytes

    def reader(text: str, name: str) -> Callable[[], bytes]:
        return lambda: base64_image(text, name, max_bytes)

    embedded = await service.embed(
        request,
        [reader(t, n) for t, n in zip(inputs, names, strict=True)],
        names,
        output=body.output,
        normalize=body.normalize,
        dimensions=body.dimensions,
    )
    return embedding_response(service, embedded, body.encoding_format)


@router.post(
    "/v1/embeddings/upload",
    response_model=EmbeddingResponse,
    responses=_ERROR_RESPONSES,
    dependencies=[Depends(require_api_key), Depends(require_content_type("multipart/form-data"))],
    tags=["embeddings"],
)
async def upload_embeddings(
    request: Request,
    files: Annotated[list[UploadFile], File(description="one or more image files")],
    model: Annotated[str | None, Form()] = None,
    encoding_format: Annotated[EncodingFormat, Form()] = "float",
    normalize: Annotated[bool, Form()] = True,
    output: Annotated[Output | None, Form()] = None,
    dimensions: Annotated[int | None, Form(description=DIMENSIONS_HELP)] = None,
) -> Response:
    """Embed images uploaded as multipart ``files`` parts; same options and response."""
    service = get_service(request)
    check_model(service, model)
    names = [f"files[{i}] ({f.filename or 'unnamed'})" for i, f in enumerate(files)]
    max_bytes = service.settings.max_image_bytes
    embedded = await service.embed(
        request,
        [upload_reader(f, name, max_bytes) for f, name in zip(files, names, strict=True)],
        names,
        output=output,
        normalize=normalize,
        dimensions=dimensions,
    )
    return embedding_response(service, embedded, encoding_format)


@router.get(
    "/v1/models",
    response_model=ModelList,
    tags=["models"],
    dependencies=[Depends(require_api_key)],
    responses={401: _ERROR_RESPONSES[401]},
)
async def list_models(request: Request) -> ModelList:
    """The one model this server serves."""
    service = get_service(request)
    card = ModelCard(
        id=service.settings.model_id,
        created=service.created,
        ready=service.ready,
        dimensions=dict(service.backend.dimensions) if service.backend else {},
        backend=service.backend.backend_name if service.backend else None,
        backend_timings=dict(service.backend.backend_timings) if service.backend else {},
        batch_size=service.batcher.target_size if service.batcher else None,
        batch_timings={str(n): round(ms, 3) for n, ms in service.batch_timings.items()},
        reduced_decoding=service.backend.reduced_decoding if service.backend else None,
        device_decoding=dict(service.backend.device_decoding) if service.backend else None,
        pca=CompactSizes(**service.backend.pca)
        if service.backend and service.backend.pca
        else None,
    )
    return ModelList(data=[card])


@router.get(
    "/health",
    response_model=Status,
    tags=["operations"],
    responses={503: {"description": "the model failed to load"}},
)
async def health(request: Request) -> Status:
    """Alive: 200 while the process serves requests, also while the model loads (503 only if
    the model failed to load)."""
    service = get_service(request)
    if service.load_error:
        raise service.load_failed()
    return Status(status="ok")


@router.get(
    "/ready",
    response_model=Status,
    tags=["operations"],
    responses={503: {"description": "model not loaded and warmed yet, or failed to load"}},
)
async def ready(request: Request) -> Status:
    """Ready: 200 once the model is loaded and warmed, 503 (with Retry-After) before."""
    get_service(request).ready_parts()
    return Status(status="ready")


@router.get(
    "/metrics",
    tags=["operations"],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latency, queue time and depth, batch sizes, errors."""
    return Response(get_service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
