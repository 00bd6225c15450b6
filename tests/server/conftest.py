"""Fixtures for the server tests: a tiny real model folder and real uvicorn servers on loopback.

The model is ``ssole_resnet18`` (random weights, fixed seed) with a small projector, exported
as a real hub folder whose pretrained config asks for 64 px inputs, so a forward pass is cheap.
Each server is the real app under a real uvicorn on 127.0.0.1, on a port the OS picked.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import timm
import torch
import uvicorn

from server.app import create_app
from server.backend import BackendLoader
from server.settings import ServerSettings
from ssole_hub import FeatureExtractor, export_hub_folder, fit_hub_pca
from ssole_hub.hub.checkpoint import ModelCheckpoint
from ssole_hub.models import SSOLEProjector

INPUT_PX = 64


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real hub folder: ssole_resnet18 at 64 px with a 512 -> 64 -> 32 projector."""
    torch.manual_seed(0)
    backbone = timm.create_model("ssole_resnet18", pretrained=False, num_classes=0)
    projector = SSOLEProjector(512, hidden_dim=64, out_dim=32, depth=2)
    ckpt = ModelCheckpoint(
        arch="ssole_resnet18",
        backbone=backbone.state_dict(),
        projector=projector.state_dict(),
        projector_config=projector.config,
        pretrained_cfg={"input_size": (3, INPUT_PX, INPUT_PX), "crop_pct": 1.0},
        metadata={"dataset": "test"},
    )
    return export_hub_folder(ckpt, tmp_path_factory.mktemp("models") / "tiny-ssole")


@pytest.fixture(scope="session")
def pca_model_dir(tiny_model_dir, photo_crops, tmp_path_factory) -> Path:
    """A copy of the tiny model's folder with a PCA of its 512-d backbone embeddings fitted on
    150 photo crops: ``dimensions`` from 1 to 149."""
    folder = tmp_path_factory.mktemp("models") / "tiny-ssole-pca"
    shutil.copytree(tiny_model_dir, folder)
    fit_hub_pca(folder, photo_crops, progress=False, num_workers=0)
    return folder


@pytest.fixture(scope="session")
def pca_extractor(pca_model_dir) -> FeatureExtractor:
    """The offline reference for compact embeddings: the PCA folder's extractor (torch)."""
    return FeatureExtractor.from_pretrained(pca_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> str:
    """The model spec the servers load."""
    return f"local-dir:{tiny_model_dir}"


@dataclass
class Reference:
    """One output of the offline extractor, with normalisation fixed."""

    fx: FeatureExtractor
    output: str
    normalize: bool

    def embed(self, images: list) -> torch.Tensor:
        return self.fx.embed(images, output=self.output, normalize=self.normalize)


@pytest.fixture(scope="session")
def extractors(tiny_model) -> Callable[[str, bool], Reference]:
    """Offline embeddings of the tiny model, the reference the server must match:
    ``extractors(output, normalize).embed(images)``, all from one FeatureExtractor."""
    fx = FeatureExtractor.from_pretrained(
        tiny_model, with_projector=True, device="cpu", dtype="float32"
    )

    def get(output: str = "backbone", normalize: bool = True) -> Reference:
        return Reference(fx, output, normalize)

    return get


@dataclass
class RunningServer:
    """A live server: its base URL and settings, and a way to stop it."""

    url: str
    settings: ServerSettings
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while time.monotonic() < deadline:
                if c.get("/ready").status_code == 200:
                    return
                time.sleep(0.05)
        raise TimeoutError(f"server at {self.url} not ready after {timeout_s} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(settings: ServerSettings, loader: BackendLoader | None = None) -> RunningServer:
    """Run the app under uvicorn in a thread on a socket bound to a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings, loader), log_level="warning", lifespan="on", timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return RunningServer(f"http://127.0.0.1:{port}", settings, server, thread)


@pytest.fixture(scope="session")
def make_server(tiny_model) -> Iterator[Callable[..., RunningServer]]:
    """Start servers of the tiny model with setting overrides; all are stopped at the end."""
    running: list[RunningServer] = []

    def make(loader: BackendLoader | None = None, wait: bool = True, **overrides) -> RunningServer:
        overrides.setdefault("model", tiny_model)
        settings = ServerSettings(device="cpu", decode_threads=2, **overrides)
        srv = start_server(settings, loader)
        running.append(srv)
        if wait:
            srv.wait_ready()
        return srv

    yield make
    for srv in running:
        srv.stop()


@pytest.fixture(scope="session")
def pca_server(make_server, pca_model_dir) -> RunningServer:
    """A server of the PCA folder (torch backend), batch 8."""
    return make_server(
        model=f"local-dir:{pca_model_dir}", backend="torch", max_batch_size=8, max_items=8
    )


@pytest.fixture(scope="session")
def server(make_server) -> RunningServer:
    """The default server: 64 px tiny model, batch 8, small limits that tests can reach."""
    return make_server(
        max_batch_size=8,
        max_batch_wait_ms=20,
        max_items=8,
        max_queue=256,
        max_image_bytes=2_000_000,
        max_request_bytes=4_000_000,
        max_image_pixels=20_000_000,
    )
