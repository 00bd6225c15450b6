"""Serving benchmark: the batched server vs the offline bound vs a naive endpoint, in one run.

What is measured, side by side on the same real photos (scikit-image, JPEG):

- **bound**: the offline :class:`~ssole_hub.FeatureExtractor` (decode + preprocess + forward at
  the server's max batch size), images/s, median of repeats: what serving cannot beat;
- **server**: ``python -m server`` (dynamic batching) under a bounded closed-loop load on
  loopback at concurrency 1, 8, 32, 64 (one image per request, JSON data URIs): images/s,
  p50/p99 latency;
- **naive**: a one-request-one-forward FastAPI endpoint (sync route in FastAPI's thread pool, the
  usual first version of such a service) under the same load.

Ratios (server / bound, server / naive, p99 / time of one full batch) come from this one run,
in interleaved rounds (bound, then each level against both servers), medians over rounds.
Throughput is reported per wall second and per CPU second of the serving process, and their
quotient, the serving process's busy cores (CPU seconds per wall second): on an idle machine a
server that keeps every core busy shows about the machine's core count there. The server runs
with its own defaults for batching unless ``--batch-size`` / ``--max-wait-ms`` are given. The
load average before and after, and the CPU model and flags, go into the JSON.

    python bench/serve.py                       # random-weight ssole_resnet18 at 224 px, CPU
    python bench/serve.py --backend onnx-int8   # and the same server on torch, in the same rounds
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

    def __init__(self, model: str, device: str, batch_size: int) -> None:
        from ssole_hub.extractor import FeatureExtractor

        self.fx = FeatureExtractor.from_pretrained(
            model, device=None if device == "auto" else device
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


def start(cmd: list[str], port: int, timeout_s: float = 300) -> subprocess.Popen:
    """Start a server process and wait until its /ready answers 200."""
    import httpx

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
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


def main(argv: list[str] | None = None) -> int:
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
        default="torch",
        choices=["torch", "onnx", "onnx-bf16", "onnx-int8"],
        help="the server's forward pass; the default model gets its ONNX files exported first "
        "(int8 calibrated on the benchmark's photos). The bound and the naive endpoint stay "
        "torch, and a second server on torch is measured in the same rounds (server / torch "
        "server)",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=128, help="requests per level (at least 8x c)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the offline bound")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.json"))
    p.add_argument("--naive-server", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from server.settings import ServerSettings

    defaults = ServerSettings(model="unused")
    if args.batch_size is None:
        args.batch_size = defaults.max_batch_size
    if args.max_wait_ms is None:
        args.max_wait_ms = defaults.max_batch_wait_ms
    if args.decode_threads is None:
        args.decode_threads = defaults.decode_threads

    if args.naive_server is not None:  # child process: serve the naive endpoint
        import uvicorn

        uvicorn.run(
            naive_app(args.model, args.device),
            host="127.0.0.1",
            port=args.naive_server,
            log_level="warning",
            timeout_keep_alive=65,
        )
        return 0

    machine = machine_record()
    print(f"load average before: {machine['load_average_before']}", flush=True)
    jpegs = photo_jpegs()
    bodies = [
        json.dumps({"input": ["data:image/jpeg;base64," + base64.b64encode(j).decode()]}).encode()
        for j in jpegs
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_model_folder(Path(tmp), args.input_px, args.arch)
        if args.backend != "torch" and args.model is None:
            export_onnx_files(model, jpegs, Path(tmp))
        images = [jpegs[i % len(jpegs)] for i in range(args.batch_size * 4)]
        offline = OfflineBound(model, args.device, args.batch_size)
        server_port, naive_port = free_port(), free_port()
        server_cmd = [
            sys.executable, "-m", "server", "--model", model, "--port", str(server_port),
            "--device", args.device, "--max-batch-size", str(args.batch_size),
            "--max-batch-wait-ms", str(args.max_wait_ms), "--max-queue", "1024",
            "--decode-threads", str(args.decode_threads), "--log-level", "warning",
            "--backend", args.backend,
        ]  # fmt: skip
        naive_cmd = [
            sys.executable, str(Path(__file__).resolve()), "--naive-server", str(naive_port),
            "--model", model, "--device", args.device,
        ]  # fmt: skip
        procs = [start(server_cmd, server_port), start(naive_cmd, naive_port)]
        urls = {
            "server": (f"http://127.0.0.1:{server_port}", procs[0].pid),
            "naive": (f"http://127.0.0.1:{naive_port}", procs[1].pid),
        }
        if args.backend != "torch":  # the same server on torch, in the same rounds
            torch_port = free_port()
            torch_cmd = [*server_cmd[:-1], "torch"]
            torch_cmd[torch_cmd.index("--port") + 1] = str(torch_port)
            procs.append(start(torch_cmd, torch_port))
            urls["torch"] = (f"http://127.0.0.1:{torch_port}", procs[-1].pid)
        bounds, batch_times = [], []
        runs: dict[str, dict[int, list[dict]]] = {
            k: {c: [] for c in args.concurrency} for k in urls
        }
        try:
            # Interleaved rounds: the bound and both servers see the same background load.
            for rep in range(args.repeats):
                bounds.append(offline.measure(images))
                batch_times.append(offline.full_batch_s(images))
                print(
                    f"round {rep + 1}/{args.repeats}: bound {bounds[-1]['images_per_s']:.1f} "
                    f"img/s ({bounds[-1]['images_per_cpu_s']:.2f} img/CPU-s), full batch "
                    f"{batch_times[-1] * 1000:.0f} ms",
                    flush=True,
                )
                for c in args.concurrency:
                    for name, (url, pid) in urls.items():
                        r = run_level(url, pid, bodies, c, args.requests)
                        runs[name][c].append(r)
                        print(
                            f"  {name:<6} c={c:<3} {r['images_per_s']:7.1f} img/s  "
                            f"{r['images_per_cpu_s']:5.2f} img/CPU-s  "
                            f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                            f"errors {sum(r['errors'].values())}",
                            flush=True,
                        )
        finally:
            for proc in procs:
                stop(proc)
    bound = statistics.median(b["images_per_s"] for b in bounds)
    bound_cpu = statistics.median(b["images_per_cpu_s"] for b in bounds)
    batch_s = statistics.median(batch_times)
    results = {
        name: [median_of(runs[name][c]) | {"concurrency": c} for c in args.concurrency]
        for name in urls
    }

    rows = []
    torch_levels = results.get("torch") or [None] * len(results["server"])
    for srv, naive, on_torch in zip(results["server"], results["naive"], torch_levels, strict=True):
        vs_torch = {}
        if on_torch is not None:
            vs_torch = {
                "torch_server_images_per_s": on_torch["images_per_s"],
                "server_vs_torch_server": srv["images_per_s"] / on_torch["images_per_s"],
                "server_vs_torch_server_per_cpu_s": srv["images_per_cpu_s"]
                / on_torch["images_per_cpu_s"],
            }
        rows.append(
            vs_torch
            | {
                "concurrency": srv["concurrency"],
                "server_images_per_s": srv["images_per_s"],
                "naive_images_per_s": naive["images_per_s"],
                "server_vs_bound": srv["images_per_s"] / bound,
                "server_vs_naive": srv["images_per_s"] / naive["images_per_s"],
                "server_images_per_cpu_s": srv["images_per_cpu_s"],
                "naive_images_per_cpu_s": naive["images_per_cpu_s"],
                "server_vs_bound_per_cpu_s": srv["images_per_cpu_s"] / bound_cpu,
                "server_vs_naive_per_cpu_s": srv["images_per_cpu_s"] / naive["images_per_cpu_s"],
                "server_busy_cores": srv["images_per_s"] / srv["images_per_cpu_s"],
                "naive_busy_cores": naive["images_per_s"] / naive["images_per_cpu_s"],
                "server_machine_busy_cores": srv["machine_busy_cores"],
                "server_load_generator_cores": srv["load_generator_cores"],
                "server_p50_ms": srv["p50_ms"],
                "server_p99_ms": srv["p99_ms"],
                "naive_p50_ms": naive["p50_ms"],
                "naive_p99_ms": naive["p99_ms"],
                "p99_over_full_batch": srv["p99_ms"] / (batch_s * 1000),
                "requests": srv["requests"],
                "server_errors": srv["errors"],
                "naive_errors": naive["errors"],
            }
        )
    print()
    print(
        f"bound (offline FeatureExtractor, batch {args.batch_size}): {bound:.1f} img/s, "
        f"{bound_cpu:.2f} img/CPU-s; one full batch: {batch_s * 1000:.0f} ms"
    )
    print(
        "| c | server img/s | / bound | naive img/s | server / naive | server img/CPU-s "
        "| naive img/CPU-s | server / naive (CPU) | server busy cores | naive busy cores "
        "| machine busy cores | load generator cores | server p50 ms | server p99 ms "
        "| p99 / full batch | naive p99 ms |"
    )
    print("| ---: " * 16 + "|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['server_images_per_s']:.1f} | {r['server_vs_bound']:.2f} "
            f"| {r['naive_images_per_s']:.1f} | {r['server_vs_naive']:.2f} "
            f"| {r['server_images_per_cpu_s']:.2f} | {r['naive_images_per_cpu_s']:.2f} "
            f"| {r['server_vs_naive_per_cpu_s']:.2f} | {r['server_busy_cores']:.2f} "
            f"| {r['naive_busy_cores']:.2f} | {r['server_machine_busy_cores']:.2f} "
            f"| {r['server_load_generator_cores']:.2f} | {r['server_p50_ms']:.0f} "
            f"| {r['server_p99_ms']:.0f} | {r['p99_over_full_batch']:.2f} "
            f"| {r['naive_p99_ms']:.0f} |"
        )
        if "server_vs_torch_server" in r:
            print(
                f"|   {args.backend} server / torch server at c={r['concurrency']}: "
                f"{r['server_vs_torch_server']:.2f} (wall), "
                f"{r['server_vs_torch_server_per_cpu_s']:.2f} (per CPU-s); torch server "
                f"{r['torch_server_images_per_s']:.1f} img/s"
            )
    machine["load_average_after"] = load_average()
    print(
        f"load average before {machine['load_average_before']}, "
        f"after {machine['load_average_after']}"
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "serve",
        "command": "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "naive_server"},
        "bound_images_per_s": bound,
        "bound_images_per_cpu_s": bound_cpu,
        "full_batch_ms": batch_s * 1000,
        "levels": rows,
        "raw": {name: {str(c): r for c, r in levels.items()} for name, levels in runs.items()},
        "bound_rounds": bounds,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
