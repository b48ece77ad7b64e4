"""Prometheus metrics at ``[metrics].listen``.

Two sources, so the worker processes' numbers reach the endpoint correctly:

- event counters and stage latency histograms, written by every process through
  prometheus-client's multiprocess mode (files under ``data_dir/.metrics``, set up by
  ``enable_multiprocess`` in the main process before any child starts);
- state gauges (studies and instances by state, queue depth, deliveries pending and dead,
  the model and its execution providers) read from the database at scrape time, so they
  are the same numbers ``cxrd status`` shows.

Several nodes on one PostgreSQL database read the same rows: the database gauges are
exported by one node at a time, the one that holds a PostgreSQL advisory lock
(``GaugeLock``), so Prometheus does not count them once per node. Every node exports
``cxrd_database_gauges_exporter`` (1 on the one that exports them) and its own counters,
histograms and disk gauges. On SQLite (one node) the database gauges are always exported.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def enable_multiprocess(data_dir: Path, node_id: str) -> Path:
    """Point prometheus-client at a fresh per-node directory; call before importing the
    metric objects and before spawning children (they inherit the environment). One per
    ``[node] id`` (``.metrics/<id>``): nodes sharing the data folder each wipe only their
    own at start."""
    folder = data_dir / ".metrics" / node_id
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


class _Metrics:
    """The metric objects, created on first use (after ``enable_multiprocess``)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.instances_received = Counter(
            "cxrd_instances_received_total",
            "Instances offered to cxrd, by outcome (stored, duplicate, rejected reason).",
            ["outcome"])
        self.instances_refused = Counter(
            "cxrd_instances_refused_total",
            "Instances refused or left waiting for a resource, by reason (disk-low: free "
            "space below storage.min_free_mb) and source (dicom: answered 0xA700; dicomweb: "
            "answered 503; watch: a watched file left in place).", ["reason", "source"])
        for source in ("dicom", "dicomweb", "watch"):
            # Created now, not on the first refusal: in multiprocess mode a new series is
            # written into a file under data_dir, which is then short of space.
            self.instances_refused.labels("disk-low", source)
        self.dicomweb_instances = Counter(
            "cxrd_dicomweb_instances_total",
            "Instances posted to the STOW-RS receiver, by route (/studies, "
            "/studies/{study}) and outcome (stored, duplicate, or the refusal's reason, as "
            "cxrd_instances_received_total counts them).", ["route", "outcome"])
        self.dicomweb_requests = Counter(
            "cxrd_dicomweb_requests_total",
            "Requests to the STOW-RS receiver, by route and HTTP status.",
            ["route", "status"])
        self.images_classified = Counter(
            "cxrd_images_classified_total", "Images classified, by the class shown.",
            ["label"])
        self.stage_seconds = Histogram(
            "cxrd_stage_seconds",
            "Time per image (report: per study; send: per object) in each pipeline stage.",
            ["stage"], buckets=STAGE_BUCKETS)
        self.deliveries = Counter(
            "cxrd_deliveries_total", "Delivery attempts, by outcome (done, retry, dead).",
            ["outcome"])


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> _Metrics:
    global _metrics  # one set of metric objects per process, created lazily
    if _metrics is None:
        # The receiver's association threads can get here at once: a second _Metrics
        # would fail to register (DuplicateTimeseries) and its C-STORE would be refused.
        with _metrics_lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def observe_stages(timings: Mapping[str, float]) -> None:
    hist = metrics().stage_seconds
    for stage, seconds in timings.items():
        hist.labels(stage).observe(seconds)


#: The PostgreSQL advisory lock whose holder exports the database gauges ("cxrg").
GAUGE_LOCK = 0x63787267


