"""Worker processes of one node, supervised: started, woken, restarted when they die,
stopped at a drain.

``cxrd serve`` (``cxrd.node``) and ``cxrd worker`` (``cxrd.workernode``) both run their
workers through a :class:`WorkerPool`, so a worker dies, is restarted and drains the same
way whichever role its node has. The pool decides how soon a dead worker comes back (one
that dies soon after starting, a model that cannot load say, with a growing delay, not in
a tight loop) and frees the jobs it held at once, its attempt counted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any

from cxrd import queue
from cxrd.config import Config
from cxrd.db import Database
from cxrd.durable import remove_stale_temp_files
from cxrd.store import local_folders
from cxrd.worker import spawn_context, worker_id_prefix, worker_main

log = logging.getLogger(__name__)

QUICK_DEATH_SECONDS = 30.0
RESTART_DELAY_MAX = 60.0


class WorkerPool:
    """``count`` worker processes (``cxrd.worker.worker_main``), each with a doorbell
    (``ring``). Not thread-safe: one loop calls ``supervise``."""

    def __init__(self, config: Config, db: Database, count: int,
                 setup_logging: Callable[[Config], None] | None = None) -> None:
        self.config = config
        self.db = db
        self.count = count
        self._setup_logging = setup_logging
        self._ctx = spawn_context()
        self._workers: dict[int, Any] = {}
        self._doorbells: dict[int, Connection] = {}  # write ends, one per worker (ring())
        self._worker_started: dict[int, float] = {}
        self._restart_delay: dict[int, float] = {}
        self._restart_at: dict[int, float] = {}

    @property
    def processes(self) -> list[Any]:
        """The worker processes started last for each index (alive or not)."""
        return list(self._workers.values())

    def start(self) -> None:
        for index in range(self.count):
            self._start_worker(index)

    def _start_worker(self, index: int) -> None:
        bell_in, bell_out = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_main, name=f"cxrd-worker-{index}",
            args=(self.config, index, os.getpid(), self._setup_logging, bell_in),
        )
        proc.start()
        bell_in.close()  # the worker has its own copy
        os.set_blocking(bell_out.fileno(), False)  # a ring never waits for a busy worker
        old = self._doorbells.pop(index, None)
        if old is not None:
            old.close()
        self._doorbells[index] = bell_out
        self._workers[index] = proc
        self._worker_started[index] = time.monotonic()
        log.info("action=worker-spawned index=%d pid=%s", index, proc.pid)

    def supervise(self) -> None:
        """Restart dead workers; one that dies soon after starting (a model that cannot
        load, say) is restarted with a growing delay, not in a tight loop. Its jobs return
        to the queue at once, the attempt counted (a job may kill its worker)."""
        now = time.monotonic()
        for index, proc in list(self._workers.items()):
            if proc.is_alive():
                continue
            if index not in self._restart_at:
                lived = now - self._worker_started.get(index, now)
                delay = (min(self._restart_delay.get(index, 1.0) * 2, RESTART_DELAY_MAX)
                         if lived < QUICK_DEATH_SECONDS else 0.0)
                self._restart_delay[index] = delay or 1.0
                self._restart_at[index] = now + delay
                log.error("action=worker-died index=%d pid=%s exitcode=%s lived_s=%.0f "
                          "restart_in_s=%.0f", index, proc.pid, proc.exitcode, lived, delay)
                results_dir = local_folders(self.config)[1]
                if results_dir is not None:
                    remove_stale_temp_files(results_dir)  # its SC, if any
                try:
                    queue.release_worker_leases(
                        self.db, f"{worker_id_prefix(self.config.node.id)}{proc.pid}:w{index}")
                except Exception as exc:  # the database away: the leases expire instead
                    log.warning("action=release-leases-failed error_type=%s",
                                type(exc).__name__)
            if now >= self._restart_at[index]:
                del self._restart_at[index]
                self._start_worker(index)

    def ring(self) -> None:
        """Wake the idle workers: jobs were just queued. Without it an idle worker finds
        them on its next poll, up to ``IDLE_SLEEP_SECONDS`` later. A worker whose pipe is
        full (busy for long) or gone is skipped: it is not idle."""
        for bell in self._doorbells.values():
            with contextlib.suppress(OSError):  # BlockingIOError, BrokenPipeError included
                bell.send_bytes(b"")

    def terminate(self) -> None:
        """SIGTERM to each live worker: it finishes its current batch, then exits."""
        for proc in self._workers.values():
            if proc.is_alive():
                proc.terminate()

    def join(self, deadline: float) -> None:
        """Wait for the workers until ``deadline`` (``time.monotonic()``); kill those still
        running then (their leased jobs return to the queue at the next start, or when the
        lease expires)."""
        for proc in self._workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._workers.values():
            if proc.is_alive():
                log.warning("action=worker-killed pid=%s reason=drain-timeout", proc.pid)
                proc.kill()
                proc.join(5)


def install_stop_signals(stop: Callable[[], None], reload: Callable[[], None],
                         children: Callable[[], Iterable[Any]]) -> None:
    """A node's signals (``cxrd serve`` and ``cxrd worker``): the first SIGTERM or SIGINT
    calls ``stop`` (a drain); a second kills every live process of ``children()`` and exits
    1 at once. SIGHUP calls ``reload``, which only flags it: the node's loop acts on it,
    not the handler."""
    received = 0

    def on_term(signum: int, _frame: object) -> None:
        nonlocal received
        received += 1
        if received > 1:
            log.warning("action=exit-now signal=%d", signum)
            for proc in children():
                if proc.is_alive():
                    proc.kill()
            os._exit(1)
        log.info("action=stop-requested signal=%d", signum)
        stop()

    def on_hup(_signum: int, _frame: object) -> None:
        reload()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
