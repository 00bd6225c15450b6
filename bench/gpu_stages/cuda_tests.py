"""The ``cuda_tests`` stage: the test suite's CUDA tests."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from bench.gpu_stages.stage import ROOT, Check, Plan, Stage

# A test module holds CUDA tests when it marks one or asks whether CUDA is there.
CUDA_TEST = r"pytest\.mark\.gpu|torch\.cuda\.is_available\(\)"


def build_stage(plan: Plan, timeout_s: float) -> Stage:
    """The CUDA tests: marked ``gpu`` or named for CUDA (``-k`` also matches marker names). Only
    the modules that hold such tests are collected, so that the rest of the suite's dependencies
    (schemathesis, ...) need not travel; the GPU check's own tests (``tests/bench/``) are never
    among them."""
    modules = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if p.parent.name != "bench" and re.search(CUDA_TEST, p.read_text())
    )
    report = plan.work / "cuda_tests.xml"
    command = [
        plan.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
        "-k", "gpu or cuda", f"--junitxml={report}", *modules,
    ]  # fmt: skip

    def judge() -> tuple[dict[str, Any], list[Check]]:
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = n["failures"] + n["errors"]
        passed = n["tests"] - failed - n["skipped"]
        measured = f"{passed} passed, {n['skipped']} skipped, {failed} failed"
        met = n["tests"] > 0 and passed == n["tests"]
        figures = {"passed": passed, "skipped": n["skipped"], "failed": failed, "modules": modules}
        return figures, [Check("CUDA tests", "all pass, none skipped", measured, met)]

    return Stage("cuda_tests", "tests marked gpu or named for CUDA", command, timeout_s, judge)
