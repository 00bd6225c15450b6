"""JPEGs decoded in batches on the model's device: nvjpeg through torchvision on a GPU.

On a GPU, decoding JPEGs on the CPU can cost as much as the forward pass. :class:`DeviceDecoder`
decodes a batch of JPEGs in one call (``torchvision.io.decode_jpeg`` with ``device="cuda"``,
batched nvjpeg), then resizes, crops and normalises each image there as the model's eval
transform (:func:`~ssole_hub.preprocessing.resolve_preprocessing`) does on the CPU.

What goes to the device, and what does not:

- every input is first opened on the CPU by :func:`~ssole_hub.images.open_image`, which reads
  only its header: the same limits, the same refusals and the same errors as CPU decoding;
- only baseline or progressive JPEGs in RGB or greyscale are decoded on the device
  (:meth:`DeviceDecoder.admit`); other formats, CMYK JPEGs and non-JPEG inputs are decoded on the
  CPU as before;
- a batch the device cannot decode (a JPEG damaged past its header) is decoded again one image
  at a time, and whatever still fails there is decoded on the CPU, which raises the same
  :class:`~ssole_hub.images.ImageDecodeError` it always did.

Where it is used is chosen where it runs (``device_decode`` of
:meth:`~ssole_hub.FeatureExtractor.from_pretrained`): by default on a CUDA device whose
torchvision can decode there, if the model's embeddings of real photos (the reduced-decoding
guard's photos, :func:`~ssole_hub.hub.decode_check.check_device_decoding`) decoded on the device
agree with the CPU's, by the same cosine and neighbour-agreement limits as the reduced-decoding
guard.
On the CPU it is off by default; asked for there, the same code runs with torchvision's CPU
decoder (which is how the suite covers it without a GPU).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ssole_hub.images import ImageSource, open_image

__all__ = [
    "DEVICE_DECODE_CHOICES",
    "DEVICE_MODES",
    "DeviceDecoder",
    "EncodedJPEG",
    "admit_jpeg",
    "device_support",
]

# torchvision 0.29 deprecates its decoders in favour of TorchCodec, which the GPU machines this
# project targets do not have; nvjpeg through torchvision is what runs there.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated"
)

DEVICE_DECODE_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
"""The words of the ``--decode-on-device`` options (server, ``ssole-hub extract``) as the
``device_decode`` argument of :meth:`~ssole_hub.FeatureExtractor.from_pretrained`."""

DEVICE_MODES = ("RGB", "L")
"""JPEG colour modes decoded on the device; CMYK and YCCK JPEGs are decoded on the CPU."""

_ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class EncodedJPEG:
    """A JPEG whose header passed the CPU's checks, waiting to be decoded on the device."""

    data: bytes
    source: ImageSource
    """What it was read from (the bytes, or a path): the CPU decodes this if the device fails,
    and its errors name it as they always did."""
    orientation: int
    """Its EXIF orientation (1 to 8; 1 is upright), applied after decoding."""


def _upright(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a ``(C, H, W)`` image, as ``PIL.ImageOps.exif_transpose``."""
    if orientation in (2, 4):
        img = img.flip(-1) if orientation == 2 else img.flip(-2)
    elif orientation == 3:
        img = img.flip(-1).flip(-2)
    elif orientation == 5:  # transpose
        img = img.transpose(-1, -2)
    elif orientation == 6:  # rotate 270 (90 clockwise)
        img = img.transpose(-1, -2).flip(-1)
    elif orientation == 7:  # transverse
        img = img.transpose(-1, -2).flip(-1).flip(-2)
    elif orientation == 8:  # rotate 90 (counter-clockwise)
        img = img.transpose(-1, -2).flip(-2)
    return img


def admit_jpeg(source: ImageSource, *, max_bytes: int, max_pixels: int) -> EncodedJPEG | None:
    """:meth:`DeviceDecoder.admit` without a decoder (in a process that holds no device):
    ``source``'s header checked on the CPU; an :class:`EncodedJPEG` for the device, ``None`` for
    the CPU. Raises what :func:`~ssole_hub.images.decode_image` raises for a bad header."""
    img, data, _ = open_image(source, max_bytes=max_bytes, max_pixels=max_pixels)
    if img.format != "JPEG" or img.mode not in DEVICE_MODES:
        return None
    return EncodedJPEG(data, source, int(img.getexif().get(_ORIENTATION, 1)))


def device_support(device: torch.device) -> str | None:
    """``None`` if this torchvision decodes JPEGs on ``device``, else the reason it cannot."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    try:
        decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)],
                    mode=ImageReadMode.RGB, device=device)  # fmt: skip
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        return f"torchvision cannot decode JPEGs on {device}: {exc}"
    return None


