"""Serving benchmark: the batched server vs the offline bound vs a naive endpoint, in one run.

What is measured, side by side on the same real photos (scikit-image, JPEG):

- **bound**: the offline :class:`~ssole_hub.FeatureExtractor` (decode + preprocess + forward at
  the server's max batch size), images/s, median of repeats: what serving cannot beat;
- **server**: ``python -m server`` (dynamic batching) under a bounded closed-loop load on
  loopback at concurrency 1, 8, 32, 64 (one image per request, JSON data URIs): images/s,
  p50/p99 latency;
- **naive**: a one-request-one-forward FastAPI endpoint (sync route in FastAPI's thread pool, the
  usual first version of such a service) under the same load (``--no-naive``: not started);
- **stage profile**: where an image's CPU goes in the server's own code (parse, decode,
  preprocess, forward, encode; :func:`stage_profile`), per round;
- **other servers** in the same rounds: the same server on ``torch`` when another backend is
  measured, ``--baseline NAME=DIR``: the server of another checkout (e.g. a git worktree of an
  older commit) on the same model folder and settings, and ``--fixed-batches N ...``: the same
  server with its batches' target (and largest) size fixed at N, without the start-up timing that
  otherwise chooses it.

Ratios (server / bound, server / naive, p99 / time of one full batch) come from this one run,
in interleaved rounds (bound, then each level against both servers), medians over rounds.
Throughput is reported per wall second and per CPU second of the serving process, and their
quotient, the serving process's busy cores (CPU seconds per wall second): on an idle machine a
server that keeps every core busy shows about the machine's core count there. The server runs
with its own defaults for batching unless ``--batch-size`` / ``--max-wait-ms`` are given. The
load average before and after, and the CPU model and flags, go into the JSON.

    python bench/serve.py                       # random-weight ssole_resnet18 at 224 px, CPU, auto
    python bench/serve.py --backend onnx-int8   # and the same server on torch, in the same rounds
    python bench/serve.py --profile-only --backend torch --forward-batches 8 64
    python bench/serve.py --baseline old=/tmp/old-main   # after: git worktree add /tmp/old-main REV
    python bench/serve.py --backend torch --no-naive --fixed-batches 4 8 16 32 64
    python bench/serve.py --device cuda --batch-size 64 --requests 2048
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import load_average, machine_record  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


# --- inputs ---------------------------------------------------------------------------------


def photo_jpegs() -> list[bytes]:
    """The real photos of scikit-image as JPEG files (mixed sizes, 300 to 1000 px)."""
    from PIL import Image
    from skimage import data

    out = []
    for name in PHOTOS:
        img = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def random_model_folder(out: Path, input_px: int, arch: str = "ssole_resnet18") -> str:
    """A real hub folder of ``arch`` with random weights (speed does not need training)."""
    import timm
    import torch

    from ssole_hub import export_hub_folder
    from ssole_hub.hub.checkpoint import ModelCheckpoint
    from ssole_hub.models import SSOLEProjector

    torch.manual_seed(0)
    backbone = timm.create_model(arch, pretrained=False, num_classes=0)
    projector = SSOLEProjector(backbone.num_features, hidden_dim=512, out_dim=128, depth=2)
    ckpt = ModelCheckpoint(
        arch=arch,
        backbone=backbone.state_dict(),
        projector=projector.state_dict(),
        projector_config=projector.config,
        pretrained_cfg={"input_size": (3, input_px, input_px)},
        metadata={"dataset": "benchmark"},
    )
    return f"local-dir:{export_hub_folder(ckpt, out / 'bench-model', overwrite=True)}"


def export_onnx_files(model: str, jpegs: list[bytes], tmp: Path) -> None:
    """Add ONNX files to the benchmark's model folder, int8 calibrated on the benchmark photos."""
    from ssole_hub.hub.onnx_export import export_onnx

    photos = tmp / "calibration"
    photos.mkdir()
    for i, jpeg in enumerate(jpegs):
        (photos / f"{i}.jpg").write_bytes(jpeg)
    export_onnx(model.removeprefix("local-dir:"), calibration=photos)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the offline bound ----------------------------------------------------------------------


