"""JPEGs decoded in batches on the model's device (``ssole_hub.device_decode``), and the choice of
where to decode.

No GPU here: the same code runs with torchvision's CPU decoder (``device_decode=True`` on a CPU),
so the batching, the EXIF orientation, the per-image fallback and the preprocessing are all
exercised on real photos; the CUDA path itself is the ``gpu`` test at the end (run by
``make gpu-check``'s test stage).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageOps

from ssole_hub import FeatureExtractor
from ssole_hub.device_decode import DeviceDecoder, _upright, device_support
from ssole_hub.hub.decode_check import check_device_decoding, resize_side
from ssole_hub.images import CorruptImageError, ImageTooLargeError, UnsupportedImageError


def _jpeg(img: Image.Image, orientation: int = 1, **kwargs) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(buf, format="JPEG", quality=90, exif=exif.tobytes(), **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    """ResNet-18 at 96 px (resized to 109): photos still get resized, passes stay cheap."""
    torch.manual_seed(0)
    overlay = {"input_size": (3, 96, 96), "crop_pct": 0.875}
    return timm.create_model(
        "ssole_resnet18", pretrained=False, num_classes=0, pretrained_cfg_overlay=overlay
    )


@pytest.fixture(scope="module")
def extractors(backbone) -> tuple[FeatureExtractor, FeatureExtractor]:
    """(CPU decoding, decoding through the device path on the CPU) of one model."""
    return FeatureExtractor(backbone), FeatureExtractor(backbone, device_decode=True)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_exactly_as_pillow_does(photos, orientation):
    img = photos[1].resize((40, 24))  # not square: a transpose changes the shape
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(_jpeg(img, orientation)))))
    decoded = np.array(Image.open(io.BytesIO(_jpeg(img, orientation))).convert("RGB"))
    got = _upright(torch.from_numpy(decoded).permute(2, 0, 1), orientation).permute(1, 2, 0)
    assert got.shape == expected.shape
    assert np.array_equal(got.numpy(), expected)


def test_device_decoding_embeds_photos_as_cpu_decoding_does(extractors, photos):
    """Large, small, greyscale and EXIF-rotated JPEGs, a PNG and a PIL image in one batch."""
    cpu, dev = extractors
    inputs = [_jpeg(p) for p in photos]
    inputs += [_jpeg(photos[0].convert("L")), _jpeg(photos[2], orientation=6)]
    png = io.BytesIO()
    photos[3].save(png, format="PNG")
    inputs += [png.getvalue(), photos[4]]
    assert dev.device_decoding == {"on": True, "reason": "asked"}
    a, b = cpu.embed(inputs, batch_size=5), dev.embed(inputs, batch_size=5)
    assert a.shape == b.shape == (len(inputs), 512)
    assert _cosines(a, b).min() >= 0.999
    # The device path's pixels differ only by resampling: a few levels, never a misplaced image.
    diff = (cpu.preprocess(inputs) - dev.preprocess(inputs)).abs().flatten(1).mean(1)
    assert diff.max() < 0.05


def test_a_jpeg_damaged_past_its_header_fails_alone_with_the_cpu_decoders_error(
    extractors, photo_jpegs
):
    cpu, dev = extractors
    decoder = dev.device_decoder
    cut = photo_jpegs[0][: len(photo_jpegs[0]) // 2]  # the header reads, the pixels do not
    jpegs = [decoder.admit(j) for j in (photo_jpegs[1], cut, photo_jpegs[2])]
    out = decoder.preprocess(jpegs)
    assert isinstance(out[1], CorruptImageError) and "truncated" in str(out[1])
    expected = cpu.preprocess([photo_jpegs[1], photo_jpegs[2]])
    for got, want in zip((out[0], out[2]), expected, strict=True):
        assert (got - want).abs().mean() < 0.05
    with pytest.raises(CorruptImageError, match="image 1"):
        dev.embed([photo_jpegs[1], cut])


def test_headers_are_checked_on_the_cpu_with_the_cpu_decoders_errors(extractors, photos):
    _, dev = extractors
    decoder = dev.device_decoder
    png, cmyk = io.BytesIO(), io.BytesIO()
    photos[0].save(png, format="PNG")
    photos[0].convert("CMYK").save(cmyk, format="JPEG")
    assert decoder.admit(png.getvalue()) is None  # decoded on the CPU
    assert decoder.admit(cmyk.getvalue()) is None
    jpeg = _jpeg(photos[0])
    with pytest.raises(CorruptImageError):
        decoder.admit(jpeg[:100])
    with pytest.raises(UnsupportedImageError):
        decoder.admit(b"plain text, not a picture")
    small = DeviceDecoder(dev.data_config, dev.device, dev.preprocess_one,
                          max_bytes=10**6, max_pixels=1000)  # fmt: skip
    with pytest.raises(ImageTooLargeError, match="pixels"):
        small.admit(jpeg)


def test_where_to_decode_is_chosen_and_said(backbone, monkeypatch):
    assert FeatureExtractor(backbone).device_decoding == {
        "on": False, "reason": "the model runs on cpu"
    }  # fmt: skip
    off = FeatureExtractor(backbone, device_decode=False)
    assert off.device_decoder is None and off.device_decoding["reason"] == "off"
    monkeypatch.setattr(
        "ssole_hub.extractor.device_support", lambda device: f"no decoder on {device}"
    )
    with pytest.raises(ValueError, match="device_decode=True, but no decoder on cpu"):
        FeatureExtractor(backbone, device_decode=True)
    assert device_support(torch.device("cpu")) is None  # the real torchvision can
    monkeypatch.undo()
    wide = timm.create_model("ssole_resnet18", pretrained=False, num_classes=0,
                             pretrained_cfg_overlay={"input_size": (3, 64, 96)})  # fmt: skip
    with pytest.raises(ValueError, match="supports square inputs"):  # timm squashes those
        FeatureExtractor(wide, device_decode=True)


def test_the_guard_passes_real_decoding_and_refuses_a_wrong_one(extractors):
    cpu, dev = extractors
    embed = cpu.embed_tensor
    side = resize_side(cpu.data_config)
    check = check_device_decoding(embed, cpu.transform, dev.device_decoder, side)
    assert check["passed"] and check["photos"] >= 5
    assert check["min_cosine"] >= check["min_cosine_limit"]

    class Swapped(DeviceDecoder):
        def transform(self, img):  # BGR for RGB, a decoder bug the guard must catch
            return super().transform(img.flip(-3))

    swapped = Swapped(cpu.data_config, cpu.device, cpu.preprocess_one,
                      max_bytes=10**8, max_pixels=10**8)  # fmt: skip
    refused = check_device_decoding(embed, cpu.transform, swapped, side)
    assert not refused["passed"] and refused["min_cosine"] < check["min_cosine"]


@pytest.mark.parametrize("workers", [0, 1])
def test_extract_decodes_jpegs_on_the_device_and_lists_the_bad_ones_as_before(
    hub_folder, photo_jpegs, photos, tmp_path, workers
):
    """The plain engine: headers checked in the loader's workers, JPEGs decoded in the main
    process's batch; a PNG, a damaged JPEG and a text file among them."""
    from ssole_hub import extract_dataset, read_embeddings

    folder = tmp_path / "images"
    folder.mkdir()
    for i, jpeg in enumerate(photo_jpegs[:4]):
        (folder / f"{i}.jpg").write_bytes(jpeg)
    photos[4].save(folder / "4.png")
    (folder / "5.jpg").write_bytes(photo_jpegs[5][: len(photo_jpegs[5]) // 2])
    (folder / "6.jpg").write_text("not a photo")
    runs = {}
    for on in (False, True):
        out = tmp_path / f"out-{on}"
        runs[on] = extract_dataset(hub_folder, folder, out, batch_size=3, num_workers=workers,
                                   device_decode=on, progress=False)  # fmt: skip
        runs[on]["read"] = read_embeddings(out)
        runs[on]["errors"] = (out / "_errors.jsonl").read_text()
    (cpu_emb, cpu_ids), (dev_emb, dev_ids) = runs[False]["read"], runs[True]["read"]
    assert dev_ids == cpu_ids == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "4.png"]
    assert _cosines(torch.from_numpy(cpu_emb), torch.from_numpy(dev_emb)).min() >= 0.999
    assert runs[True]["errors"] == runs[False]["errors"]
    assert '"5.jpg"' in runs[True]["errors"] and "CorruptImageError" in runs[True]["errors"]
    assert runs[True]["preprocessing"]["device_decoding"] is True
    assert runs[False]["preprocessing"]["device_decoding"] is False
    assert runs[True]["fingerprint"] != runs[False]["fingerprint"]


def test_the_ray_embedder_decodes_jpegs_on_the_device_and_keeps_a_bad_row_apart(
    hub_folder, photo_jpegs, photos
):
    """The Ray engine's actor class, called in this process as Ray Data calls it (its Ray runs
    are in test_extract_ray.py): headers in its decode threads, JPEGs in the model thread."""
    import asyncio

    from ssole_hub.extract.ray import Embedder

    png = io.BytesIO()
    photos[4].save(png, format="PNG")
    cut = photo_jpegs[1][: len(photo_jpegs[1]) // 2]
    cells = [photo_jpegs[0], cut, png.getvalue(), b"not a photo", photo_jpegs[2]]
    batch = {"image": np.array(cells, dtype=object), "id": np.arange(len(cells))}

    async def embed(actor):
        async for out in actor(batch):  # one batch in, one out
            return out

    cpu = asyncio.run(embed(Embedder(hub_folder, device_decode=False)))
    dev = asyncio.run(embed(Embedder(hub_folder, device_decode=True)))
    assert list(dev["error"]) == list(cpu["error"])
    assert list(dev["error"]) == ["", "CorruptImageError", "", "UnsupportedImageError", ""]
    assert list(dev["error_message"]) == list(cpu["error_message"])
    good = [0, 2, 4]
    cos = _cosines(
        torch.from_numpy(cpu["embedding"][good]), torch.from_numpy(dev["embedding"][good])
    )
    assert cos.min() >= 0.999 and not dev["embedding"][[1, 3]].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for nvjpeg decoding")
def test_on_a_gpu_auto_decodes_jpegs_there_and_matches_cpu_decoding(backbone, photo_jpegs):
    cpu = FeatureExtractor(backbone, device="cuda", dtype="float32", device_decode=False)
    gpu = FeatureExtractor(backbone, device="cuda", dtype="float32")
    assert gpu.device_decoding["on"], gpu.device_decoding
    assert gpu.device_decoding["guard"]["passed"]
    assert _cosines(cpu.embed(photo_jpegs), gpu.embed(photo_jpegs)).min() >= 0.999
