"""Ordinary permissions for files written atomically.

``tempfile.mkstemp`` and ``mkdtemp`` create 0600 files and 0700 folders, and a rename keeps those
modes, so an exported folder or a checkpoint written through them would be private to its creator
(a container running as another user could not read a mounted export). :func:`give_umask_mode`
gives such a path the mode a plain ``open()`` or ``mkdir()`` would have given it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["current_umask", "give_umask_mode"]

_lock = threading.Lock()


def current_umask() -> int:
    """This process's umask (read from ``/proc`` where there is one, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _lock:  # os.umask can only be read by setting it; restore it at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def give_umask_mode(path: str | os.PathLike[str]) -> None:
    """Set ``path`` (a file, or a folder and everything in it) to the modes that the umask gives
    new files (0666 & ~umask) and folders (0777 & ~umask)."""
    mask = current_umask()
    root = Path(path)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
