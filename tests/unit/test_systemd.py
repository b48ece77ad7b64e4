"""sd_notify over a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from cxrd.systemd import Notifier


def _listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    return s


def test_ready_status_stopping(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with _listen(path) as server:
        n = Notifier({"NOTIFY_SOCKET": path})
        assert n.enabled
        n.ready("queue depth 0")
        msg = server.recv(4096).decode().split("\n")
        assert "READY=1" in msg and "STATUS=queue depth 0" in msg
        assert f"MAINPID={os.getpid()}" in msg
        n.status("queue depth 3")
        assert server.recv(4096) == b"STATUS=queue depth 3"
        n.stopping()
        assert server.recv(4096).decode().startswith("STOPPING=1")


def test_abstract_socket() -> None:
    name = f"cxrd-test-{os.getpid()}-{time.monotonic_ns()}"
    with _listen("\0" + name) as server:
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("x")
        assert server.recv(4096) == b"STATUS=x"


def test_watchdog_interval_and_rate(tmp_path: Path) -> None:
    path = str(tmp_path / "wd.sock")
    with _listen(path) as server:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000",
                      "WATCHDOG_PID": str(os.getpid())})
        assert n.watchdog_interval == 0.1  # half of WatchdogSec
        n.watchdog()
        n.watchdog()  # too soon: not sent
        time.sleep(0.12)
        n.watchdog()
        server.settimeout(0.5)
        got = [server.recv(64), server.recv(64)]
        assert got == [b"WATCHDOG=1", b"WATCHDOG=1"]
        try:
            extra = server.recv(64)
        except TimeoutError:
            extra = b""
        assert extra == b""
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is meant for another process


def test_not_under_systemd_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and n.notify(ready="1") is False
    n.watchdog()
