"""cxrd.db: engines, pragmas and migrations."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text

from cxrd.db import SCHEMA_VERSION, Database, SchemaVersion, Study, make_engine


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
        assert s.scalars(select(SchemaVersion.version)).all() == [SCHEMA_VERSION]
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
        assert s.scalars(select(SchemaVersion.version)).all() == [SCHEMA_VERSION]
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
