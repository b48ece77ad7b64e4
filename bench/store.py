"""What one object costs in each ``cxrd.store`` backend: put and get of a 10 MB object.

A 10 MB object is an uncompressed radiograph. For each backend it times ``--rounds``
puts of fresh random bytes (a new key each round, as the spool gets) and a get of each,
in wall time and in this process's CPU time (``time.process_time``: boto3's calls run in
the calling thread for objects under the multipart threshold). The S3 backend talks to
moto's server (``python -m moto.server``, started here on loopback); the server's own
CPU is read from /proc and printed apart, since a real S3 service spends it elsewhere.
The local backend writes under ``--folder`` (default: a temp folder under the current
directory, so on the disk the repository is on, not a tmpfs)::

    python bench/store.py                  # 5 rounds, both backends, ~10 s
    python bench/store.py --rounds 10 --size-mb 20 --json store.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrd.store import LocalStore, S3Store, Store  # noqa: E402


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(store: Store, size: int, rounds: int, server_pid: int | None) -> dict[str, Any]:
    puts: list[tuple[float, float]] = []
    gets: list[tuple[float, float]] = []
    server = {"put": 0.0, "get": 0.0}
    store.put("bench/warm-up", b"x")  # connection and client set-up out of the figures
    store.get("bench/warm-up")
    for _ in range(rounds):
        data = os.urandom(size)
        key = f"bench/{uuid.uuid4().hex}.dcm"
        before = proc_cpu(server_pid) if server_pid else 0.0
        puts.append(timed(lambda: store.put(key, data)))  # noqa: B023
        middle = proc_cpu(server_pid) if server_pid else 0.0
        got: list[bytes] = []
        gets.append(timed(lambda: got.append(store.get(key))))  # noqa: B023
        after = proc_cpu(server_pid) if server_pid else 0.0
        assert got[0] == data
        server["put"] += middle - before
        server["get"] += after - middle
        store.delete(key)

    def summary(samples: list[tuple[float, float]], what: str) -> dict[str, float]:
        out = {"wall_ms_median": 1000 * statistics.median(s[0] for s in samples),
               "cpu_ms_median": 1000 * statistics.median(s[1] for s in samples),
               "wall_ms_min": 1000 * min(s[0] for s in samples),
               "cpu_ms_min": 1000 * min(s[1] for s in samples)}
        if server_pid:
            out["server_cpu_ms_mean"] = 1000 * server[what] / len(samples)
        return out

    return {"backend": store.location, "size_bytes": size, "rounds": rounds,
            "put": summary(puts, "put"), "get": summary(gets, "get")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the local backend writes (default: a temp folder here)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    size = int(args.size_mb * 1e6)
    results = []

    folder = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.folder or Path.cwd()))
    try:
        results.append(run(LocalStore(folder), size, args.rounds, None))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(name, value)  # moto's server takes any credentials
    with socket_port() as port:
        pass
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        store = S3Store("cxrd-bench", endpoint_url=endpoint)
        store._client.create_bucket(Bucket="cxrd-bench")
        results.append(run(store, size, args.rounds, proc.pid))
    finally:
        proc.terminate()
        proc.wait()

    for r in results:
        print(f"{r['backend']}: {r['size_bytes'] / 1e6:g} MB x {r['rounds']}")
        for op in ("put", "get"):
            s = r[op]
            line = (f"  {op}: wall {s['wall_ms_median']:.1f} ms (min {s['wall_ms_min']:.1f}), "
                    f"client CPU {s['cpu_ms_median']:.1f} ms (min {s['cpu_ms_min']:.1f})")
            if "server_cpu_ms_mean" in s:
                line += f", moto server CPU {s['server_cpu_ms_mean']:.1f} ms"
            print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


class socket_port:
    """A free loopback port, its socket closed on exit (the server binds it next)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


if __name__ == "__main__":
    main()
