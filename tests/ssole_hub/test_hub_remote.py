"""The Hub side over real HTTP: downloads for ``hf-hub:``, registered tags and ``torch.hub``; the
offline HF cache; publishing with the real ``huggingface_hub`` client.

The public Hub cannot be reached from tests, so a loopback server (``tests/hub_server.py``) stands
in for it; the client is pointed at it with ``HF_ENDPOINT``, which huggingface_hub reads at import
time, so every client runs in a process of its own that has not imported huggingface_hub (a child
of the zygote, ``tests/zygote.py``; the ``ssole-hub push`` test runs the installed command's entry
point there).
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import hf_hub_download

from ssole_hub.hub.folder import HUB_FILES

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

DOWNLOAD_SCRIPT = """
import json, sys
from pathlib import Path
import safetensors.torch, timm, torch
from PIL import Image
import ssole_hub

repo_root, photo_dir, out = {args}
images = [Image.open(p).convert("RGB") for p in sorted(Path(photo_dir).glob("*.png"), key=lambda p: int(p.stem))]
configs, tensors = {{}}, {{}}

def run(name, model):
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config, is_training=False)
    with torch.inference_mode():
        tensors[name] = model(torch.stack([transform(i) for i in images])).contiguous()
    configs[name] = config

run("timm_hf_hub", timm.create_model("hf-hub:someone/custom-model", pretrained=True).eval())
run("torch_hub", torch.hub.load(repo_root, "ssole_resnet18", source="local"))
registered = timm.create_model("ssole_resnet18.in100_m4", pretrained=True)
tensors.update({{"registered." + k: v.contiguous() for k, v in registered.state_dict().items()}})
safetensors.torch.save_file(tensors, out)
print(json.dumps(configs))
"""


def _reference(encoder, photos, config: dict) -> torch.Tensor:
    transform = timm.data.create_transform(**config, is_training=False)
    with torch.inference_mode():
        return encoder.backbone(torch.stack([transform(img) for img in photos]))


def test_hf_hub_registered_tags_and_torch_hub_download_over_http_and_match(
    loopback_hub, hub_folder, encoder, hub_photos, photo_dir, hub_env, python_subprocess, tmp_path
):
    loopback_hub.publish_folder("someone/custom-model", hub_folder)
    loopback_hub.publish_folder("test-org/ssole_resnet18.in100_m4", hub_folder)
    env = {**hub_env, "HF_ENDPOINT": loopback_hub.endpoint, "SSOLE_HUB_ORG": "test-org"}
    out = tmp_path / "features.safetensors"
    args = repr((str(REPO_ROOT), str(photo_dir), str(out)))
    configs = python_subprocess(DOWNLOAD_SCRIPT.format(args=args), env, tmp_path)

    tensors = safetensors.torch.load_file(out)
    # hf-hub: takes preprocessing from the repo's config.json; registered tags from their table
    assert configs["timm_hf_hub"]["input_size"] == [3, 160, 160]
    assert configs["torch_hub"]["input_size"] == [3, 224, 224]
    for name, config in configs.items():
        expected = _reference(encoder, hub_photos, config)
        assert tensors[name].shape == expected.shape, name
        assert (tensors[name] - expected).abs().max().item() <= 1e-5, name
    # plain timm with a registered tag (after `import ssole_hub`) gets exactly the published weights
    published = safetensors.torch.load_file(hub_folder / "model.safetensors")
    assert all(torch.equal(tensors[f"registered.{k}"], v) for k, v in published.items())
    fetched = {path for method, path in loopback_hub.requests if method == "GET"}
    assert "/someone/custom-model/resolve/main/model.safetensors" in fetched
    assert "/test-org/ssole_resnet18.in100_m4/resolve/main/model.safetensors" in fetched


OFFLINE_SCRIPT = """
import json
import safetensors.torch, timm, torch
import ssole_hub

