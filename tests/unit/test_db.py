"""cxrd.db: engines, pragmas and migrations."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from cxrd.db import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Database,
    Delivery,
    Job,
    SchemaVersion,
    Study,
    make_engine,
)


def test_in_memory_database_is_one_database_across_sessions():
    db = Database("sqlite://")
    db.migrate()
    with db.session() as s:
        s.add(Study(study_instance_uid="1.2.3"))
    with db.session() as s:
        assert s.scalars(select(Study.study_instance_uid)).all() == ["1.2.3"]
    db.dispose()


def test_sqlite_file_runs_in_wal_mode_with_full_sync_and_busy_timeout(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'x.sqlite'}")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    db.dispose()


def test_migrate_is_idempotent(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'x.sqlite'}")
    assert db.migrate() == SCHEMA_VERSION
    assert db.migrate() == SCHEMA_VERSION
    with db.session() as s:
        assert s.scalars(select(SchemaVersion.version)).all() == [v for v, _ in MIGRATIONS]
    db.dispose()


def test_concurrent_migrations_apply_each_step_once(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.sqlite'}"
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        db = Database(url)
        barrier.wait()
        try:
            db.migrate()
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    db = Database(url)
    with db.session() as s:
        assert s.scalars(select(SchemaVersion.version)).all() == [v for v, _ in MIGRATIONS]
    db.dispose()


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "postgres://u@h/db"])
def test_postgres_urls_use_psycopg3(url: str):
    pytest.importorskip("psycopg")
    engine = make_engine(url)
    assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"


def test_session_rolls_back_on_error(memdb: Database):
    with pytest.raises(RuntimeError), memdb.session() as s:
        s.add(Study(study_instance_uid="9.9"))
        s.flush()
        raise RuntimeError
    with memdb.session() as s:
        assert s.execute(text("SELECT count(*) FROM studies")).scalar() == 0


_JOBS_V1 = """CREATE TABLE jobs (
    id INTEGER NOT NULL PRIMARY KEY, instance_id INTEGER NOT NULL REFERENCES instances (id),
    study_instance_uid VARCHAR(64) NOT NULL, generation INTEGER NOT NULL,
    state VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, not_before DATETIME NOT NULL,
    lease_owner VARCHAR(128), lease_expires DATETIME, created_at DATETIME NOT NULL,
    finished_at DATETIME, error TEXT, reason VARCHAR(32), probs TEXT, cam TEXT,
    model_device_uid VARCHAR(64), timings TEXT)"""


def test_schema_1_jobs_are_migrated_to_report_jobs(tmp_path: Path):
    """A database written by schema 1 (jobs.instance_id NOT NULL, no kind) keeps its jobs
    and can hold report jobs after migrating."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    db.dispose()
    conn = sqlite3.connect(path)
    conn.executescript(f"""
        DROP TABLE jobs; {_JOBS_V1};
        CREATE INDEX ix_jobs_claim ON jobs (state, not_before);
        CREATE INDEX ix_jobs_instance_id ON jobs (instance_id);
        DELETE FROM schema_version WHERE version > 1;
        INSERT INTO instances (id, sop_instance_uid, study_instance_uid, series_instance_uid,
            sop_class_uid, transfer_syntax_uid, modality, body_part, view_position,
            presentation_intent, photometric, has_pixels, frames, path, sha256, size, source,
            received_at, state)
            VALUES (1, '1.2.3', '1.2', '1.2.4', '1.2.840.10008.5.1.4.1.1.1', '', 'CR', '',
            '', '', '', 1, 1, '/x', '0', 1, 't', '2026-01-01 00:00:00', 'done');
        INSERT INTO jobs VALUES (7, 1, '1.2', 1, 'done', 1, '2026-01-01 00:00:00', NULL, NULL,
            '2026-01-01 00:00:00', NULL, NULL, NULL, '[0.1, 0.2, 0.7]', '[]', '1.9', '{{}}');
    """)
    conn.commit()
    conn.close()
    db = Database(f"sqlite:///{path}")
    assert db.migrate() == SCHEMA_VERSION
    with db.session() as s:
        job = s.get(Job, 7)
        assert job is not None
        assert (job.kind, job.instance_id, job.probs) == ("classify", 1, "[0.1, 0.2, 0.7]")
        s.add(Job(kind="report", instance_id=None, study_instance_uid="1.2", generation=1,
                  state="pending"))
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(Job(kind="report", instance_id=None, study_instance_uid="1.2", generation=1,
                  state="pending"))
    db.dispose()


def test_v5_adds_the_delivery_lease_columns_in_place(tmp_path: Path):
    """A version 4 SQLite database (deliveries without lease columns) gains them, its rows
    kept."""
    import sqlite3

    path = tmp_path / "v4.sqlite"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    db.dispose()
    conn = sqlite3.connect(path)
    conn.executescript("""
        ALTER TABLE deliveries DROP COLUMN lease_owner;
        ALTER TABLE deliveries DROP COLUMN lease_expires;
        DELETE FROM schema_version WHERE version >= 5;
        INSERT INTO results (id, sop_instance_uid, study_instance_uid, kind, generation, path,
            created_at) VALUES (1, '1.2.3', '1.2', 'sc', 1, '/r', '2026-01-01 00:00:00');
        INSERT INTO deliveries (id, result_id, destination, state, attempts, created_at,
            next_attempt_at) VALUES (3, 1, 'pacs', 'pending', 0, '2026-01-01 00:00:00',
            '2026-01-01 00:00:00');
    """)
    conn.commit()
    conn.close()
    db = Database(f"sqlite:///{path}")
    assert db.migrate() == SCHEMA_VERSION
    with db.session() as s:
        row = s.get(Delivery, 3)
        assert row is not None
        assert (row.destination, row.lease_owner, row.lease_expires) == ("pacs", None, None)
    db.dispose()


def test_unavailable_tells_an_outage_from_a_mistake(tmp_path):
    """What makes a worker wait (the database cannot be used just now) and what must not
    (a statement that is wrong), from real errors."""
    import socket
    import sqlite3

    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    from cxrd.db import Database, unavailable

    path = tmp_path / "x.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (a)")
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    with pytest.raises(OperationalError) as locked, engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    assert unavailable(locked.value)
    with pytest.raises(OperationalError) as mistake, engine.connect() as conn:
        conn.exec_driver_sql("SELECT * FROM no_such_table")
    assert not unavailable(mistake.value)
    assert not unavailable(ValueError("no"))
    try:
        raise RuntimeError("while completing a job") from locked.value
    except RuntimeError as wrapped:
        assert unavailable(wrapped)
    holder.close()
    engine.dispose()

    # a PostgreSQL server that is not there (nothing listens on the port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pg = Database(f"postgresql://postgres@127.0.0.1:{port}/cxrd?connect_timeout=2")
    with pytest.raises(OperationalError) as refused:
        pg.ping()
    assert unavailable(refused.value)
    pg.dispose()
