"""Real notification peers on loopback, each in a thread of the test process: an HTTP
server that takes webhook POSTs, and an MLLP listener (a plain socket server framing
``<VT>message<FS><CR>`` itself, not with the library cxrd sends with) that parses each
message with the ``hl7`` package and answers an ACK, or drops the connection, as the test
scripts it."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
from dicompeers import free_port

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"


class HookServer:
    """Takes ``POST`` requests and answers the HTTP statuses of ``statuses`` in turn (the
    last one from then on); records each request's headers and JSON body."""

    def __init__(self, statuses: Sequence[int] = (200,)) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with server.lock:
                    server.requests.append((dict(self.headers), json.loads(body)))
                    n = len(server.requests)
                status = server.statuses[min(n, len(server.statuses)) - 1]
                data = b'{"ok": true}' if status < 300 else b"refused by the test server"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/cxrd"

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [body for _, body in self.requests]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class MllpServer:
    """An HL7 v2 receiver over MLLP: for the n-th message it receives it does ``script``'s
    n-th action (the last one from then on): an ACK code ("AA", "AE", "AR") answered with
    the message's own ``create_ack``, or "drop" (close the connection without an answer).
    ``received`` holds every message parsed, ``accepted`` those answered AA."""

    def __init__(self, script: Sequence[str] = ("AA",)) -> None:
        self.script = list(script)
        self.received: list[hl7.Message] = []
        self.accepted: list[hl7.Message] = []
        self.connections = 0
        self.lock = threading.Lock()
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with server.lock:
                    server.connections += 1
                buffer = b""
                while True:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    while END_BLOCK in buffer:
                        block, buffer = buffer.split(END_BLOCK, 1)
                        assert block.startswith(START_BLOCK), block[:20]
                        message = hl7.parse(block[1:].decode("utf-8"))
                        with server.lock:
                            server.received.append(message)
                            n = len(server.received)
                        action = server.script[min(n, len(server.script)) - 1]
                        if action == "drop":
                            return
                        if action == "AA":
                            with server.lock:
                                server.accepted.append(message)
                        ack = message.create_ack(action, application="RIS")
                        self.request.sendall(START_BLOCK + str(ack).encode("utf-8")
                                             + END_BLOCK)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.port = free_port()
        self.tcp = Server(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.tcp.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.tcp.shutdown()
        self.tcp.server_close()