folder = {folder!r}
expected = safetensors.torch.load_file(folder + "/model.safetensors")
expected_proj = safetensors.torch.load_file(folder + "/projector.safetensors")
model = timm.create_model("ssole_resnet18", pretrained=True)
same = all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
fm = ssole_hub.load_model("ssole_resnet18.in100_m4", with_projector=True)
same_proj = all(torch.equal(fm.projector.state_dict()[k], v) for k, v in expected_proj.items())
same_loaded = all(torch.equal(fm.backbone.state_dict()[k], v) for k, v in expected.items())
try:
    ssole_hub.load_model("ssole_resnet50")
    missing_error = None
except FileNotFoundError as exc:
    missing_error = str(exc)
from huggingface_hub import constants
print(json.dumps(dict(offline=constants.HF_HUB_OFFLINE, same=same, same_proj=same_proj,
                      same_loaded=same_loaded, missing_error=missing_error)))
"""


def test_prepopulated_cache_loads_exact_weights_with_hf_hub_offline(
    loopback_hub, hub_folder, hub_env, python_subprocess, tmp_path
):
    repo_id = "test-org/ssole_resnet18.in100_m4"
    loopback_hub.publish_folder(repo_id, hub_folder)
    cache = tmp_path / "hf_home" / "hub"
    for name in HUB_FILES:  # fill the cache with the real client, over HTTP
        hf_hub_download(repo_id, name, cache_dir=cache, endpoint=loopback_hub.endpoint)
    before = len(loopback_hub.requests)

    # The stand-in keeps running at HF_ENDPOINT: offline mode must not even ask it.
    env = {
        **hub_env,
        "HF_ENDPOINT": loopback_hub.endpoint,
        "HF_HUB_OFFLINE": "1",
        "SSOLE_HUB_ORG": "test-org",
    }
    result = python_subprocess(OFFLINE_SCRIPT.format(folder=str(hub_folder)), env, tmp_path)
    assert result["offline"] is True
    assert result["same"] and result["same_loaded"] and result["same_proj"]
    assert "not in the local HF cache" in result["missing_error"]
    assert "ssole_resnet50" in result["missing_error"]
    assert len(loopback_hub.requests) == before


PUSH_SCRIPT = """
import json, os
import ssole_hub, torch
from ssole_hub.cli import main

folder, broken = {folder!r}, {broken!r}
rc_broken = main(["push", broken, "--repo", "me/broken"])
rc_bad_id = main(["push", folder, "--repo", "not/a/repo"])
rc = main(["push", folder, "--repo", "me/pushed", "--revision", "v1", "--private",
           "--message", "first upload"])
model = ssole_hub.load_model("hf-hub:me/pushed@v1", with_projector=True)
local = ssole_hub.load_model(folder, with_projector=True)
same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
os.environ.pop("HF_TOKEN")
rc_no_token = main(["push", folder, "--repo", "me/other"])
print(json.dumps(dict(rc_broken=rc_broken, rc_bad_id=rc_bad_id, rc=rc, same=same,
                      rc_no_token=rc_no_token)))
