"""cxrd.watch with a real watchdog observer (inotify) on temporary folders and a real
SQLite file: slow writers, files present at start, ignored names, nested folders."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dicomfactory import make_dataset, part10_bytes, write
from sqlalchemy import func, select

from cxrd.db import Database, Instance, Rejection
from cxrd.ingest import Ingestor
from cxrd.watch import MIN_SETTLE_WITH_EVENTS, FolderWatcher

SETTLE = 0.2


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def spool_files(spool: Path) -> list[Path]:
    return sorted(p for p in spool.rglob("*.dcm")) if spool.exists() else []


@pytest.fixture
def watcher(ingestor: Ingestor, dirs) -> Iterator[FolderWatcher]:
    w = FolderWatcher(ingestor, [dirs.incoming], SETTLE)
    yield w
    w.stop()


def test_slow_writer_is_not_read_before_it_closes_the_file(watcher, ingestor, dirs):
    data = part10_bytes(make_dataset("CR", rows=128, columns=128))
    half = len(data) // 2
    watcher.start()
    target = dirs.incoming / "slow.dcm"
    with open(target, "wb") as fh:  # one open, no close until the end: no close event
        fh.write(data[:half])
        fh.flush()
        os.fsync(fh.fileno())
        # far past the settle time (and the floor on it while events flow), file still open
        time.sleep(max(SETTLE, MIN_SETTLE_WITH_EVENTS) + 0.8)
        assert target.exists(), "a half-written file was taken"
        assert count(ingestor.db, Instance) == 0
        assert count(ingestor.db, Rejection) == 0
        fh.write(data[half:])
    assert wait_for(lambda: count(ingestor.db, Instance) == 1)
    (spooled,) = spool_files(dirs.spool)
    assert spooled.read_bytes() == data
    assert not target.exists()
    assert count(ingestor.db, Rejection) == 0


def test_write_then_rename_is_picked_up_at_once(watcher, ingestor, dirs):
    data = part10_bytes(make_dataset("DX"))
    watcher.start()
    part = write(dirs.incoming / "img.dcm.part", data)
    time.sleep(SETTLE * 3)
    assert count(ingestor.db, Instance) == 0  # *.part is someone's work in progress
    os.rename(part, dirs.incoming / "img.dcm")
    assert wait_for(lambda: count(ingestor.db, Instance) == 1, timeout=5)
    assert spool_files(dirs.spool)[0].read_bytes() == data


def test_file_renamed_in_from_outside_is_taken_without_the_settle_wait(ingestor, dirs):
    """A file renamed into the folder from elsewhere on the file system is whole: taken at
    once, not after the settle time (here far longer than the wait allowed)."""
    w = FolderWatcher(ingestor, [dirs.incoming], 30.0)
    data = part10_bytes(make_dataset("CR"))
    staged = write(dirs.incoming.parent / "staged.dcm", data)  # outside the watched folder
    w.start()
    try:
        os.rename(staged, dirs.incoming / "img.dcm")
        assert wait_for(lambda: count(ingestor.db, Instance) == 1, timeout=5)
        (spooled,) = spool_files(dirs.spool)
        assert spooled.read_bytes() == data
    finally:
        w.stop()


def test_files_present_before_start_are_ingested(ingestor, dirs):
    payloads = [part10_bytes(make_dataset("CR", seed=i)) for i in range(3)]
    for i, data in enumerate(payloads):
        write(dirs.incoming / f"early-{i}.dcm", data)
    w = FolderWatcher(ingestor, [dirs.incoming], SETTLE)
    w.start()
    try:
        assert wait_for(lambda: count(ingestor.db, Instance) == 3)
    finally:
        w.stop()
    assert sorted(p.read_bytes() for p in spool_files(dirs.spool)) == sorted(payloads)
    assert list(dirs.incoming.iterdir()) == []


def test_dotfiles_partials_and_dot_folders_are_left_alone_nested_folders_are_not(
        watcher, ingestor, dirs):
    data = [part10_bytes(make_dataset("CR", seed=i)) for i in range(7)]
    ignored = [
        write(dirs.incoming / ".hidden.dcm", data[0]),
        write(dirs.incoming / "copying.part", data[1]),
        write(dirs.incoming / "x.dcm.tmp", data[2]),
        write(dirs.incoming / ".staging" / "inside.dcm", data[3]),
    ]
    nested = [
        write(dirs.incoming / "a" / "b" / "c" / "deep.dcm", data[4]),
        write(dirs.incoming / "site 1" / "img", data[5]),
    ]
    watcher.start()
    late_nested = write(dirs.incoming / "new" / "folder" / "late.dcm", data[6])
    assert wait_for(lambda: count(ingestor.db, Instance) == 3)
    time.sleep(SETTLE * 3)
    assert count(ingestor.db, Instance) == 3
    assert all(p.exists() for p in ignored)
    assert not any(p.exists() for p in [*nested, late_nested])
    assert count(ingestor.db, Rejection) == 0


def test_bad_file_is_rejected_while_watching(watcher, ingestor, dirs):
    watcher.start()
    write(dirs.incoming / "readme.txt", b"hello")
    assert wait_for(lambda: count(ingestor.db, Rejection) == 1)
    with ingestor.db.session() as s:
        (row,) = s.scalars(select(Rejection)).all()
        assert row.moved_to and Path(row.moved_to).exists()
    assert not (dirs.incoming / "readme.txt").exists()


def test_watching_the_data_folder_itself_never_reads_spool_or_rejected(db, dirs):
    """With data_dir watched as a whole, the spool, rejected/, the SQLite file (the db
    fixture keeps it in the same tmp folder) and the results folder live inside it."""
    ingestor = Ingestor(db, dirs.root / "spool", dirs.root / "rejected")
    results = dirs.root / "results"
    w = FolderWatcher(ingestor, [dirs.root], 0, exclude=[results])
    write(dirs.incoming / "ok.dcm", part10_bytes(make_dataset("CR")))
    write(dirs.incoming / "bad.txt", b"nope")
    result = write(results / "sr.dcm", b"a result file")
    database_files = sorted(dirs.root.glob("cxrd.sqlite*"))
    assert database_files
    for _ in range(3):
        w.scan()
        w.run_once()
    assert count(db, Instance) == 1
    assert count(db, Rejection) == 1  # rejected once, not re-read from rejected/
    assert len(spool_files(dirs.root / "spool")) == 1
    assert result.exists()
    assert all(p.exists() for p in database_files)


def test_storage_failure_is_retried_later_not_in_a_tight_loop(ingestor, dirs, monkeypatch):
    from cxrd import durable
    from cxrd import watch as watch_mod

    calls = []

    def failing(path: Path, data: bytes | Path) -> Path:
        calls.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "write_temp", failing)
    monkeypatch.setattr(durable, "link_temp", failing)
    monkeypatch.setattr(watch_mod, "RETRY_SECONDS", 0.5)
    src = write(dirs.incoming / "x.dcm", part10_bytes(make_dataset("CR")))
    w = FolderWatcher(ingestor, [dirs.incoming], 0)
    w.scan()
    w.run_once()
    for _ in range(5):  # rescans within the retry delay do not try again
        w.scan()
        w.run_once()
    assert len(calls) == 1 and src.exists()
    monkeypatch.undo()
    time.sleep(0.6)
    w.scan()
    w.run_once()
    assert count(ingestor.db, Instance) == 1 and not src.exists()


def test_settle_rule_restarts_the_clock_on_each_change(ingestor, dirs):
    """Without events (a network file system), a file is taken once its size and mtime
    have stood still for settle_seconds."""
    w = FolderWatcher(ingestor, [dirs.incoming], 0.3)
    data = part10_bytes(make_dataset("CR"))
    path = write(dirs.incoming / "nfs.dcm", data[:100])
    w.scan()
    assert w.run_once() == 0
    time.sleep(0.2)
    with open(path, "ab") as fh:
        fh.write(data[100:])
    w.scan()
    assert w.run_once() == 0  # changed: the clock restarts
    time.sleep(0.2)
    w.scan()
    assert w.run_once() == 0  # 0.2 s quiet < 0.3 s
    time.sleep(0.15)
    w.scan()
    assert w.run_once() == 1
    assert spool_files(dirs.spool)[0].read_bytes() == data


def test_below_min_free_mb_watched_files_wait_untouched_and_go_once_space_is_back(
        db, tmp_path, tmpfs):
    """[storage] min_free_mb on a real tmpfs: while free space is below it, a watched
    file is neither read nor moved nor recorded; once space is back it is ingested."""
    from diskhelpers import fill

    from cxrd.space import FreeSpace

    data = tmpfs(tmp_path / "data", 16)
    incoming = data / "incoming"
    incoming.mkdir()
    space = FreeSpace([data / "spool"], 4, cache_seconds=0)
    ing = Ingestor(db, data / "spool", data / "rejected", space=space)
    src = write(incoming / "x.dcm", part10_bytes(make_dataset("CR")))
    before = os.stat(src)
    filler = fill(data, 1024 * 1024)
    w = FolderWatcher(ing, [incoming], 0)
    for _ in range(3):
        w.scan()
        w.run_once()
    after = os.stat(src)
    assert (after.st_ino, after.st_size, after.st_mtime_ns, after.st_nlink) == (
        before.st_ino, before.st_size, before.st_mtime_ns, before.st_nlink)
    assert count(db, Instance) == 0 and count(db, Rejection) == 0
    assert not (data / "rejected").exists() and spool_files(data / "spool") == []
    # A direct ingest_file (a file already settled when space ran out) leaves it too.
    outcome = ing.ingest_file(src, "watch:test")
    assert not outcome.accepted and outcome.reason == "disk-low" and src.exists()
    assert count(db, Rejection) == 0
    filler.unlink()
    w.scan()
    w.run_once()
    assert count(db, Instance) == 1 and not src.exists() and len(spool_files(data / "spool")) == 1
