"""The watched folders: ``data_dir/incoming`` and ``[watch].folders``, recursively.

A file is read only when its writer is done with it: after an inotify close-write event,
or once its size and mtime have not changed for ``settle_seconds`` (for writers on network
file systems, where no close event arrives). A file that inotify saw opened and not yet
closed is not read on the settle timer: a local writer that pauses mid-file must not have
its half file taken. Files present at start-up are picked up by the first scan. Names
starting with a dot (and anything in a dot folder), or ending in ``.tmp``/``.part``/
``.partial``, are left alone: they are other programs' work in progress.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import make_url
from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MOVED,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from cxrd.ingest import Ingestor

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".reason.txt")
RESCAN_SECONDS = 5.0
#: A file left in place (storage failed, or it could not be moved to rejected/) is tried
#: again after this long, not on every rescan.
RETRY_SECONDS = 30.0
#: A file some process holds open is not read on the settle timer alone; this long without
#: a change, it is read anyway (a close event can be lost when the inotify queue overflows).
OPEN_STALE_SECONDS = 120.0
#: While events flow, a file is not taken on the settle timer sooner than this: a scan can
#: find a file before the observer thread has delivered its "opened" event.
MIN_SETTLE_WITH_EVENTS = 1.0
#: Settled files are ingested this many at a time. Ingesting a file freshly copied in is
#: mostly waiting for its fsync (its pages are still dirty) and the commit's; several
#: at once share the group commit (``cxrd.ingest``) and overlap those waits, as several
#: associations do. Measured with 48 files of 10 MB: one at a time about 100 files/s,
#: four about 127.
INGEST_THREADS = 4


def _observer() -> Any:
    """The platform's observer; on Linux one that reports a file renamed in from outside
    the watched folders as a move (complete, taken at once), not as a creation (taken only
    after the settle time, at least ``MIN_SETTLE_WITH_EVENTS``)."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux
        return Observer()
    return InotifyObserver(generate_full_events=True)


