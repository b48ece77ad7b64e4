"""The database: SQLAlchemy 2.x models, engine set-up and numbered migrations.

SQLite (the embedded default) runs in WAL mode with a busy timeout and ``synchronous=FULL``
so a commit that acknowledges an instance survives power loss. The same models run on
PostgreSQL for a queue shared by several nodes (jobs are then claimed with
``FOR UPDATE SKIP LOCKED``; see ``cxrd.queue``).
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    bindparam,
    create_engine,
    event,
    inspect,
    make_url,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import QueuePool, StaticPool

from cxrd.domain import DeliveryState, InstanceState, JobKind, JobState, StudyState

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Open connections kept per process (per engine) to a SQLite file.
SQLITE_POOL_SIZE = 8


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.COLLECTING.value, index=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)  # +1 per reprocess
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    stable_at: Mapped[dt.datetime | None] = mapped_column(DateTime)  # admitted at
    reported_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))  # the current SR
    report_seconds: Mapped[float | None] = mapped_column(Float)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    presentation_intent: Mapped[str] = mapped_column(String(32), default="")
    photometric: Mapped[str] = mapped_column(String(16), default="")
    has_pixels: Mapped[bool] = mapped_column(default=True)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    # The spool file's store key, spool/<study>/<sop>.dcm (cxrd.store; schema 7: an
    # absolute path before).
    path: Mapped[str] = mapped_column(Text)
    # Empty until needed: when the UID comes again, or before retention removes the file
    # (``cxrd.ingest`` ``_same_content``).
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(256))  # "watch:<folder>" or "dicom:<AE>@<host>"
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    state: Mapped[str] = mapped_column(String(16), default=InstanceState.RECEIVED.value, index=True)
    reason: Mapped[str | None] = mapped_column(String(32))  # SkipReason value
    detail: Mapped[str | None] = mapped_column(Text)
    # When retention removed the spool file (``cxrd.retention``); the row stays.
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Job(Base):
    """A unit of work any worker can claim with a lease: classifying one instance
    (``kind`` classify) or writing the SR of one study generation (``kind`` report)."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "state", "not_before"),
        # PostgreSQL also has ix_jobs_due (kind, state, id): schema 6.
        # One report job per study generation, whichever node enqueues it.
        Index("ux_jobs_report", "study_instance_uid", "generation", unique=True,
              sqlite_where=text("kind = 'report'"), postgresql_where=text("kind = 'report'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), default=JobKind.CLASSIFY.value,
                                      server_default=JobKind.CLASSIFY.value)
    # The instance classified; NULL for a report job.
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(String(32))  # SkipReason for SKIPPED jobs
    # A classify job's outputs, kept small: the study's SR is built from these alone.
    probs: Mapped[str | None] = mapped_column(Text)  # JSON [p_TB, p_NTB, p_NORM]
    cam: Mapped[str | None] = mapped_column(Text)  # schema 1 only; no longer written
    # JSON {"header": DICOM JSON of cxrd.headers.source_record, "region": [x0, y0, x1, y1]
    # of the reported class's hottest CAM region, or null for NORM}
    record: Mapped[str | None] = mapped_column(Text)
    model_device_uid: Mapped[str | None] = mapped_column(String(64))
    timings: Mapped[str | None] = mapped_column(Text)  # JSON stage -> seconds


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # ResultKind
    generation: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # store key results/<uid>.dcm (schema 7)
    source_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))  # SC: the radiograph
    supersedes: Mapped[str | None] = mapped_column(String(64))  # SR: the previous SR
    # SR: the study-level finding it reports, JSON {"finding", "probability", "threshold",
    # "images", "model": {"name", "version", "demo", "device_uid"}} (schema 8; NULL for
    # other results and older SRs): what a notification says, and what a superseding SR
    # is compared with (``cxrd.outbox.add_result``). No patient data.
    summary: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    # When retention removed the file (``cxrd.retention``); the row stays.
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Rejection(Base):
    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    source: Mapped[str] = mapped_column(String(256))
    name: Mapped[str] = mapped_column(Text)  # file name or SOP Instance UID
    reason: Mapped[str] = mapped_column(String(32))  # RejectReason
    detail: Mapped[str] = mapped_column(Text)
    moved_to: Mapped[str | None] = mapped_column(Text)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    done_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # The sender sending it now (``node-id:pid:send-DESTINATION``), PostgreSQL only, and
    # until when; ``next_attempt_at`` is moved to the same time, so an expired lease (its
    # node died mid-send) makes the delivery due again (``cxrd.outbox.claim_deliveries``).
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Worker(Base):
    """One row per worker process: its heartbeat, model and execution providers."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    model: Mapped[str] = mapped_column(String(128))
    model_device_uid: Mapped[str] = mapped_column(String(64))
    demo: Mapped[bool] = mapped_column(default=False)
    providers: Mapped[str] = mapped_column(String(256))  # comma-separated, as in use
    processed: Mapped[int] = mapped_column(Integer, default=0)


class OperatorAction(Base):
    """One row per mending command an operator ran (``cxrd deliveries retry``,
    ``cxrd jobs retry``): who, when, on what and how many rows it changed. Written in the
    transaction that made the change; ``cxrd status`` shows the recent ones."""

    __tablename__ = "operator_actions"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(32))  # e.g. "deliveries-retry"
    actor: Mapped[str] = mapped_column(String(256))  # user@host that ran the command
    scope: Mapped[str | None] = mapped_column(String(256))  # "destination=pacs"; None: all
    count: Mapped[int] = mapped_column(Integer)  # rows re-queued
    detail: Mapped[str | None] = mapped_column(Text)  # "key=value ..." (e.g. by job kind)


class Purge(Base):
    """One row per purge run (``cxrd.retention``): the node's periodic one (``trigger``
    "retention") or ``cxrd purge`` ("command"), what it removed and what it kept."""

    __tablename__ = "purges"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    before: Mapped[dt.datetime] = mapped_column(DateTime)  # the cutoff
    trigger: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str | None] = mapped_column(String(256))  # user@host of a command
    studies: Mapped[int] = mapped_column(Integer, default=0)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    spool_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    results: Mapped[int] = mapped_column(Integer, default=0)
    result_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    results_kept: Mapped[int] = mapped_column(Integer, default=0)  # old, not yet delivered


class SchemaVersion(Base):
    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(primary_key=True)
    applied_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


def _v1(conn: Any) -> None:
    Base.metadata.create_all(conn)


def _v2(conn: Any) -> None:
    """Report jobs: ``jobs.kind`` and ``jobs.record``, ``jobs.instance_id`` NULL for a
    report job, one report job per study generation. A database created at version 1 by
    this code's models already has them."""
    columns = {c["name"] for c in inspect(conn).get_columns("jobs")}
    if "kind" in columns:
        return
    table = Job.__table__
    if conn.dialect.name == "sqlite":
        # SQLite cannot drop a NOT NULL constraint: rebuild the table (nothing refers to it).
        conn.exec_driver_sql("ALTER TABLE jobs RENAME TO jobs_v1")
        for index in inspect(conn).get_indexes("jobs_v1"):
            conn.exec_driver_sql(f'DROP INDEX "{index["name"]}"')
        table.create(conn)  # type: ignore[attr-defined]
        names = ", ".join(sorted(columns))
        conn.exec_driver_sql(f"INSERT INTO jobs ({names}) SELECT {names} FROM jobs_v1")
        conn.exec_driver_sql("DROP TABLE jobs_v1")
        return
    conn.exec_driver_sql("ALTER TABLE jobs ADD COLUMN kind VARCHAR(8) NOT NULL "
                         "DEFAULT 'classify'")
    conn.exec_driver_sql("ALTER TABLE jobs ADD COLUMN record TEXT")
    conn.exec_driver_sql("ALTER TABLE jobs ALTER COLUMN instance_id DROP NOT NULL")
    for index in table.indexes:  # type: ignore[attr-defined]
        if index.name == "ux_jobs_report":
            index.create(conn)