"""


def test_push_uploads_through_the_real_client_and_refuses_invalid_folders(
    loopback_hub, hub_folder, hub_env, python_subprocess, tmp_path
):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in HUB_FILES:
        (broken / name).write_bytes((hub_folder / name).read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])

    env = {
        **hub_env,
        "HF_ENDPOINT": loopback_hub.endpoint,
        "HF_TOKEN": "test-token",
        # The stand-in speaks Git LFS, not Xet storage (see tests/hub_server.py).
        "HF_HUB_DISABLE_XET": "1",
    }
    script = PUSH_SCRIPT.format(folder=str(hub_folder), broken=str(broken))
    result = python_subprocess(script, env, tmp_path)

    assert result["rc_broken"] == 2 and result["rc_bad_id"] == 2  # refused before any request
    assert not any("broken" in path or "not/a" in path for _, path in loopback_hub.requests)
    assert result["rc"] == 0 and result["same"]
    repo = loopback_hub.repos["me/pushed"]
    assert repo.private
    pushed = loopback_hub.files("me/pushed", "v1")
    for name in HUB_FILES:
        assert pushed[name] == (hub_folder / name).read_bytes(), name
    assert "model.safetensors" not in loopback_hub.files("me/pushed", "main")
    assert repo.messages[repo.branches["v1"]] == "first upload"
    # binaries went through the LFS routes, the rest inline in the commit
    for name in ("model.safetensors", "projector.safetensors"):
        assert hashlib.sha256(pushed[name]).hexdigest() in loopback_hub.lfs_objects
    assert hashlib.sha256(pushed["README.md"]).hexdigest() not in loopback_hub.lfs_objects
    assert result["rc_no_token"] == 2
    assert "me/other" not in loopback_hub.repos


def test_push_with_the_default_client_settings_commits_every_file(
    make_loopback_hub, hub_folder, hub_env, python_subprocess, tmp_path
):
    """hf_xet is installed, so the client takes its pipelined upload path; the stand-in asks for
    every file inline ("regular"), which that path commits without Xet storage."""
    script = (
        "import json; from ssole_hub import push_to_hub\n"
        f"info = push_to_hub({str(hub_folder)!r}, 'me/default-path', commit_message='default')\n"
        "print(json.dumps({'oid': info.oid}))"
    )
    hub = make_loopback_hub(token="test-token", lfs_suffixes=())
    env = {**hub_env, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "test-token"}
    result = python_subprocess(script, env, tmp_path)
    repo = hub.repos["me/default-path"]
    assert repo.branches["main"] == result["oid"]
    assert repo.messages[result["oid"]] == "default"
    for name in HUB_FILES:
        assert hub.files("me/default-path")[name] == (hub_folder / name).read_bytes(), name


def test_push_to_an_unreachable_or_refusing_hub_prints_one_error_line(
    loopback_hub, hub_folder, hub_env, tmp_path, zygote
):
    """The installed ``ssole-hub`` command (its console entry point, in a child of the zygote).
    Simulated: no network, as a loopback port nothing listens on; then the stand-in Hub refusing
    a wrong token (HTTP 401)."""
    push = ["push", str(hub_folder), "--repo", "me/pushed"]
    env = {**hub_env, "HF_TOKEN": "test-token", "HF_HUB_DISABLE_XET": "1"}
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening
        done = zygote.run("console", "ssole-hub", push, tmp_path, {**env, "HF_ENDPOINT": nobody})
    refused = zygote.run(
        "console",
        "ssole-hub",
        push,
        tmp_path,
        {**env, "HF_ENDPOINT": loopback_hub.endpoint, "HF_TOKEN": "wrong-token"},
    )
    for run, reason in [
        (done, f"cannot reach the Hub at {nobody} to push me/pushed"),
        (refused, "refused to let this token write me/pushed (HTTP 401"),
    ]:
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ssole-hub push: error: "), run.stderr
        assert reason in lines[0] and "no commit was made" in lines[0]
    assert "HF_ENDPOINT" in done.stderr and "HF_TOKEN" in refused.stderr
    assert "me/pushed" not in loopback_hub.repos


UNAVAILABLE_SCRIPT = """
import json, time
import timm
import ssole_hub

def attempt(load):
    start = time.perf_counter()
    try:
        load()
    except ssole_hub.HubUnavailableError as exc:
        return dict(seconds=time.perf_counter() - start, error=str(exc),
                    is_file_not_found=isinstance(exc, FileNotFoundError))
    return dict(seconds=time.perf_counter() - start, error=None)

