"""cxrd.durable: whole files or none, new folders fsynced into their parents."""

from __future__ import annotations

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
