"""The watched folders: ``data_dir/incoming`` and ``[watch].folders``, recursively.

A file is read only when its writer is done with it: after an inotify close-write event,
or once its size and mtime have not changed for ``settle_seconds`` (for writers on network
file systems, where no close event arrives). Files present at start-up are picked up by the
first scan. Names starting with a dot or ending in ``.tmp``/``.part``/``.partial`` are
left alone: they are other programs' work in progress.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from cxrd.ingest import Ingestor

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".reason.txt")
RESCAN_SECONDS = 5.0


def _ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower().endswith(IGNORED_SUFFIXES)


class _Events(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        path = Path(os.fsdecode(getattr(event, "dest_path", "") or event.src_path))
        closed = event.event_type in ("closed", "moved")
        self.watcher.notice(path, closed=closed)


class FolderWatcher:
    """Watches folders and feeds settled files to the Ingestor, one at a time."""

    def __init__(self, ingestor: Ingestor, folders: Iterable[Path], settle_seconds: float) -> None:
        self.ingestor = ingestor
        self.folders = [Path(f) for f in folders]
        self.settle_seconds = settle_seconds
        self._lock = threading.Lock()
        # path -> (size, mtime_ns, first time seen with that size/mtime, closed)
        self._pending: dict[Path, tuple[int, int, float, bool]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._observer: Any = None
        self._thread: threading.Thread | None = None
        self.ingested = 0

    def start(self) -> None:
        self._observer = Observer()
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
        """Stop watching; a file being ingested is finished first."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def notice(self, path: Path, *, closed: bool = False) -> None:
        if _ignored(path):
            return
        with self._lock:
            prev = self._pending.get(path)
            self._pending[path] = (prev[0], prev[1], prev[2], closed or prev[3]) if prev else (
                -1, -1, time.monotonic(), closed)
        if closed:
            self._wake.set()

    def scan(self) -> None:
        """Find files the events missed (start-up, overflowed inotify queues)."""
        for folder in self.folders:
            for root, dirs, files in os.walk(folder):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    self.notice(Path(root) / name)

    def _settled(self) -> list[Path]:
        now = time.monotonic()
        ready: list[Path] = []
        with self._lock:
            for path, (size, mtime, since, closed) in list(self._pending.items()):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    del self._pending[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (size, mtime):
                    # Changed since last look: restart the clock (a close event still
                    # counts: it came after the last write).
                    self._pending[path] = (st.st_size, st.st_mtime_ns, now, closed)
                    if closed:
                        ready.append(path)
                    continue
                if closed or now - since >= self.settle_seconds:
                    ready.append(path)
            for path in ready:
                self._pending.pop(path, None)
        return ready

    def run_once(self) -> int:
        """Ingest every settled file; returns how many were handled."""
        handled = 0
        for path in sorted(self._settled()):
            if self._stop.is_set():
                break
            folder = next((f for f in self.folders if path.is_relative_to(f)), path.parent)
            try:
                self.ingestor.ingest_file(path, f"watch:{folder}")
            except Exception:  # never let one file stop the watcher
                log.exception("action=ingest-error folder=%s", folder)
            handled += 1
        self.ingested += handled
        return handled

    def _run(self) -> None:
        self.scan()
        last_scan = time.monotonic()
        while not self._stop.is_set():
            self.run_once()
            if time.monotonic() - last_scan > RESCAN_SECONDS:
                self.scan()
                last_scan = time.monotonic()
            self._wake.wait(min(0.5, self.settle_seconds / 2 or 0.5))
            self._wake.clear()

