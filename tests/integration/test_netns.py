"""The separate hosts of the multi-node tests (``tests/netns.py``) against the real kernel:
a TCP relay carries bytes both ways and passes a half-close on; a namespace does not reach
this machine's loopback, reaches a service through its relay, and is deleted with its veth
pair and whatever still runs in it when its context ends by an exception. Where namespaces
are not available (not root, a container without the capabilities) the namespace tests
are skipped: the acceptance test then runs its nodes as processes, and says so.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from dicompeers import free_port
from netns import Hosts, Relay, isolated_host, netns_available, with_host

needs_netns = pytest.mark.skipif(not netns_available(),
                                 reason="no network namespaces here (root and ip netns)")


@pytest.fixture
def echo() -> Iterator[int]:
    """A loopback TCP server that answers each connection with what it read up to the
    client's half-close, upper-cased, then closes; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(data.upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    with contextlib.suppress(OSError):
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
    server.close()
    thread.join(5)


def exchange(address: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((address, port), timeout=10) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)  # the server answers only after our EOF
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_relay_carries_both_ways_and_passes_the_half_close_on(echo: int) -> None:
    port = free_port()
    relay = Relay(("127.0.0.1", port), ("127.0.0.1", echo))
    try:
        payload = b"select 1;" * 100_000  # more than one read's worth
        assert exchange("127.0.0.1", port, payload) == payload.upper()
        assert exchange("127.0.0.1", port, b"again") == b"AGAIN"
        assert relay.accepted == 2
    finally:
        relay.close()
    with pytest.raises(OSError):  # closed: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_with_host_keeps_user_database_and_port() -> None:
    assert with_host("postgresql://postgres@127.0.0.1:5432/cxrd_x", "10.77.1.1") == \
        "postgresql://postgres@10.77.1.1:5432/cxrd_x"
    assert with_host("http://127.0.0.1:38123", "10.77.1.1") == "http://10.77.1.1:38123"


def test_hosts_fall_back_to_processes_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRD_TEST_NETNS", "0")
    netns_available.cache_clear()
    try:
        hosts = Hosts()
        host = hosts.new("wk")
        assert hosts.mode == "processes" and host.prefix == [] and host.pids() == []
        assert host.reach("http://127.0.0.1:9000") == "http://127.0.0.1:9000"
        hosts.close()
    finally:
        netns_available.cache_clear()


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True,
                          check=False).returncode == 0


@needs_netns
def test_a_namespace_reaches_a_loopback_service_only_through_its_relay(echo: int) -> None:
    with isolated_host("wk") as host:
        url = host.reach(f"http://127.0.0.1:{echo}/x")
        assert url == f"http://{host.address}:{echo}/x"
        assert not host.can_connect("127.0.0.1", echo)  # its own loopback: nothing there
        assert host.can_connect(host.address, echo)
        assert host.relays[echo].accepted == 1
        probe = ("import socket\n"
                 f"c = socket.create_connection(({host.address!r}, {echo}), timeout=10)\n"
                 "c.sendall(b'over the link'); c.shutdown(socket.SHUT_WR)\n"
                 "print(c.recv(100).decode())\n")
        done = subprocess.run([*host.prefix, sys.executable, "-c", probe], capture_output=True,
                              text=True, timeout=30, check=True)
        assert done.stdout.strip() == "OVER THE LINK"


@needs_netns
def test_a_namespace_is_deleted_with_its_link_and_processes_even_on_failure() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), \
            isolated_host("wk") as host:
        sleeper = subprocess.Popen([*host.prefix, "sleep", "600"], start_new_session=True)
        deadline = time.monotonic() + 10
        while sleeper.pid not in host.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.pids() == [sleeper.pid]  # ip exec'd sleep: the pid is the sleeper's
        assert host.namespace in namespaces()
        outside = f"cxh{host.namespace.removeprefix('cxrd-')}"
        assert link_exists(outside)
        raise RuntimeError("the test failed")
    assert sleeper.wait(10) == -9
    assert host.namespace not in namespaces()
    assert not link_exists(outside)
