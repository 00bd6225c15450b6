"""The README runs as written: every fenced shell command and Python snippet, in order, as a new
user would run them in a fresh checkout (here: a copy of this one in a temporary folder).

What differs from a user's run is all in this file, in three tables:

- :data:`SUBSTITUTIONS`, the one substitution table: README text -> what runs here;
- :data:`REDUCTIONS`: options appended to commands that train or evaluate, so that they run the
  same code at a fraction of the size (later options win over the README's own);
- :data:`USER_FILES`: the files a user brings (``photo.jpg``, ``photos/``, ...), written as real
  scikit-image photos before the first command.

Steps that are Python programs (a Python block, ``python -m MODULE ARGS``, ``ssole-hub ARGS``,
without shell syntax) run in a child forked from a process that has already imported torch and
torchvision (``tests/zygote.py``), the server among them; the rest run in ``bash``.

A step fails when its command exits non-zero or a path it names does not exist after it ran.
Steps that cannot run on a CPU without internet are skipped by :data:`SKIPS`, each with its
reason (pytest's ``-rs`` lists them). A command that starts the server runs in the background
until the last step (its port is a free one), and later ``curl`` steps talk to it. The steps that
use Ray (:data:`RAY_STEP`) join one local Ray instance that this test starts before the first of
them and stops after the last (``RAY_ADDRESS``, as on a cluster), instead of each starting its own.

It is part of ``make test``; ``make test-readme`` (marker ``readme``) runs it alone.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [pytest.mark.readme, pytest.mark.slow]

# precision=auto: the README's own advice for the released recipe's fp16 on a CPU (its backward
# pass is about 10x slower there); the fp16 path and its warning are tested in test_precision_*.
TRAIN_SMALL = (
    "precision=auto epochs=1 data.max_images=32 data.batch_size=8 data.num_workers=0 views.size=32 "
    "model.projector_hidden=256 model.projector_out=256 knn.max_train_images=200 "
    "knn.max_val_images=100"
)

# README text -> what runs here, applied to every step in this order. ``{port}`` is a free port.
SUBSTITUTIONS: list[tuple[str, str]] = [
    # make demo trains for minutes and then serves until Ctrl-C: the same pipeline, smaller, no serve
    ("make demo", f"python -m training.demo --no-serve --eval-limit 300 {TRAIN_SMALL}"),
    # no published repo to download: the folder make demo exported stands in for it
    ("hf-hub:ORG/NAME", "local-dir:demo_out/ssole_resnet18-digits"),
    # a user's own image folder, made of real photos in the working copy
    ("/data/my_photos/", "my_photos/"),
    # the environment this test runs in is the one make venv makes: use it, do not rebuild it
    ("source .venv/bin/activate", f"source {VENV_BIN}/activate"),
    ("make ", f"make VENV={VENV_BIN.parent} -o {VENV_BIN.parent}/.installed "),
    # port 8000 may be taken on a shared machine
    ("8000", "{port}"),
]

# Appended to every command that starts with the key (Python snippets: to load_config's overrides).
REDUCTIONS: dict[str, str] = {
    "python -m training.pretrain": TRAIN_SMALL,
    "python -m training.evaluate": "--train-limit 300 --test-limit 100 --probe-epochs 3",
}

# Steps that cannot run here: (pattern searched in the step after substitution, reason).
SKIPS: list[tuple[str, str]] = [
    (r"^docker ", "needs a Docker engine"),
    (r"^torchrun ", "launches several GPU processes or nodes"),
    (r"--device cuda|--gpus", "needs a GPU"),
    (r"^pip install", "installs into the environment this test runs in; needs the package index"),
    (r"^make .*\btest\b", "is the test suite this test belongs to"),
    (r"ssole-hub push|hf download", "publishes to or downloads from the real Hugging Face Hub"),
    (r"hf-hub:|load_model\(\"ssole_resnet", "downloads from the real Hugging Face Hub"),
    (r"OWNER/ssole-hub", "downloads the project from GitHub"),
    (r"^ray start|--ray-address", "needs a multi-node Ray cluster"),
]
if not FASHION_MNIST.is_dir():
    SKIPS.append((r"fashion.mnist", "needs Debian's dataset-fashion-mnist"))

# Files the README assumes a user has: name -> scikit-image photos it is made of.
USER_FILES = {
    "photo.jpg": "astronaut",
    "cat.jpg": "chelsea",
    "dog.png": "coffee",
    "photos/": "every photo",
    "data/pets/": "train/ and val/ class folders of photos",
    "my_photos/": "train/ and val/ class folders of photos",
}

PY_PRELUDE = f"""\
import training.config as _config
_load_config = _config.load_config
def _smaller(path=None, overrides=()):
    return _load_config(path, [*overrides, *{TRAIN_SMALL.split()!r}])
