"""cxrd.space on real tmpfs mounts: the [storage] min_free_mb check (threshold, cache,
several file systems) and which errors mean "a resource is missing"."""

from __future__ import annotations

import errno
import socket
import sqlite3

import pytest
from diskhelpers import fill
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from cxrd.durable import write_file
from cxrd.space import MB, FreeSpace, is_disk_full, is_resource_error, look


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_low_below_the_threshold_cached_and_back_by_itself(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", 16)
    clock = Clock()
    space = FreeSpace([disk / "spool", disk / "results"], 4, clock=clock)  # not made yet
    assert space.low() is None
    filler = fill(disk, 2 * MB)
    assert space.low() is None  # the look of a moment ago is reused (cheap on every store)
    clock.now += 1.5
    reason = space.low()
    assert reason is not None and "disk-low" in reason and "min_free_mb is 4" in reason
    assert str(disk / "spool") in reason
    filler.unlink()
    assert space.low() is not None  # still cached
    clock.now += 1.5
    assert space.low() is None  # recovered without anyone doing anything else


def test_the_results_file_system_counts_when_it_is_another_one(tmp_path, tmpfs):
    spool, results = tmpfs(tmp_path / "spool", 16), tmpfs(tmp_path / "results", 16)
    fill(results, 1 * MB)
    space = FreeSpace([spool, results], 4, cache_seconds=0)
    reason = space.low()
    assert reason is not None and str(results) in reason
    assert [fs.path for fs in space.filesystems()] == [spool, results]


def test_one_file_system_is_looked_at_once(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", 16)
    (disk / "spool").mkdir()
    found = look([disk / "spool", disk / "results", disk])
    assert len(found) == 1 and found[0].path == disk / "spool"
    assert 15 * MB <= found[0].free_bytes <= 16 * MB and found[0].total_bytes == 16 * MB


def test_zero_turns_the_check_off(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", 8)
    fill(disk, 0)
    assert FreeSpace([disk], 0, cache_seconds=0).low() is None
    assert FreeSpace([disk], 1, cache_seconds=0).low() is not None


def test_a_write_onto_a_full_disk_is_a_resource_error(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", 4)
    fill(disk, 0)
    with pytest.raises(OSError) as caught:
        write_file(disk / "results" / "sc.dcm", b"x" * (1 * MB))
    assert caught.value.errno == errno.ENOSPC
    assert is_disk_full(caught.value) and is_resource_error(caught.value)
    wrapped = RuntimeError("while writing the SC")
    wrapped.__cause__ = caught.value
    assert is_resource_error(wrapped)


def test_a_full_sqlite_database_is_a_resource_error_a_bad_query_is_not(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", 4)
    engine = create_engine(f"sqlite:///{disk / 'db.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (v BLOB)"))
    fill(disk, 0)
    with pytest.raises(OperationalError) as full, engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (:v)"), {"v": b"x" * (2 * MB)})
    assert isinstance(full.value.orig, sqlite3.OperationalError)
    assert is_resource_error(full.value)
    with pytest.raises(OperationalError) as bad, engine.connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert not is_resource_error(bad.value)
    engine.dispose()


def test_an_unreachable_postgresql_is_a_resource_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens on it
    engine = create_engine(f"postgresql+psycopg://cxrd@127.0.0.1:{port}/cxrd",
                           connect_args={"connect_timeout": 2})
    with pytest.raises(OperationalError) as caught:
        engine.connect()
    assert is_resource_error(caught.value)
    engine.dispose()


def test_other_errors_are_not_resource_errors():
    assert not is_resource_error(ValueError("bad pixel data"))
    assert not is_resource_error(OSError(errno.EIO, "I/O error"))
    assert not is_resource_error(FileNotFoundError(errno.ENOENT, "gone"))
