"""The preprocessing resolver: timm's centre-crop eval transform in one resample, and timm's own
transform wherever that does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import InterpolationMode

from ssole_hub.preprocessing import CropResize, resolve_preprocessing

CONFIGS = {
    "bicubic-224": {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875},
    "bilinear-64-whole": {"input_size": (3, 64, 64), "interpolation": "bilinear", "crop_pct": 1},
    "lanczos-160": {
        "input_size": (3, 160, 160), "interpolation": "lanczos", "crop_pct": 0.95,
        "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
    },
}  # fmt: skip


def timm_transform(cfg: dict):
    """The step-by-step transform timm builds for ``cfg`` (no ssole_hub code)."""
    return create_transform(**resolve_data_config(pretrained_cfg=cfg), is_training=False)


def sizes_of(photo: Image.Image) -> list[Image.Image]:
    """The photo, shrunk to odd sizes, cut to a small landscape strip and to a tall one:
    downsampling, upsampling and both orientations."""
    w, h = photo.size
    return [
        photo,
        photo.resize((w // 3 + 1, h // 5 + 3)),
        photo.crop((0, 0, min(w, 97), min(h, 61))),
        photo.crop((0, 0, min(w, 50), h)),
    ]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_resample_gives_timms_values_to_rounding(name, photos):
    """The same filter at the same sample positions; only the rounding of Pillow's intermediate
    image may differ (rows and columns resampled in the other order)."""
    cfg = CONFIGS[name]
    _, transform = resolve_preprocessing(cfg)
    assert isinstance(transform, CropResize)
    reference = timm_transform(cfg)
    std = torch.tensor(resolve_data_config(pretrained_cfg=cfg)["std"])[:, None, None]
    for img in (im for photo in photos for im in sizes_of(photo)):
        ours, theirs = transform(img), reference(img)
        assert ours.shape == theirs.shape == cfg["input_size"]
        assert ours.dtype == theirs.dtype == torch.float32
        levels = (ours - theirs).abs() * std * 255
        assert levels.mean() < 0.5, (
            f"{img.size}: {levels.mean():.3f} levels of 255 apart on average"
        )
        assert levels.max() <= 16, f"{img.size}: {levels.max():.1f} levels of 255 apart"


def test_embeddings_of_one_resample_match_timms_steps(encoder, photos):
    cfg = CONFIGS["bicubic-224"]
    _, transform = resolve_preprocessing(cfg)
    images = [im for photo in photos for im in sizes_of(photo)]
    with torch.inference_mode():
        ours = encoder(torch.stack([transform(im) for im in images]), "backbone")
        theirs = encoder(torch.stack([timm_transform(cfg)(im) for im in images]), "backbone")
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.9999


def test_an_image_already_at_the_resize_side_is_only_cropped(photos):
    cfg = CONFIGS["bicubic-224"]
    _, transform = resolve_preprocessing(cfg)
    img = photos[0].resize((256, 300))  # shorter side 256 = floor(224 / 0.875): no resampling
    torch.testing.assert_close(transform(img), timm_transform(cfg)(img), atol=0, rtol=0)


def test_the_tensor_is_in_the_layout_the_model_runs_in_and_stacks(photos):
    _, transform = resolve_preprocessing(CONFIGS["bicubic-224"])
    x = transform(photos[0])
    assert x.permute(1, 2, 0).is_contiguous()  # channels last
    batch = torch.stack([transform(p) for p in photos])
    torch.testing.assert_close(batch[0], x)


@pytest.mark.parametrize(
    "cfg",
    [
        {**CONFIGS["bicubic-224"], "crop_mode": "squash"},
        {**CONFIGS["bicubic-224"], "crop_mode": "border"},
        {**CONFIGS["bicubic-224"], "interpolation": "nearest"},
        {**CONFIGS["bicubic-224"], "crop_pct": 1.2},  # the crop is larger than the resized image
    ],
    ids=["squash", "border", "nearest", "crop-larger-than-resize"],
)
def test_other_pipelines_run_timms_own_transform(cfg, photos):
    _, transform = resolve_preprocessing(cfg)
    assert not isinstance(transform, CropResize)
    torch.testing.assert_close(transform(photos[1]), timm_transform(cfg)(photos[1]), atol=0, rtol=0)


def test_inputs_other_than_rgb_images_go_through_timms_steps(photos):
    cfg = CONFIGS["bicubic-224"]
    _, transform = resolve_preprocessing(cfg)
    reference = timm_transform(cfg)
    as_tensor = torch.from_numpy(np.array(photos[1])).permute(2, 0, 1) / 255
    torch.testing.assert_close(transform(as_tensor), reference(as_tensor), atol=0, rtol=0)
    gray = photos[1].convert("L")  # timm normalises one channel with three means: it fails
    with pytest.raises(RuntimeError, match="broadcast shape"):
        reference(gray)
    with pytest.raises(RuntimeError, match="broadcast shape"):
        transform(gray)


@pytest.mark.parametrize(
    ("side", "mode"), [(200, InterpolationMode.BICUBIC), (256, InterpolationMode.NEAREST)]
)
def test_a_crop_larger_than_the_resize_side_or_nearest_has_no_one_resample_form(side, mode):
    with pytest.raises(ValueError, match="no one-resample form"):
        CropResize(side, (224, 224), mode, (0.5,) * 3, (0.25,) * 3, reference=torch.as_tensor)
