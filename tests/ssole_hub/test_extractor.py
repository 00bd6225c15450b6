"""FeatureExtractor: the same numbers as a hand-written timm forward, for every kind of input."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config

import ssole_hub
from ssole_hub import FeatureExtractor, SSOLEModel, SSOLEProjector, export_hub_folder
from ssole_hub.images import ImageDecodeError, UnsupportedImageError


@pytest.fixture(scope="module")
def encoder() -> SSOLEModel:
    torch.manual_seed(0)
    backbone = timm.create_model("ssole_resnet18")
    return SSOLEModel(backbone, SSOLEProjector(512, 64, 32, depth=2)).eval()


@pytest.fixture(scope="module")
def hub_folder(encoder, tmp_path_factory):
    """A real hub folder (safetensors + timm config.json) of a seeded SSOLE ResNet-18."""
    return export_hub_folder(encoder, tmp_path_factory.mktemp("hub") / "ssole_resnet18.test")


@pytest.fixture(scope="module")
def fx(hub_folder) -> FeatureExtractor:
    return FeatureExtractor.from_pretrained(hub_folder, with_projector=True)


@pytest.fixture(scope="module")
def reference(hub_folder, photos) -> torch.Tensor:
    """Vanilla timm, no ssole_hub code: load the folder, build timm's transform, forward."""
    model = timm.create_model(f"local-dir:{hub_folder}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    with torch.inference_mode():
        return model(torch.stack([transform(p) for p in photos]))


def test_embed_equals_a_handwritten_timm_forward(fx, reference, photos):
    out = fx.embed(photos, batch_size=4, normalize=False)
    assert out.shape == (len(photos), 512) == reference.shape
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


def test_normalized_embeddings_are_the_unit_rows_of_the_raw_ones(fx, reference, photos):
    out = fx.embed(photos)
    torch.testing.assert_close(out, F.normalize(reference, dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(photos)))


def test_every_input_kind_gives_the_same_embedding(fx, photos, tmp_path):
    photo = photos[1]
    png = io.BytesIO()
    photo.save(png, format="PNG")
    path = tmp_path / "coffee.png"
    path.write_bytes(png.getvalue())
    arr = np.array(photo)
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    inputs = [photo, png.getvalue(), path, str(path), arr, chw, chw.float() / 255]
    out = fx.embed(inputs)
    for row in out[1:]:
        torch.testing.assert_close(row, out[0], atol=1e-5, rtol=1e-5)
    batched = fx.embed(chw[None].repeat(2, 1, 1, 1))
    assert batched.shape == (2, 512)
    torch.testing.assert_close(batched[1], out[0], atol=1e-5, rtol=1e-5)


def test_rows_follow_input_order_whatever_the_batch_size(fx, photos):
    forward = fx.embed(photos, batch_size=4, normalize=False)
    backward = fx.embed(photos[::-1], batch_size=1, normalize=False)
    torch.testing.assert_close(backward.flip(0), forward, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(forward[0], forward[1])


def test_preprocess_and_embed_tensor_are_embed_split_in_two(fx, photo_jpegs):
    with ThreadPoolExecutor(max_workers=3) as pool:
        batches = list(
            pool.map(fx.preprocess, [photo_jpegs[:2], photo_jpegs[2:4], photo_jpegs[4:]])
        )
    batch = torch.cat(batches)
    assert batch.shape == (len(photo_jpegs), *fx.data_config["input_size"])
    torch.testing.assert_close(fx.embed_tensor(batch), fx.embed(photo_jpegs), atol=1e-4, rtol=1e-4)


def test_projector_output_is_the_projector_of_the_backbone(fx, encoder, photos):
    assert fx.dims == {"backbone": 512, "projector": 32}
    x = fx.preprocess(photos[:3])
    with torch.inference_mode():
        expected = encoder.projector(encoder.backbone(x))
    got = fx.embed(photos[:3], output="projector", normalize=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("output", ["backbone", "projector"])
@pytest.mark.parametrize("normalize", [True, False])
def test_one_extractor_serves_every_output_and_normalization(
    fx, encoder, photo_jpegs, output, normalize
):
    """The offline reference: the encoder's own modules, run by hand on the same batch."""
    batch = fx.preprocess(photo_jpegs)
    with torch.inference_mode():
        expected = encoder.backbone(batch)
        if output == "projector":
            expected = encoder.projector(expected)
    if normalize:
        expected = F.normalize(expected, dim=1)
    got = fx.embed(photo_jpegs, batch_size=4, output=output, normalize=normalize)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_the_extractor_does_not_change_the_model_it_is_given(photos):
    torch.manual_seed(0)
    model = SSOLEModel(timm.create_model("ssole_resnet18"), SSOLEProjector(512, 64, 32))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fx = FeatureExtractor(model, device="cpu")
    fx.embed(photos[:2])
    assert model.training and all(m.training for m in model.modules())
    assert model.backbone.conv1.weight.is_contiguous()  # not turned channels-last
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_an_already_built_module_is_accepted(encoder, photos):
    fx_mod = FeatureExtractor.from_pretrained(encoder)
    assert fx_mod.embed(photos[:2], output="projector").shape == (2, 32)
    assert FeatureExtractor.from_pretrained(encoder.backbone).dims == {"backbone": 512}


def test_a_bad_image_raises_naming_its_index(fx, photo_jpegs):
    with pytest.raises(UnsupportedImageError, match="image 2: input is not a supported image"):
        fx.embed([photo_jpegs[0], photo_jpegs[1], b"plain text, not an image"])
    with pytest.raises(ImageDecodeError, match="image 0"):
        fx.preprocess([photo_jpegs[0][:100]])


def test_bad_arguments_raise_clear_errors(encoder, fx, photos):
    with pytest.raises(ValueError, match=r"'projector' is not available.*with_projector=True"):
        FeatureExtractor.from_pretrained(encoder.backbone).embed(photos[:1], output="projector")
    with pytest.raises(ValueError, match="output 'logits' is not available"):
        fx.embed(photos[:1], output="logits")
    with pytest.raises(ValueError, match="dtype"):
        FeatureExtractor.from_pretrained(encoder, dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        fx.embed(photos, batch_size=0)
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        fx.embed_tensor(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="NaN"):
        fx.embed(torch.full((3, 8, 8), float("nan")))
    with pytest.raises(TypeError, match="cannot embed a dict"):
        fx.embed([{"not": "an image"}])


def test_fast_decode_stays_close_to_a_full_decode(hub_folder, photos):
    jpegs = []
    for photo in photos[:3]:
        buf = io.BytesIO()
        photo.resize((photo.width * 3, photo.height * 3)).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    fast = FeatureExtractor.from_pretrained(hub_folder, fast_decode=True)
    assert fast.decode_options["draft_size"] == 256  # 224 / crop_pct 0.875
    exact = FeatureExtractor.from_pretrained(hub_folder, fast_decode=False)
    assert exact.decode_options["draft_size"] is None
    a, b = fast.embed(jpegs), exact.embed(jpegs)
    assert not torch.equal(a, b)
    assert ((a * b).sum(dim=1) > 0.99).all()


def test_reduced_decoding_is_the_default_where_the_export_guard_passed(hub_folder, caplog):
    """Export ran the guard on scikit-image's photos (at 2 and 4 times the resize size, decoded
    both ways) and recorded it; its figures are recomputed here from the same photos through the loaded
    extractor, so a guard that passed without checking would show."""
    from ssole_hub.hub.decode_check import MIN_COSINE, guard_jpegs

    record = json.loads((hub_folder / "ssole.json").read_text())["reduced_decoding"]
    with caplog.at_level("INFO", logger="ssole_hub"):
        fx = FeatureExtractor.from_pretrained(hub_folder)
    assert fx.decode_check == record and record["passed"]
    assert fx.decode_options["draft_size"] == record["draft_size"] == 256
    assert record["photos"] == record["reduced"] == 6
    assert "reduced JPEG decoding on" in caplog.text
    full = FeatureExtractor.from_pretrained(hub_folder, fast_decode=False)
    jpegs = list(guard_jpegs(256))
    a, b = fx.embed(jpegs), full.embed(jpegs)
    cosine = (a * b).sum(dim=1)
    assert cosine.min() >= MIN_COSINE and abs(float(cosine.min()) - record["min_cosine"]) < 1e-4
    assert (cosine < 1 - 1e-6).all()  # every photo was reduced, so none is the same


def test_a_failed_or_missing_guard_keeps_full_decoding(hub_folder, tmp_path, monkeypatch, caplog):
    from ssole_hub.hub import decode_check

    model = ssole_hub.load_model(hub_folder, with_projector=True)
    monkeypatch.setattr(decode_check, "MIN_COSINE", 1.01)  # no cosine reaches it
    failed = export_hub_folder(model, tmp_path / "failed")
    with caplog.at_level("INFO", logger="ssole_hub"):
        fx = FeatureExtractor.from_pretrained(failed)
    assert not fx.decode_check["passed"] and fx.decode_options["draft_size"] is None
    assert fx.decode_check["min_cosine_limit"] == 1.01
    assert "reduced JPEG decoding off" in caplog.text
    assert FeatureExtractor.from_pretrained(failed, fast_decode=True).decode_options["draft_size"]

    def no_skimage(side: int) -> tuple[bytes, ...]:
        raise ImportError("No module named 'skimage'")

    monkeypatch.setattr(decode_check, "guard_jpegs", no_skimage)
    unchecked = export_hub_folder(model, tmp_path / "unchecked")
    assert json.loads((unchecked / "ssole.json").read_text())["reduced_decoding"] is None
    fx = FeatureExtractor.from_pretrained(unchecked)
    assert fx.decode_check is None and fx.decode_options["draft_size"] is None
    # A built module has no folder, so no record: full decoding unless asked.
    assert FeatureExtractor(fx.model).decode_options["draft_size"] is None


def test_a_registered_name_loads_without_weights(photos):
    fx_name = FeatureExtractor.from_pretrained("ssole_resnet18", pretrained=False)
    assert fx_name.model_id == "ssole_resnet18"
    assert fx_name.dims == {"backbone": 512}
    assert fx_name.data_config["input_size"] == (3, 224, 224)
    assert fx_name.embed(photos[:1]).shape == (1, 512)


def test_bfloat16_autocast_path_stays_close_to_float32(hub_folder, photos):
    """The CUDA mixed-precision code path (autocast), run on the CPU."""
    fx32 = FeatureExtractor.from_pretrained(hub_folder, device="cpu", dtype="float32")
    fx16 = FeatureExtractor.from_pretrained(hub_folder, device="cpu", dtype="bfloat16")
    assert fx16.dtype == torch.bfloat16
    out = fx16.embed(photos[:3])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    cosine = (out * fx32.embed(photos[:3])).sum(dim=1)
    assert (cosine > 0.99).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_matches_cpu_float32(hub_folder, photos):
    fx_gpu = FeatureExtractor.from_pretrained(hub_folder, device="cuda")
    assert fx_gpu.dtype in (torch.bfloat16, torch.float16)
    fx_cpu = FeatureExtractor.from_pretrained(hub_folder, device="cpu")
    cosine = (fx_gpu.embed(photos) * fx_cpu.embed(photos)).sum(dim=1)
    assert (cosine > 0.99).all()