class OfflineBound:
    """The offline FeatureExtractor on the same images: what serving cannot beat."""

    def __init__(self, model: str, device: str, batch_size: int, backend: str = "torch") -> None:
        from ssole_hub.extractor import FeatureExtractor

        self.fx = FeatureExtractor.from_pretrained(
            model, device=None if device == "auto" else device, backend=backend
        )
        self.batch_size = batch_size
        self.fx.warmup(batch_size)

    def measure(self, images: list[bytes]) -> dict:
        """Decode + preprocess + forward throughput of ``FeatureExtractor.embed``: images per
        wall second and per CPU second of this process."""
        cpu0, t0 = cpu_seconds(os.getpid()), time.perf_counter()
        self.fx.embed(images, batch_size=self.batch_size)
        wall, cpu = time.perf_counter() - t0, cpu_seconds(os.getpid()) - cpu0
        return {"images_per_s": len(images) / wall, "images_per_cpu_s": len(images) / cpu}

    def full_batch_s(self, images: list[bytes]) -> float:
        """Forward time of one full batch (the unit the latency target is stated in)."""
        batch = self.fx.preprocess(images[: self.batch_size])
        t0 = time.perf_counter()
        self.fx.embed_tensor(batch)
        return time.perf_counter() - t0


# --- where an image's CPU goes ----------------------------------------------------------------

STAGES = ("parse", "decode", "preprocess", "forward", "encode")
"""The stages of serving one image, in order (:func:`stage_profile`)."""


def _thread_ms(fn, items: list, repeats: int) -> float:
    """Median over ``repeats`` of the CPU milliseconds this thread spends per item in
    ``fn(item)`` (one thread: what a decode thread pays)."""
    per_item = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for item in items:
            fn(item)
        per_item.append((time.thread_time() - t0) * 1000 / len(items))
    return statistics.median(per_item)


def stage_profile(fx, bodies: list[bytes], batch_size: int, repeats: int = 3) -> dict[str, float]:
    """CPU milliseconds per image of each of :data:`STAGES`, through the server's own code:

    - ``parse``: the request body to image bytes (``orjson`` then ``EmbeddingRequest``, as the
      route's ``OrjsonRoute`` and FastAPI's validation do, then
      ``server.inputs.base64_image``);
    - ``decode``: the bytes to an RGB image (``FeatureExtractor.load_image``: the decoder with
      the extractor's options, e.g. a reduced DCT scale);
    - ``preprocess``: resize, crop and normalise (the model's eval transform);
    - ``forward``: one batch of ``batch_size`` through ``embed_tensor``, the process's CPU over
      all threads divided by the batch (the forward pass is the multi-threaded stage);
    - ``encode``: one vector to the response body (``server.outputs.embeddings_body``).

    The single-threaded stages run where the server runs them, in a thread with one torch
    thread (a decode thread), and are timed with that thread's CPU clock. Medians over
    ``repeats``.
    """
    from concurrent.futures import ThreadPoolExecutor

    import orjson
    import torch

    from server.inputs import base64_image
    from server.outputs import embeddings_body
    from server.schemas import EmbeddingRequest
    from server.service import use_intra_op_threads

    def parse(body: bytes) -> bytes:
        text = EmbeddingRequest.model_validate(orjson.loads(body)).input[0]
        return base64_image(text, "input[0]", fx.decode_options["max_bytes"])

    def single_threaded() -> dict[str, float]:
        encoded = [parse(b) for b in bodies]
        decoded = [fx.load_image(e) for e in encoded]
        vector = np.random.default_rng(0).standard_normal(max(fx.dims.values()))
        vectors = [[(vector / np.linalg.norm(vector)).astype(np.float32)]] * 32
        return {
            "parse": _thread_ms(parse, bodies, repeats),
            "decode": _thread_ms(fx.load_image, encoded, repeats),
            "preprocess": _thread_ms(fx.transform, decoded, repeats),
            "encode": _thread_ms(lambda v: embeddings_body(v, "m", "float"), vectors, repeats),
            "images": [fx.transform(decoded[i % len(decoded)]) for i in range(batch_size)],
        }

    with ThreadPoolExecutor(1, initializer=use_intra_op_threads, initargs=(1,)) as pool:
        profile = pool.submit(single_threaded).result()
    batch = torch.stack(profile.pop("images"))
    forward = []
    for _ in range(repeats):
        cpu0 = cpu_seconds(os.getpid())
        fx.embed_tensor(batch)
        forward.append((cpu_seconds(os.getpid()) - cpu0) * 1000 / batch_size)
    return {stage: profile.get(stage, statistics.median(forward)) for stage in STAGES}