class DeviceDecoder:
    """Decode JPEGs in batches on ``device`` and preprocess them there.

    Args:
        data_config: the model's timm data config (``input_size``, ``interpolation``,
            ``crop_pct``, ``crop_mode``, ``mean``, ``std``); only square inputs with
            ``crop_mode="center"``, timm's default, are supported.
        device: where images are decoded and preprocessed.
        cpu_preprocess: the CPU path for one input (decode and eval transform), used for what
            the device cannot decode; raises the decoder's errors for bad input.
        max_bytes, max_pixels: the limits of :func:`~ssole_hub.images.open_image`.

    Raises:
        ValueError: a ``crop_mode`` other than ``center``, or an input that is not square
            (timm's eval transform squashes those).
    """

    def __init__(
        self,
        data_config: Mapping[str, Any],
        device: torch.device,
        cpu_preprocess: Callable[[ImageSource], torch.Tensor],
        *,
        max_bytes: int,
        max_pixels: int,
    ) -> None:
        size = data_config["input_size"][1:]
        if data_config.get("crop_mode", "center") != "center" or size[0] != size[1]:
            raise ValueError(
                f"crop_mode {data_config.get('crop_mode')!r} at {size[0]}x{size[1]} px: decoding "
                "on the device supports square inputs with crop_mode 'center'"
            )
        self.crop = (int(size[0]), int(size[1]))
        self.resize = int(max(size) / data_config.get("crop_pct", 1.0))
        self.interpolation = InterpolationMode(data_config.get("interpolation", "bilinear"))
        self.mean = torch.tensor(data_config["mean"], device=device).view(3, 1, 1) * 255
        self.std = torch.tensor(data_config["std"], device=device).view(3, 1, 1) * 255
        self.device = device
        self._cpu = cpu_preprocess
        self._limits = {"max_bytes": max_bytes, "max_pixels": max_pixels}

    def admit(self, source: ImageSource) -> EncodedJPEG | None:
        """Check ``source``'s header on the CPU; an :class:`EncodedJPEG` if it is to be decoded
        on the device, ``None`` if on the CPU (another format or colour mode).

        Raises:
            ImageDecodeError: (a subclass) what CPU decoding raises for a bad header or limit.
        """
        return admit_jpeg(source, **self._limits)

    def preprocess(self, images: Sequence[EncodedJPEG]) -> list[torch.Tensor | Exception]:
        """Decode and preprocess ``images`` on the device: one ``(3, H, W)`` float32 tensor per
        image, or the exception CPU decoding raised for an image that neither could decode."""
        if not images:
            return []
        encoded = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in images]
        try:
            decoded: list[torch.Tensor | None] = list(
                decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            )
        except RuntimeError:  # one bad JPEG fails the whole batch: find it
            decoded = [self._decode_one(e) for e in encoded]
        out: list[torch.Tensor | Exception] = []
        for jpeg, img in zip(images, decoded, strict=True):
            if img is None:
                try:
                    out.append(self._cpu(jpeg.source).to(self.device))
                except (ValueError, OSError) as exc:  # reported by the caller, for this image
                    out.append(exc)
            else:
                out.append(self.transform(_upright(img, jpeg.orientation)))
        return out

    def _decode_one(self, encoded: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg([encoded], mode=ImageReadMode.RGB, device=self.device)[0]
        except RuntimeError:
            return None

    def transform(self, img: torch.Tensor) -> torch.Tensor:
        """The eval transform on a decoded ``(3, H, W)`` uint8 image on the device: the shorter
        side resized (antialiased) to ``input_size / crop_pct``, the centre crop, normalised."""
        img = TF.resize(img, [self.resize], self.interpolation, antialias=True)
        img = TF.center_crop(img, list(self.crop))
        return (img.float() - self.mean) / self.std