def _database_files(ingestor: Ingestor) -> list[Path]:
    url = make_url(ingestor.db.url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return []
    db = Path(url.database)
    return [db, *(db.with_name(db.name + s) for s in ("-wal", "-shm", "-journal"))]


@dataclass
class _Seen:
    size: int = -1
    mtime_ns: int = -1
    since: float = 0.0  # monotonic time of the last change of (size, mtime)
    closed: bool = False  # a writer closed it after its last write
    opens: int = 0  # opens minus closes seen through events (inotify)


class _Events(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        kind = event.event_type
        src = Path(os.fsdecode(event.src_path))
        if kind == EVENT_TYPE_MOVED:
            # A rename is atomic: the file arrives whole (write, then rename, is how a
            # writer hands a file over). With full events, a file renamed in from outside
            # the watched folders has no source and one renamed out has no destination.
            if event.src_path:
                self.watcher.forget(src)
            if event.dest_path:
                self.watcher.notice(Path(os.fsdecode(event.dest_path)), closed=True)
        elif kind == EVENT_TYPE_DELETED:
            self.watcher.forget(src)
        elif kind == EVENT_TYPE_OPENED:
            self.watcher.notice(src, opened=1)
        elif kind == EVENT_TYPE_CLOSED:
            self.watcher.notice(src, opened=-1, closed=True)
        elif kind == EVENT_TYPE_CLOSED_NO_WRITE:
            self.watcher.notice(src, opened=-1)
        else:
            self.watcher.notice(src)


class FolderWatcher:
    """Watches folders and feeds settled files to the Ingestor, one at a time.

    ``scan()`` and ``run_once()`` can also be driven without ``start()`` (tests, one-shot
    imports); the settle rule then works on successive scans.
    """

    def __init__(self, ingestor: Ingestor, folders: Iterable[Path], settle_seconds: float,
                 *, exclude: Iterable[Path] = ()) -> None:
        self.ingestor = ingestor
        self.folders = [Path(f).absolute() for f in folders]
        # Never read what the node itself writes, should it live under a watched folder
        # (data_dir watched as a whole, say): the spool, rejected/, the SQLite database,
        # and whatever the caller names (the results folder).
        self._excluded = [Path(p).absolute() for p in (
            ingestor.spool_dir, ingestor.rejected_dir, *_database_files(ingestor), *exclude)]
        self.settle_seconds = settle_seconds
        self._lock = threading.Lock()
        self._pending: dict[Path, _Seen] = {}
        self._retry_after: dict[Path, float] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._observer: Any = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.ingested = 0

    def start(self) -> None:
        self._observer = _observer()
        handler = _Events(self)
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._observer.schedule(handler, str(folder), recursive=True)
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name="cxrd-watch", daemon=True)
        self._thread.start()
        log.info("action=watch-start folders=%s settle_s=%.1f",
                 ",".join(str(f) for f in self.folders), self.settle_seconds)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching; the files being ingested are finished first."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _folder_of(self, path: Path) -> Path | None:
        """The watched folder holding ``path``; None when the path is to be left alone."""
        if any(path.is_relative_to(x) for x in self._excluded):
            return None
        for folder in self.folders:
            if path.is_relative_to(folder):
                parts = path.relative_to(folder).parts
                if not parts or any(p.startswith(".") for p in parts):
                    return None  # dot folders are other programs' work in progress
                if path.name.lower().endswith(IGNORED_SUFFIXES):
                    return None
                return folder
        return None

    def notice(self, path: Path, *, closed: bool = False, opened: int = 0) -> None:
        """Note activity on a file (an event or a scan)."""
        path = path.absolute()
        if self._folder_of(path) is None:
            return
        with self._lock:
            if path in self._retry_after:
                if not closed:
                    return  # left in place after a failure: wait for RETRY_SECONDS
                del self._retry_after[path]  # rewritten since: try again now
            seen = self._pending.get(path)
            if seen is None:
                if opened < 0:
                    # Our own read's close, or a reader's, after the file was handled.
                    return
                seen = self._pending[path] = _Seen(since=time.monotonic())
            seen.opens = max(0, seen.opens + opened)
            seen.closed = seen.closed or closed
        if closed:
            self._wake.set()

    def forget(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path.absolute(), None)

    def scan(self) -> None:
        """Find files the events missed (start-up, overflowed inotify queues)."""
        now = time.monotonic()
        with self._lock:
            for path, when in list(self._retry_after.items()):
                if when <= now:
                    del self._retry_after[path]
        for folder in self.folders:
            for root, dirs, files in os.walk(folder):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    self.notice(Path(root) / name)

    def _settled(self) -> list[Path]:
        now = time.monotonic()
        settle = self.settle_seconds
        if self._observer is not None:
            settle = max(settle, MIN_SETTLE_WITH_EVENTS)
        ready: list[Path] = []
        with self._lock:
            for path, seen in list(self._pending.items()):
                try:
                    st = path.stat()
                except OSError:  # gone, or unreadable metadata: the next scan decides
                    del self._pending[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                    # Changed since the last look: restart the clock. A close event still
                    # counts: it came after the last write.
                    seen.size, seen.mtime_ns, seen.since = st.st_size, st.st_mtime_ns, now
                quiet = now - seen.since
                if seen.closed and seen.opens == 0:
                    ready.append(path)
                elif seen.opens > 0:
                    # Someone still has it open (a slow local writer): wait for the close.
                    if quiet >= max(OPEN_STALE_SECONDS, settle):
                        ready.append(path)
                elif quiet >= settle:
                    ready.append(path)
            for path in ready:
                self._pending.pop(path, None)
        return ready

    def run_once(self) -> int:
        """Ingest every settled file; returns how many were handled. Below ``[storage]
        min_free_mb`` none is touched: they wait, and go once space is back."""
        if self.ingestor.space_low() is not None:
            return 0
        ready = sorted(self._settled())
        if len(ready) > 1:  # several at once (INGEST_THREADS), in name order per thread
            if self._pool is None:
                self._pool = ThreadPoolExecutor(INGEST_THREADS, thread_name_prefix="cxrd-ingest")
            handled = sum(self._pool.map(self._ingest, ready))
        else:
            handled = sum(map(self._ingest, ready))
        self.ingested += handled
        return handled

    def _ingest(self, path: Path) -> int:
        """Ingest one settled file; 1 when handled, 0 when the watcher is stopping."""
        if self._stop.is_set():
            return 0
        folder = self._folder_of(path) or path.parent
        try:
            self.ingestor.ingest_file(path, f"watch:{folder}")
        except Exception:  # never let one file stop the watcher
            log.exception("action=ingest-error folder=%s", folder)
        if path.exists():
            # Storage failed or the file could not be moved: try again later, not on every
            # event and rescan.
            with self._lock:
                self._retry_after[path] = time.monotonic() + RETRY_SECONDS
                self._pending.pop(path, None)
        return 1

    def _run(self) -> None:
        last_scan = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_scan > RESCAN_SECONDS:
                    self.scan()
                    last_scan = time.monotonic()
                self.run_once()
            except Exception:  # the watcher must outlive any one bad moment
                log.exception("action=watch-error")
            self._wake.wait(min(0.5, self.settle_seconds / 2 or 0.5))
            self._wake.clear()
