"""``cxrd worker``: a node that only runs worker processes (classify and report jobs).

Scale-out: one receiving node (``cxrd serve``: receiver, watcher, scheduler, sender, and
workers or none, ``[workers] processes = 0``) and any number of worker nodes share one
PostgreSQL database and one data folder, mounted at the same path on every node (the
database records the spool's and the results' absolute paths). A worker node claims jobs
from the shared queue (``FOR UPDATE SKIP LOCKED``, leases owned ``<[node] id>:pid:wN``),
reads the received images from the spool and writes its SCs, SEGs and SRs into the
results folder, where the receiving node's sender finds them. It listens on no DICOM
port, watches no folder, admits nothing and sends nothing; it exports metrics only when
``[metrics] listen`` is set.

Its workers are supervised as ``cxrd serve`` supervises its own (``cxrd.pool``). At start
it frees the leases of its own dead processes (a restart on the same host with the same
id); another node's leases come back when they expire. It never migrates the database: it
refuses to start against another schema (``cxrd.preflight.check_worker_database``).

SIGTERM drains: each worker finishes the batch in hand, then the node exits 0. A second
SIGTERM exits at once (the leases expire, or the next start frees them).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from cxrd import queue
from cxrd.config import Config, worker_processes
from cxrd.db import SCHEMA_VERSION, Database
from cxrd.durable import remove_stale_temp_files
from cxrd.errors import CxrdError
from cxrd.infer import check_cuda, resolve_model_path
from cxrd.logs import setup_logging
from cxrd.metrics import enable_multiprocess, metrics
from cxrd.metrics import start_server as start_metrics
from cxrd.modelinfo import ModelInfo, read_model_info
from cxrd.pool import WorkerPool, install_stop_signals
from cxrd.space import node_space
from cxrd.store import local_folders
from cxrd.systemd import Notifier
from cxrd.worker import settle_garbage_collector, worker_id_prefix

log = logging.getLogger(__name__)

#: How often the node looks for dead workers (and pings systemd's watchdog).
SUPERVISE_SECONDS = 0.5
STATUS_SECONDS = 5.0
DRAIN_SECONDS = 60.0
#: After a failure, worker processes get this long to exit on SIGTERM before SIGKILL.
ABORT_SECONDS = 5.0


class WorkerNode:
    """One ``cxrd worker`` node. ``run()`` blocks until stopped; returns the exit code."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.db = Database(config.storage.database_url_resolved)
        self.model: ModelInfo = read_model_info(resolve_model_path(config.model.path))
        self.worker_count = worker_processes(config)
        self.pool = WorkerPool(config, self.db, self.worker_count, setup_logging)
        self.notifier = Notifier()
        self._stop = threading.Event()
        self._metrics_server: Any = None
        self._last_status = 0.0
        self._reload = False

    def prepare(self) -> None:
        cfg = self.config
        version = self.db.schema_version()
        if version != SCHEMA_VERSION:  # the preflight said so too, unless it changed since
            raise CxrdError(f"database is at schema version {version}, this cxrd needs "
                            f"{SCHEMA_VERSION}; a worker node never migrates")
        spool_dir, results_dir = local_folders(cfg)
        if spool_dir is None:  # S3: data_dir is this node's own (metrics files)
            cfg.storage.data_dir.mkdir(parents=True, exist_ok=True)
        for folder in (results_dir, cfg.results.folder if cfg.storage.store else None):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        if cfg.metrics.enabled:
            enable_multiprocess(cfg.storage.data_dir, cfg.node.id)  # before any worker
            metrics()
        # What this node's earlier processes held and were writing when they died; other
        # nodes' leases are theirs until they expire.
        queue.release_dead_leases(self.db, worker_id_prefix(cfg.node.id))
        if results_dir is not None:
            remove_stale_temp_files(results_dir)
        if cfg.model.require_cuda:
            check_cuda(cfg)
        log.info("action=node-start role=worker node_id=%s data_dir=%s store=%s schema=%d "
                 "model=%s device_uid=%s demo=%s workers=%d", cfg.node.id,
                 cfg.storage.data_dir, cfg.storage.store or "data_dir", version,
                 self.model.display_name, self.model.device_uid, self.model.demo,
                 self.worker_count)
        if not cfg.destinations:
            # The worker that writes a result queues it for the destinations of its own
            # config; the receiving node's sender sends them.
            log.warning("action=no-destinations role=worker node_id=%s note=%s", cfg.node.id,
                        "results written here are queued for no destination")
        if self.model.demo:
            log.warning("action=demo-model model=%s note=%s", self.model.display_name,
                        "trained on synthetic phantoms; not for clinical use")

    def start(self) -> None:
        cfg = self.config
        if cfg.metrics.enabled:
            self._metrics_server = start_metrics(cfg.metrics.listen, self.db,
                                                 space=node_space(cfg), config=cfg)
        self.pool.start()
        settle_garbage_collector()

    def run(self) -> int:
        try:
            self.prepare()
            self.start()
            self._install_signals()
            self.notifier.ready(self._status_line())
            self._loop()
        except BaseException:
            self.abort()  # no worker left behind, then raise
            raise
        return self.drain()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._reload:  # SIGHUP: nothing of a worker node's config applies live
                self._reload = False
                log.info("action=reloaded applied=nothing restart_needed_for=everything")
            self.pool.supervise()
            self.notifier.watchdog()
            if time.monotonic() - self._last_status > STATUS_SECONDS:
                self._last_status = time.monotonic()
                self.notifier.status(self._status_line())
            self._stop.wait(SUPERVISE_SECONDS)

    def _status_line(self) -> str:
        alive = sum(p.is_alive() for p in self.pool.processes)
        return f"worker node {self.config.node.id}: {alive} of {self.worker_count} workers"

    def drain(self) -> int:
        """Let each worker finish its batch in hand (bounded), then stop."""
        log.info("action=drain-start role=worker")
        self.notifier.stopping()
        self.pool.terminate()  # SIGTERM: finish the current batch, then exit
        self.pool.join(time.monotonic() + DRAIN_SECONDS)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.db.dispose()
        log.info("action=drain-done role=worker node_id=%s", self.config.node.id)
        return 0

    def abort(self) -> None:
        """Start-up or the loop failed: end every worker now, without a drain."""
        self._stop.set()
        self.pool.terminate()
        self.pool.join(time.monotonic() + ABORT_SECONDS)
        if self._metrics_server is not None:
            try:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            except Exception:
                log.debug("action=abort-step-failed", exc_info=True)
        self.db.dispose()

    def stop(self) -> None:
        self._stop.set()

    def _install_signals(self) -> None:
        install_stop_signals(self.stop, self._request_reload, lambda: self.pool.processes)

    def _request_reload(self) -> None:
        self._reload = True  # logged by the loop, not in the handler
