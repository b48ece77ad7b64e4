#!/usr/bin/env python
"""A pynetdicom C-STORE SCP that stores nothing: the network stack's own ceiling.

``bench/ingest.py`` runs it as the ``pynetdicom`` receiver. Every C-STORE is answered
Success at once; the data set is neither parsed nor written (not durable). It runs the
same pynetdicom version, PDU size, transfer syntaxes and event-driven reactors
(``cxrd.reactor``) as cxrd's receiver, in ``--processes`` processes sharing the port
(SO_REUSEPORT, as ``[node].receivers``), so the gap between this receiver and cxrd is what
cxrd's own work costs (validation, spooling, fsyncs, the database row), and a receiver
faster than this one cannot be built on pynetdicom as it is.

Each stored instance appends one byte to ``--count-file``; its size is the count.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def serve(port: int, ae_title: str, max_pdu: int, count_file: Path) -> None:
    from dataclasses import replace

    from pynetdicom import evt

    from cxrd.config import NodeConfig, load_config
    from cxrd.reactor import make_event_driven
    from cxrd.receive import Receiver

    fd = os.open(count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    class NoopReceiver(Receiver):
        """cxrd's receiver (AE setup, contexts, reactors, SO_REUSEPORT) with a C-STORE
        handler that only counts."""

        def on_store(self, event: Any) -> int:
            os.write(fd, b".")
            return 0x0000

        def handlers(self) -> list[Any]:
            return [(evt.EVT_CONN_OPEN, lambda e: make_event_driven(e.assoc)),
                    (evt.EVT_C_STORE, self.on_store)]

    config = replace(load_config(None, env={}), node=NodeConfig(
        ae_title=ae_title, host="127.0.0.1", port=port, max_pdu=max_pdu))
    receiver = NoopReceiver(config, ingestor=None, reuse_port=True)  # type: ignore[arg-type]
    receiver.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    receiver.drain(5.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ae-title", default="PYNETDICOM")
    p.add_argument("--max-pdu", type=int, default=131072)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--count-file", type=Path, required=True)
    args = p.parse_args()
    children = []
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:
            serve(args.port, args.ae_title, args.max_pdu, args.count_file)
            os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda *_: None)  # replaced in serve()
    try:
        serve(args.port, args.ae_title, args.max_pdu, args.count_file)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