def _v3(conn: Any) -> None:
    """``operator_actions``: the record of mending commands. A database created at an
    earlier version by this code's models already has it."""
    OperatorAction.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _v4(conn: Any) -> None:
    """Retention: ``instances.purged_at``, ``results.purged_at`` and ``purges``. A
    database created at an earlier version by this code's models already has them."""
    for table in (Instance.__tablename__, Result.__tablename__):
        if "purged_at" not in {c["name"] for c in inspect(conn).get_columns(table)}:
            kind = "TIMESTAMP" if conn.dialect.name == "postgresql" else "DATETIME"
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN purged_at {kind}")
    Purge.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _v5(conn: Any) -> None:
    """Delivery claims: ``deliveries.lease_owner`` and ``deliveries.lease_expires``. Plain
    nullable columns, which SQLite adds in place. A database created at an earlier version
    by this code's models already has them."""
    columns = {c["name"] for c in inspect(conn).get_columns(Delivery.__tablename__)}
    kind = "TIMESTAMP" if conn.dialect.name == "postgresql" else "DATETIME"
    for name, sql in (("lease_owner", "VARCHAR(128)"), ("lease_expires", kind)):
        if name not in columns:
            conn.exec_driver_sql(f"ALTER TABLE {Delivery.__tablename__} ADD COLUMN {name} {sql}")


