"""Separate hosts on one machine for the multi-node tests: Linux network namespaces.

A node started in a network namespace of its own (``ip netns exec``) sees only its own
loopback and one veth link to this (the root) namespace, as a host on a network would:
PostgreSQL, which listens on 127.0.0.1 only, and moto's S3 server are not reachable at
127.0.0.1 there. ``Host.reach(url)`` gives such a node the address of a TCP relay on the
host side of its veth (``Relay``, a thread of the test process) that forwards to the
service's loopback port, so what the node reaches, it reaches over the link. The file
system is not separated (the namespace has its own mount table, a copy of this one): a
folder shared between the nodes models a shared mount, as NFS would be.

Namespaces need root and ``ip netns add`` (``netns_available``); where they are not
available (an unprivileged container), ``Hosts`` gives every node this machine's own
namespace instead, separate processes only, and says which mode it uses (``Hosts.mode``).
``CXRD_TEST_NETNS=0`` in the environment asks for that fallback on any machine.

Every namespace is named ``cxrd-<hex>`` and deleted with its veth pair when its context
ends, even when the test fails; processes still running in it are killed first (a
namespace lives on, unnamed, while a process holds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

#: The /30 networks of the veth pairs are drawn from 10.77.0.0/16.
NETWORK_PREFIX = "10.77"
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; a failure raises with ip's own message when ``check``."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@functools.cache
def netns_available() -> bool:
    """True where this process may make network namespaces: root, iproute2, and a probe
    namespace with a veth pair can be added and deleted (a container without
    CAP_SYS_ADMIN/CAP_NET_ADMIN refuses). ``CXRD_TEST_NETNS=0`` says False."""
    if os.environ.get("CXRD_TEST_NETNS") == "0":
        return False
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    try:
        with isolated_host():
            return True
    except (RuntimeError, OSError, subprocess.SubprocessError):
        return False


# -------------------------------------------------------------------------------- relay


class Relay:
    """A TCP relay: every connection accepted on ``listen`` is piped to ``target``, both
    ways, until either side closes. One asyncio loop in a thread of its own; ``accepted``
    counts the connections (a test shows with it that a node really came through)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self.accepted = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"relay-{listen[0]}:{listen[1]}")
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(self._serve, *listen), self._loop).result(10)
        except BaseException:
            self._stop_loop()
            raise

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the service is down: the client sees the connection close
            try:
                await asyncio.gather(self._pipe(reader, up_writer, writer),
                                     self._pipe(up_reader, writer, up_writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    other: asyncio.StreamWriter) -> None:
        """Copy until EOF, then half-close; a reset closes both sides at once."""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.close()
            other.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# -------------------------------------------------------------------------------- hosts


def loopback_port(url: str) -> int | None:
    """The port of a URL that names this machine's loopback (None for any other)."""
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK_NAMES or parts.port is None:
        return None
    return parts.port


def with_host(url: str, address: str) -> str:
    """``url`` with its host replaced by ``address`` (user and port kept)."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user + '@' if user else ''}{address}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Host:
    """Where one node runs. ``prefix`` goes before its command line; ``reach(url)`` is the
    URL under which it reaches a service this process's host serves on loopback.

    In this machine's own namespace (``namespace`` empty) both are the identity."""

    name: str
    namespace: str = ""
    address: str = "127.0.0.1"  # this host's side of the link: where the relays listen
    peer_address: str = ""  # the namespace's side
    relays: dict[int, Relay] = field(default_factory=dict)

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    def reach(self, url: str) -> str:
        """``url`` as the node sees it: a loopback URL becomes the host-side address of
        the veth, where a relay forwards to the loopback port (one relay per port)."""
        port = loopback_port(url)
        if not self.namespace or port is None:
            return url
        if port not in self.relays:
            self.relays[port] = Relay((self.address, port), ("127.0.0.1", port))
        return with_host(url, self.address)

    def can_connect(self, address: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a TCP connection from inside this host to ``address:port`` succeeds
        (a Python process started with ``prefix``)."""
        probe = ("import socket,sys\n"
                 "try:\n"
                 f"    socket.create_connection(({address!r}, {port}), timeout={timeout}).close()\n"
                 "except OSError:\n"
                 "    sys.exit(1)\n")
        done = subprocess.run([*self.prefix, sys.executable, "-c", probe], capture_output=True,
                              timeout=timeout + 30, check=False)
        return done.returncode == 0

    def pids(self) -> list[int]:
        """The processes in this host's namespace (none outside one)."""
        if not self.namespace:
            return []
        out = ip("netns", "pids", self.namespace, check=False).stdout
        return sorted(int(p) for p in out.split())


def _free_network() -> str:
    """``10.77.A.B`` (B a multiple of 4): a /30 no route of this machine uses."""
    routes = ip("-4", "route", "show", "table", "all").stdout
    for _ in range(100):
        net = f"{NETWORK_PREFIX}.{random.randrange(256)}.{4 * random.randrange(64)}"
        if f"{net}/30" not in routes:
            return net
    raise RuntimeError(f"no free /30 in {NETWORK_PREFIX}.0.0/16")


@contextlib.contextmanager
def isolated_host(name: str = "probe") -> Iterator[Host]:
    """A network namespace ``cxrd-<hex>`` joined to this one by a veth pair, a /30 on it
    (this side ``.1``, the namespace ``.2``), both ends and the namespace's loopback up.
    On exit processes left in the namespace are killed, the relays stop, and the
    namespace and the host end of the pair are deleted, whatever happened inside."""
    tag = uuid.uuid4().hex[:8]
    namespace, outside, inside = f"cxrd-{tag}", f"cxh{tag}", f"cxn{tag}"
    net = _free_network().rsplit(".", 1)
    address, peer = f"{net[0]}.{int(net[1]) + 1}", f"{net[0]}.{int(net[1]) + 2}"
    host = Host(name, namespace, address, peer)
    try:
        ip("netns", "add", namespace)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", namespace)
        ip("addr", "add", f"{address}/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("-n", namespace, "addr", "add", f"{peer}/30", "dev", inside)
        ip("-n", namespace, "link", "set", inside, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        yield host
    finally:
        _kill_all(host)
        for relay in host.relays.values():
            relay.close()
        ip("netns", "delete", namespace, check=False)
        ip("link", "delete", outside, check=False)  # gone with the namespace, normally


def _kill_all(host: Host) -> None:
    """SIGKILL what still runs in the namespace (started by this test) and wait for it."""
    deadline = time.monotonic() + 10
    while (pids := host.pids()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.1)


class Hosts:
    """The hosts of one test's nodes: each ``new`` one a network namespace of its own
    where ``netns_available()``, else this machine's namespace (``mode`` says which:
    ``"netns"`` or ``"processes"``). ``close`` deletes every namespace made."""

    def __init__(self) -> None:
        self.mode = "netns" if netns_available() else "processes"
        self._stack = contextlib.ExitStack()

    def new(self, name: str) -> Host:
        if self.mode == "processes":
            return Host(name)
        return self._stack.enter_context(isolated_host(name))

    def close(self) -> None:
        self._stack.close()
