"""How long ``make test`` takes: this checkout's suite against an earlier commit's, side by side.

Each commit is checked out into a temporary git worktree and its own ``make test`` recipe runs
there with this environment's Python (``PYTHONPATH`` points at the worktree, so its code is what
runs): the test command of its Makefile, without the prerequisites ``venv`` and ``datasets``, which
are already satisfied here. Runs alternate (this checkout, baseline, this checkout, ...) and the table
gives each one's wall time, its test counts and the load average around it, then the median ratio.
Before each run it waits (``--settle``) until the 1-minute load average has fallen below a bound,
so that no run starts in the previous one's load. Run it on an idle machine, with nothing else
running::

    python bench/suite_time.py --baseline 5995b10 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import load_average, machine_record, write_result

REPO = Path(__file__).resolve().parents[1]


def test_command(worktree: Path) -> list[str]:
    """The worktree's ``make test`` recipe line, with this Python for ``$(PY)`` and the Makefile's
    own defaults for its other variables."""
    makefile = (worktree / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n\t(.+)$", makefile, re.MULTILINE)
    if recipe is None:
        raise SystemExit(f"no test recipe in {worktree / 'Makefile'}")
    defaults = dict(re.findall(r"^(\w+) \?= (.+)$", makefile, re.MULTILINE))
    line = recipe.group(1).replace("$(PY)", sys.executable)
    line = re.sub(r"\$\((\w+)\)", lambda m: defaults.get(m.group(1), ""), line)
    return shlex.split(line)


def _sigint_as_in_a_terminal() -> None:
    """Run the suite with SIGINT as a terminal's ``make test`` has it. Started in the background by a
    non-interactive shell (``python bench/suite_time.py &``), this script ignores SIGINT, every
    process below it inherits that, and a test that interrupts a run with SIGINT then waits for
    the whole run instead."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def settle(bound: float, limit_s: float = 600.0) -> float:
    """Wait until the 1-minute load average is below ``bound`` (at most ``limit_s``); returns
    the seconds waited."""
    start = time.perf_counter()
    while load_average()[0] >= bound and time.perf_counter() - start < limit_s:
        time.sleep(5)
    return round(time.perf_counter() - start, 1)


def run_suite(worktree: Path, settle_below: float) -> dict[str, Any]:
    """Run the worktree's test command once, after :func:`settle`; wall seconds, counts, exit
    status, the wait and the load."""
    command = test_command(worktree)
    env = {**os.environ, "PYTHONPATH": str(worktree)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    waited = settle(settle_below)
    before = load_average()
    start = time.perf_counter()
    done = subprocess.run(
        command, cwd=worktree, env=env, capture_output=True, text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):  # pytest's 2-5: interrupted, internal or usage error, none
        raise SystemExit(
            f"{' '.join(command)} in {worktree} did not run the suite (exit {done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    last = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", last)}
    return {
        "command": " ".join(command).replace(sys.executable, "python"),  # no machine paths
        "seconds": round(seconds, 1),
        "returncode": done.returncode,
        "counts": counts,
        "summary": last,
        "failed_tests": [
            line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))
        ],
        "settle_waited_s": waited,
        "load_average_before": before,
        "load_average_after": load_average(),
    }


def worktree(commit: str, parent: Path) -> Path:
    """A detached worktree of ``commit`` under ``parent``."""
    path = parent / commit
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--force", str(path), commit],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="5995b10", help="the commit to compare with")
    p.add_argument("--commit", default="HEAD", help="the commit to measure")
    p.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved")
    p.add_argument(
        "--settle", type=float, default=0.5, metavar="LOAD",
        help="before each run, wait (up to 10 minutes) for a 1-minute load average below LOAD",
    )  # fmt: skip
    p.add_argument("--out", default=str(REPO / "bench/results/suite_time.json"))
    args = p.parse_args()
    record = {
        "machine": machine_record(), "baseline": args.baseline, "commit": args.commit,
        "settle_below": args.settle,
    }  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "commit": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {  # this checkout first: a test command that cannot start fails at once
            "commit": worktree(args.commit, Path(tmp)),
            "baseline": worktree(args.baseline, Path(tmp)),
        }
        for r in range(args.repeats):
            for name, tree in trees.items():
                print(f"repeat {r + 1}/{args.repeats}: {name} ({tree.name}) ...", flush=True)
                runs[name].append(run_suite(tree, args.settle))
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO)
    record["runs"] = runs
    medians = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    record["median_seconds"] = medians
    record["ratio_commit_to_baseline"] = round(medians["commit"] / medians["baseline"], 3)
    record["machine"]["load_average_after"] = load_average()
    print(
        "\n| run | seconds | exit | tests | load before -> after |\n| --- | ---: | ---: | --- | --- |"
    )
    for name, rows in runs.items():
        for row in rows:
            print(
                f"| {name} | {row['seconds']:.0f} | {row['returncode']} | {row['summary']} | "
                f"{row['load_average_before'][0]} -> {row['load_average_after'][0]} |"
            )
    print(f"\nmedian: this checkout {medians['commit']:.0f} s, baseline {medians['baseline']:.0f} s, "
          f"ratio {record['ratio_commit_to_baseline']}")  # fmt: skip
    write_result(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