_config.load_config = _smaller
"""

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")
LONG_RUNNING = r"^python -m server (?!.*--help)"
RAY_STEP = r"--engine ray|^import ray$"


@dataclass
class Step:
    """One command (a logical line of a bash block) or one Python block of the README."""

    kind: str  # "bash" or "python"
    text: str
    line: int

    @property
    def id(self) -> str:
        lines = [t for t in self.text.split("\n") if len(re.findall(r"\w", t)) > 2] or [""]
        words = re.sub(r"\W+", "-", lines[-1 if self.kind == "python" else 0])
        return f"L{self.line}-{words.strip('-')[:48]}"


def readme_steps(readme: Path = REPO / "README.md") -> list[Step]:
    """Every shell command and Python block of ``readme``'s fenced code, in order."""
    steps, lines = [], readme.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w+)?\s*$", lines[i])
        if not fence:
            i += 1
            continue
        lang, start, body = fence.group(1) or "", i + 1, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang == "python":
            steps.append(Step("python", "\n".join(body), start + 1))
        elif lang in ("bash", "sh", "shell"):
            steps.extend(_shell_commands(body, start + 1))
    return steps


def _shell_commands(body: list[str], first_line: int) -> Iterator[Step]:
    command, line = "", first_line
    for n, raw in enumerate(body):
        text = raw.rstrip()
        if not command:
            line = first_line + n
        if text.endswith("\\"):
            command += text[:-1] + " "
            continue
        command += text
        # Comments after a command, never inside quotes (the README's JSON bodies have no '#').
        command = re.sub(r"(^|\s)#.*$", "", command).strip()
        if command:
            yield Step("bash", " ".join(command.split()) if "'" not in command else command, line)
        command = ""


def substituted(step: Step, port: int) -> str:
    """The step's text after :data:`SUBSTITUTIONS` and :data:`REDUCTIONS`."""
    text = step.text
    for old, new in SUBSTITUTIONS:
        text = text.replace(old, new.replace("{port}", str(port)))
    if step.kind == "bash":
        for prefix, extra in REDUCTIONS.items():
            if text.startswith(prefix):
                text = f"{text} {extra}"
    return text


def skip_reason(text: str) -> str | None:
    """Why a (substituted) step cannot run here, or None."""
    for pattern, reason in SKIPS:
        if re.search(pattern, text, re.MULTILINE):
            return reason
    return None


# --- paths a step names -------------------------------------------------------------------------

_SUFFIXES = (".jpg", ".png", ".pt", ".json", ".yaml", ".safetensors", ".txt", ".npy")
_NOT_PATHS = re.compile(r"://|^/v1|^localhost|^(image|application|text|multipart)/|^\w+:\d+")


def named_paths(text: str, kind: str) -> list[str]:
    """Relative paths a step names: arguments and ``key=value`` values (shell) or string
    literals (Python) that contain a ``/`` or end with a file suffix."""
    if kind == "python":
        words = re.findall(r"[\"']([^\"'\s]+)[\"']", text)
    else:
        try:
            words = shlex.split(text)
        except ValueError:
            words = text.split()
    paths = []
    for word in words:
        word = word.rsplit("=", 1)[-1].lstrip("@").removeprefix("local-dir:")
        if not word or word.startswith(("-", "$")) or " " in word or _NOT_PATHS.search(word):
            continue
        if "/" in word or word.endswith(_SUFFIXES):
            paths.append(word)
    return paths


# --- the working copy ---------------------------------------------------------------------------


def _photo(name: str) -> Image.Image:
    from skimage import data

    arr = np.asarray(getattr(data, name)())
    return Image.fromarray(arr).convert("RGB")


