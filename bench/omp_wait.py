"""Two torch processes on the same cores: what OpenMP's wait policy costs them.

``make test`` runs two pytest-xdist workers on two cores, each with torch's default intra-op
threads (one per core), and many tests start more torch processes. This measures a ResNet-18
forward loop (batch 16, 64 px, 40 passes) alone and as two copies at once, under OpenMP's
default wait policy (threads spin before they sleep) and under ``OMP_WAIT_POLICY=PASSIVE``
(which ``tests/conftest.py`` sets for the suite). Each case runs ``--repeats`` times; the table
gives the median seconds per copy and the slowdown against the default policy alone::

    python bench/omp_wait.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import load_average, machine_record, write_result

REPO = Path(__file__).resolve().parents[1]
LOOP = """
import json, time, torch, timm
model = timm.create_model("resnet18", num_classes=0).eval()
x = torch.randn(16, 3, 64, 64)
with torch.no_grad():
    for _ in range(3):
        model(x)
    start = time.perf_counter()
    for _ in range(40):
        model(x)
print(json.dumps({"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}))
"""
CASES = {  # name -> (copies at once, OMP_WAIT_POLICY or None for the default)
    "alone, default": (1, None),
    "alone, PASSIVE": (1, "PASSIVE"),
    "two at once, default": (2, None),
    "two at once, PASSIVE": (2, "PASSIVE"),
}


def run_case(copies: int, policy: str | None) -> list[float]:
    """Seconds of each copy's loop, started together."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    procs = [
        subprocess.Popen([sys.executable, "-c", LOOP], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(copies)
    ]
    return [json.loads(p.communicate()[0])["seconds"] for p in procs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "omp_wait.json"))
    args = p.parse_args(argv)
    machine = machine_record()
    seconds: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):  # interleaved: every case sees the same background
        for name, (copies, policy) in CASES.items():
            seconds[name] += run_case(copies, policy)
    machine["load_average_after"] = load_average()
    base = statistics.median(seconds["alone, default"])
    rows = [
        {"case": name, "median_s": statistics.median(s), "vs_alone_default": statistics.median(s) / base}
        for name, s in seconds.items()
    ]  # fmt: skip
    print("| case | median s per copy | x alone, default |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['median_s']:.2f} | {r['vs_alone_default']:.2f} |")
    write_result(args.out, {"machine": machine, "repeats": args.repeats, "seconds": seconds,
                            "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
