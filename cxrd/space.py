"""Free space and the errors that mean "a resource is missing", not "this image is bad".

``FreeSpace`` is the ``[storage] min_free_mb`` check: the free space of the file system
holding the spool and, when it is another one, of the one holding the results. Below the
threshold the receiver answers C-STORE with 0xA700 (Out of Resources) and the watcher
leaves files where they are; both resume by themselves once space is back. The check is a
``statvfs`` per file system, cached for ``CACHE_SECONDS``: the receive path is hot.

``is_resource_error`` tells a job's failure on a full disk (ENOSPC, EDQUOT) or on a
database that is full or unreachable from a failure of the image itself: such a job waits
and resumes without using up its attempts (``cxrd.queue.retry_or_fail``).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cxrd.config import Config

log = logging.getLogger(__name__)

MB = 1024 * 1024
#: How long one look at the file systems is reused.
CACHE_SECONDS = 1.0

#: OSError numbers that mean the disk (or the user's quota) is full.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: SQLite's messages for a full or unreachable database file (sqlite3.OperationalError).
@dataclass(frozen=True)
class FileSystem:
    """One file system that cxrd writes to, as seen at one moment."""

    path: Path  # the configured folder (the first one on this file system)
    free_bytes: int
    total_bytes: int

    @property
    def free_mb(self) -> int:
        return self.free_bytes // MB


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (a folder not made yet is on its parent's
    file system)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def look(folders: Iterable[Path]) -> list[FileSystem]:
    """The free and total bytes (available to cxrd, not to root) of each distinct file
    system holding ``folders``, in their order."""
    seen: set[int] = set()
    found: list[FileSystem] = []
    for folder in folders:
        where = _existing(Path(folder))
        device = os.stat(where).st_dev
        if device in seen:
            continue
        seen.add(device)
        st = os.statvfs(where)
        found.append(FileSystem(Path(folder), st.f_bavail * st.f_frsize,
                                st.f_blocks * st.f_frsize))
    return found


class FreeSpace:
    """The ``min_free_mb`` check over some folders, cached for ``cache_seconds``.

    ``low()`` returns None while every file system has at least ``min_free_mb`` free, else
    a one-line reason naming the file system that is short. Going low and coming back are
    each logged once. Thread-safe; a file system that cannot be looked at counts as not
    low (the write itself then fails and is answered as it always was)."""

    def __init__(self, folders: Iterable[Path], min_free_mb: int, *,
                 cache_seconds: float = CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.folders = [Path(f) for f in folders]
        self.min_free_mb = min_free_mb
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._reason: str | None = None
        self._filesystems: list[FileSystem] = []

    @property
    def enabled(self) -> bool:
        return self.min_free_mb > 0

    def low(self) -> str | None:
        """Why storing must wait (free space below the threshold), or None."""
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            if self._checked_at is not None and now - self._checked_at < self.cache_seconds:
                return self._reason
            self._checked_at = now
            try:
                self._filesystems = look(self.folders)
            except OSError as exc:
                log.warning("action=disk-check-failed error=%s",
                            exc.strerror or type(exc).__name__)
                self._filesystems = []
            short = [fs for fs in self._filesystems if fs.free_bytes < self.min_free_mb * MB]
            reason = None
            if short:
                fs = short[0]
                reason = (f"disk-low: {fs.free_mb} MB free on {fs.path}, "
                          f"storage.min_free_mb is {self.min_free_mb}")
            if reason and not self._reason:
                log.warning("action=disk-low path=%s free_mb=%d min_free_mb=%d "
                            "note=C-STORE answers 0xA700 and watched files wait until "
                            "space is back", short[0].path, short[0].free_mb, self.min_free_mb)
            elif self._reason and not reason:
                log.info("action=disk-ok %s min_free_mb=%d", " ".join(
                    f"free_mb[{fs.path}]={fs.free_mb}" for fs in self._filesystems),
                    self.min_free_mb)
            self._reason = reason
            return reason

    def filesystems(self) -> list[FileSystem]:
        """The file systems as last looked at (looks again when the cache is stale)."""
        if self.enabled:
            self.low()
            with self._lock:
                if self._filesystems:
                    return list(self._filesystems)
        return look(self.folders)


def storage_space(spool_dir: Path, results_dir: Path, min_free_mb: int) -> FreeSpace:
    """The check of ``[storage] min_free_mb`` over the spool and the results folder."""
    return FreeSpace([spool_dir, results_dir], min_free_mb)


def node_space(config: Config) -> FreeSpace:
    """``[storage] min_free_mb`` for the node's store (``[storage] store``): over the
    spool's and the results' folders when they are local files
    (``cxrd.store.local_folders``); on S3 the check is off (an object store has no free
    space to read; a PUT it cannot take is StoreUnavailable, and waited out), and the
    gauges and status show ``data_dir``'s file system."""
    from cxrd.store import local_folders

    spool, results = local_folders(config)
    if spool is not None and results is not None:
        return storage_space(spool, results, config.storage.min_free_mb)
    return FreeSpace([config.storage.data_dir], 0)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota, here or anywhere in the exception's chain."""
    return any(isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS for e in _chain(exc))


def is_resource_error(exc: BaseException) -> bool:
    """True when ``exc`` says a resource is missing (a full disk, a database that is full
    or unreachable: ``cxrd.db.unavailable``, a store that cannot be reached now:
    ``cxrd.errors.StoreUnavailable``), not that the work itself is wrong: the
    work is to wait and resume."""
    from cxrd.db import unavailable
    from cxrd.errors import StoreUnavailable

    return (is_disk_full(exc) or unavailable(exc)
            or any(isinstance(e, StoreUnavailable) for e in _chain(exc)))


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in found and len(found) < 16:
        found.append(e)
        e = e.__cause__ or e.__context__
    return found