def _v6(conn: Any) -> None:
    """PostgreSQL: the claim's index ``ix_jobs_due`` (kind, state, id), which the claim
    walks in id order, one kind at a time, stopping at the batch (``cxrd.queue._due_jobs``).
    Not in the models: every database, new or upgraded, gets it here. SQLite does not:
    its planner prefers ``ix_jobs_claim`` and sorts anyway, and its one node claims with
    the single query it always did, so the index would only cost writes."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_jobs_due ON jobs (kind, state, id)")


#: Where ``_v7`` looks for the files of absolute paths: ``spool`` and ``results`` folders.
Folders = Mapping[str, Path]


def key_of_path(path: str, kind: str, folders: Folders | None = None) -> str | None:
    """The store key (``cxrd.store``) of an absolute path recorded before schema 7, or
    None when it is not a file the node wrote there. A spooled instance was always
    ``<spool>/<study>/<sop>.dcm`` -> ``spool/<study>/<sop>.dcm``; a result
    ``<[results] folder>/<uid>.dcm`` -> ``results/<uid>.dcm`` (the default store maps
    ``results/`` keys to ``[results] folder`` wherever it is, ``cxrd.store.NodeStore``).
    ``folders``: the node's ``spool`` and ``results`` folders, which the path must lie in
    (a missing one: nothing of that kind is converted); None: any folder named ``spool``
    or ``results``, the default layout."""
    from cxrd.errors import InvalidKey
    from cxrd.store import RESULTS, SPOOL, check_key

    if not path.startswith("/"):
        return None
    file = Path(path)
    name = SPOOL if kind == "instance" else RESULTS
    top = file.parent.parent if kind == "instance" else file.parent
    if folders is None:
        if top.name != name:
            return None
    elif name not in folders or Path(os.path.abspath(folders[name])) != top:
        return None
    try:
        if kind == "instance":
            return check_key(f"{SPOOL}/{file.parent.name}/{file.name}")
        return check_key(f"{RESULTS}/{file.name}")
    except InvalidKey:
        return None


def _v7(conn: Any, folders: Folders | None = None) -> None:
    """Keys, not absolute paths: ``instances.path`` and ``results.path`` become store keys
    (``spool/<study>/<sop>.dcm``, ``results/<uid>.dcm``) relative to the node's store, so
    that every host sharing the store finds the same object (``key_of_path``, with the
    folders the node's configuration names). A value that is not a file the node wrote
    there stays an absolute path, which ``cxrd.store.NodeStore`` still reads as a local
    file."""
    tables: list[tuple[Any, str]] = [(Instance.__table__, "instance"),
                                      (Result.__table__, "result")]
    for table, kind in tables:
        rows = conn.execute(select(table.c.id, table.c.path).where(
            table.c.path.like("/%"))).all()
        changes = [{"row_id": row.id, "key": key} for row in rows
                   if (key := key_of_path(str(row.path), kind, folders)) is not None]
        for start in range(0, len(changes), 1000):
            conn.execute(table.update().where(table.c.id == bindparam("row_id")).values(
                path=bindparam("key")), changes[start:start + 1000])


def _v8(conn: Any) -> None:
    """Notifications: ``results.summary``, an SR's study-level finding. A plain nullable
    column, which SQLite adds in place. A database created at an earlier version by this
    code's models already has it."""
    if "summary" not in {c["name"] for c in inspect(conn).get_columns(Result.__tablename__)}:
        conn.exec_driver_sql(f"ALTER TABLE {Result.__tablename__} ADD COLUMN summary TEXT")


#: Numbered migrations; append, never edit. Each runs in its own transaction.
MIGRATIONS: list[tuple[int, Callable[[Any], None]]] = [(1, _v1), (2, _v2), (3, _v3), (4, _v4),
                                                       (5, _v5), (6, _v6), (7, _v7), (8, _v8)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _is_sqlite_memory(url: str) -> bool:
    database = make_url(url).database
    return not database or database == ":memory:" or "mode=memory" in url


def _enable_wal(cur: Any) -> None:
    """Switch a new database file to WAL. The switch needs an exclusive lock and SQLite
    answers "database is locked" at once, without its busy handler, when several
    processes open a new file together (node, workers and receivers at first start);
    retry within the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def make_engine(url: str) -> Engine:
    """An engine with the pragmas durability needs (SQLite) or a plain pool (PostgreSQL)."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and not _is_sqlite_memory(url):
            # `cxrd status` before the first `cxrd serve` finds an empty node, not an error.
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # An in-memory database lives as long as its one connection: every session must
        # share that connection (NullPool would hand each one a new, empty database).
        # A file keeps a pool of open connections: opening one per session (NullPool) cost
        # 2-4 ms each time (connect, pragmas, and a WAL checkpoint whenever the last
        # connection closed), which halved the receiver's rate on small images. Bursts
        # beyond the pool get extra connections, closed when returned (never a wait).
        pool: dict[str, Any] = ({"poolclass": StaticPool} if _is_sqlite_memory(url) else
                                {"poolclass": QueuePool, "pool_size": SQLITE_POOL_SIZE,
                                 "max_overflow": -1})
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            **pool,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy issue BEGIN itself (IMMEDIATE, see below); pysqlite's own
            # transaction handling would defer the write lock and deadlock writers.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            _enable_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # Take the write lock up front: read-then-write transactions cannot deadlock.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # psycopg 3 (the [postgres] extra), not SQLAlchemy's default psycopg2.
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            url = "postgresql+psycopg://" + url[len(plain):]
    return create_engine(url, pool_pre_ping=True, pool_size=5)


#: Serialises migrations of several nodes sharing one PostgreSQL database.
_PG_MIGRATION_LOCK = 0x63787264  # "cxrd"


def _lock_for_migration(conn: Any) -> None:
    # SQLite needs nothing: BEGIN IMMEDIATE already serialises the transaction.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})


def _current_version(conn: Any) -> int:
    return int(conn.execute(select(SchemaVersion.version).order_by(
        SchemaVersion.version.desc()).limit(1)).scalar() or 0)


def migrate(engine: Engine, folders: Folders | None = None) -> int:
    """Apply pending migrations; returns the schema version. ``folders``: the node's
    local ``spool`` and ``results`` folders, in which schema 7 recognises the absolute
    paths it turns into keys (``cxrd.store.local_folders``; ``_v7``).

    Safe when several processes or nodes start at once: each step re-reads the version
    inside its own locked transaction, so a step is applied exactly once.
    """
    with engine.begin() as conn:
        _lock_for_migration(conn)
        if not inspect(conn).has_table(SchemaVersion.__tablename__):
            SchemaVersion.__table__.create(conn)  # type: ignore[attr-defined]
    for version, step in MIGRATIONS:
        with engine.begin() as conn:
            _lock_for_migration(conn)
            if _current_version(conn) >= version:
                continue
            if step is _v7:
                _v7(conn, folders)
            else:
                step(conn)
            conn.execute(SchemaVersion.__table__.insert().values(  # type: ignore[attr-defined]
                version=version, applied_at=utcnow()))
    return SCHEMA_VERSION


#: SQLite's OperationalError also reports mistakes in a statement; only these mean that the
#: file cannot be used just now.
_SQLITE_UNAVAILABLE = ("locked", "busy", "disk i/o error", "unable to open",
                       "disk is full", "readonly database")


def unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) says the database cannot be reached or used
    just now: the server is down or restarting, the connection was terminated or refused,
    SQLite's file is locked or its disk fails. A reason to wait and try again, never to
    fail an image or a job."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, InterfaceError):
            return True
        if isinstance(exc, OperationalError):
            if not isinstance(exc.orig, sqlite3.Error):
                return True  # PostgreSQL: psycopg's OperationalError is about the connection
            return any(m in str(exc.orig).lower() for m in _SQLITE_UNAVAILABLE)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class Database:
    """Engine plus session factory; one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def migrate(self, folders: Folders | None = None) -> int:
        return migrate(self.engine, folders)

    def schema_version(self) -> int:
        """The schema version the database is at, without migrating it (0: none yet).
        ``cxrd worker`` compares it with ``SCHEMA_VERSION``: a worker node never migrates."""
        with self.engine.connect() as conn:
            if not inspect(conn).has_table(SchemaVersion.__tablename__):
                return 0
            return _current_version(conn)

    def ping(self) -> None:
        """One round trip (``SELECT 1``); raises what the database raises."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