def _labelled_folder(root: Path) -> None:
    """train/ (16 images) and val/ (8 images) with two classes, made of real photos."""
    for split, count in (("train", 8), ("val", 4)):
        for label, names in (("people", PHOTOS[:3]), ("things", PHOTOS[3:])):
            folder = root / split / label
            folder.mkdir(parents=True)
            for k in range(count):
                img = _photo(names[k % 3])
                w, h = img.size
                box = (k * w // 40, k * h // 40, w - k * w // 50, h - k * h // 50)
                img.crop(box).resize((96, 96)).save(folder / f"{k}.jpg", quality=90)


def write_user_files(work: Path) -> None:
    """The files of :data:`USER_FILES`."""
    _photo("astronaut").save(work / "photo.jpg", quality=90)
    _photo("chelsea").save(work / "cat.jpg", quality=90)
    _photo("coffee").save(work / "dog.png")
    (work / "photos").mkdir()
    for name in PHOTOS:
        _photo(name).save(work / "photos" / f"{name}.jpg", quality=90)
    _labelled_folder(work / "data" / "pets")
    _labelled_folder(work / "my_photos")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkout_files(repo: Path) -> list[Path]:
    """The files a fresh clone of ``repo`` would hold, plus new files not yet committed: what git
    tracks or would track (nothing it ignores: runs, exports, the venv), without the user's own
    files that a used checkout may hold (they are written anew)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    user_tops = {name.rstrip("/").split("/")[0] for name in USER_FILES}
    files = [Path(f) for f in listed.split("\0") if f]
    return [f for f in files if f.parts[0] not in user_tops and (repo / f).is_file()]


def copy_checkout(repo: Path, work: Path) -> None:
    """Copy ``repo`` as a new user would find it after cloning, even when ``repo`` has been used
    (its README commands run, its outputs and user files present)."""
    for rel in _checkout_files(repo):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, work / rel)


@dataclass
class Session:
    """The working copy, its environment, the server a step started, and the paths named by steps
    that were skipped (a later step that needs one of them is skipped too, with that reason)."""

    work: Path
    scratch: Path
    env: dict[str, str]
    port: int
    zygote: Any
    server: Any = None  # subprocess.Popen, or zygote.Child: the same methods
    ray: Any = None  # the ray module while the shared instance runs
    ray_env: dict[str, str] = field(default_factory=dict)  # what joining it takes
    skipped_paths: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def session(tmp_path_factory, zygote) -> Iterator[Session]:
    work = tmp_path_factory.mktemp("readme") / "ssole-hub"
    copy_checkout(REPO, work)
    write_user_files(work)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(work),  # this copy, not the checkout the environment was installed from
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    s = Session(work, tmp_path_factory.mktemp("snippets"), env, _free_port(), zygote)
    yield s
    _stop_ray(s)
    if s.server is not None:
        os.killpg(s.server.pid, signal.SIGTERM)
        try:
            s.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(s.server.pid, signal.SIGKILL)


def _start_server(s: Session, command: str) -> None:
    """Start the server step in the background, in its own process group: a child of the zygote
    when it is a Python program (:func:`python_program`), else in ``bash``."""
    log = s.scratch / "server.log"
    program = python_program(command)
    if program is not None:
        s.server = s.zygote.start(*program, s.work, s.env, stdout=log, stderr=log, new_session=True)
    else:
        s.server = subprocess.Popen(
            ["bash", "-c", command], cwd=s.work, env=s.env, stdout=log.open("w"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    with httpx.Client(timeout=2) as client:  # one client: httpx.get costs ~23 ms of CPU a call
        while time.monotonic() < deadline:
            if s.server.poll() is not None:
                log_tail = (s.scratch / "server.log").read_text()[-3000:]
                pytest.fail(f"{command} exited:\n{log_tail}")
            try:
                if client.get(f"http://127.0.0.1:{s.port}/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    pytest.fail(f"{command} did not get ready in 180 s")


def _start_ray(s: Session) -> None:
    """Start the local Ray instance the Ray steps join (2 CPUs, a 256 MiB object store, no
    dashboard), once."""
    if s.ray is None:
        s.ray = pytest.importorskip("ray", reason="the Ray steps need the [ray] extra")
        here = Path.cwd()
        os.chdir(s.work)  # its workers start where a user would start Ray: in the project
        try:
            context = s.ray.init(num_cpus=2, object_store_memory=256 * 2**20,
                                 include_dashboard=False, configure_logging=False)  # fmt: skip
        finally:
            os.chdir(here)
        # what joining takes: the address, and the settings init set here (RAY_AUTH_MODE)
        s.ray_env = {k: v for k, v in os.environ.items() if k.startswith("RAY_") and k not in s.env}
        s.ray_env["RAY_ADDRESS"] = context.address_info["gcs_address"]
        s.env.update(s.ray_env)


def _stop_ray(s: Session) -> None:
    """Stop the shared Ray instance, so that its daemons take no CPU from the steps after."""
    if s.ray is not None:
        s.ray.shutdown()
        s.ray = None
        for key in s.ray_env:
            s.env.pop(key, None)


def _missing_prerequisite(session: Session, paths: list[str]) -> str | None:
    """Why a step cannot run: a path it names is missing because the step that makes it was
    skipped; None when every path it names exists or was never named by a skipped step."""
    for path in paths:
        made_by = session.skipped_paths.get(path)
        if made_by and not (session.work / path).exists():
            return f"needs {path}, which was not made because {made_by}"
    return None


_SHELL_SYNTAX = re.compile(r"[|&;<>()$`*?~\\\"']|^\w+=")


def python_program(text: str) -> tuple[str, str, list[str]] | None:
    """``(kind, target, args)`` for a shell step the zygote can run (module docstring), else
    None."""
    if _SHELL_SYNTAX.search(text):
        return None
    words = text.split()
    if words[:2] == ["python", "-m"] and len(words) > 2:
        return "module", words[2], words[3:]
    if words[0] == "ssole-hub":
        return "console", "ssole-hub", words[1:]
    return None


def _run_step(session: Session, step: Step, text: str) -> tuple[int, str, str]:
    """Run one step to its end: its exit status, stdout and stderr."""
    if step.kind == "python":
        script = session.scratch / f"readme_line_{step.line}.py"
        prelude = PY_PRELUDE if "load_config" in text else ""
        script.write_text(prelude + text + "\n")
        program = ("script", str(script), [])
    else:
        program = python_program(text)
    if program is None:
        done = subprocess.run(
            ["bash", "-c", f"set -eo pipefail; {text}"], cwd=session.work, env=session.env,
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr
    kind, target, args = program
    try:
        done = session.zygote.run(kind, target, args, session.work, session.env, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README line {step.line} did not finish in 900 s")
    return done.returncode, done.stdout, done.stderr


STEPS = readme_steps()
LAST_RAY_STEP = max((s.line for s in STEPS if re.search(RAY_STEP, s.text, re.M)), default=0)


def test_the_readme_has_steps_to_run():
    kinds = {s.kind for s in STEPS}
    assert kinds == {"bash", "python"} and len(STEPS) > 20


@pytest.mark.parametrize("step", STEPS, ids=[s.id for s in STEPS])
def test_readme_step(step: Step, session: Session):
    text = substituted(step, session.port)
    paths = named_paths(text, step.kind)
    reason = skip_reason(text) or _missing_prerequisite(session, paths)
    if reason:
        for path in paths:
            if not (session.work / path).exists():
                session.skipped_paths.setdefault(path, f"README line {step.line}: {reason}")
        pytest.skip(f"README line {step.line}: {reason}")
    if re.search(LONG_RUNNING, text):
        if session.server is not None:
            pytest.skip(f"README line {step.line}: a server already runs")
        _start_server(session, text)
    else:
        if re.search(RAY_STEP, text, re.M):
            _start_ray(session)
        code, out, err = _run_step(session, step, text)
        if step.line == LAST_RAY_STEP:
            _stop_ray(session)
        assert code == 0, (
            f"README line {step.line} failed ({code}):\n{text}\n"
            f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}"
        )
    missing = [p for p in paths if not (session.work / p).exists()]
    assert not missing, f"README line {step.line} names paths that do not exist: {missing}"
