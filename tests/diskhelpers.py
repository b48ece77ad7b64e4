"""Filling a (small, real) file system, for the disk-full tests; the ``tmpfs`` fixture
that mounts one is in ``conftest.py``."""

from __future__ import annotations

import os
from pathlib import Path


def fill(folder: Path, leave_bytes: int, name: str = "filler.bin") -> Path:
    """A file in ``folder`` (allocated, not sparse) that leaves about ``leave_bytes`` free
    on its file system; remove it to give the space back."""
    st = os.statvfs(folder)
    size = st.f_bavail * st.f_frsize - leave_bytes
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if size > 0:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return path

