"""The wheelhouse: the wheels of what the GPU machine lacks, downloaded here at the versions
installed here (``make wheelhouse``), and installed there without a registry."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.parser import Parser
from importlib import metadata
from pathlib import Path
from typing import Any

# What the GPU machine may lack, pinned at download time to the versions installed where the test
# suite passes. The last six are there already; they travel only as fallbacks, installed when a
# carried package needs a newer version than the machine's.
WHEELS = (
    "fastapi", "starlette", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv",
    "annotated-types", "typing-inspection", "uvicorn", "python-multipart", "kornia", "kornia-rs",
    "lightly",
    "typing-extensions", "anyio", "annotated-doc", "h11", "click", "idna",
)  # fmt: skip
# pip matches each manylinux tag exactly: name every glibc level such a machine can load.
PLATFORMS = (
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
)  # fmt: skip
GPU_PYTHON = "3.12"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download_wheels(dest: Path, names: Iterable[str] = WHEELS) -> list[Path]:
    """Download the wheels of ``names`` for the GPU machine's CPython into ``dest`` (emptied of
    wheels first: two versions of one package stop an install), each at the version installed
    here. Returns the wheel files.

    Raises:
        metadata.PackageNotFoundError: if one of ``names`` is not installed here.
        subprocess.CalledProcessError: if pip cannot download one.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={metadata.version(name)}" for name in names]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--python-version", GPU_PYTHON, "--implementation", "cp",
            *platforms, "--dest", str(dest), *pins,
        ],
        check=True,
    )  # fmt: skip
    return sorted(dest.glob("*.whl"))


@dataclass(frozen=True)
class Wheel:
    """A wheel file's project name (canonical), version and unconditional requirements."""

    path: Path
    name: str
    version: str
    requires: tuple[str, ...]


def read_wheel(path: Path) -> Wheel:
    """Name, version and ``Requires-Dist`` of a wheel, from its ``METADATA``."""
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    return Wheel(
        path, _canonical(meta["Name"]), meta["Version"], tuple(meta.get_all("Requires-Dist") or ())
    )


def wheels_to_install(wheels: Mapping[str, Wheel], installed: Mapping[str, str]) -> list[str]:
    """The carried wheels to install: each one whose package is not installed, then, repeatedly,
    each one whose installed version fails a requirement of a wheel already chosen. Names are
    canonical; requirements with an extra or a marker false for this interpreter are ignored."""
    from packaging.requirements import Requirement

    chosen = [name for name in wheels if name not in installed]
    queue = list(chosen)
    while queue:
        for line in wheels[queue.pop()].requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = _canonical(req.name)
            if name in wheels and name not in chosen and installed[name] not in req.specifier:
                chosen.append(name)
                queue.append(name)
    return sorted(chosen)


def install_missing(wheelhouse: Path, target: Path) -> dict[str, Any]:
    """Install into ``target`` (put it first on ``PYTHONPATH``) the carried wheels this
    interpreter lacks, without a registry; returns what was installed, what was already there,
    and the wheels left out because they do not fit this interpreter.

    Raises:
        subprocess.CalledProcessError: if pip fails.
    """
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    supported = set(sys_tags())
    wheels, unfit = {}, []
    for path in sorted(wheelhouse.glob("*.whl")):
        if set(parse_wheel_filename(path.name)[3]) & supported:
            wheel = read_wheel(path)
            wheels[wheel.name] = wheel
        else:
            unfit.append(path.name)
    installed = {
        _canonical(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if d.metadata["Name"]  # a broken install can leave a nameless record
    }
    names = wheels_to_install(wheels, installed)
    if names:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                *(str(wheels[n].path) for n in names),
            ],
            check=True,
        )  # fmt: skip
    return {
        "installed": [f"{n}=={wheels[n].version}" for n in names],
        "already_there": sorted(f"{n}=={installed[n]}" for n in wheels if n not in names),
        "not_for_this_python": unfit,
    }
