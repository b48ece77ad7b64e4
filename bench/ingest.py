#!/usr/bin/env python
"""DICOM ingest benchmark: dcmtk ``storescu`` -> cxrd, dcmtk ``storescp``, Orthanc and a
pynetdicom receiver that stores nothing.

The same files go to each receiver, over 1 and over 4 associations (4 ``storescu``
processes in parallel, each with a quarter of the files), for two data sets:
``--large`` synthetic 2500x2048 12-bit CR images (about 10 MB each, Explicit VR Little
Endian) and ``--small`` 256x256 ones (about 130 KB). The time runs from the start of the
first ``storescu`` to the exit of the last; afterwards every instance must be found at the
receiver (files, database rows, Orthanc's ``/statistics``), or the run is an error.

Receivers, each started fresh (empty storage) for every measurement:

* ``cxrd``: the real ``cxrd serve`` subprocess (``[node] receivers = R`` for each R in
  ``--receivers``), durable: every instance is fsynced, renamed, its folder fsynced and its
  SQLite row committed (WAL, ``synchronous=FULL``) before Success is answered.
* ``storescp``: dcmtk's ``storescp --fork -od DIR`` (a process per association, no fsync).
* ``orthanc``: Orthanc with ``SyncStorageArea`` (an fsync per stored file), its SQLite
  index in WAL mode with ``synchronous=NORMAL``, no compression and no plugins.
* ``pynetdicom``: ``bench/noop_scp.py``, cxrd's receiver class with a C-STORE handler that
  stores nothing (P processes, as many as cxrd's R): the ceiling of the network stack.

Run ``python bench/ingest.py --help``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: import cxrd, training
    sys.path.insert(0, str(ROOT))

ORTHANC = "/usr/sbin/Orthanc"  # Debian installs it outside a normal user's PATH
LABELS = ("TB", "NTB", "NORM")
PEERS = ("cxrd", "storescp", "orthanc", "pynetdicom")
CALLING_AE = "BENCH"


@dataclass(frozen=True)
class DataSpec:
    key: str
    label: str
    rows: int
    cols: int
    per_study: int


DATASETS = {
    "large": DataSpec("large", "10 MB CR", 2500, 2048, 4),
    "small": DataSpec("small", "256x256", 256, 256, 20),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class RunError(RuntimeError):
    """A measurement that cannot count: a receiver failed or lost instances."""


# --------------------------------------------------------------------------- input files


@dataclass(frozen=True)
class Inputs:
    spec: DataSpec
    files: list[Path]
    total_bytes: int

    @property
    def mean_mb(self) -> float:
        return self.total_bytes / len(self.files) / 1e6


def generate_inputs(cache: Path, spec: DataSpec, n: int, seed: int) -> Inputs:
    """``n`` CR phantoms (Explicit VR Little Endian) in studies of ``spec.per_study``,
    cached under ``cache``; a file already there is reused. UIDs are derived from the
    seed and the position, so a rerun sends the same instances."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from training.phantoms import DicomOptions, make_phantom, random_patient_study, to_dataset

    folder = cache / f"ingest-{spec.key}-{spec.rows}x{spec.cols}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    made = 0
    t0 = time.perf_counter()
    for i in range(n):
        s, j = divmod(i, spec.per_study)
        path = folder / f"s{s:04d}_i{j:02d}.dcm"
        files.append(path)
        if path.exists():
            continue
        study = random_patient_study(np.random.default_rng([seed, s]))
        ph = make_phantom(np.random.default_rng([seed, s, j]), LABELS[i % len(LABELS)],
                          spec.rows, spec.cols)
        tag = f"cxrd-bench-ingest {spec.key} {seed} {s}"
        ds = to_dataset(ph, study, DicomOptions(transfer_syntax=ExplicitVRLittleEndian),
                        series_instance_uid=generate_uid(entropy_srcs=[tag, "series"]),
                        sop_instance_uid=generate_uid(entropy_srcs=[tag, "sop", str(j)]),
                        instance_number=j + 1)
        tmp = path.with_name(f".{path.name}.tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        made += 1
        if made % 100 == 0 or (spec.key == "large" and made % 20 == 0):
            log(f"{spec.key}: generated {made} files, {time.perf_counter() - t0:.0f} s")
    if made:
        log(f"{spec.key}: generated {made} files in {time.perf_counter() - t0:.1f} s "
            f"under {folder}")
    total = 0
    for f in files:  # read once: every receiver then gets them from the page cache
        total += len(f.read_bytes())
    return Inputs(spec, files, total)


# --------------------------------------------------------------------------- helpers


def peer_env() -> dict[str, str]:
    """Debian's dcmtk (and Orthanc, built on it) leave Nagle's algorithm on unless this is
    set: every DIMSE message would then wait about 50 ms."""
    env = {k: v for k, v in os.environ.items() if k != "CXRD_CONFIG"}
    env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listeners(port: int) -> int:
    """How many sockets listen on TCP ``port`` (several with SO_REUSEPORT), read from
    /proc/net: a probe connection would count as an association at the peer."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    n += 1
    return n


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def tool(name: str) -> str:
    path = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
    if path is None:
        raise SystemExit(f"{name} is not installed (dcmtk and Orthanc are needed)")
    return path


def version_of(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def count_files(folder: Path) -> int:
    """Regular, non-hidden files under ``folder`` (temp files are hidden or removed)."""
    n = 0
    for _dirpath, _dirs, names in os.walk(folder):
        n += sum(1 for name in names if not name.startswith("."))
    return n


def wait_until(condition: Any, timeout: float, what: str, proc: subprocess.Popen[bytes],
               log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise RunError(f"{what}: the process exited with {proc.returncode}:\n"
                           f"{tail(log_path)}")
        if time.monotonic() > deadline:
            raise RunError(f"{what}: not ready after {timeout:.0f} s:\n{tail(log_path)}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- receivers


class Receiver:
    """One receiver, started fresh in its own folder for each measurement."""

    name = ""
    called_ae = ""

    def __init__(self, run_dir: Path, max_pdu: int) -> None:
        self.run_dir = run_dir
        self.max_pdu = max_pdu
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = run_dir / f"{self.name.split()[0]}.log"

    def _popen(self, cmd: list[str]) -> None:
        with self.log_path.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, cwd=self.run_dir, env=peer_env(),
                                         stdin=subprocess.DEVNULL, stdout=fh,
                                         stderr=subprocess.STDOUT)

    def start(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        """Instances stored, as the receiver itself records them."""
        raise NotImplementedError

    def check(self) -> dict[str, Any]:
        """Extra consistency data after a run (raises RunError on a mismatch)."""
        return {}

    def stop(self) -> int | None:
        return stop_process(self.proc)


class StoreScp(Receiver):
    """dcmtk's storescp, one forked child process per association; files are written
    with the data set as received re-encoded by dcmtk, without fsync."""

    name = "storescp"
    called_ae = "STORESCP"

    def start(self) -> None:
        self.store_dir = self.run_dir / "received"
        self.store_dir.mkdir(parents=True)
        self._popen([tool("storescp"), "--fork", "-aet", self.called_ae,
                     "-pdu", str(self.max_pdu), "-od", str(self.store_dir), str(self.port)])
        assert self.proc is not None
        wait_until(lambda: listeners(self.port) > 0, 30, "storescp", self.proc, self.log_path)

    def count(self) -> int:
        return count_files(self.store_dir)


class Orthanc(Receiver):
    """Orthanc with its storage and SQLite index in the run folder."""

    name = "orthanc"
    called_ae = "ORTHANC"

    def start(self) -> None:
        self.http_port = free_port()
        config = self.run_dir / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "cxrd-bench",
            "StorageDirectory": str(self.run_dir / "storage"),
            "IndexDirectory": str(self.run_dir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.port,
            "DicomAet": self.called_ae,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "StorageCompression": False,
            "SyncStorageArea": True,  # fsync each stored file (new in 1.7.4)
            "MaximumPduLength": self.max_pdu,  # new in 1.9.0; default 16384
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "SaveJobs": False,
        }, indent=2))
        self._popen([tool(ORTHANC), str(config)])
        assert self.proc is not None

        def up() -> bool:
            try:
                self._get("/system")
            except OSError:
                return False
            return listeners(self.port) > 0

        wait_until(up, 60, "Orthanc", self.proc, self.log_path)

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                    timeout=30) as rsp:
            return json.loads(rsp.read())

    def count(self) -> int:
        return int(self._get("/statistics")["CountInstances"])


class NoopPynetdicom(Receiver):
    """``bench/noop_scp.py``: pynetdicom with cxrd's receiver set-up (contexts, PDU size,
    event-driven reactors, SO_REUSEPORT processes) answering Success without storing: the
    ceiling of the network stack cxrd is built on. Not durable."""

    called_ae = "PYNETDICOM"

    def __init__(self, run_dir: Path, max_pdu: int, processes: int) -> None:
        self.processes = processes
        self.name = f"pynetdicom P={processes}"
        super().__init__(run_dir, max_pdu)

    def start(self) -> None:
        self.count_file = self.run_dir / "stored.count"
        self._popen([sys.executable, str(ROOT / "bench" / "noop_scp.py"), "--port",
                     str(self.port), "--ae-title", self.called_ae, "--max-pdu",
                     str(self.max_pdu), "--processes", str(self.processes), "--count-file",
                     str(self.count_file)])
        assert self.proc is not None
        wait_until(lambda: listeners(self.port) >= self.processes, 60, self.name, self.proc,
                   self.log_path)

    def count(self) -> int:
        return self.count_file.stat().st_size if self.count_file.exists() else 0


class Cxrd(Receiver):
    """``cxrd serve`` with R receiver processes sharing the port; from this checkout, or
    from ``src`` (another checkout's folder, put first on PYTHONPATH) for ``--compare``."""

    called_ae = "CXRD"

    def __init__(self, run_dir: Path, max_pdu: int, receivers: int, label: str = "cxrd",
                 src: Path | None = None) -> None:
        self.receivers = receivers
        self.src = src
        self.name = f"{label} R={receivers}"
        super().__init__(run_dir, max_pdu)
        self.data_dir = run_dir / "data"

    def _popen(self, cmd: list[str]) -> None:
        if self.src is None:
            return super()._popen(cmd)
        env = peer_env()
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.src), *filter(None, [env.get("PYTHONPATH")])])
        with self.log_path.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, cwd=self.run_dir, env=env,
                                         stdin=subprocess.DEVNULL, stdout=fh,
                                         stderr=subprocess.STDOUT)
        return None

    def start(self) -> None:
        config = self.run_dir / "cxrd.toml"
        # No study becomes stable during the measurement, and nothing is classified on
        # arrival (a tree that has [study] classify_on_arrival): no inference competes.
        tree = self.src if self.src is not None else Path(__file__).resolve().parents[1]
        eager = "classify_on_arrival" in (tree / "cxrd" / "config.py").read_text("utf-8")
        config.write_text(
            "# written by bench/ingest.py\n"
            f'[node]\nae_title = "{self.called_ae}"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f"max_pdu = {self.max_pdu}\nreceivers = {self.receivers}\n\n"
            f"[storage]\ndata_dir = {json.dumps(str(self.data_dir))}\n\n"
            "[study]\nstable_seconds = 3600\n"
            + ("classify_on_arrival = false\n" if eager else "") + "\n"
            "[workers]\nprocesses = 1\n\n"
            '[metrics]\nlisten = ""\n\n'
            '[logging]\nlevel = "INFO"\n', encoding="utf-8")
        self._popen([sys.executable, "-m", "cxrd.cli", "serve", "--config", str(config)])
        assert self.proc is not None
        self.db_path = self.data_dir / "cxrd.sqlite3"
        # ready: every receiver process listens and the worker has loaded its model
        wait_until(lambda: listeners(self.port) >= self.receivers and self._workers() >= 1,
                   120, self.name, self.proc, self.log_path)

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
        finally:
            conn.close()

    def _workers(self) -> int:
        rows = self._query("SELECT count(*) FROM workers")
        return int(rows[0][0]) if rows else 0

    def count(self) -> int:
        rows = self._query("SELECT count(*) FROM instances")
        return int(rows[0][0]) if rows else 0

    def check(self) -> dict[str, Any]:
        rejections = self._query("SELECT reason, count(*) FROM rejections GROUP BY reason")
        if rejections:
            raise RunError(f"{self.name}: rejections {rejections}:\n{tail(self.log_path)}")
        files = count_files(self.data_dir / "spool")
        rows = self.count()
        if files != rows:
            raise RunError(f"{self.name}: {rows} instance rows but {files} spool files")
        syntaxes = [r[0] for r in self._query(
            "SELECT DISTINCT transfer_syntax_uid FROM instances")]
        return {"spool_files": files, "transfer_syntaxes": syntaxes}


