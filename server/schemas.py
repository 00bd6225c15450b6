"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has a shape)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from ssole_hub.models import Output

__all__ = [
    "DIMENSIONS_HELP",
    "CompactSizes",
    "Embedding",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EncodingFormat",
    "ModelCard",
    "ModelList",
    "Output",
    "Status",
    "Usage",
]

EncodingFormat = Literal["float", "base64"]
DIMENSIONS_HELP = (
    "OpenAI's `dimensions`: a compact embedding of this many numbers, from the PCA fitted for "
    "the model (`ssole-hub fit-pca`; its sizes are in /v1/models, `pca`), L2-normalised; "
    "default: the full embedding. A model without a PCA, or a size out of its range, gets 400"
)


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: one image or a list of images as data URIs or bare base64."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"input": ["data:image/jpeg;base64,/9j/4AAQ..."], "normalize": True}]
        },
    )

    input: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="an image, or a non-empty list of images: `data:image/<type>;base64,...` "
        "data URIs or bare base64 of the encoded file (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)",
    )
    model: str | None = Field(
        default=None, description="the served model's id (see /v1/models); optional"
    )
    encoding_format: EncodingFormat = Field(
        default="float",
        description="`float`: lists of numbers; `base64`: little-endian float32 bytes, base64",
    )
    normalize: bool = Field(default=True, description="L2-normalise each embedding")
    output: Output | None = Field(
        default=None,
        description="`backbone` (pooled features) or `projector` (SSOLE projector output); "
        "default set by the server",
    )
    # Strict: true or "128" would pass as a size otherwise.
    dimensions: StrictInt | None = Field(default=None, description=DIMENSIONS_HELP)
    user: str | None = Field(default=None, description="ignored; accepted for OpenAI clients")


class Embedding(BaseModel):
    """One image's embedding; ``index`` is its position in the request."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    """Work done; OpenAI's token fields count images here."""

    prompt_tokens: int
    total_tokens: int
    images: int


class EmbeddingResponse(BaseModel):
    """The embeddings of a request, in the order of its inputs."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class CompactSizes(BaseModel):
    """The sizes that ``dimensions`` can ask for: the model's fitted PCA."""

    output: str = Field(description="the embedding the PCA applies to")
    max_dimensions: int = Field(description="any size from 1 to this works")
    whiten: bool = Field(description="whether the PCA whitens (unit variance per axis)")
    images: int = Field(description="how many images it was fitted on")
    variance_kept: dict[str, float] = Field(
        description="share of the embeddings' variance each common size keeps"
    )


class ModelCard(BaseModel):
    """The served model, with its embedding sizes once loaded."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ssole-hub"
    ready: bool
    dimensions: dict[str, int] = Field(
        default_factory=dict, description="embedding size per available `output`"
    )
    backend: str | None = Field(
        default=None,
        description="what runs the forward pass once loaded: `torch`, `onnx`, `onnx-bf16` or "
        "`onnx-int8`",
    )
    backend_timings: dict[str, float] = Field(
        default_factory=dict,
        description="milliseconds per image of each backend that `auto` timed at load on this "
        "machine (it serves the fastest); empty when the backend was given",
    )
    batch_size: int | None = Field(
        default=None,
        description="the batch size the batcher aims at and takes at most: the largest whose "
        "forward pass cost at most 5% more per image than the cheapest when timed at start-up "
        "(`batch_timings`), else the maximum",
    )
    batch_timings: dict[str, float] = Field(
        default_factory=dict,
        description="milliseconds per image of the forward pass by batch size, timed at start-up; "
        "empty when not timed (`warmup` off)",
    )
    reduced_decoding: bool | None = Field(
        default=None,
        description="whether large JPEGs are decoded at a reduced DCT scale (on where the "
        "model's hub folder records that it passed the decoding guard at export)",
    )
    device_decoding: dict[str, Any] | None = Field(
        default=None,
        description="whether JPEGs are decoded on the model's device (`on`), why (`reason`), "
        "and the guard's figures (`guard`: cosine and neighbour agreement against CPU decoding)",
    )
    pca: CompactSizes | None = Field(
        default=None,
        description="the sizes `dimensions` offers (the model's PCA); null without one",
    )


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Status(BaseModel):
    """``GET /health`` and ``GET /ready`` when the answer is yes."""

    status: str
