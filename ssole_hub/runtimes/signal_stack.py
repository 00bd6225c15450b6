"""Keep a thread's alternate signal stack as it was around OpenVINO calls (Linux only)."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

__all__ = ["own_signal_stack"]


class _SignalStack(ctypes.Structure):
    """Linux's ``stack_t``."""

    _fields_ = [
        ("ss_sp", ctypes.c_void_p),
        ("ss_flags", ctypes.c_int),
        ("ss_size", ctypes.c_size_t),
    ]


@contextlib.contextmanager
def own_signal_stack() -> Iterator[None]:
    """Keep the calling thread's alternate signal stack as it was.

    OpenVINO's CPU plugin (2026.4) gives the thread that compiles a model an alternate signal
    stack and can free that memory later. The next signal the thread takes (a child process
    exiting is enough) is then written to freed memory and the process dies with SIGSEGV, which
    happened in training after ``validate_hub_folder``. Restoring the thread's own setting
    afterwards leaves OpenVINO's handlers on the ordinary stack (Linux only; a no-op elsewhere).
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before = _SignalStack()
    libc.sigaltstack(None, ctypes.byref(before))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(before), None)
