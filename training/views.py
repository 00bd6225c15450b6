"""Multi-crop views per the SSOLE recipe, made on the CPU per image or on the device per batch.

Both backends apply the same recipe (:class:`~training.config.ViewsConfig`): ``N`` random resized
crops, horizontal flip, colour jitter, grayscale, Gaussian blur and solarize, each with its own
probability and per-view random parameters.

- ``pil``: :func:`pil_views` runs torchvision's transforms on each image in the DataLoader
  workers and returns uint8 views ``(N, 3, S, S)``.
- ``batch``: the workers only decode and resize to a fixed source size; :class:`BatchViews`
  (kornia) then augments the whole batch on the training device with per-sample parameters.

Randomness is reproducible by construction: every image's views are drawn from a generator seeded
by ``(run seed, epoch, image index)`` (``pil``), every batch's from ``(run seed, step, rank)``
(``batch``). Workers, process counts and interruptions therefore never change what a step sees,
which is what makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from training.config import DataConfig, ViewsConfig

__all__ = [
    "BatchViews",
    "MultiViewDataset",
    "blur_kernel_size",
    "normalize_views",
    "pil_views",
    "sample_seed",
]

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) to spread nearby integers


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so that nearby inputs give unrelated random streams."""
    h = 0
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the view size (23 px at 224 px, as in the recipe)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def pil_views(
    views: ViewsConfig, interpolation: str = "bicubic"
) -> Callable[[Image.Image], torch.Tensor]:
    """The recipe as a per-image transform: PIL RGB image in, uint8 views ``(N, 3, S, S)`` out."""
    import torchvision.transforms as T

    interp = T.InterpolationMode(interpolation)
    one_view = T.Compose(
        [
            T.RandomResizedCrop(views.size, scale=views.scale, interpolation=interp),
            T.RandomHorizontalFlip(views.flip_p),
            T.RandomApply([T.ColorJitter(*views.color_jitter)], p=views.color_jitter_p),
            T.RandomGrayscale(views.grayscale_p),
            T.RandomApply(
                [T.GaussianBlur(blur_kernel_size(views.size), sigma=views.blur_sigma)],
                p=views.blur_p,
            ),
            T.RandomSolarize(128, p=views.solarize_p),
            T.PILToTensor(),
        ]
    )

    def transform(img: Image.Image) -> torch.Tensor:
        return torch.stack([one_view(img) for _ in range(views.num_views)])

    return transform


class BatchViews(nn.Module):
    """The recipe on whole batches (kornia), on any device: uint8 images ``(B, 3, H, W)`` in,
    float views ``(B, N, 3, S, S)`` in ``[0, 1]`` out, every view with its own random parameters."""

    def __init__(self, views: ViewsConfig, interpolation: str = "bicubic") -> None:
        super().__init__()
        import kornia.augmentation as K

        self.num_views = views.num_views
        k = blur_kernel_size(views.size)
        self.augment = K.AugmentationSequential(
            K.RandomResizedCrop(
                (views.size, views.size), scale=views.scale, resample=interpolation.upper()
            ),
            K.RandomHorizontalFlip(p=views.flip_p),
            K.ColorJitter(*views.color_jitter, p=views.color_jitter_p),
            K.RandomGrayscale(p=views.grayscale_p),
            K.RandomGaussianBlur((k, k), views.blur_sigma, p=views.blur_p),
            # A fixed threshold of 0.5 with nothing added: torchvision's RandomSolarize(128).
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=views.solarize_p),
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        b = images.shape[0]
        x = images.float().div_(255).repeat_interleave(self.num_views, dim=0)
        out = self.augment(x).clamp_(0, 1)
        return out.view(b, self.num_views, *out.shape[1:])


def normalize_views(
    views: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool
) -> torch.Tensor:
    """uint8 (``0..255``) or float (``0..1``) views ``(B, N, 3, S, S)`` to normalised float32, in
    channels-last memory per view when asked (the 5-D view keeps 4-D channels-last strides)."""
    b, n = views.shape[:2]
    x = views.flatten(0, 1)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    x = x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.view(b, n, *x.shape[1:])


class MultiViewDataset(Dataset):
    """Wraps an image dataset for pre-training; indexed by ``(index, seed)`` pairs from
    :class:`~training.sampler.ResumableSampler`.

    With the ``pil`` backend an item is the uint8 views ``(N, 3, S, S)`` drawn from ``seed``; with
    ``batch`` it is the uint8 image ``(3, H, W)`` resized and centre-cropped to
    ``views.source_size`` (kept as is when 0). Labels are not used.
    """

    def __init__(self, images: Dataset, views: ViewsConfig, data: DataConfig) -> None:
        self.images = images
        self.backend = views.backend
        if self.backend == "pil":
            self.transform = pil_views(views, data.interpolation)
        else:
            import torchvision.transforms as T

            steps: list[Callable] = []
            if views.source_size:
                interp = T.InterpolationMode(data.interpolation)
                steps += [T.Resize(views.source_size, interp), T.CenterCrop(views.source_size)]
            self.transform = T.Compose([*steps, T.PILToTensor()])

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        index, seed = item
        img, _ = self.images[index]
        if self.backend != "pil":
            return self.transform(img)
        # torchvision's transforms draw from the global generator: fork it so the caller's
        # stream (the main process with num_workers=0) is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img)
