"""systemd's notify protocol (sd_notify(3)): one datagram per message to ``$NOTIFY_SOCKET``.

The protocol is small enough to speak directly: newline-separated ``KEY=VALUE`` pairs in a
single datagram on the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a leading ``@`` means the
abstract namespace). Without that variable (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """READY/STATUS/STOPPING/WATCHDOG messages, and the watchdog interval if one is set."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2  # ping twice per period
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False when not under systemd."""
        if not self.address:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(message)
        except OSError as exc:
            log.warning("action=sd-notify-failed error=%s", exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.notify(ready="1", status=status, mainpid=str(os.getpid()))

    def status(self, status: str) -> None:
        self.notify(status=status)

    def stopping(self, status: str = "draining") -> None:
        self.notify(stopping="1", status=status)

    def watchdog(self) -> None:
        """Ping if the interval has passed; call it from the loop that proves liveness."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.notify(watchdog="1")