# --------------------------------------------------------------------------- sending


def send(files: Sequence[Path], associations: int, receiver: Receiver, log_dir: Path,
         timeout: float) -> float:
    """``associations`` storescu processes in parallel, each with a contiguous share of
    the files (whole studies stay together); seconds from the first start to the last
    exit."""
    k = max(1, min(associations, len(files)))
    size = -(-len(files) // k)
    chunks = [list(files[i * size:(i + 1) * size]) for i in range(k)]
    chunks = [c for c in chunks if c]
    storescu = tool("storescu")
    env = peer_env()
    logs = [(log_dir / f"storescu-{i}.log").open("wb") for i in range(len(chunks))]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.perf_counter()
        for chunk, fh in zip(chunks, logs, strict=True):
            procs.append(subprocess.Popen(
                [storescu, "-aet", CALLING_AE, "-aec", receiver.called_ae, "127.0.0.1",
                 str(receiver.port), *map(str, chunk)],
                env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(max(1.0, deadline - time.monotonic()))
        wall = time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        raise RunError(f"storescu did not finish in {timeout:g} s") from exc
    finally:
        for fh in logs:
            fh.close()
    bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        i = bad[0][0]
        raise RunError(f"storescu exited with {bad}:\n{tail(log_dir / f'storescu-{i}.log')}")
    return wall


def measure(receiver: Receiver, inputs: Inputs, associations: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """Start the receiver, send, check that every instance arrived, stop it."""
    os.sync()  # the previous run's dirty pages must not be written back during this one
    load = os.getloadavg()[0]
    t = time.perf_counter()
    receiver.start()
    startup = time.perf_counter() - t
    try:
        wall = send(inputs.files, associations, receiver, receiver.run_dir, args.timeout)
        stored = receiver.count()
        if stored != len(inputs.files):
            raise RunError(f"{receiver.name}: {stored} of {len(inputs.files)} instances "
                           f"stored:\n{tail(receiver.log_path)}")
        extra = receiver.check()
    finally:
        rc = receiver.stop()
    n = len(inputs.files)
    return {"instances": n, "bytes": inputs.total_bytes, "wall_s": wall,
            "instances_per_s": n / wall, "mb_per_s": inputs.total_bytes / 1e6 / wall,
            "startup_s": startup, "exit_code": rc, "loadavg_1min_before": load, **extra}


def make_receiver(name: str, run_dir: Path, max_pdu: int,
                  sources: dict[str, Path]) -> Receiver:
    if name == "storescp":
        return StoreScp(run_dir, max_pdu)
    if name == "orthanc":
        return Orthanc(run_dir, max_pdu)
    if name.startswith("pynetdicom P="):
        return NoopPynetdicom(run_dir, max_pdu, int(name.partition("=")[2]))
    label, _, count = name.partition(" R=")
    return Cxrd(run_dir, max_pdu, int(count), label, sources.get(label))


def is_cxrd(name: str) -> bool:
    return " R=" in name


# --------------------------------------------------------------------------- report


def median_rate(runs: list[dict[str, Any]]) -> float:
    return float(statistics.median(r["instances_per_s"] for r in runs))


def print_tables(cells: dict[tuple[str, int, str], list[dict[str, Any]]],
                 failed: dict[tuple[str, int, str], str], inputs: dict[str, Inputs],
                 receivers: list[str], associations: list[int], repeats: int) -> None:
    print(f"\n== throughput (median of {repeats}; MB = 10^6 bytes of DICOM files sent) ==")
    print(f"{'data':<16}{'assoc':>5}  {'receiver':<16}{'inst/s':>10}{'MB/s':>9}"
          f"{'wall s':>9}  runs (inst/s)")
    for key, inp in inputs.items():
        label = f"{inp.spec.label} x{len(inp.files)}"
        for a in associations:
            for r in receivers:
                cell = (key, a, r)
                if cell in failed:
                    print(f"{label:<16}{a:>5}  {r:<16}{'FAILED':>10}  {failed[cell][:60]}")
                    continue
                runs = cells.get(cell, [])
                if not runs:
                    continue
                rate = median_rate(runs)
                wall = statistics.median(x["wall_s"] for x in runs)
                each = ", ".join(f"{x['instances_per_s']:.1f}" for x in runs)
                print(f"{label:<16}{a:>5}  {r:<16}{rate:>10.1f}{rate * inp.mean_mb:>9.1f}"
                      f"{wall:>9.2f}  {each}")
    cxrds = [r for r in receivers if is_cxrd(r)]
    others = [r for r in receivers if not is_cxrd(r)]
    if not cxrds or not others:
        return
    print("\n== cxrd's ratio to the others (instances/s over instances/s; >= 1.00 is at "
          "least as fast) ==")
    heads = [f"{c}/{o}" for c in cxrds for o in others]
    width = max(len(h) for h in heads) + 3
    print(f"{'data':<16}{'assoc':>5}  " + "".join(f"{h:>{width}}" for h in heads))
    for key, inp in inputs.items():
        label = f"{inp.spec.label} x{len(inp.files)}"
        for a in associations:
            row = []
            for c in cxrds:
                for o in others:
                    rc, ro = cells.get((key, a, c)), cells.get((key, a, o))
                    row.append(f"{median_rate(rc) / median_rate(ro):.2f}" if rc and ro
                               else "-")
            print(f"{label:<16}{a:>5}  " + "".join(f"{v:>{width}}" for v in row))


# --------------------------------------------------------------------------- main


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{what}: a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{what}: integers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Send the same synthetic CR files with dcmtk storescu to cxrd, to dcmtk "
                    "storescp and to Orthanc, over 1 and over 4 associations; print "
                    "instances/s and MB/s per receiver and cxrd's ratio to the others.")
    p.add_argument("--large", type=int, default=200, metavar="N",
                   help="2500x2048 12-bit CR images, about 10 MB each (default 200; 0 skips)")
    p.add_argument("--small", type=int, default=2000, metavar="N",
                   help="256x256 images, about 130 KB each (default 2000; 0 skips)")
    p.add_argument("--associations", default="1,4",
                   help="comma-separated numbers of parallel associations, one storescu "
                        "process each (default 1,4)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measurements per cell; the median is printed (default 1)")
    p.add_argument("--receivers", default="1,2",
                   help="comma-separated [node].receivers values to run cxrd with "
                        "(default 1,2)")
    p.add_argument("--only", default=",".join(PEERS),
                   help=f"comma-separated subset of {','.join(PEERS)} (default all)")
    p.add_argument("--compare", action="append", default=[], metavar="LABEL=DIR",
                   help="also run cxrd from another source tree (DIR holds its cxrd/ "
                        "package, put first on PYTHONPATH), as LABEL R=n; repeatable. "
                        "For before/after numbers measured in the same run")
    p.add_argument("--max-pdu", type=int, default=131072,
                   help="maximum PDU every receiver offers: cxrd node.max_pdu, storescp "
                        "-pdu, Orthanc MaximumPduLength (default 131072; dcmtk's and "
                        "Orthanc's own default is 16384)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cxrd-bench",
                   help="work folder: cache/ holds the generated files (reused), runs/ the "
                        "receivers' storage (default $TMPDIR/cxrd-bench)")
    p.add_argument("--keep", action="store_true", help="keep every run folder")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every number as JSON")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one send may take (default 600)")
    p.add_argument("--seed", type=int, default=11, help="phantom seed (default 11)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    only = [v.strip() for v in args.only.split(",") if v.strip()]
    if not only or any(v not in PEERS for v in only):
        raise SystemExit(f"--only: choose from {', '.join(PEERS)}")
    associations = _ints(args.associations, "--associations")
    sources: dict[str, Path] = {}
    for spec in args.compare:
        label, _, folder = spec.partition("=")
        if not label.strip() or not (Path(folder) / "cxrd" / "__init__.py").is_file() or (
                label.strip() in (*PEERS, "cxrd")):
            raise SystemExit(f"--compare: LABEL=DIR with DIR/cxrd/__init__.py, got {spec!r}")
        sources[label.strip()] = Path(folder).resolve()
    counts = _ints(args.receivers, "--receivers")
    receivers: list[str] = []
    for peer in PEERS:
        if peer in only:
            if peer == "cxrd":
                receivers += [f"{label} R={r}" for label in ("cxrd", *sources) for r in counts]
            elif peer == "pynetdicom":  # as many processes as cxrd's receivers
                receivers += [f"pynetdicom P={r}" for r in counts]
            else:
                receivers.append(peer)
    if args.repeats < 1 or args.large < 0 or args.small < 0 or not args.large + args.small:
        raise SystemExit("--repeats must be >= 1 and --large + --small >= 1")
    if "storescp" in only or "cxrd" in only:
        tool("storescp")
    if "orthanc" in only:
        tool(ORTHANC)
    tool("storescu")

    args.work.mkdir(parents=True, exist_ok=True)
    inputs: dict[str, Inputs] = {}
    for key, n in (("large", args.large), ("small", args.small)):
        if n:
            inputs[key] = generate_inputs(args.work / "cache", DATASETS[key], n, args.seed)
    runs_root = args.work / "runs"
    runs_root.mkdir(exist_ok=True)

    env: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
           "storescu": version_of([tool("storescu"), "--version"]),
           "orthanc": version_of([ORTHANC, "--version"]) if "orthanc" in only else None,
           "python": sys.version.split()[0]}
    print("cxrd ingest benchmark (storescu -> receiver, loopback)")
    for inp in inputs.values():
        print(f"  data        {inp.spec.label}: {len(inp.files)} files, "
              f"{inp.total_bytes / 1e6:.0f} MB, {inp.spec.per_study} per study")
    print(f"  receivers   {', '.join(receivers)}; max PDU {args.max_pdu} for all; "
          "storescp --fork (no fsync); Orthanc SyncStorageArea=true; pynetdicom: "
          "bench/noop_scp.py (stores nothing)")
    print(f"  sender      {env['storescu']}; TCP_NODELAY=1; associations "
          f"{','.join(map(str, associations))}; repeats {args.repeats}")
    print(f"  machine     {env['cpus']} CPUs, load average at start "
          f"{env['loadavg_at_start'][0]:.2f}; shared machines give noisy numbers: compare "
          "the ratios of one run")
    sys.stdout.flush()

    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    failed: dict[tuple[str, int, str], str] = {}
    for rep in range(args.repeats):
        order = receivers[rep % len(receivers):] + receivers[:rep % len(receivers)]
        for key, inp in inputs.items():
            for a in associations:
                for name in order:
                    cell = (key, a, name)
                    if cell in failed:
                        continue
                    run_dir = Path(tempfile.mkdtemp(
                        prefix=f"{name.replace(' ', '').replace('=', '')}-{key}-{a}-",
                        dir=runs_root))
                    receiver = make_receiver(name, run_dir, args.max_pdu, sources)
                    try:
                        result = measure(receiver, inp, a, args)
                    except RunError as exc:
                        failed[cell] = str(exc).splitlines()[0]
                        log(f"{key} x{a} {name}: FAILED: {exc}\n(kept {run_dir})")
                        continue
                    cells.setdefault(cell, []).append(result)
                    log(f"rep {rep + 1} {key} x{a} {name}: {result['instances_per_s']:.1f} "
                        f"inst/s, {result['mb_per_s']:.1f} MB/s ({result['wall_s']:.2f} s, "
                        f"load {result['loadavg_1min_before']:.2f})")
                    if not args.keep:
                        shutil.rmtree(run_dir, ignore_errors=True)

    print_tables(cells, failed, inputs, receivers, associations, args.repeats)
    if args.json:
        report = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "environment": env,
            "data": {k: {"label": i.spec.label, "files": len(i.files), "bytes": i.total_bytes,
                         "rows": i.spec.rows, "cols": i.spec.cols,
                         "per_study": i.spec.per_study} for k, i in inputs.items()},
            "results": [{"data": k, "associations": a, "receiver": r,
                         "median_instances_per_s": median_rate(v),
                         "median_mb_per_s": median_rate(v) * inputs[k].mean_mb, "runs": v}
                        for (k, a, r), v in cells.items()],
            "failed": [{"data": k, "associations": a, "receiver": r, "error": e}
                       for (k, a, r), e in failed.items()],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
