"""Server settings: defaults, then ``SSOLE_SERVER_*`` environment variables, then command-line flags.

Every field is both an environment variable (``max_batch_size`` -> ``SSOLE_SERVER_MAX_BATCH_SIZE``)
and a flag (``--max-batch-size``); a flag wins over the variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_origin

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ssole_hub.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ssole_hub.models import Output

__all__ = ["ServerSettings", "build_arg_parser", "settings_from_args"]

# What a browser sends as `Origin`: scheme://host[:port], no path, no trailing slash.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", re.IGNORECASE)


class ServerSettings(BaseSettings):
    """Everything the embedding server can be configured with; each limit has a safe default."""

    model_config = SettingsConfigDict(env_prefix="SSOLE_SERVER_", extra="forbid")

    model: str = Field(
        description="model to serve: a timm name (ssole_resnet50.in1k_m8), local-dir:PATH or "
        "hf-hub:ORG/REPO"
    )
    served_model_name: str | None = Field(
        default=None,
        description="name clients pass as `model` (default: the folder or repo name of --model)",
    )
    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8000, ge=0, le=65535, description="port to bind")
    device: str = Field(default="auto", description="torch device: auto, cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="compute dtype; auto: bfloat16 on GPUs that support it, float32 on CPU",
    )
    backend: Literal["auto", "torch", "onnx", "onnx-bf16", "onnx-int8"] = Field(
        default="auto",
        description="forward pass: torch, or OpenVINO on the CPU with the model folder's "
        "onnx/model.onnx (onnx: float32, onnx-bf16: bfloat16) or onnx/model_int8.onnx "
        "(onnx-int8); auto: torch on a GPU, else each backend that the folder has and that "
        "passed its export check, and torch, is timed at start-up and the fastest served",
    )
    default_output: Output = Field(
        default="backbone", description="embedding returned when a request names no `output`"
    )
    # Both defaults were chosen by measurement (bench/serve.py, BENCHMARKS.md): the batches
    # already wait for images being decoded, so a fixed wait only adds latency; 64 bounds the
    # sizes timed at start-up, of which the cheapest per image becomes the batches' target.
    max_batch_size: int = Field(
        default=64,
        ge=1,
        description="most images per forward pass; batches aim at the size whose forward pass "
        "was timed cheapest per image at start-up, up to this",
    )
    max_batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="longest time the oldest queued image waits for more images before its "
        "forward pass starts (0: start as soon as the model is free)",
    )
    max_queue: int = Field(
        default=256,
        ge=1,
        description="images waiting for inference before new work gets 503; at least --max-items",
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_BYTES, ge=1, description="largest encoded image, in bytes"
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=1, description="largest decoded image, width x height"
    )
    max_items: int = Field(default=64, ge=1, description="images per request")
    max_request_bytes: int = Field(
        default=64 * 2**20, ge=1, description="largest request body, in bytes"
    )
    # NoDecode: the variable is a comma-separated list (like the flag given several times),
    # not the JSON that pydantic-settings expects for lists by default.
    cors_allow_origin: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="browser origin (scheme://host[:port]) allowed to call the API from its "
        "pages, or * for any; repeat the flag, or comma-separate in the variable (default: none, "
        "no CORS headers)",
    )
    api_key: SecretStr | None = Field(
        default=None, description="if set, /v1/* requires `Authorization: Bearer <key>`"
    )
    decode_threads: int = Field(
        default=min(4, os.cpu_count() or 1),
        ge=1,
        description="threads that decode and preprocess images (default: the CPU count, at most 4)",
    )
    decode_on_device: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="decode JPEGs on the model's device in each batch (nvjpeg on a GPU), other "
        "formats in the decode threads; auto: on a GPU if the model's embeddings of guard photos "
        "agree with CPU decoding; on: wherever torchvision can decode there; off: never",
    )
    inference_threads: int | None = Field(
        default=None,
        ge=1,
        description="intra-op threads of the forward pass (default: torch's, one per core)",
    )
    keep_alive_s: float = Field(
        default=65.0,
        gt=0,
        description="idle seconds before a keep-alive connection is closed (keep it above any "
        "load balancer's idle timeout, so the balancer never reuses a closing connection)",
    )
    warmup: bool = Field(default=True, description="run forward passes before reporting ready")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info",
        description="log level of uvicorn and of the server's own lines on stderr (the model "
        "loaded, the backend auto chose)",
    )

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_no_key(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty SSOLE_SERVER_API_KEY= in a compose file means "no key", not "the empty key".
        return value if value is not None and value.get_secret_value() else None

    @field_validator("cors_allow_origin", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return value  # pydantic reports the wrong type
        return [o.strip() for item in items for o in str(item).split(",") if o.strip()]

    @field_validator("cors_allow_origin")
    @classmethod
    def _origins_are_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: give scheme://host[:port] with no path or "
                    "trailing slash (e.g. https://app.example.com), or * for any origin"
                )
        return origins

    @model_validator(mode="after")
    def _items_fit_the_queue(self) -> ServerSettings:
        if self.max_items > self.max_queue:
            raise ValueError(
                f"max_items ({self.max_items}) must not exceed max_queue ({self.max_queue}): "
                "a request that large could never be queued"
            )
        return self

    @property
    def model_id(self) -> str:
        """The name served in ``/v1/models`` and accepted as a request's ``model``."""
        if self.served_model_name:
            return self.served_model_name
        spec = self.model
        for prefix in ("local-dir:", "hf-hub:"):
            if spec.startswith(prefix):
                spec = spec.removeprefix(prefix).rstrip("/")
                return spec.rsplit("/", 1)[-1] if prefix == "local-dir:" else spec
        return spec


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, bool):
        return f"default: {'on' if default else 'off'}"
    return f"default: {'none' if default is None else default}"


def build_arg_parser() -> argparse.ArgumentParser:
    """An argument parser with one ``--flag`` per :class:`ServerSettings` field.

    Flags default to "not given" so that environment variables still apply underneath them.
    """
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve SSOLE image embeddings over HTTP (OpenAI-compatible /v1/embeddings). "
        "Every flag can also be set as SSOLE_SERVER_<FLAG> in the environment.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if "(default" not in help_text:  # some defaults are best said in words
            help_text += f" ({_default_text(field)})"
        help_text = help_text.replace("%", "%%")
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif get_origin(field.annotation) is list:
            parser.add_argument(flag, action="append", metavar=name.upper(), help=help_text)
        else:
            parser.add_argument(flag, metavar=name.upper(), help=help_text)
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> ServerSettings:
    """Parse ``argv`` (default: ``sys.argv[1:]``) over the environment into validated settings.

    Raises:
        pydantic.ValidationError: if a value is missing or invalid (names the field).
    """
    given: dict[str, Any] = vars(build_arg_parser().parse_args(argv))
    return ServerSettings(**given)
