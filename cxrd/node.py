"""``cxrd serve``: watcher, scheduler (admission + reports), worker processes, in one service.

The main process never decodes or infers. It ingests (watch), admits stable studies,
writes each study's SR when its jobs end, and supervises the worker processes, restarting
any that die. SIGTERM drains: stop ingesting, let workers finish their batch (bounded),
exit 0. A second SIGTERM exits at once; the queue recovers on the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

from cxrd import queue
from cxrd.admit import admit_stable_studies
from cxrd.config import Config
from cxrd.db import Database
from cxrd.infer import resolve_model_path
from cxrd.ingest import Ingestor
from cxrd.logs import setup_logging
from cxrd.modelinfo import ModelInfo, read_model_info
from cxrd.receive import Receiver, receiver_main
from cxrd.results import finish_studies, remove_stale_temp_files
from cxrd.watch import FolderWatcher
from cxrd.worker import spawn_context, worker_id_prefix, worker_main

log = logging.getLogger(__name__)

SCHEDULER_INTERVAL_SECONDS = 0.5
DRAIN_SECONDS = 60.0


class Node:
    """One cxrd node. ``run()`` blocks until stopped."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.db = Database(config.storage.database_url_resolved)
        self.model: ModelInfo = read_model_info(resolve_model_path(config.model.path))
        self._stop = threading.Event()
        self._signals = 0
        self._ctx = spawn_context()
        self._workers: dict[int, Any] = {}
        self.watcher: FolderWatcher | None = None
        self.receiver: Receiver | None = None
        self._receivers: list[Any] = []

    # -- lifecycle --------------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.config
        for d in (cfg.storage.data_dir, cfg.storage.incoming_dir, cfg.storage.spool_dir,
                  cfg.storage.rejected_dir, cfg.results.results_dir):
            d.mkdir(parents=True, exist_ok=True)
        version = self.db.migrate()
        queue.release_dead_leases(self.db, worker_id_prefix())
        # what this node's earlier processes were writing when they died
        remove_stale_temp_files(cfg.results.results_dir)
        remove_stale_temp_files(cfg.storage.spool_dir, recursive=True)
        log.info("action=node-start ae_title=%s data_dir=%s schema=%d model=%s device_uid=%s "
                 "demo=%s", cfg.node.ae_title, cfg.storage.data_dir, version,
                 self.model.display_name, self.model.device_uid, self.model.demo)
        if self.model.demo:
            log.warning("action=demo-model model=%s note=trained on synthetic phantoms; "
                        "not for clinical use", self.model.display_name)

    def start(self) -> None:
        cfg = self.config
        ingestor = Ingestor(self.db, cfg.storage.spool_dir, cfg.storage.rejected_dir)
        shared = cfg.node.receivers > 1
        self.receiver = Receiver(cfg, ingestor, reuse_port=shared)
        self.receiver.start()
        for index in range(1, cfg.node.receivers):
            proc = self._ctx.Process(
                target=receiver_main, name=f"cxrd-receiver-{index}",
                args=(cfg, index, os.getpid(), setup_logging))
            proc.start()
            self._receivers.append(proc)
        folders = [cfg.storage.incoming_dir, *cfg.watch.folders]
        self.watcher = FolderWatcher(ingestor, folders, cfg.watch.settle_seconds,
                                     exclude=[cfg.results.results_dir])
        self.watcher.start()
        for index in range(cfg.workers.processes):
            self._start_worker(index)

    def _start_worker(self, index: int) -> None:
        proc = self._ctx.Process(
            target=worker_main, name=f"cxrd-worker-{index}",
            args=(self.config, index, os.getpid(), setup_logging),
        )
        proc.start()
        self._workers[index] = proc
        log.info("action=worker-spawned index=%d pid=%s", index, proc.pid)

    def supervise(self) -> None:
        for index, proc in list(self._workers.items()):
            if not proc.is_alive() and not self._stop.is_set():
                log.error("action=worker-died index=%d pid=%s exitcode=%s", index, proc.pid,
                          proc.exitcode)
                remove_stale_temp_files(self.config.results.results_dir)  # its SC, if any
                self._start_worker(index)

    def tick(self) -> None:
        """One scheduler round: admit stable studies, write finished studies' SRs."""
        cfg = self.config
        admit_stable_studies(self.db, cfg.study.stable_seconds)
        finish_studies(self.db, self.model, cfg.results.results_dir,
                       sr_sop_class=cfg.results.sr_sop_class.value,
                       structured_report=cfg.results.structured_report,
                       destinations=[d.name for d in cfg.destinations])

    def run(self) -> int:
        self.prepare()
        self.start()
        self._install_signals()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("action=scheduler-error")
            self.supervise()
            self._stop.wait(SCHEDULER_INTERVAL_SECONDS)
        return self.drain()

    def stop(self) -> None:
        self._stop.set()

    def drain(self) -> int:
        """Stop ingesting, let workers finish their current batch, write what is due."""
        log.info("action=drain-start")
        for proc in self._receivers:
            proc.terminate()  # SIGTERM: they finish their associations in flight
        if self.receiver is not None:
            self.receiver.drain()
        for proc in self._receivers:
            proc.join(35)
        if self.watcher is not None:
            self.watcher.stop()
        for proc in self._workers.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: finish the current batch, then exit
        deadline = time.monotonic() + DRAIN_SECONDS
        for proc in self._workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._workers.values():
            if proc.is_alive():
                # Its leased jobs return to the queue at the next start.
                log.warning("action=worker-killed pid=%s reason=drain-timeout", proc.pid)
                proc.kill()
                proc.join(5)
        try:
            self.tick()
        except Exception:
            log.exception("action=scheduler-error")
        self.db.dispose()
        log.info("action=drain-done")
        return 0

    def _install_signals(self) -> None:
        def on_term(signum: int, _frame: FrameType | None) -> None:
            self._signals += 1
            if self._signals > 1:
                log.warning("action=exit-now signal=%d", signum)
                for proc in [*self._workers.values(), *self._receivers]:
                    if proc.is_alive():
                        proc.kill()
                os._exit(1)
            log.info("action=stop-requested signal=%d", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