def forward_ms_per_image(fx, batch_sizes: list[int], repeats: int = 3) -> dict[int, float]:
    """CPU milliseconds per image of ``embed_tensor`` at each batch size (median of
    ``repeats``, after one untimed pass): how the forward pass's cost depends on the batch."""
    import torch

    out = {}
    for n in batch_sizes:
        batch = torch.randn(n, *fx.data_config["input_size"])
        fx.embed_tensor(batch)
        per_image = []
        for _ in range(repeats):
            cpu0 = cpu_seconds(os.getpid())
            fx.embed_tensor(batch)
            per_image.append((cpu_seconds(os.getpid()) - cpu0) * 1000 / n)
        out[n] = statistics.median(per_image)
    return out


def print_profile(profile: dict[str, float]) -> None:
    """The stage profile as a Markdown table, with the limit it sets (images per CPU-s)."""
    total = sum(profile.values())
    print("| stage | CPU ms per image | share |")
    print("| --- | ---: | ---: |")
    for stage in STAGES:
        print(f"| {stage} | {profile[stage]:.2f} | {profile[stage] / total:.0%} |")
    print(f"| total | {total:.2f} | limit {1000 / total:.1f} images per CPU-s |")


# --- the naive endpoint ---------------------------------------------------------------------


def naive_app(model: str, device: str):
    """One request, one forward: decode, preprocess and run the model inside the route."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from ssole_hub.extractor import FeatureExtractor

    fx = FeatureExtractor.from_pretrained(model, device=None if device == "auto" else device)
    fx.warmup(1)
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict:
        return {"status": "ready"}

    @app.post("/v1/embeddings")
    def embeddings(body: dict) -> JSONResponse:
        images = [base64.b64decode(s.split(",", 1)[-1]) for s in body["input"]]
        vectors = fx.embed_tensor(fx.preprocess(images)).numpy()
        data = [
            {"object": "embedding", "index": i, "embedding": v.tolist()}
            for i, v in enumerate(vectors)
        ]
        return JSONResponse({"object": "list", "data": data, "model": fx.model_id})

    return app


# --- load generation ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, cwd: Path = REPO, timeout_s: float = 300) -> subprocess.Popen:
    """Start a server process in ``cwd`` and wait until its /ready answers 200.

    The polls share one client: ``httpx.get`` builds a client (and its TLS context) per call,
    about 23 ms of CPU each, which every 0.2 s took a tenth of a core from the server while it
    timed its batch sizes at start-up, enough to reorder them."""
    import httpx

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if client.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"server on port {port} not ready after {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


class _Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads only the status and body
    length: a load generator that shares the machine with the server must cost it little CPU
    (httpx's client took up to 0.3 of the 2 cores at concurrency 64)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        """Send one request and read the whole response; returns its status code."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.writelines([head.encode(), body])
        await self.writer.drain()
        assert self.reader is not None
        status = int((await self.reader.readline()).split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                close = True
        await self.reader.readexactly(length)
        if close:
            self.writer.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, n_requests: int) -> dict:
    """``concurrency`` clients each send their next request when the last one returns, until
    ``n_requests`` have been sent; returns images/s and latency percentiles."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0

    async def client(conn: _Connection) -> None:
        nonlocal sent
        while sent < n_requests:
            body = bodies[sent % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            try:
                status = str(await conn.request("POST", "/v1/embeddings", body))
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                status = type(exc).__name__  # counted, not fatal: a load test reports it
                conn.close()
            latencies.append(time.perf_counter() - t0)
            if status != "200":
                errors[status] = errors.get(status, 0) + 1

    conns = [_Connection(host, int(port)) for _ in range(concurrency)]
    try:
        # A short warm-up opens the connections before the clock starts.
        await asyncio.gather(*(c.request("GET", "/ready") for c in conns))
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in conns))
        wall = time.perf_counter() - t0
    finally:
        for c in conns:
            c.close()
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "images_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent busy so far (``/proc/stat``: all but idle and
    iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_level(url: str, pid: int, bodies: list[bytes], concurrency: int, requests: int) -> dict:
    """One load level against the server process ``pid``; adds images per server CPU second,
    which, unlike images per second, does not depend on how busy the rest of the machine is, and
    the cores kept busy by the whole machine and by this load generator (it shares the machine)."""
    cpu0, machine0, own0, t0 = (
        cpu_seconds(pid), machine_busy_seconds(), cpu_seconds(os.getpid()), time.perf_counter(),
    )  # fmt: skip
    # Enough requests for a p99 at every level, bounded so a level takes seconds.
    r = asyncio.run(closed_loop(url, bodies, concurrency, max(requests, 4 * concurrency)))
    wall = time.perf_counter() - t0
    r["images_per_cpu_s"] = r["requests"] / (cpu_seconds(pid) - cpu0)
    r["machine_busy_cores"] = (machine_busy_seconds() - machine0) / wall
    r["load_generator_cores"] = (cpu_seconds(os.getpid()) - own0) / wall
    return r


def median_of(runs: list[dict]) -> dict:
    """Per-level medians over repeats of images/s and latency percentiles."""
    keys = (
        "images_per_s", "images_per_cpu_s", "p50_ms", "p99_ms", "machine_busy_cores",
        "load_generator_cores",
    )  # fmt: skip
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["errors"] = sum(sum(r["errors"].values()) for r in runs)
    out["requests"] = sum(r["requests"] for r in runs)
    return out


# --- main -----------------------------------------------------------------------------------

BACKENDS = ("auto", "torch", "onnx", "onnx-bf16", "onnx-int8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the server's own batching defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model spec (default: random ssole_resnet18)")
    p.add_argument("--input-px", type=int, default=224, help="input size of the default model")
    p.add_argument(
        "--arch",
        default="ssole_resnet18",
        choices=["ssole_resnet18", "ssole_resnet50"],
        help="architecture of the default (random-weight) model",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="server max batch size")
    p.add_argument("--max-wait-ms", type=float, default=None, help="server max batch wait")
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="the server's and the bound's forward pass (default: the server's default, auto). "
        "On a CPU the default model gets its ONNX files exported first (int8 calibrated on the "
        "benchmark's photos); the naive endpoint stays torch, and for another backend than "
        "torch a second server on torch is measured in the same rounds (server / torch server)",
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also serve the same model and settings with the server of another checkout (e.g. "
        "a git worktree of main), in the same rounds: server / NAME; repeatable",
    )
    p.add_argument(
        "--fixed-batches",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also serve with the batches' target and largest size fixed at each N (no start-up "
        "timing), in the same rounds: server / batch_N, and each against the bound",
    )
    p.add_argument(
        "--decode-on-device",
        default="auto",
        choices=["auto", "on", "off"],
        help="the server's --decode-on-device: JPEGs decoded in each batch on the model's device "
        "(nvjpeg on a GPU) or in the decode threads (default: the server's default, auto)",
    )
    p.add_argument(
        "--compare-decoding",
        action="store_true",
        help="also serve with --decode-on-device off, in the same rounds (server / cpu_decoding)",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=128, help="requests per level (at least 8x c)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (bound, profile, levels)")
    p.add_argument(
        "--profile-only", action="store_true", help="print the stage profile only; no servers"
    )
    p.add_argument(
        "--forward-batches",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="with --profile-only: also the forward pass's CPU ms per image at these batch sizes",
    )
    p.add_argument(
        "--no-naive", action="store_true", help="do not start or measure the naive endpoint"
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.json"))
    p.add_argument("--naive-server", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for spec in args.baseline:
        name, _, folder = spec.partition("=")
        if not name or not Path(folder, "server", "__main__.py").is_file():
            p.error(f"--baseline {spec!r}: give NAME=DIR, DIR a checkout with server/__main__.py")
    from server.settings import ServerSettings

    defaults = ServerSettings(model="unused")
    if args.batch_size is None:
        args.batch_size = defaults.max_batch_size
    if args.max_wait_ms is None:
        args.max_wait_ms = defaults.max_batch_wait_ms
    if args.decode_threads is None:
        args.decode_threads = defaults.decode_threads
    return args


def server_command(
    args: argparse.Namespace,
    model: str,
    port: int,
    backend: str,
    decoding: str = "auto",
    max_batch: int | None = None,
) -> list[str]:
    """``python -m server`` with the benchmark's settings (``decoding``: its
    ``--decode-on-device``, given only when not the default: older servers have no such flag;
    ``max_batch``: a fixed target and largest batch, instead of ``--batch-size`` and the target
    the server times at start-up)."""
    return [
        sys.executable, "-m", "server", "--model", model, "--port", str(port),
        "--device", args.device, "--max-batch-size", str(max_batch or args.batch_size),
        "--max-batch-wait-ms", str(args.max_wait_ms), "--max-queue", "1024",
        "--decode-threads", str(args.decode_threads), "--log-level", "warning",
        "--backend", backend,
        *(["--decode-on-device", decoding] if decoding != "auto" else []),
        *(["--no-warmup"] if max_batch else []),
    ]  # fmt: skip


def start_servers(
    args: argparse.Namespace, model: str, procs: list[subprocess.Popen]
) -> dict[str, tuple[str, int]]:
    """Start every server measured (appending each process to ``procs``); returns name ->
    (URL, pid): ``server``, ``naive`` (unless ``--no-naive``), ``cpu_decoding`` (``--compare-decoding``),
    ``torch_server`` (for another backend than torch), ``baseline_<NAME>`` per ``--baseline``
    and ``batch_<N>`` per ``--fixed-batches``."""
    plan: dict[str, tuple[list[str], int, Path]] = {}
    port = free_port()
    plan["server"] = (
        server_command(args, model, port, args.backend, args.decode_on_device),
        port,
        REPO,
    )
    if args.compare_decoding:
        port = free_port()
        plan["cpu_decoding"] = (server_command(args, model, port, args.backend, "off"), port, REPO)
    if not args.no_naive:
        naive_port = free_port()
        plan["naive"] = (
            [sys.executable, str(Path(__file__).resolve()), "--naive-server", str(naive_port),
             "--model", model, "--device", args.device],
            naive_port, REPO,
        )  # fmt: skip
    if args.backend != "torch":
        port = free_port()
        plan["torch_server"] = (server_command(args, model, port, "torch"), port, REPO)
    for spec in args.baseline:
        name, _, folder = spec.partition("=")
        port = free_port()
        plan[f"baseline_{name}"] = (server_command(args, model, port, args.backend), port,
                                    Path(folder).resolve())  # fmt: skip
    for n in args.fixed_batches:
        port = free_port()
        plan[f"batch_{n}"] = (server_command(args, model, port, args.backend, max_batch=n), port,
                              REPO)  # fmt: skip
    urls = {}
    for name, (cmd, port, cwd) in plan.items():
        procs.append(start(cmd, port, cwd))
        urls[name] = (f"http://127.0.0.1:{port}", procs[-1].pid)
    return urls


def served_models(urls: dict[str, tuple[str, int]]) -> dict[str, dict | None]:
    """Each server's backend and the batch size it aims at, from its ``/v1/models`` (``None``
    where there is none, as for the naive endpoint; older servers give fewer fields)."""
    import httpx

    cards: dict[str, dict | None] = {}
    for name, (url, _) in urls.items():
        response = httpx.get(f"{url}/v1/models", timeout=10)
        card = response.json()["data"][0] if response.status_code == 200 else None
        keys = ("backend", "backend_timings", "batch_size", "batch_timings")
        cards[name] = {k: card.get(k) for k in keys} if card else None
    return cards


def measure_rounds(
    args: argparse.Namespace,
    offline: OfflineBound,
    urls: dict[str, tuple[str, int]],
    images: list[bytes],
    bodies: list[bytes],
) -> dict:
    """Interleaved rounds: the bound, the stage profile and every server at every level see
    the same background load. Returns the raw measurements."""
    raw: dict = {"bounds": [], "batch_times": [], "profiles": [],
                 "runs": {k: {c: [] for c in args.concurrency} for k in urls}}  # fmt: skip
    for rep in range(args.repeats):
        raw["bounds"].append(offline.measure(images))
        raw["batch_times"].append(offline.full_batch_s(images))
        raw["profiles"].append(stage_profile(offline.fx, bodies, args.batch_size))
        bound = raw["bounds"][-1]
        print(
            f"round {rep + 1}/{args.repeats}: bound {bound['images_per_s']:.1f} img/s "
            f"({bound['images_per_cpu_s']:.2f} img/CPU-s), full batch "
            f"{raw['batch_times'][-1] * 1000:.0f} ms",
            flush=True,
        )
        for c in args.concurrency:
            for name, (url, pid) in urls.items():
                r = run_level(url, pid, bodies, c, args.requests)
                raw["runs"][name][c].append(r)
                print(
                    f"  {name:<14} c={c:<3} {r['images_per_s']:7.1f} img/s  "
                    f"{r['images_per_cpu_s']:5.2f} img/CPU-s  p50 {r['p50_ms']:7.1f} ms  "
                    f"p99 {r['p99_ms']:7.1f} ms  errors {sum(r['errors'].values())}",
                    flush=True,
                )
    return raw


def level_rows(results: dict[str, list[dict]], bound: float, bound_cpu: float,
               batch_s: float) -> list[dict]:  # fmt: skip
    """One row per concurrency: the server against the bound, and against every other server
    measured (``naive`` among them unless ``--no-naive``): ``<name>_images_per_s``,
    ``server_vs_<name>`` (wall and per CPU-s), ``<name>_p99_ms``, ..."""
    rows = []
    for i, srv in enumerate(results["server"]):
        row = {
            "concurrency": srv["concurrency"],
            "server_images_per_s": srv["images_per_s"],
            "server_vs_bound": srv["images_per_s"] / bound,
            "server_images_per_cpu_s": srv["images_per_cpu_s"],
            "server_vs_bound_per_cpu_s": srv["images_per_cpu_s"] / bound_cpu,
            "server_busy_cores": srv["images_per_s"] / srv["images_per_cpu_s"],
            "server_machine_busy_cores": srv["machine_busy_cores"],
            "server_load_generator_cores": srv["load_generator_cores"],
            "server_p50_ms": srv["p50_ms"],
            "server_p99_ms": srv["p99_ms"],
            "p99_over_full_batch": srv["p99_ms"] / (batch_s * 1000),
            "requests": srv["requests"],
            "server_errors": srv["errors"],
        }
        for name in (n for n in results if n != "server"):
            other = results[name][i]
            row[f"{name}_images_per_s"] = other["images_per_s"]
            row[f"{name}_images_per_cpu_s"] = other["images_per_cpu_s"]
            row[f"{name}_busy_cores"] = other["images_per_s"] / other["images_per_cpu_s"]
            row[f"{name}_p50_ms"], row[f"{name}_p99_ms"] = other["p50_ms"], other["p99_ms"]
            row[f"{name}_errors"] = other["errors"]
            row[f"{name}_vs_bound"] = other["images_per_s"] / bound
            row[f"server_vs_{name}"] = srv["images_per_s"] / other["images_per_s"]
            row[f"server_vs_{name}_per_cpu_s"] = srv["images_per_cpu_s"] / other["images_per_cpu_s"]
        rows.append(row)
    return rows


def print_levels(rows: list[dict], others: list[str]) -> None:
    """The levels as a Markdown table, then each comparison with another server."""
    print(
        "| c | server img/s | / bound | server img/CPU-s | / bound (CPU) | server busy cores "
        "| machine busy cores | load generator cores | server p50 ms | server p99 ms "
        "| p99 / full batch |"
    )
    print("| ---: " * 11 + "|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['server_images_per_s']:.1f} | {r['server_vs_bound']:.2f} "
            f"| {r['server_images_per_cpu_s']:.2f} | {r['server_vs_bound_per_cpu_s']:.2f} "
            f"| {r['server_busy_cores']:.2f} | {r['server_machine_busy_cores']:.2f} "
            f"| {r['server_load_generator_cores']:.2f} | {r['server_p50_ms']:.0f} "
            f"| {r['server_p99_ms']:.0f} | {r['p99_over_full_batch']:.2f} |"
        )
    for name in others:
        print(f"\nserver / {name}:")
        print(f"| c | server img/CPU-s | {name} img/CPU-s | ratio (CPU) | ratio (wall) "
              f"| {name} / bound | {name} p99 ms |")  # fmt: skip
        print("| ---: " * 7 + "|")
        for r in rows:
            print(
                f"| {r['concurrency']} | {r['server_images_per_cpu_s']:.2f} "
                f"| {r[f'{name}_images_per_cpu_s']:.2f} | {r[f'server_vs_{name}_per_cpu_s']:.2f} "
                f"| {r[f'server_vs_{name}']:.2f} | {r[f'{name}_vs_bound']:.2f} "
                f"| {r[f'{name}_p99_ms']:.0f} |"
            )


def print_profile_only(args: argparse.Namespace, fx, bodies: list[bytes]) -> None:
    """``--profile-only``: the stage profile (and the forward pass per batch size) alone."""
    profiles = [stage_profile(fx, bodies, args.batch_size) for _ in range(args.repeats)]
    print(f"backend {fx.backend} {fx.backend_timings or ''}; reduced decoding guard "
          f"{fx.decode_check}")  # fmt: skip
    print_profile({k: statistics.median(p[k] for p in profiles) for k in STAGES})
    for n, ms in forward_ms_per_image(fx, args.forward_batches).items():
        print(f"forward at batch {n}: {ms:.2f} CPU ms per image")


def report(args: argparse.Namespace, argv: list[str] | None, machine: dict, fx, raw: dict) -> dict:
    """Print the tables of one run and return its JSON record."""
    bound = statistics.median(b["images_per_s"] for b in raw["bounds"])
    bound_cpu = statistics.median(b["images_per_cpu_s"] for b in raw["bounds"])
    batch_s = statistics.median(raw["batch_times"])
    profile = {k: statistics.median(p[k] for p in raw["profiles"]) for k in STAGES}
    results = {
        name: [median_of(levels[c]) | {"concurrency": c} for c in args.concurrency]
        for name, levels in raw["runs"].items()
    }
    rows = level_rows(results, bound, bound_cpu, batch_s)
    print(f"\nstage profile ({fx.backend}, forward at batch {args.batch_size}):")
    print_profile(profile)
    print(
        f"\nbound (offline FeatureExtractor, {fx.backend}, batch {args.batch_size}): "
        f"{bound:.1f} img/s, {bound_cpu:.2f} img/CPU-s; one full batch: {batch_s * 1000:.0f} ms"
    )
    print_levels(rows, [n for n in results if n != "server"])
    machine["load_average_after"] = load_average()
    print(f"load average before {machine['load_average_before']}, "
          f"after {machine['load_average_after']}")  # fmt: skip
    return {
        "benchmark": "serve",
        "command": "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "naive_server"},
        "bound_backend": fx.backend,
        "bound_backend_timings": fx.backend_timings,
        "decode_check": fx.decode_check,
        "bound_images_per_s": bound,
        "bound_images_per_cpu_s": bound_cpu,
        "full_batch_ms": batch_s * 1000,
        "stage_profile_ms_per_image": profile,
        "levels": rows,
        "raw": {name: {str(c): r for c, r in lv.items()} for name, lv in raw["runs"].items()},
        "bound_rounds": raw["bounds"],
        "profile_rounds": raw["profiles"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    if args.naive_server is not None:  # child process: serve the naive endpoint
        import uvicorn

        uvicorn.run(naive_app(args.model, args.device), host="127.0.0.1",
                    port=args.naive_server, log_level="warning", timeout_keep_alive=65)  # fmt: skip
        return 0

    machine = machine_record()
    print(f"load average before: {machine['load_average_before']}", flush=True)
    jpegs = photo_jpegs()
    bodies = [
        json.dumps({"input": ["data:image/jpeg;base64," + base64.b64encode(j).decode()]}).encode()
        for j in jpegs
    ]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_model_folder(Path(tmp), args.input_px, args.arch)
        if args.backend != "torch" and args.model is None and args.device == "cpu":
            export_onnx_files(model, jpegs, Path(tmp))
        images = [jpegs[i % len(jpegs)] for i in range(args.batch_size * 4)]
        offline = OfflineBound(model, args.device, args.batch_size, args.backend)
        if args.profile_only:
            print_profile_only(args, offline.fx, bodies)
            return 0
        try:
            urls = start_servers(args, model, procs)
            cards = served_models(urls)
            raw = measure_rounds(args, offline, urls, images, bodies)
        finally:
            for proc in procs:
                stop(proc)
    record = report(args, argv, machine, offline.fx, raw)
    record["served_models"] = cards
    for name, card in cards.items():
        if card and card.get("batch_size") is not None:
            print(f"{name}: {card['backend']}, batches of {card['batch_size']} "
                  f"(ms per image by batch size: {card['batch_timings']})")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
