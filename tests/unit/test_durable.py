"""cxrd.durable: whole files or none, new folders fsynced into their parents."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import BinaryIO

import pytest

from cxrd import durable


def test_write_file_syncs_new_folders_and_the_rename(tmp_path: Path, monkeypatch) -> None:
    synced: list[Path] = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (synced.append(p), real(p)))
    target = tmp_path / "a" / "b" / "x.dcm"
    durable.write_file(target, b"one")
    durable.write_file(target, lambda fh: fh.write(b"two"))
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]
    # each new folder once into its parent; the target's folder once per rename
    assert synced.count(tmp_path) == 1 and synced.count(tmp_path / "a") == 1
    assert synced.count(target.parent) == 2


def test_temp_file_names_carry_the_writer(tmp_path: Path) -> None:
    tmp = durable.write_temp(tmp_path / "1.2.3.dcm", b"x")
    assert tmp.parent == tmp_path and tmp.name.startswith(".1.2.3.dcm.")
    assert tmp.name.endswith(".tmp") and tmp.name.split(".")[-3] == str(os.getpid())
    assert durable.temp_path(tmp_path / "y") != durable.temp_path(tmp_path / "y")


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def fail(fh: BinaryIO) -> None:
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        durable.write_file(tmp_path / "x.dcm", fail)
    assert list(tmp_path.iterdir()) == []


def _writes(monkeypatch) -> list[tuple[int, bool]]:
    """Record each os.write of cxrd.durable: its length, and whether O_DIRECT was on."""
    seen: list[tuple[int, bool]] = []
    real = os.write

    def write(fd: int, data) -> int:
        seen.append((len(data), bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        return real(fd, data)

    monkeypatch.setattr(durable.os, "write", write)
    return seen


def test_a_large_file_goes_past_the_page_cache_and_stays_whole(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """A megabyte or more: the aligned bulk with O_DIRECT a chunk at a time, the last
    partial block through the page cache; every byte where it belongs, fsynced."""
    data = os.urandom(2 * durable.DIRECT_CHUNK + 5000)
    seen = _writes(monkeypatch)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "big.dcm"
    durable.write_file(target, data)
    assert target.read_bytes() == data
    assert seen == [(durable.DIRECT_CHUNK, True), (durable.DIRECT_CHUNK, True),
                    (4096, True), (5000 - 4096, False)]
    assert synced  # the file (O_DIRECT leaves the device's cache unflushed)
    small = tmp_path / "small.dcm"
    seen.clear()
    durable.write_file(small, data[:durable.DIRECT_CHUNK - 1])
    assert small.read_bytes() == data[:durable.DIRECT_CHUNK - 1]
    assert not any(direct for _, direct in seen)


def test_where_o_direct_is_refused_the_bytes_go_through_the_page_cache(
        tmp_path: Path, monkeypatch) -> None:
    data = os.urandom(durable.DIRECT_CHUNK * 3 + 1)
    real_fcntl = fcntl.fcntl

    def no_direct(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(durable.fcntl, "fcntl", no_direct)
    durable.write_file(tmp_path / "a.dcm", data)
    assert (tmp_path / "a.dcm").read_bytes() == data
    monkeypatch.setattr(durable.fcntl, "fcntl", real_fcntl)

    # a device that takes O_DIRECT but not this alignment: EINVAL at the first write
    seen = _writes(monkeypatch)
    real_write = durable.os.write

    def refuse_direct(fd: int, view) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, view)

    monkeypatch.setattr(durable.os, "write", refuse_direct)
    durable.write_file(tmp_path / "b.dcm", data)
    assert (tmp_path / "b.dcm").read_bytes() == data
    assert [direct for _, direct in seen] == [False]  # the whole file, buffered


def test_a_failed_direct_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    real_write = os.write
    calls: list[int] = []

    def full(fd: int, view) -> int:
        calls.append(len(view))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, view)

    monkeypatch.setattr(durable.os, "write", full)
    with pytest.raises(OSError) as caught:
        durable.write_file(tmp_path / "x.dcm", os.urandom(3 * durable.DIRECT_CHUNK))
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_folder_removed_after_use_is_made_again(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    durable.write_file(folder / "a.dcm", b"a")
    (folder / "a.dcm").unlink()
    folder.rmdir()  # an operator's clean-up while the node runs
    durable.write_file(folder / "b.dcm", b"b")
    assert (folder / "b.dcm").read_bytes() == b"b"


def test_pid_alive() -> None:
    assert durable.pid_alive(os.getpid())
    assert durable.pid_alive(1)  # someone else's (PermissionError) or ours: alive


def test_a_zombie_is_not_alive() -> None:
    """An exited child not yet reaped still answers kill(pid, 0); it writes no more, so its
    temp files and leases are stale (a killed node's workers can linger so)."""
    import subprocess
    import time

    child = subprocess.Popen(["true"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        os.kill(child.pid, 0)  # the kernel still has it
        assert not durable.pid_alive(child.pid)
    finally:
        child.wait()
    assert not durable.pid_alive(child.pid)
