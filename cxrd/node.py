"""``cxrd serve``: receivers (C-STORE; STOW-RS with ``[dicomweb] listen``), watcher,
scheduler, worker processes and sender in one service.

The main process never decodes, infers or builds a result. It ingests (receiver, watch),
admits stable studies, runs the outbox (sender) and supervises the worker processes,
restarting any that die. Workers do every per-image and per-study computation: classify
jobs and the study's report job (``cxrd.worker``). The scheduler's CPU time is counted
(``scheduler_cpu_s`` in the drain line and in systemd's STATUS).

SIGTERM drains: stop ingesting, let workers finish their batch (bounded),
exit 0. A second SIGTERM exits at once; the queue recovers on the next start.

A node that cannot do its job does not run half-alive: ``cxrd serve`` checks what would
stop it before it listens (``cxrd.preflight``), and any exception that escapes ``run()``,
at start-up or later, closes the listeners and ends every child process (``abort``) before
it propagates, so the process exits non-zero with nothing left behind.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from cxrd import queue
from cxrd.admit import admission_round, queue_arrivals
from cxrd.config import Config, worker_processes
from cxrd.db import Database, unavailable
from cxrd.dicomweb import DicomwebReceiver
from cxrd.durable import remove_stale_temp_files
from cxrd.infer import check_cuda, resolve_model_path
from cxrd.ingest import Ingestor
from cxrd.logs import setup_logging
from cxrd.metrics import enable_multiprocess, metrics
from cxrd.metrics import start_server as start_metrics
from cxrd.modelinfo import ModelInfo, read_model_info
from cxrd.outbox import release_dead_delivery_leases
from cxrd.pool import WorkerPool, install_stop_signals
from cxrd.receive import Receiver, receiver_main
from cxrd.send import Sender
from cxrd.space import is_resource_error, node_space
from cxrd.store import key_folders, open_node_store
from cxrd.systemd import Notifier
from cxrd.watch import FolderWatcher
from cxrd.worker import settle_garbage_collector, spawn_context, worker_id_prefix

log = logging.getLogger(__name__)

SCHEDULER_INTERVAL_SECONDS = 0.5
#: The shortest wait between two rounds (a study due now is admitted by this round already).
MIN_INTERVAL_SECONDS = 0.02
#: With ``[study] classify_on_arrival``, a stored instance wakes the scheduler, but no
#: sooner than this after its previous round: a burst of arrivals is queued a few at a
#: time, not one round (a transaction, a commit) per file.
ARRIVAL_ROUND_SECONDS = 0.2
#: Without a store noticed in this process, the scheduler still looks for received
#: instances to queue this often.
ARRIVAL_CHECK_SECONDS = 5.0
#: How often the scheduler looks for admitted studies that lack a report job.
REPORT_SWEEP_SECONDS = 30.0
STATUS_SECONDS = 5.0
DRAIN_SECONDS = 60.0
#: After a failure, child processes get this long to exit on SIGTERM before SIGKILL.
ABORT_SECONDS = 5.0
#: With ``[storage] retention_days``: the first purge this long after start, then hourly.
PURGE_FIRST_SECONDS = 15.0
PURGE_INTERVAL_SECONDS = 3600.0
#: A drain waits this long for a purge in progress to finish its batch.
PURGE_STOP_SECONDS = 10.0


class Node:
    """One cxrd node. ``run()`` blocks until stopped."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.db = Database(config.storage.database_url_resolved)
        self.model: ModelInfo = read_model_info(resolve_model_path(config.model.path))
        self._stop = threading.Event()
        #: What the scheduler loop waits on between rounds: a stop, a reload, or a stored
        #: instance (``_on_stored``, with ``[study] classify_on_arrival``).
        self._wake = threading.Event()
        self._last_round = 0.0
        self._ctx = spawn_context()
        self.watcher: FolderWatcher | None = None
        self.receiver: Receiver | None = None
        #: The STOW-RS receiver (``[dicomweb] listen``), a thread of this process.
        self.dicomweb: DicomwebReceiver | None = None
        #: The spool and the results (``[storage] store``); each child process opens its own.
        self.objects = open_node_store(config)
        self.sender = Sender(config, self.db, self.objects)
        self._receivers: list[Any] = []
        self.destination_names = [d.name for d in config.destinations]
        self.notifier = Notifier()
        self._reload = threading.Event()
        self._metrics_server: Any = None
        self._last_status = 0.0
        self.worker_count = worker_processes(config)
        self.pool = WorkerPool(config, self.db, self.worker_count, setup_logging)
        self.scheduler_cpu_s = 0.0
        self.scheduler_ticks = 0
        # The ticks that admitted studies, apart: the CPU per admitted study, without the
        # idle rounds and the first round's imports.
        self.admitting_cpu_s = 0.0
        self.admitted_studies = 0
        self._next_sweep = 0.0
        #: When the earliest collecting study becomes stable (``time.monotonic()``), as the
        #: last full round read it; None: nothing collecting, or not known.
        self._admission_due: float | None = None
        self._arrival_round = False  # the loop woke for a stored instance
        self._stored = False  # an instance was stored since the last queue_arrivals
        self._next_arrival_check = 0.0
        self.space = node_space(config)
        self._database_down_since: float | None = None
        self._next_purge = time.monotonic() + PURGE_FIRST_SECONDS
        self._purger: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.config
        local = [d for d in (self.objects.spool_dir, self.objects.results_dir, cfg.results.folder)
                 if d is not None]
        for d in (cfg.storage.data_dir, cfg.storage.incoming_dir, cfg.storage.spool_dir,
                  cfg.storage.rejected_dir, *local):
            d.mkdir(parents=True, exist_ok=True)
        if cfg.metrics.enabled:
            # before any child process starts
            enable_multiprocess(cfg.storage.data_dir, cfg.node.id)
            metrics()  # its files written now, while there is space (cxrd.space)
        version = self.db.migrate(key_folders(cfg))
        queue.release_dead_leases(self.db, worker_id_prefix(cfg.node.id))
        release_dead_delivery_leases(self.db, worker_id_prefix(cfg.node.id))
        # what this node's earlier processes were writing when they died
        if self.objects.results_dir is not None:
            remove_stale_temp_files(self.objects.results_dir)
        if self.objects.spool_dir is not None:
            remove_stale_temp_files(self.objects.spool_dir, recursive=True)
        if cfg.model.require_cuda:
            check_cuda(cfg)  # before the receiver listens: a node that cannot infer exits
        log.info("action=node-start node_id=%s ae_title=%s data_dir=%s store=%s schema=%d "
                 "model=%s device_uid=%s demo=%s workers=%d", cfg.node.id, cfg.node.ae_title,
                 cfg.storage.data_dir, self.objects.location, version,
                 self.model.display_name, self.model.device_uid, self.model.demo,
                 self.worker_count)
        if self.model.demo:
            log.warning("action=demo-model model=%s note=%s", self.model.display_name,
                        "trained on synthetic phantoms; not for clinical use")

    def start(self) -> None:
        cfg = self.config
        if cfg.metrics.enabled:
            # Before the DICOM port: a metrics port taken since the preflight check stops
            # the node before it accepts anything.
            self._metrics_server = start_metrics(cfg.metrics.listen, self.db,
                                                 space=self.space, config=cfg)
        ingestor = Ingestor(self.db, cfg.storage.spool_dir, cfg.storage.rejected_dir,
                            space=self.space, store=self.objects,
                            on_stored=self._on_stored if cfg.study.classify_on_arrival else None)
        shared = cfg.node.receivers > 1
        self.receiver = Receiver(cfg, ingestor, reuse_port=shared)
        self.receiver.start()
        if cfg.dicomweb.enabled:
            # The same ingest as C-STORE; a port taken since the preflight stops the node.
            self.dicomweb = DicomwebReceiver(cfg, ingestor)
            self.dicomweb.start()
        for index in range(1, cfg.node.receivers):
            proc = self._ctx.Process(
                target=receiver_main, name=f"cxrd-receiver-{index}",
                args=(cfg, index, os.getpid(), setup_logging))
            proc.start()
            self._receivers.append(proc)
        folders = [cfg.storage.incoming_dir, *cfg.watch.folders]
        self.watcher = FolderWatcher(ingestor, folders, cfg.watch.settle_seconds,
                                     exclude=[d for d in (cfg.results.results_dir,
                                                          self.objects.results_dir) if d])
        self.watcher.start()
        self.pool.start()
        self.sender.start()
        settle_garbage_collector()

    def tick(self) -> None:
        """One scheduler round: queue the instances that arrived (``[study]
        classify_on_arrival``), admit stable studies (which queues the rest and lets their
        report jobs run); a safety net for admitted studies without a report job. Its CPU
        time is accounted; the rounds that queued or admitted anything apart."""
        t0 = time.thread_time()
        admitted = queued = 0
        try:
            admitted, queued = self._tick()
        finally:
            cpu = time.thread_time() - t0
            self.scheduler_cpu_s += cpu
            self.scheduler_ticks += 1
            if admitted or queued:
                self.admitting_cpu_s += cpu
                self.admitted_studies += admitted

    def _tick(self) -> tuple[int, int]:
        cfg = self.config
        self._last_round = time.monotonic()
        queued = 0
        if cfg.study.classify_on_arrival and (
                self._stored or cfg.node.receivers > 1
                or self._last_round >= self._next_arrival_check):
            # Only after a store in this process (``_on_stored``), with receivers in other
            # processes every round, and otherwise now and then (a lost wake-up).
            self._stored = False
            self._next_arrival_check = self._last_round + ARRIVAL_CHECK_SECONDS
            try:
                queued = queue_arrivals(self.db)
            except BaseException:
                self._stored = True  # the next round tries again (the database away)
                raise
        due = self._admission_due
        admitted = 0
        if not (self._arrival_round and due is not None and self._last_round < due):
            # (A round woken by an arrival before the earliest study is due skips this:
            # an arrival only makes a study due later.) Unknown until this round has read
            # it: a round that fails (the database away) leaves the next one at the
            # regular interval, not at a study's due time.
            self._admission_due = None
            admitted, wait = admission_round(self.db, cfg.study.stable_seconds)
            if wait is not None:
                self._admission_due = time.monotonic() + wait
        swept = 0
        if time.monotonic() >= self._next_sweep:  # a safety net: rarely, not every round
            self._next_sweep = time.monotonic() + REPORT_SWEEP_SECONDS
            swept = queue.ensure_report_jobs(self.db)
        if cfg.storage.retention_days > 0 and time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + PURGE_INTERVAL_SECONDS
            self._start_purge()
        if admitted or swept or queued:
            self.ring()
        return admitted, queued

    def _interval(self) -> float:
        """Until the next round: ``SCHEDULER_INTERVAL_SECONDS``, or less when a collecting
        study becomes stable sooner (it is admitted then, not up to a round later)."""
        due = self._admission_due
        if due is None:
            return SCHEDULER_INTERVAL_SECONDS
        return min(SCHEDULER_INTERVAL_SECONDS,
                   max(MIN_INTERVAL_SECONDS, due - time.monotonic()))

    def ring(self) -> None:
        """Wake the idle workers: jobs were just queued (``WorkerPool.ring``)."""
        self.pool.ring()

    def _start_purge(self) -> None:
        """Retention's purge, on its own thread: its file removals neither hold up
        admission nor count as scheduler CPU, and a long first purge cannot starve the
        watchdog. One at a time."""
        if self._stop.is_set() or (self._purger is not None and self._purger.is_alive()):
            return
        self._purger = threading.Thread(target=self._purge, name="cxrd-purge", daemon=True)
        self._purger.start()

    def _purge(self) -> None:
        from cxrd.retention import TRIGGER_RETENTION, cutoff_for, purge

        try:
            purge(self.db, self.config, cutoff_for(self.config.storage.retention_days),
                  trigger=TRIGGER_RETENTION, stop=self._stop, objects=self.objects)
        except Exception:  # the next one tries again
            log.exception("action=purge-failed")

    def run(self) -> int:
        try:
            self.prepare()
            self.start()
            self._install_signals()
            # READY only now: the database is migrated and the receiver is listening.
            self.notifier.ready(self._status_line())
            self._loop()
        except BaseException:
            # Half a node must not stay up: nothing listening, no child left, then raise.
            self.abort()
            raise
        return self.drain()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            try:
                self.tick()
                self.notifier.watchdog()  # only a loop that completes a round pings
                self._database_back()
            except Exception as exc:
                if unavailable(exc):
                    self._database_gone(exc)
                elif is_resource_error(exc):  # a full disk: it comes back
                    log.warning("action=scheduler-wait error_type=%s error=%s",
                                type(exc).__name__, str(exc).splitlines()[0][:200])
                else:
                    log.exception("action=scheduler-error")
            if not self._stop.is_set():
                self.pool.supervise()
            if time.monotonic() - self._last_status > STATUS_SECONDS:
                self._last_status = time.monotonic()
                self.notifier.status(self._status_line())
            self._pause()

    def _on_stored(self) -> None:
        """The ingestor stored an instance (any thread): queue it at the next round."""
        self._stored = True
        self._wake.set()

    def _pause(self) -> None:
        """Between two rounds: until the next is due (``_interval``), or a stop or a reload,
        or an instance stored, though not sooner than ``ARRIVAL_ROUND_SECONDS`` after the
        last round (the arrivals meanwhile are queued together)."""
        self._arrival_round = self._wake.wait(self._interval()) and not (
            self._stop.is_set() or self._reload.is_set())
        if self._arrival_round:
            self._stop.wait(self._last_round + ARRIVAL_ROUND_SECONDS - time.monotonic())
        self._wake.clear()

    def _database_gone(self, exc: BaseException) -> None:
        """The scheduler found the database unreachable: say so once, and keep going (the
        receiver answers Out of Resources meanwhile, workers wait with their jobs)."""
        if self._database_down_since is None:
            self._database_down_since = time.monotonic()
            log.error("action=database-unavailable component=scheduler error_type=%s",
                      type(exc).__name__)
            log.debug("action=database-unavailable detail=%s", exc)

    def _database_back(self) -> None:
        if self._database_down_since is not None:
            log.warning("action=database-back component=scheduler down_s=%.1f",
                        time.monotonic() - self._database_down_since)
            self._database_down_since = None

    def _status_line(self) -> str:
        """systemd STATUS=: queue depth and counts, from the database."""
        from sqlalchemy import func, select

        from cxrd.db import Delivery, Job
        from cxrd.domain import DeliveryState, JobState

        try:
            with self.db.session() as s:
                depth = s.scalar(select(func.count()).select_from(Job).where(Job.state.in_(
                    (JobState.PENDING.value, JobState.RUNNING.value))))
                pending = s.scalar(select(func.count()).select_from(Delivery).where(
                    Delivery.state == DeliveryState.PENDING.value))
        except Exception as exc:
            return f"database unavailable: {type(exc).__name__}"
        return (f"queue depth {depth}, deliveries pending {pending}, "
                f"model {self.model.display_name}, scheduler CPU {self.scheduler_cpu_s:.1f} s")

    def reload(self) -> None:
        """SIGHUP: apply what is safe to change live; name what needs a restart."""
        from cxrd.config import describe, load_config

        try:
            new = load_config(self.config.source)
        except Exception as exc:
            log.error("action=reload-failed error=%s", exc)
            return
        old_view, new_view = describe(self.config), describe(new)
        live = {"destinations", "notifications", "sender"}
        changed = sorted(k for k in new_view if new_view[k] != old_view.get(k))
        node_old, node_new = dict(old_view.get("node", {})), dict(new_view.get("node", {}))
        if node_old.get("allowed_callers") != node_new.get("allowed_callers"):
            if self.receiver is not None:
                self.receiver.set_allowed_callers(new.node.allowed_callers)
            node_old.pop("allowed_callers", None)
            node_new.pop("allowed_callers", None)
        if "destinations" in changed:
            self.sender.set_destinations(new.destinations)
            self.destination_names = [d.name for d in new.destinations]
        if "notifications" in changed:
            # The sender's side; this node's workers queue for those they started with.
            self.sender.set_notifications(new.notifications)
        restart = [k for k in changed if k not in live and k != "node"]
        if node_old != node_new:
            restart.append("node (except allowed_callers)")
        if "sender" in changed:
            restart.append("sender")
        log.info("action=reloaded applied=allowed_callers,destinations,notifications "
                 "restart_needed_for=%s",
                 ",".join(restart) or "nothing")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def drain(self) -> int:
        """Stop ingesting, let workers finish their current batch, write what is due."""
        log.info("action=drain-start")
        self.notifier.stopping()
        # Workers first: they finish the batch in hand and claim no other while the
        # receivers finish their associations (which can take a while).
        self.pool.terminate()  # SIGTERM: finish the current batch, then exit
        for proc in self._receivers:
            proc.terminate()  # SIGTERM: they finish their associations in flight
        # The STOW-RS server stops accepting at once and finishes its requests while the
        # C-STORE receiver finishes its associations.
        stow = threading.Thread(target=self.dicomweb.drain, name="cxrd-dicomweb-drain",
                                daemon=True) if self.dicomweb is not None else None
        if stow is not None:
            stow.start()
        if self.receiver is not None:
            self.receiver.drain()
        if stow is not None:
            stow.join(40)
        for proc in self._receivers:
            proc.join(35)
        if self.watcher is not None:
            self.watcher.stop()
        self.pool.join(time.monotonic() + DRAIN_SECONDS)
        try:
            self.tick()
        except Exception:
            log.exception("action=scheduler-error")
        self.sender.stop()
        if self._purger is not None:
            self._purger.join(PURGE_STOP_SECONDS)  # _stop is set: it ends after its batch
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.db.dispose()
        log.info("action=drain-done scheduler_cpu_s=%.4f scheduler_ticks=%d "
                 "admitting_cpu_s=%.4f admitted_studies=%d", self.scheduler_cpu_s,
                 self.scheduler_ticks, self.admitting_cpu_s, self.admitted_studies)
        return 0

    def abort(self) -> None:
        """Start-up or the scheduler loop failed: close the listeners and end every child
        process now, without a drain (leased jobs return to the queue at the next start;
        what was acknowledged is in the spool and the database)."""
        log.debug("action=abort workers=%d receivers=%d", len(self.pool.processes),
                  len(self._receivers))
        self._stop.set()
        procs = [*self.pool.processes, *self._receivers]
        steps: list[Any] = [p.terminate for p in procs if p.is_alive()]
        if self.receiver is not None:
            steps.append(lambda: self.receiver.drain(timeout=0) if self.receiver else None)
        if self.dicomweb is not None:
            steps.append(lambda: self.dicomweb.drain(timeout=0) if self.dicomweb else None)
        if self.watcher is not None:
            steps.append(self.watcher.stop)
        steps.append(lambda: self.sender.stop(timeout=ABORT_SECONDS))
        if self._metrics_server is not None:
            steps += [self._metrics_server.shutdown, self._metrics_server.server_close]
        for step in steps:
            try:
                step()
            except Exception:  # the others still run
                log.debug("action=abort-step-failed", exc_info=True)
        deadline = time.monotonic() + ABORT_SECONDS
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self.db.dispose()

    def _install_signals(self) -> None:
        install_stop_signals(self.stop, self._request_reload,
                             lambda: [*self.pool.processes, *self._receivers])

    def _request_reload(self) -> None:
        self._reload.set()  # handled by the scheduler loop, not in the handler
        self._wake.set()