class GaugeLock:
    """Whether this node exports the database-derived gauges: on PostgreSQL, while it holds
    a session advisory lock (``GAUGE_LOCK`` and the schema's name) on a connection of its
    own; on SQLite, always.

    Tried at each scrape (``held``): a node that does not hold it tries to take it, the one
    that holds it checks that its connection is still there (one round trip). The lock is
    the connection's, not a transaction's: it is taken in autocommit, so no transaction
    stays open. The connection comes from an engine without a pool, so closing it (``close``,
    or the process's death: the server ends the session) releases the lock, and the next
    node to be scraped takes it over. A node whose host vanished holds it until the server
    notices the dead connection (PostgreSQL's ``tcp_keepalives_*`` settings)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self._conn: Connection | None = None
        self._engine: Any = None
        self._mutex = threading.Lock()  # scrapes may come in on several threads

    def held(self) -> bool:
        if self.db.is_sqlite:
            return True
        with self._mutex:
            try:
                if self._conn is not None:
                    self._conn.execute(text("SELECT 1"))
                    return True
                if self._engine is None:
                    self._engine = create_engine(self.db.engine.url, poolclass=NullPool)
                conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                # Advisory locks belong to the database: the schema's name in the key keeps
                # apart deployments (and tests) that share one database, each in its schema.
                if conn.execute(text("SELECT pg_try_advisory_lock(:key, "
                                     "hashtext(current_schema()))"),
                                {"key": GAUGE_LOCK}).scalar():
                    self._conn = conn
                    log.info("action=gauges-exporter node=this")
                    return True
                conn.close()
                return False
            except Exception as exc:  # the database away: no gauges from here until back
                log.debug("action=gauge-lock-error error=%s", exc)
                self._drop()
                return False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # a connection already gone
                log.debug("action=gauge-lock-close-error error=%s", exc)

    def close(self) -> None:
        """Release the lock (its connection closed): another node exports from its next
        scrape."""
        with self._mutex:
            self._drop()
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None


class DatabaseCollector:
    """State gauges read from the database at scrape time, by the node that holds the
    ``GaugeLock``."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.lock = GaugeLock(db)

    def describe(self) -> list[Any]:
        return []

    def close(self) -> None:
        self.lock.close()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        from cxrd.db import Delivery, Instance, Job, Study, Worker
        from cxrd.domain import DeliveryState, JobState

        exporter = self.lock.held()
        yield GaugeMetricFamily(
            "cxrd_database_gauges_exporter", "1 on the node that exports the gauges read "
            "from the shared database (one node at a time), 0 on the others.",
            value=1 if exporter else 0)
        if not exporter:
            return
        try:
            with self.db.session() as s:
                def by(column: Any) -> list[tuple[str, int]]:
                    return [(str(k), int(n)) for k, n in
                            s.execute(select(column, func.count()).group_by(column)).all()]

                studies, instances = by(Study.state), by(Instance.state)
                skipped = [(k, n) for k, n in by(Instance.reason) if k != "None"]
                jobs, deliveries = by(Job.state), by(Delivery.state)
                workers = s.scalars(select(Worker).order_by(Worker.heartbeat_at.desc())
                                    .limit(16)).all()
        except Exception as exc:  # the endpoint stays up when the database is not
            log.warning("action=metrics-db-error error=%s", exc)
            return
        for name, doc, rows, label in (
            ("cxrd_studies", "Studies by state.", studies, "state"),
            ("cxrd_instances", "Instances by state.", instances, "state"),
            ("cxrd_instances_skipped", "Instances not classified, by reason.", skipped,
             "reason"),
            ("cxrd_jobs", "Jobs by state.", jobs, "state"),
            ("cxrd_deliveries", "Deliveries by state.", deliveries, "state"),
        ):
            g = GaugeMetricFamily(name, doc, labels=[label])
            for key, n in rows:
                g.add_metric([key], n)
            yield g
        depth = sum(n for k, n in jobs if k in (JobState.PENDING.value, JobState.RUNNING.value))
        yield GaugeMetricFamily("cxrd_queue_depth", "Jobs pending or running.", value=depth)
        counts = dict(deliveries)
        yield GaugeMetricFamily("cxrd_deliveries_pending", "Deliveries waiting to be sent.",
                                value=counts.get(DeliveryState.PENDING.value, 0))
        yield GaugeMetricFamily("cxrd_deliveries_dead", "Deliveries given up on.",
                                value=counts.get(DeliveryState.DEAD.value, 0))
        info = InfoMetricFamily("cxrd_model", "The model and execution providers in use, "
                                "per worker.", labels=["worker"])
        for w in workers:
            info.add_metric([w.id], {"model": w.model, "device_uid": w.model_device_uid,
                                     "demo": str(w.demo).lower(), "providers": w.providers})
        yield info


class SpaceCollector:
    """Free space of the spool's and the results' file systems, read at scrape time
    (``[storage] min_free_mb``, ``cxrd.space``)."""

    def __init__(self, space: Any) -> None:
        self.space = space

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            filesystems = self.space.filesystems()
        except OSError as exc:
            log.warning("action=metrics-disk-error error=%s", exc.strerror or exc)
            return
        free = GaugeMetricFamily("cxrd_disk_free_bytes", "Free bytes on the file system of "
                                 "each folder cxrd writes to (spool, results).",
                                 labels=["path"])
        for fs in filesystems:
            free.add_metric([str(fs.path)], fs.free_bytes)
        yield free
        yield GaugeMetricFamily("cxrd_disk_min_free_bytes", "storage.min_free_mb in bytes "
                                "(0: no check).", value=self.space.min_free_mb * 1024 * 1024)
        yield GaugeMetricFamily("cxrd_disk_low", "1 while free space is below "
                                "storage.min_free_mb (C-STORE answers 0xA700).",
                                value=1 if self.space.low() else 0)


class _QuietHandler(WSGIRequestHandler):
    """Requests are not logged (a scrape every few seconds would fill the log)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _server_class(host: str, port: int) -> tuple[type[WSGIServer], str]:
    """A server with a thread per request (a slow page never holds up a scrape), of the
    address family of ``host`` (IPv4 or IPv6), and the address to bind, as
    prometheus-client's own ``start_http_server`` picks them."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True  # a request in flight does not hold up the node's exit

    return Server, str(sockaddr[0])


def start_server(listen: str, db: Any, *, space: Any = None, config: Any = None) -> Any:
    """Serve /metrics on ``host:port``; returns the server (``shutdown()`` to stop).
    ``space``: the node's ``cxrd.space.FreeSpace``, for the free-space gauges; ``config``:
    the node's, for the status page at ``/`` (``cxrd.statuspage``; none without it)."""
    from wsgiref.simple_server import make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.multiprocess import MultiProcessCollector

    from cxrd.config import parse_listen

    host, port = parse_listen(listen)
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    registry.register(DatabaseCollector(db))
    if space is not None:
        registry.register(SpaceCollector(space))
    app = make_wsgi_app(registry)
    if config is not None:
        from cxrd.statuspage import wrap

        app = wrap(app, config, db)
    server_class, address = _server_class(host, port)
    server = make_server(address, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="cxrd-metrics", daemon=True).start()
    log.info("action=metrics-start listen=%s status_page=%s", listen, config is not None)
    return server
