"""A process that has imported torch and torchvision once, and forks a child for each Python
program a test would otherwise start in a new interpreter: a script, ``python -c CODE``,
``python -m MODULE`` or a console script such as ``ssole-hub``.

A new interpreter pays for torch's and torchvision's imports (with ``torch._dynamo``, which
torchvision imports): about three of the four CPU-seconds a short command costs here, and the
suite starts many. A forked child starts with them imported and runs the program as the
interpreter would: ``sys.argv``, ``sys.path`` (with the request's ``PYTHONPATH``), the working
folder and the environment set, stdin empty, stdout and stderr to files, ``runpy`` for scripts
and modules, the entry point for console scripts, and the exit functions run at the end (Ray's
shutdown among them).

Only third-party modules are imported before the fork: numpy, Pillow, scikit-learn's datasets
(the digits), torch and torchvision. The project's own modules, and huggingface_hub and timm
(which read their settings from the environment when imported), are imported by each program
itself, as in a new interpreter. No thread exists when a child is
forked. Tests that check what a brand-new process does at start-up still start one.

The client is :class:`Zygote`: :meth:`Zygote.run` runs a program to its end, :meth:`Zygote.start`
starts one in the background (a server, a run to interrupt) and returns a :class:`Child`, which
reads like ``subprocess.Popen``. ``python tests/zygote.py`` is the server: one JSON request per
line on stdin, answered with the child's pid and then its exit status (a background child: its
pid only; a ``poll`` request: its exit status, or null while it runs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_PRELOADED_PATH = list(sys.path)
_OWN_PYTHONPATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def _set_sys_path(env: dict[str, str], first: str) -> None:
    """``sys.path`` as a new interpreter with ``env`` would have it: ``first``, then
    ``PYTHONPATH``, then the rest (what the zygote's own PYTHONPATH added left out)."""
    wanted = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    rest = [p for p in _PRELOADED_PATH[1:] if p not in _OWN_PYTHONPATH]
    sys.path[:] = [first, *wanted, *rest]


def _run(request: dict[str, Any]) -> int:
    import runpy
    from importlib.metadata import entry_points

    kind, target, args, env = request["kind"], request["target"], request["args"], request["env"]
    if kind == "script":
        sys.argv = [target, *args]
        _set_sys_path(env, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")
    elif kind == "code":
        sys.argv = ["-c", *args]
        _set_sys_path(env, "")
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    elif kind == "module":
        sys.argv = [target, *args]
        _set_sys_path(env, os.getcwd())
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        (script,) = entry_points(group="console_scripts", name=target)
        sys.argv = [target, *args]
        _set_sys_path(env, os.path.dirname(sys.executable))
        return script.load()() or 0
    return 0


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def _child(request: dict[str, Any]) -> None:
    """Become the program: never returns."""
    import atexit
    import traceback

    if request.get("new_session"):
        os.setsid()
    if request.get("sigint_default"):
        # what a new interpreter installs when SIGINT is not ignored where it starts
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # not the request pipe: the program's own subprocesses inherit fd 0
    os.close(devnull)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        if fd == 2 and path == request["stdout"]:
            os.dup2(1, 2)  # one file for both, as with ``stderr=subprocess.STDOUT``
            continue
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    try:
        code = _run(request)
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """Preload, then run requests until stdin closes."""
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import sklearn.datasets  # noqa: F401  (digits: about 1 CPU-s per program that loads them)
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        if "poll" in request:  # a background child: its exit status, or null while it runs
            pid, status = os.waitpid(request["poll"], os.WNOHANG)
            print(json.dumps(os.waitstatus_to_exitcode(status) if pid else None), file=replies,
                  flush=True)  # fmt: skip
            continue
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(pid, file=replies, flush=True)
        if not request.get("background"):
            _, status = os.waitpid(pid, 0)
            print(os.waitstatus_to_exitcode(status), file=replies, flush=True)


class Zygote:
    """The client: start the server once, then :meth:`run` programs in children of it."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__], cwd=cwd, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._lock = threading.Lock()

    def run(
        self,
        kind: str,
        target: str,
        args: list[str],
        cwd: Path,
        env: dict[str, str],
        timeout: float = 900,
    ) -> subprocess.CompletedProcess:
        """Run one program to its end (``kind``: "script", "code", "module" or "console"); the
        result reads like ``subprocess.run(..., capture_output=True, text=True)``'s.

        Raises:
            subprocess.TimeoutExpired: it ran past ``timeout`` seconds (and was killed).
        """
        with self._lock, tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"kind": kind, "target": target, "args": list(args), "cwd": str(cwd),
                       "env": dict(env), "stdout": str(out), "stderr": str(err)}  # fmt: skip
            pid = int(self._ask(request))
            expired = threading.Event()
            timer = threading.Timer(timeout, lambda: (expired.set(), os.kill(pid, signal.SIGKILL)))
            timer.start()
            code = int(self._proc.stdout.readline())
            timer.cancel()
            argv = [kind, target, *args]
            if expired.is_set():
                raise subprocess.TimeoutExpired(argv, timeout)
            return subprocess.CompletedProcess(
                argv, code, out.read_text(errors="replace"), err.read_text(errors="replace")
            )

    def start(
        self,
        kind: str,
        target: str,
        args: list[str],
        cwd: Path,
        env: dict[str, str],
        *,
        stdout: Path | str = os.devnull,
        stderr: Path | str = os.devnull,
        new_session: bool = False,
        sigint_default: bool = False,
    ) -> Child:
        """Start a program in the background, as ``subprocess.Popen`` would (a server, or a run
        to interrupt): its output goes to the files ``stdout`` and ``stderr`` (the same path for
        both: one file, in order). ``new_session``: its own session and process group, as
        ``start_new_session=True``; ``sigint_default``: SIGINT raises KeyboardInterrupt even when
        the suite ignores SIGINT (as a shell's background job does)."""
        request = {"kind": kind, "target": target, "args": list(args), "cwd": str(cwd),
                   "env": dict(env), "stdout": str(stdout), "stderr": str(stderr),
                   "background": True, "new_session": new_session,
                   "sigint_default": sigint_default}  # fmt: skip
        with self._lock:
            pid = int(self._ask(request))
        return Child(self, pid, [kind, target, *args])

    def _poll(self, pid: int) -> int | None:
        with self._lock:
            return json.loads(self._ask({"poll": pid}))

    def _ask(self, request: dict[str, Any]) -> str:
        """Send one request and read the first line of its answer (the caller holds the lock)."""
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._proc.stdout.readline()

    def close(self) -> None:
        """End the server (after the running program, if any)."""
        self._proc.stdin.close()
        self._proc.wait(timeout=60)


class Child:
    """A program :meth:`Zygote.start` started: ``pid``, ``returncode``, and ``poll``,
    ``wait``, ``send_signal``, ``terminate`` and ``kill`` as on ``subprocess.Popen``."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str]) -> None:
        self._zygote, self.pid, self.args = zygote, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status (negative: the signal that ended it), or None while it runs."""
        if self.returncode is None:
            self.returncode = self._zygote._poll(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to end; raises ``subprocess.TimeoutExpired`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` unless it has ended (its pid is not reused before :meth:`poll` saw it
        end: until then it stays the zygote's unreaped child)."""
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


if __name__ == "__main__":
    serve()
