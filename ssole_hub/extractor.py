"""FeatureExtractor: images in, one embedding per image out, from any SSOLE (or timm) model.

Preprocessing is never written here: it comes from the one resolver,
:func:`ssole_hub.preprocessing.resolve_preprocessing` (timm's eval transform from the model's own
pretrained config), so the extractor, ``ssole-hub extract``, the server and evaluation all feed a
model exactly what it was trained for. The forward pass is
:class:`ssole_hub.models.SSOLEModel`'s (``backend="torch"``) or OpenVINO's on the folder's ONNX
files (:class:`ssole_hub.runtimes.openvino.OnnxModel`, ``"onnx"``, ``"onnx-bf16"``, ``"onnx-int8"``),
called the same way;
nothing else differs between backends. Compact embeddings (``dimensions``) are made after the
forward pass, by the hub folder's PCA (:mod:`ssole_hub.pca`), so every backend gives them.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ssole_hub.device_decode import DeviceDecoder, EncodedJPEG, device_support
from ssole_hub.errors import HubFolderError
from ssole_hub.hub.compact import FIT_COMMAND
from ssole_hub.hub.decode_check import check_device_decoding, resize_side
from ssole_hub.hub.load import (
    guarded_backends,
    load_model,
    load_onnx_model,
    load_pca,
    reduced_decoding_record,
)
from ssole_hub.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    to_rgb,
)
from ssole_hub.models import Output, SSOLEModel, l2_normalize
from ssole_hub.pca import PCA
from ssole_hub.preprocessing import resolve_preprocessing
from ssole_hub.runtimes.backends import (
    TIMING_BATCH,
    Backend,
    candidate_backends,
    fastest_backend,
)
from ssole_hub.runtimes.conv_fusion import fuse_conv_activations
from ssole_hub.runtimes.eager import default_device, inference_model, resolve_dtype
from ssole_hub.runtimes.openvino import OnnxModel

__all__ = ["FeatureExtractor", "ImageInput"]

log = logging.getLogger("ssole_hub")

ImageInput = (
    bytes | bytearray | memoryview | str | os.PathLike | Image.Image | torch.Tensor | np.ndarray
)
"""One image: encoded bytes, a file path, a PIL image, a ``(C, H, W)`` tensor (``uint8``
0..255 or float 0..1, C = 1 or 3) or an ``(H, W[, C])`` ``uint8`` array."""


def _model_id(module: nn.Module) -> str:
    cfg = getattr(getattr(module, "backbone", module), "pretrained_cfg", None) or {}
    if cfg.get("hf_hub_id"):
        return str(cfg["hf_hub_id"])
    if cfg.get("architecture"):
        tag = cfg.get("tag")
        return f"{cfg['architecture']}.{tag}" if tag else str(cfg["architecture"])
    return type(module).__name__


def _tensor_to_pil(t: torch.Tensor) -> Image.Image:
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"an image tensor must be (C, H, W) with C = 1 or 3, got {tuple(t.shape)}")
    t = t.detach().cpu()
    if t.is_floating_point():
        if not torch.isfinite(t).all():
            raise ValueError("an image tensor holds NaN or infinite values")
        t = (t * 255).round().clamp(0, 255)
    elif t.dtype != torch.uint8:
        raise ValueError(f"an image tensor must be uint8 or float, got {t.dtype}")
    arr = t.to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def _as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    single = (bytes, bytearray, memoryview, str, os.PathLike, Image.Image)
    if isinstance(images, single):
        return [images]
    if isinstance(images, torch.Tensor):
        return list(images.unbind(0)) if images.ndim == 4 else [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


class FeatureExtractor:
    """Embeds images with an SSOLE (or any timm) model, preprocessing included.

    Build one with :meth:`from_pretrained`, then call :meth:`embed` (or the object itself). Which
    embedding (``output``: pooled ``"backbone"`` features or ``"projector"`` outputs), whether
    to L2-``normalize`` it and its size (``dimensions``: a compact embedding from the hub
    folder's fitted PCA, ``ssole-hub fit-pca``) are chosen per call, so one extractor serves
    every combination with one copy of the weights. For serving, the halves are public:
    :meth:`preprocess_one` / :meth:`preprocess` (thread-safe, CPU: images to tensors),
    :meth:`embed_tensor` (the forward pass on a batch) and :meth:`postprocess` (raw forward
    outputs to the rows asked for).

    Example::

        fx = FeatureExtractor.from_pretrained("ssole_resnet18.in100_m4", with_projector=True)
        emb = fx.embed(["cat.jpg", "dog.png"])  # (2, 512) float32, rows unit-norm
        raw = fx.embed(["cat.jpg"], output="projector", normalize=False)
        small = fx.embed(["cat.jpg"], dimensions=128)  # (1, 128), needs a fitted PCA

    Attributes:
        model_id: name of the model (what it was loaded from, or its pretrained config's hub id).
        dims: embedding width per available output (``backbone``, and ``projector`` if loaded).
        data_config: timm's data config (input size, interpolation, crop, mean, std).
        transform: timm's eval transform, RGB PIL image -> ``(3, H, W)`` float tensor.
        device: where the forward pass runs.
        dtype: compute dtype (autocast below float32); outputs are always float32.
        backend: what runs the forward pass: ``"torch"``, ``"onnx"``, ``"onnx-bf16"`` or
            ``"onnx-int8"``.
        backend_timings: milliseconds per image of each backend that ``backend="auto"`` timed
            at load (on a batch of :data:`~ssole_hub.runtimes.backends.TIMING_BATCH`), the
            chosen one the fastest; empty when there was nothing to choose between.
        decode_options: keyword arguments this extractor passes to
            :func:`ssole_hub.images.decode_image` (limits, ``draft_size``).
        decode_check: the hub folder's record of the reduced-decoding guard (figures,
            ``passed``), or ``None`` when it has none.
        pca: the PCA that gives ``dimensions`` (the hub folder's, or the one given), or
            ``None``.
    """

    def __init__(
        self,
        model: nn.Module | OnnxModel,
        *,
        model_id: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        compile: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        fast_decode: bool | None = None,
        decode_check: Mapping[str, Any] | None = None,
        pca: PCA | None = None,
        device_decode: bool | None = None,
    ) -> None:
        """Wrap a built model; see :meth:`from_pretrained` for the arguments (``decode_check``:
        the hub folder's record of the reduced-decoding guard, which ``fast_decode=None``
        follows; ``pca``: a PCA, :func:`ssole_hub.pca.fit_pca`, that gives ``dimensions``).

        ``model`` (a timm backbone, an :class:`~ssole_hub.models.SSOLEModel`, or any module with
        ``.backbone`` and ``.projector``) is copied: the extractor runs an eval-mode copy on
        ``device`` and never changes the module it was given. An :class:`OnnxModel` runs as is,
        on the CPU in float32, with preprocessing from its folder's ``config.json``.

        Raises:
            ValueError: an :class:`OnnxModel` with a non-CPU device, a dtype below float32 or
                ``compile``; a ``pca`` of another width than the model's output it applies to.
        """
        self.device = default_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if isinstance(model, OnnxModel):
            if self.device.type != "cpu" or self.dtype != torch.float32 or compile:
                raise ValueError(
                    f"backend {model.backend!r} runs on the CPU in float32 without compile; got "
                    f"device {self.device}, dtype {self.dtype}, compile={compile}"
                )
            self.model_id = model_id or str(model.path)
            self.data_config, self.transform = resolve_preprocessing(model.pretrained_cfg)
        else:
            self.model_id = model_id or _model_id(model)
            self.data_config, self.transform = resolve_preprocessing(model)
        self.decode_options: dict[str, Any] = dict(
            max_bytes=max_bytes, max_pixels=max_pixels, draft_size=None
        )
        self.decode_check: dict[str, Any] | None = None
        self.backend: Backend = "torch"
        self.backend_timings: dict[str, float] = {}
        if isinstance(model, OnnxModel):
            self.backend = model.backend
            self.model: SSOLEModel | OnnxModel = model
        else:
            # channels_last lets cuDNN and oneDNN pick their fastest convolution kernels.
            self.model = inference_model(model).to(self.device, memory_format=torch.channels_last)
        self.dims: dict[Output, int] = self.model.output_dims
        self._run = self._forward_runner(compile)
        self._set_decoding(fast_decode, decode_check)
        self.pca: PCA | None = None
        self._no_pca = f"{self.model_id} has no fitted PCA"
        if pca is not None:
            self._use_pca(pca)
        self.device_decoder: DeviceDecoder | None = None
        self.device_decoding: dict[str, Any] = {"on": False}
        self._set_device_decoding(device_decode)

    def _forward_runner(self, compile: bool) -> Callable[..., torch.Tensor]:
        """What runs the forward pass: the model compiled; on a CPU in float32, the model with
        its convolutions fused with the adds and ReLUs after them
        (:func:`~ssole_hub.runtimes.conv_fusion.fuse_conv_activations`, the same numbers);
        else the model itself."""
        if compile:
            return torch.compile(self.model)
        on_cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        if isinstance(self.model, SSOLEModel) and on_cpu_fp32:
            fused = fuse_conv_activations(self.model.backbone)
            if fused is not None:
                return SSOLEModel(fused, self.model.projector)
        return self.model

    def _use_pca(self, pca: PCA) -> None:
        width = self.dims.get(pca.output)
        if width is not None and width != pca.input_dimensions:
            raise ValueError(
                f"the PCA applies to {pca.input_dimensions}-d {pca.output} embeddings; this "
                f"model's are {width}-d"
            )
        self.pca = pca

    def _use_folder_pca(self, name: str) -> None:
        """Take the PCA fitted for the hub folder ``name``, if any. One that cannot be used
        (damaged, or not this model's) is logged, and ``dimensions`` then says why."""
        try:
            pca = load_pca(name)
            if pca is not None:
                self._use_pca(pca)
        except (HubFolderError, ValueError) as exc:
            self._no_pca = f"the PCA of {name} cannot be used ({exc})"
            log.warning("%s; embeddings of full size are not affected", self._no_pca)

    def _set_decoding(self, fast_decode: bool | None, check: Mapping[str, Any] | None) -> None:
        """Decode JPEGs at a reduced DCT scale (``True``), in full (``False``), or (``None``) at
        a reduced scale only if the guard passed for this model at export (``check``, the hub
        folder's record, :func:`~ssole_hub.hub.decode_check.check_reduced_decoding`)."""
        self.decode_check = dict(check) if check else None
        if fast_decode is None:
            fast_decode = bool(check and check.get("passed"))
        self.decode_options["draft_size"] = resize_side(self.data_config) if fast_decode else None

    def _set_device_decoding(self, device_decode: bool | None) -> None:
        """Decode JPEGs on the model's device (:mod:`ssole_hub.device_decode`): ``True``
        wherever torchvision can decode there, ``False`` never, ``None`` on a CUDA device if the
        guard photos' embeddings agree with CPU decoding. :attr:`device_decoding` says which,
        why, and the guard's figures."""
        if device_decode is False or (device_decode is None and self.device.type != "cuda"):
            reason = "off" if device_decode is False else f"the model runs on {self.device.type}"
            self.device_decoding = {"on": False, "reason": reason}
            return
        decoder, reason = self._device_decoder()
        if decoder is None:
            if device_decode:
                raise ValueError(f"device_decode=True, but {reason}")
            self.device_decoding = {"on": False, "reason": reason}
            return
        if device_decode:
            self.device_decoder, self.device_decoding = decoder, {"on": True, "reason": "asked"}
            return
        embed = functools.partial(self.embed_tensor, normalize=False)
        check = check_device_decoding(embed, self.transform, decoder, resize_side(self.data_config))
        passed = bool(check and check["passed"])
        self.device_decoder = decoder if passed else None
        self.device_decoding = {
            "on": passed, "reason": "guard passed" if passed else "guard failed" if check
            else "no guard photos: needs scikit-image", "guard": check,
        }  # fmt: skip
        log.info("JPEG decoding on %s: %s", self.device, self.device_decoding)

    def _device_decoder(self) -> tuple[DeviceDecoder | None, str]:
        """A decoder on this extractor's device, or ``None`` and why there can be none."""
        reason = device_support(self.device)
        if reason is None and self.backend != "torch":
            reason = f"the {self.backend} backend runs on the CPU"
        if reason is not None:
            return None, reason
        limits = {k: self.decode_options[k] for k in ("max_bytes", "max_pixels")}
        try:
            return DeviceDecoder(self.data_config, self.device, self.preprocess_one, **limits), ""
        except ValueError as exc:
            return None, str(exc)

    def _log_decoding(self) -> None:
        """Say whether the guarded default decodes at a reduced scale, and on what evidence."""
        c = self.decode_check
        evidence = (
            f"min cosine {c['min_cosine']:g}, neighbour agreement {c['neighbour_agreement']:g} "
            f"on {c['reduced']} reduced photos at export" if c
            else "no guard record: only hub folders exported with scikit-image have one"
        )  # fmt: skip
        state = "on" if self.decode_options["draft_size"] else "off"
        log.info("reduced JPEG decoding %s for %s (%s)", state, self.model_id, evidence)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | nn.Module,
        *,
        with_projector: bool | None = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        compile: bool = False,
        pretrained: bool = True,
        model_id: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        fast_decode: bool | None = None,
        backend: str = "torch",
        device_decode: bool | None = None,
    ) -> FeatureExtractor:
        """Load a model and wrap it for embedding.

        Args:
            model: anything :func:`ssole_hub.load_model` takes (a model name such as
                ``"ssole_resnet18.in100_m4"``, ``"hf-hub:ORG/REPO"``, ``"local-dir:PATH"``, a
                hub folder or a training checkpoint), or an already built ``nn.Module``.
            with_projector: load the projector too, for ``output="projector"``: ``True`` (an
                error if the model has none), ``None`` (when it has one) or ``False``.
            device: where to run; default CUDA when available, else CPU.
            dtype: compute dtype, ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``,
                ``"bfloat16"`` or ``"float16"``; lower precisions run under autocast.
            compile: ``torch.compile`` the forward pass (slower first call, faster after).
            pretrained: load weights (only for names; ``False`` gives a random model).
            model_id: name reported in :attr:`model_id`; default from ``model``.
            max_bytes: largest encoded image accepted (see :func:`ssole_hub.images.decode_image`).
            max_pixels: largest decoded image accepted.
            fast_decode: decode JPEGs at least twice the model's resize size at a reduced DCT
                scale that still covers it (``draft_size`` of
                :func:`ssole_hub.images.decode_image`): several times less decoding work,
                slightly different pixels. ``None`` (default): only if the hub folder records
                that this model's embeddings of real photos passed the guard at export
                (:func:`~ssole_hub.hub.decode_check.check_reduced_decoding`); ``True``:
                always; ``False``: never.
            backend: what runs the forward pass (preprocessing and ``dimensions`` are the same
                for all):
                ``"torch"``; ``"onnx"`` / ``"onnx-bf16"`` / ``"onnx-int8"``: OpenVINO on the
                CPU with the hub folder's ``onnx/model.onnx`` (at float32 / bfloat16
                precision) or ``onnx/model_int8.onnx`` (written by ``ssole-hub export
                --onnx``); ``"auto"``: torch on CUDA; on a CPU, each backend that the folder
                has and that passed its fidelity check at export, and torch, is loaded and
                timed on one batch, and the fastest is kept (logged, and in
                :attr:`backend_timings`; see :func:`ssole_hub.runtimes.backends.fastest_backend`).
            device_decode: decode JPEGs on the model's device, in batches (nvjpeg on a GPU,
                :mod:`ssole_hub.device_decode`), other formats on the CPU: ``None`` (default)
                on a CUDA device if the guard photos' embeddings agree with CPU decoding
                (:func:`~ssole_hub.hub.decode_check.check_device_decoding`); ``True``: wherever
                torchvision can decode there (the CPU too, for tests); ``False``: never.
                :attr:`device_decoding` says which and why.

        A hub folder's fitted PCA (``ssole-hub fit-pca``) is loaded with it, for
        ``dimensions``; one that cannot be used is logged and leaves full-size embeddings as
        they are.

        Raises:
            ValueError: a bad ``dtype`` or ``backend``, an ONNX backend for a source that is
                not a hub folder, or errors from loading the model.
            FileNotFoundError: a path that does not exist, or a folder without the requested
                ONNX file (the message names the export command).
            ssole_hub.HubFolderError: ``with_projector=True`` for a model without a projector,
                or an unreadable folder.
        """
        kwargs = dict(
            device=device,
            dtype=dtype,
            compile=compile,
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            fast_decode=fast_decode,
            device_decode=device_decode,
        )
        built = isinstance(model, nn.Module)
        candidates = candidate_backends(
            backend,
            default_device(device),
            guarded=(lambda: []) if built else (lambda: guarded_backends(model)),
        )
        if built:
            if candidates != ("torch",):
                raise ValueError(f"backend {backend!r} needs a hub folder, not a built module")
            return cls(model, model_id=model_id, **kwargs)
        name = os.fspath(model)
        load = functools.partial(
            cls._load, name, with_projector, pretrained, model_id=model_id or name,
            decode_check=reduced_decoding_record(name), **kwargs,
        )  # fmt: skip
        if len(candidates) > 1:
            fx = cls._fastest({b: load(b) for b in candidates}, name)
        else:
            fx = load(candidates[0])
            if backend == "auto":
                log.info(
                    "backend auto: using %s for %s on %s (no other backend to time)",
                    candidates[0], name, fx.device,
                )  # fmt: skip
        if fast_decode is None:
            fx._log_decoding()
        fx._use_folder_pca(name)
        return fx

    @classmethod
    def _load(
        cls,
        name: str,
        with_projector: bool | None,
        pretrained: bool,
        backend: Backend,
        **kwargs: Any,
    ) -> FeatureExtractor:
        """One extractor of the model ``name`` on ``backend`` (see :meth:`from_pretrained`)."""
        if backend != "torch":
            onnx_model = load_onnx_model(name, backend)
            if with_projector and "projector" not in onnx_model.output_dims:
                raise ValueError(f"{onnx_model.path} has no projector output")
            return cls(onnx_model, **kwargs)
        module = load_model(name, pretrained=pretrained, with_projector=with_projector)
        return cls(module, **kwargs)

    @staticmethod
    def _fastest(extractors: dict[Backend, FeatureExtractor], name: str) -> FeatureExtractor:
        """The extractor whose backend embeds a batch fastest here, its timings recorded."""
        some = next(iter(extractors.values()))
        batch = torch.zeros(TIMING_BATCH, *some.data_config["input_size"])
        chosen, timings = fastest_backend(
            {b: functools.partial(fx.embed_tensor, batch) for b, fx in extractors.items()},
            TIMING_BATCH,
        )
        fx = extractors[chosen]
        fx.backend_timings = timings
        figures = ", ".join(f"{b} {ms:g}" for b, ms in timings.items())
        log.info(
            "backend auto: using %s for %s on %s (ms per image at batch %d: %s)",
            chosen, name, fx.device, TIMING_BATCH, figures,
        )  # fmt: skip
        return fx

    # -- images -> tensors -------------------------------------------------------------------

    def load_image(self, image: ImageInput) -> Image.Image:
        """Turn one input into an RGB PIL image: bytes and paths through the safe decoder (with
        this extractor's limits), PIL images, tensors and arrays converted to RGB.

        Raises:
            ImageDecodeError: (or a subclass) the bytes / file are not a usable image.
            ValueError: a tensor or array of the wrong shape or dtype.
            TypeError: an input of another type.
        """
        if isinstance(image, bytes | bytearray | memoryview | str | os.PathLike):
            return decode_image(image, **self.decode_options)
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, torch.Tensor):
            return to_rgb(_tensor_to_pil(image))
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(
                    f"an image array must be uint8 (H, W) or (H, W, C), got {image.dtype} "
                    f"{image.shape}"
                )
            return to_rgb(Image.fromarray(image))
        raise TypeError(
            f"cannot embed a {type(image).__name__}; pass paths, bytes, PIL images or tensors"
        )

    def preprocess_one(self, image: ImageInput) -> torch.Tensor:
        """Decode and transform one image into a ``(3, H, W)`` float32 CPU tensor (thread-safe).

        Raises:
            ImageDecodeError, ValueError, TypeError: as :meth:`load_image`.
        """
        return self.transform(self.load_image(image))

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Decode and transform ``images`` into one ``(n, 3, H, W)`` float32 CPU batch.

        Runs on the CPU only and holds no state, so it is safe to call from worker threads.

        Raises:
            ImageDecodeError: (or a subclass, the same class) naming the index of the bad image.
            ValueError / TypeError: as :meth:`load_image`, naming the index.
        """
        return self._preprocess(images, offset=0)

    def _preprocess(self, images: Sequence[ImageInput], offset: int) -> torch.Tensor:
        prepared: list[torch.Tensor | EncodedJPEG] = []
        for i, image in enumerate(images):
            try:
                prepared.append(self.prepare(image))
            except (ImageDecodeError, ValueError, TypeError) as exc:
                raise type(exc)(f"image {offset + i}: {exc}") from exc
        tensors = []
        for i, done in enumerate(self.finish_batch(prepared)):
            if isinstance(done, Exception):
                raise type(done)(f"image {offset + i}: {done}") from done
            tensors.append(done)
        if not tensors:
            return torch.empty(0, *self.data_config["input_size"])
        return torch.stack(tensors)

    def prepare(self, image: ImageInput) -> torch.Tensor | EncodedJPEG:
        """:meth:`preprocess_one`, except for a JPEG that :attr:`device_decoder` decodes on the
        device: only its header is checked (on the CPU, with the same errors), and
        :meth:`finish_batch` decodes it with the rest of its batch (thread-safe).

        Raises:
            ImageDecodeError, ValueError, TypeError: as :meth:`load_image`.
        """
        decoder = self.device_decoder
        if decoder is not None and isinstance(
            image, bytes | bytearray | memoryview | str | os.PathLike
        ):
            jpeg = decoder.admit(image)
            if jpeg is not None:
                return jpeg
        return self.preprocess_one(image)

    def finish_batch(
        self, prepared: Sequence[torch.Tensor | EncodedJPEG]
    ) -> list[torch.Tensor | Exception]:
        """The JPEGs among :meth:`prepare`'s results decoded on the device in one call (each
        tensor then on the device), or, for one that neither the device nor the CPU could
        decode, the CPU decoder's error; tensors as they are without device decoding."""
        where = [i for i, x in enumerate(prepared) if isinstance(x, EncodedJPEG)]
        if self.device_decoder is None or not where:
            return list(prepared)  # type: ignore[arg-type]
        done: list[Any] = list(prepared)
        for i, x in zip(where, self.device_decoder.preprocess([prepared[i] for i in where]),
                        strict=True):  # fmt: skip
            done[i] = x
        return [x.to(self.device) if isinstance(x, torch.Tensor) else x for x in done]

    # -- batch -> embeddings -----------------------------------------------------------------

    def _check_output(self, output: Output) -> None:
        if output not in self.dims:
            hint = " (load the model with_projector=True)" if output == "projector" else ""
            raise ValueError(
                f"output {output!r} is not available; this extractor has "
                f"{', '.join(map(repr, self.dims))}{hint}"
            )

    def check_options(
        self, output: Output = "backbone", normalize: bool = True, dimensions: int | None = None
    ) -> int:
        """Check one call's options before any work; returns the width of the rows they give
        (``dims[output]``, or ``dimensions``).

        Raises:
            ValueError: an unavailable ``output``; ``dimensions`` without a fitted PCA, for
                another output than the PCA's, not an integer, out of its range (1 to
                ``pca.max_dimensions``) or with ``normalize=False``. The message says how to fit
                a PCA (``ssole-hub fit-pca``).
        """
        self._check_output(output)
        if dimensions is None:
            return self.dims[output]
        pca = self.pca
        if pca is None:
            raise ValueError(
                f"{self._no_pca}, so it has no dimensions={dimensions!r}: its {output} "
                f"embeddings are {self.dims[output]}-d, and nothing is truncated. Fit a PCA on "
                f"images like the ones you embed: {FIT_COMMAND} (README, Compact embeddings)"
            )
        if output != pca.output:
            raise ValueError(
                f"this model's PCA was fitted on {pca.output} embeddings, not {output}: ask "
                f"output={pca.output!r}, or fit one with {FIT_COMMAND} --output {output}"
            )
        try:
            pca.check_dimensions(dimensions)
        except ValueError as exc:
            more = isinstance(dimensions, int) and dimensions > pca.max_dimensions
            hint = (
                f"; fitted on {pca.images} images, it has at most {pca.max_dimensions} axes: "
                f"for more, fit it on more images with {FIT_COMMAND}"
                if more and pca.max_dimensions < pca.input_dimensions
                else ""
            )
            raise ValueError(f"{exc}{hint}") from None
        if not normalize:
            raise ValueError(
                "compact embeddings (dimensions) are always L2-normalised: leave normalize on"
            )
        return dimensions

    def postprocess(
        self,
        raw: torch.Tensor,
        output: Output = "backbone",
        normalize: bool = True,
        dimensions: int | None = None,
    ) -> torch.Tensor:
        """Turn raw forward outputs ``(n, dims[output])`` into the rows the options ask for:
        projected by the PCA to ``dimensions`` (unit rows), else L2-normalised if
        ``normalize``. Float32, on the device of ``raw``.

        Raises:
            ValueError: as :meth:`check_options`.
        """
        self.check_options(output, normalize, dimensions)
        if dimensions is not None:
            assert self.pca is not None  # check_options says so
            return self.pca.transform(raw, dimensions)
        return l2_normalize(raw) if normalize else raw.float()

    @torch.inference_mode()
    def embed_tensor(
        self,
        batch: torch.Tensor,
        output: Output = "backbone",
        normalize: bool = True,
        dimensions: int | None = None,
    ) -> torch.Tensor:
        """Run the model on a preprocessed batch ``(n, 3, H, W)`` (as :meth:`preprocess` makes).

        Returns:
            ``(n, dims[output])`` float32 embeddings on the CPU, L2-normalised if ``normalize``;
            ``(n, dimensions)`` unit rows with ``dimensions`` (:meth:`postprocess`).

        Raises:
            ValueError: as :meth:`check_options`, or a ``batch`` that is not ``(n, 3, H, W)``.
        """
        width = self.check_options(output, normalize, dimensions)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"batch must be (n, 3, H, W), got {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            return torch.empty(0, width)
        x = batch.to(self.device, non_blocking=True)
        if self.backend == "torch":
            # Not for OpenVINO: a torch copy here wakes torch's thread pool, which then spins
            # against OpenVINO's threads (a third of batch-1 throughput on 2 cores).
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype == torch.float32:
            out = self._run(x.float(), output)
        else:
            with torch.autocast(self.device.type, dtype=self.dtype):
                out = self._run(x, output)
        return self.postprocess(out, output, normalize, dimensions).cpu()

    def warmup(self, batch_size: int = 1) -> None:
        """Run a forward pass per output on a zero batch (loads kernels, compiles)."""
        batch = torch.zeros(batch_size, *self.data_config["input_size"])
        for output in self.dims:
            self.embed_tensor(batch, output)

    def embed(
        self,
        images: ImageInput | Iterable[ImageInput],
        batch_size: int = 32,
        progress: bool = False,
        *,
        output: Output = "backbone",
        normalize: bool = True,
        dimensions: int | None = None,
    ) -> torch.Tensor:
        """Embed images of any accepted kind (see :data:`ImageInput`), in input order.

        The next batch is decoded in a background thread while the current one runs through
        the model. For millions of files use :func:`ssole_hub.extract_dataset`.

        Args:
            images: one image, a list of them, or an ``(n, C, H, W)`` image tensor.
            batch_size: images per forward pass.
            progress: show a progress bar.
            output: ``"backbone"`` (pooled features) or ``"projector"`` (projector outputs).
            normalize: L2-normalise each embedding.
            dimensions: a compact embedding of this size, from the hub folder's PCA (fitted by
                ``ssole-hub fit-pca``, for one ``output``): any size from 1 to
                ``pca.max_dimensions``; always unit rows.

        Returns:
            ``(n, dims[output])`` (or ``(n, dimensions)``) float32 CPU tensor, row ``i`` for
            input ``i``.

        Raises:
            ImageDecodeError: (or a subclass) naming the index of the first bad image.
            ValueError: ``batch_size`` below 1, options that :meth:`check_options` refuses
                (an unavailable ``output``; ``dimensions`` without a fitted PCA or out of its
                range, with how to fit one), or a bad tensor / array input.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        width = self.check_options(output, normalize, dimensions)
        items = _as_list(images)
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        out = []
        with (
            ThreadPoolExecutor(max_workers=1) as pool,
            tqdm(total=len(items), disable=not progress, unit="img", desc="embed") as bar,
        ):
            pending = pool.submit(self._preprocess, chunks[0], 0) if chunks else None
            for k in range(len(chunks)):
                batch = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(self._preprocess, chunks[k + 1], (k + 1) * batch_size)
                out.append(self.embed_tensor(batch, output, normalize, dimensions))
                bar.update(len(batch))
        return torch.cat(out) if out else torch.empty(0, width)

    __call__ = embed

    def __repr__(self) -> str:
        return (
            f"FeatureExtractor(model_id={self.model_id!r}, dims={self.dims}, "
            f"device={self.device}, dtype={self.dtype}, backend={self.backend!r})"
        )