print(json.dumps(dict(
    timm=attempt(lambda: timm.create_model("ssole_resnet50", pretrained=True)),
    load_model=attempt(lambda: ssole_hub.load_model("ssole_resnet18.in100_m4")),
    hf_hub=attempt(lambda: ssole_hub.load_model("hf-hub:someone/custom-model")),
    timm_hf_hub=attempt(lambda: timm.create_model("hf-hub:someone/timm-model", pretrained=True)),
)))
"""


def _unavailable(env: dict, python_subprocess, tmp_path) -> dict:
    return python_subprocess(UNAVAILABLE_SCRIPT, {**env, "SSOLE_HUB_ORG": "test-org"}, tmp_path)


def _assert_clear_and_fast(result: dict, repo_id: str, reason: str) -> None:
    assert result["error"] is not None, f"{repo_id} loaded"
    assert result["is_file_not_found"]
    message = result["error"]
    assert repr(repo_id) in message and reason in message
    for way_out in ("local-dir:PATH", "ssole_hub.load_model('PATH')", "HF_HUB_OFFLINE=1"):
        assert way_out in message, way_out
    assert f"hf download {repo_id}" in message and "make demo" in message
    # huggingface_hub alone retries an uncached file with back-off: 1 + 2 + 4 + 8 + 8 s.
    assert result["seconds"] < 5, result["seconds"]


def test_an_unavailable_hub_fails_after_one_lookup_naming_the_repo_and_the_ways_out(
    make_loopback_hub, hub_env, python_subprocess, tmp_path
):
    """Simulated: a Hub that answers every download with HTTP 503 (down, or a proxy that cannot
    reach it), at HF_ENDPOINT, with an empty cache; each load may ask it once, and only once."""
    hub = make_loopback_hub(outage=503)
    result = _unavailable({**hub_env, "HF_ENDPOINT": hub.endpoint}, python_subprocess, tmp_path)
    for key, repo_id in [
        ("timm", "test-org/ssole_resnet50.in1k_m8"),
        ("load_model", "test-org/ssole_resnet18.in100_m4"),
        ("hf_hub", "someone/custom-model"),
        ("timm_hf_hub", "someone/timm-model"),
    ]:
        _assert_clear_and_fast(result[key], repo_id, "answered HTTP 503")
    asked = [path for _, path in hub.requests]
    assert asked == [
        "/test-org/ssole_resnet50.in1k_m8/resolve/main/model.safetensors",
        "/test-org/ssole_resnet18.in100_m4/resolve/main/model.safetensors",
        "/someone/custom-model/resolve/main/config.json",
        "/someone/timm-model/resolve/main/config.json",
    ]


def test_no_network_fails_at_once_and_a_missing_repo_says_it_is_not_published(
    loopback_hub, hub_env, python_subprocess, tmp_path
):
    """Simulated: no network, as a loopback port nothing listens on (connection refused); then a
    reachable stand-in Hub that has none of the repos (404, as for a recipe not yet published)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening
        result = _unavailable({**hub_env, "HF_ENDPOINT": nobody}, python_subprocess, tmp_path)
    _assert_clear_and_fast(result["timm"], "test-org/ssole_resnet50.in1k_m8", "cannot be reached")
    _assert_clear_and_fast(result["hf_hub"], "someone/custom-model", "cannot be reached")
    # plain timm with hf-hub: after `import ssole_hub`; huggingface_hub alone retried for 23 s
    _assert_clear_and_fast(result["timm_hf_hub"], "someone/timm-model", "cannot be reached")

    env = {**hub_env, "HF_ENDPOINT": loopback_hub.endpoint}
    result = _unavailable(env, python_subprocess, tmp_path)
    _assert_clear_and_fast(result["load_model"], "test-org/ssole_resnet18.in100_m4", "not found")
    assert "not published yet" in result["load_model"]["error"]
    _assert_clear_and_fast(result["timm_hf_hub"], "someone/timm-model", "not found")
    assert len(loopback_hub.requests) == 4


def test_offline_mode_with_an_empty_cache_fails_at_once_naming_the_repo(
    loopback_hub, hub_env, python_subprocess, tmp_path
):
    """HF_HUB_OFFLINE=1 and an empty cache: every loader, plain timm's hf-hub: included, raises
    HubUnavailableError naming the repo and asks nothing of the (running) stand-in Hub."""
    env = {**hub_env, "HF_ENDPOINT": loopback_hub.endpoint, "HF_HUB_OFFLINE": "1"}
    result = _unavailable(env, python_subprocess, tmp_path)
    for key, repo_id in [
        ("timm", "test-org/ssole_resnet50.in1k_m8"),
        ("load_model", "test-org/ssole_resnet18.in100_m4"),
        ("hf_hub", "someone/custom-model"),
        ("timm_hf_hub", "someone/timm-model"),
    ]:
        _assert_clear_and_fast(result[key], repo_id, "HF_HUB_OFFLINE=1 forbids downloading it")
    assert loopback_hub.requests == []
