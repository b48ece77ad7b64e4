#!/usr/bin/env python
"""End-to-end pipeline benchmark: watched folder -> SR + heatmap SC on disk.

For each variant (uncompressed, JPEG 2000 lossless) it generates N synthetic 2048x2500 CR
images (cached under ``--work``), starts ``cxrd serve`` as a subprocess on a fresh data
folder, drops the files into ``incoming/`` at once, waits until every study is reported,
stops the node with SIGTERM and prints throughput, per-study latency and per-stage times
read back from the node's SQLite database. When TensorFlow is importable (the ``[train]``
extra) it also times a naive per-image baseline (pydicom, min-max, Keras predict at batch
1, a matplotlib overlay) on the same files.

It also times a lean reference (``--no-lean`` skips it): the same job written tightly in
one process without cxrd's code (pydicom, a uint8 lookup table, Pillow, onnxruntime at
batch 1 on one thread, a plain-pydicom heatmap SC, a highdicom SR per study), the per-core
limit cxrd's figures are divided by.

``--compare REF`` also runs the daemon from a git worktree of REF, before the current tree,
on the same files; ``--reprocess`` times ``cxrd reprocess`` of everything after the fresh
run. The node's worker and main-process peak memory and the scheduler's CPU per study (when
the node logs it at drain) are printed with the daemon's figures.

``--stage-only`` skips the daemon and runs the worker's stages in-process (no queue, no
watcher), which isolates decode / preprocess / infer / SC / write / SR and shows the
onnxruntime providers in use: the mode to run on a GPU machine.

Run ``python bench/pipeline.py --help``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: import cxrd, training
    sys.path.insert(0, str(ROOT))

ROWS, COLS = 2500, 2048
LABELS = ("TB", "NTB", "NORM")
VARIANTS = ("uncompressed", "j2k")
#: Per-image stages; ``record`` (the findings a worker records for the SR) is absent from
#: older trees and from the lean arm, and shows as "-"; so are the lung segmenter's
#: ``segment`` (its preprocessing and inference) and ``seg`` (masks, SEG build and write).
STAGES = ("decode", "preprocess", "infer", "segment", "sc", "write", "seg", "record")
DEFAULT_PROVIDERS = "CUDAExecutionProvider,CPUExecutionProvider"
#: Readiness with ``processes = "auto"`` and no ``workers=`` in the node-start line: the
#: worker count has reached 1 and not grown for this long.
WORKERS_STABLE_SECONDS = 3.0
#: How often the daemon's process tree is sampled for its peak RSS.
MEMORY_SAMPLE_SECONDS = 1.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def utcnow() -> dt.datetime:
    """Naive UTC, as cxrd stores its timestamps."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def parse_ts(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def summary(values: Sequence[float]) -> dict[str, float]:
    """mean / p50 / p95 / n of a list of seconds."""
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p95": float("nan"), "n": 0}
    return {"mean": float(np.mean(values)), "p50": pct(values, 50), "p95": pct(values, 95),
            "n": len(values)}


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.1f}"  # nan -> "-"


# --------------------------------------------------------------------------- input files


@dataclass(frozen=True)
class Inputs:
    variant: str
    files: list[Path]
    studies: int


def _write_atomic(ds: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def generate_inputs(cache: Path, n: int, per_study: int, seed: int,
                    variants: Sequence[str]) -> dict[str, Inputs]:
    """N phantoms in studies of ``per_study`` images, one file per variant, cached.

    The same phantom, patient and UIDs are written in every variant, so the variants
    differ only by their transfer syntax. A file already in the cache is reused.
    """
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    from training.phantoms import DicomOptions, make_phantom, random_patient_study, to_dataset

    syntaxes = {"uncompressed": ExplicitVRLittleEndian, "j2k": JPEG2000Lossless}
    studies = -(-n // per_study)
    out: dict[str, list[Path]] = {v: [] for v in variants}
    folder = {v: cache / f"{v}-{ROWS}x{COLS}-seed{seed}" for v in variants}
    for f in folder.values():
        f.mkdir(parents=True, exist_ok=True)
    made = 0
    t0 = time.perf_counter()
    for i in range(n):
        s, j = divmod(i, per_study)
        name = f"s{s:03d}_i{j:02d}.dcm"
        paths = {v: folder[v] / name for v in variants}
        for v in variants:
            out[v].append(paths[v])
        missing = [v for v in variants if not paths[v].exists()]
        if not missing:
            continue
        study = random_patient_study(np.random.default_rng([seed, s]))
        ph = make_phantom(np.random.default_rng([seed, s, j]), LABELS[i % len(LABELS)],
                          ROWS, COLS)
        series_uid = generate_uid(entropy_srcs=["cxrd-bench series", str(seed), str(s)])
        sop_uid = generate_uid(entropy_srcs=["cxrd-bench sop", str(seed), str(s), str(j)])
        for v in missing:
            ds = to_dataset(ph, study, DicomOptions(transfer_syntax=syntaxes[v]),
                            series_instance_uid=series_uid, sop_instance_uid=sop_uid,
                            instance_number=j + 1)
            _write_atomic(ds, paths[v])
            made += 1
        log(f"generated {name} ({', '.join(missing)}) {time.perf_counter() - t0:.1f} s")
    if made:
        log(f"generated {made} files in {time.perf_counter() - t0:.1f} s under {cache}")
    return {v: Inputs(v, out[v], studies) for v in variants}


# --------------------------------------------------------------------------- the daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_segmenter(tree: Tree) -> bool:
    """Whether the tree's node runs the lung segmenter (``[model] segmenter``)."""
    infer = tree.root / "cxrd" / "infer.py"
    return infer.exists() and "class Segmenter" in infer.read_text(encoding="utf-8")


def write_config(path: Path, data_dir: Path, args: argparse.Namespace,
                 processes: int | str, tree: Tree) -> None:
    """The node's TOML; ``processes`` is an integer or "auto" (a TOML string). With
    ``--segmenter off`` a tree that has the lung segmenter runs without it."""
    providers = ", ".join(json.dumps(p) for p in args.providers)
    model = f"path = {json.dumps(str(Path(args.model).resolve()))}\n" if args.model else ""
    if args.segmenter == "off" and has_segmenter(tree):
        model += 'segmenter = "off"\n'

    path.write_text(
        "# written by bench/pipeline.py\n"
        f"[node]\nport = {free_port()}\n\n"
        f"[storage]\ndata_dir = {json.dumps(str(data_dir))}\n\n"
        "[watch]\nsettle_seconds = 0.2\n\n"
        f"[study]\nstable_seconds = {args.stable_seconds:g}\n\n"
        f"[model]\n{model}providers = [{providers}]\n\n"
        f"[workers]\nprocesses = {json.dumps(processes)}\nbatch_size = {args.batch_size}\n\n"
        '[metrics]\nlisten = ""\n\n'
        '[logging]\nlevel = "INFO"\n',
        encoding="utf-8")


class ReadOnlyDb:
    """The node's SQLite file, opened read-only (the node keeps writing it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection | None:
        if self.conn is None:
            if not self.path.exists():
                return None
            try:
                self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
                self.conn.row_factory = sqlite3.Row
            except sqlite3.Error:
                return None
        return self.conn

    def rows(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        conn = self._connect()
        if conn is None:
            return []
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:  # tables not created yet, busy
            if "no such table" in str(exc) or "locked" in str(exc):
                return []
            raise

    def scalar(self, sql: str, *params: Any) -> Any:
        rows = self.rows(sql, *params)
        return rows[0][0] if rows else None

    def image_jobs(self, alias: str = "") -> str:
        """An SQL condition on ``jobs`` (as ``alias``) keeping the image jobs: newer schemas
        also queue one report job per study (``jobs.kind``)."""
        columns = {str(r[1]) for r in self.rows("PRAGMA table_info(jobs)")}
        return f"{alias}{'.' if alias else ''}kind = 'classify'" if "kind" in columns else "1 = 1"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], timeout: float = 90.0) -> tuple[int | None, float]:
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log("node did not drain in time: SIGKILL")
            proc.kill()
            proc.wait(10)
    return proc.returncode, time.monotonic() - t0


_LOG_FIELD = re.compile(r"(\w+)=(\S+)")


def log_fields(path: Path, action: str) -> dict[str, str] | None:
    """The ``key=value`` fields of the last line of the node's log with ``action=ACTION``."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        if f"action={action}" in line.split():
            found = line
    return dict(_LOG_FIELD.findall(found)) if found is not None else None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Tree:
    """A source tree whose ``cxrd`` the daemon runs: this checkout, or a compare worktree."""

    label: str
    root: Path
    env: dict[str, str]


def current_tree() -> Tree:
    env = {k: v for k, v in os.environ.items() if k != "CXRD_CONFIG"}
    return Tree("current", ROOT, env)


def compare_tree(ref: str, work: Path) -> Tree:
    """A detached git worktree of REF under ``work`` (reused when it exists), run with
    itself on PYTHONPATH so its own ``cxrd`` package is imported."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()

    try:
        sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"--compare {ref}: not a commit: {exc.stderr.strip()}") from exc
    path = work / f"compare-{sha[:12]}"
    if not (path / "cxrd" / "__init__.py").is_file():
        log(f"compare: git worktree add --detach {path} {sha[:12]}")
        git("worktree", "add", "--detach", str(path), sha)
    env = {k: v for k, v in os.environ.items() if k != "CXRD_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH")])])
    imported = subprocess.run([sys.executable, "-c", "import cxrd; print(cxrd.__file__)"],
                              cwd=path, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()
    if not Path(imported).resolve().is_relative_to(path.resolve()):
        raise RuntimeError(f"--compare {ref}: the worktree imports cxrd from {imported}")
    log(f"compare: {ref} = {sha[:12]}, cxrd imported from {imported}")
    return Tree(f"{ref} = {sha[:12]}", path, env)


class MemorySampler:
    """Peak RSS (VmHWM) of a process and of every descendant, sampled while it runs, and
    their CPU time (utime + stime) between two marks.

    Children are found by scanning /proc/*/stat for parent ids (/proc/PID/task/*/children
    needs CONFIG_PROC_CHILDREN, which not every kernel has). VmHWM is the kernel's own
    high-water mark, so a sample just before SIGTERM gives each live process's peak; the
    periodic samples keep the peak of a child that exited earlier.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb: dict[int, int] = {}
        self.label: dict[int, str] = {}
        self._last = 0.0
        self.cpu_marks: list[dict[int, float]] = []

    @staticmethod
    def _cpu_s(pid: int) -> float | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
            fields = text[text.rindex(")") + 2:].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def mark_cpu(self) -> None:
        """Snapshot every live process's CPU seconds (call at the drop and when done)."""
        marks = {}
        for pid in (self.pid, *self._descendants()):
            cpu = self._cpu_s(pid)
            if cpu is not None:
                marks[pid] = cpu
                if pid not in self.label:
                    self.label[pid] = "main" if pid == self.pid else self._describe(pid)
        self.cpu_marks.append(marks)

    @staticmethod
    def _hwm_kb(pid: int) -> int | None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def _descendants(self) -> set[int]:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                ppid = int(text[text.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(stat.parent.name))
        found: set[int] = set()
        todo = [self.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    def _describe(self, pid: int) -> str:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return "?"
        if "resource_tracker" in cmdline:
            return "resource-tracker"
        if "spawn_main" in cmdline:
            return "spawned child"
        return cmdline.split(" ", 1)[0].rsplit("/", 1)[-1] or "?"

    def sample(self) -> None:
        self._last = time.monotonic()
        for pid in (self.pid, *self._descendants()):
            kb = self._hwm_kb(pid)
            if kb is None:
                continue
            self.peak_kb[pid] = max(kb, self.peak_kb.get(pid, 0))
            if pid not in self.label:
                self.label[pid] = "main" if pid == self.pid else self._describe(pid)

    def poll(self) -> None:
        if time.monotonic() - self._last >= MEMORY_SAMPLE_SECONDS:
            self.sample()

    def result(self, workers: dict[int, str]) -> dict[str, Any]:
        """Peaks in MB; ``workers`` maps pid -> worker id (from the workers table)."""
        children = [{"pid": pid, "what": (f"worker {workers[pid]}" if pid in workers
                                          else self.label.get(pid, "?")),
                     "vmhwm_mb": kb / 1024} for pid, kb in sorted(self.peak_kb.items())
                    if pid != self.pid]
        main = self.peak_kb.get(self.pid)
        peaks = [kb / 1024 for pid, kb in self.peak_kb.items() if pid != self.pid]
        cpu: dict[str, float] = {}
        if len(self.cpu_marks) >= 2:
            first, last = self.cpu_marks[0], self.cpu_marks[1]
            for pid, end in last.items():
                what = ("main" if pid == self.pid else "workers" if pid in workers
                        else "other")
                cpu[what] = cpu.get(what, 0.0) + end - first.get(pid, 0.0)
        return {"main_vmhwm_mb": main / 1024 if main is not None else None,
                "children": children, "max_child_vmhwm_mb": max(peaks, default=None),
                "cpu_s": cpu}


def _worker_pids(db: ReadOnlyDb) -> dict[int, str]:
    """pid -> short worker name, from worker ids ``host:pid:wN``."""
    out: dict[int, str] = {}
    for (worker_id,) in db.rows("SELECT id FROM workers"):
        parts = str(worker_id).rsplit(":", 2)
        if len(parts) == 3 and parts[1].isdigit():
            out[int(parts[1])] = parts[2]
    return out


def _check_alive(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"cxrd serve exited with {proc.returncode}:\n{_tail(log_path)}")


def wait_ready(proc: subprocess.Popen[bytes], db: ReadOnlyDb, log_path: Path,
               processes: int | str, mem: MemorySampler) -> int:
    """Wait until every worker has written its heartbeat (model loaded, session made);
    returns the number of workers.

    With an integer ``processes`` that many. With "auto", the ``workers=N`` of the node's
    ``action=node-start`` log line when it has one, else the count once it is at least 1
    and has not grown for WORKERS_STABLE_SECONDS.
    """
    t_start = time.monotonic()
    expected = processes if isinstance(processes, int) else None
    last_count, grown_at = -1, t_start
    while True:
        count = int(db.scalar("SELECT count(*) FROM workers") or 0)
        now = time.monotonic()
        if expected is None:
            fields = log_fields(log_path, "node-start") or {}
            if fields.get("workers", "").isdigit():
                expected = int(fields["workers"])
        if expected is not None and count >= expected:
            return count
        if count != last_count:
            last_count, grown_at = count, now
        if expected is None and count >= 1 and now - grown_at >= WORKERS_STABLE_SECONDS:
            return count
        _check_alive(proc, log_path)
        if now - t_start > 120:
            raise RuntimeError(f"cxrd serve not ready after 120 s:\n{_tail(log_path)}")
        mem.poll()
        time.sleep(0.1)


def wait_reported(proc: subprocess.Popen[bytes], db: ReadOnlyDb, log_path: Path,
                  studies: int, timeout: float, mem: MemorySampler,
                  generation: int = 1) -> None:
    """Wait until ``studies`` studies of at least ``generation`` are finished."""
    finished = ("reported", "nothing-to-do") if generation == 1 else ("reported",)
    t0 = time.monotonic()
    while True:
        done = db.scalar(
            f"SELECT count(*) FROM studies WHERE generation >= ? AND state IN "
            f"({', '.join('?' for _ in finished)})", generation, *finished) or 0
        if done >= studies:
            return
        rejected = db.scalar("SELECT count(*) FROM rejections") or 0
        if rejected:
            raise RuntimeError(f"{rejected} files were rejected at ingest:\n{_tail(log_path)}")
        _check_alive(proc, log_path)
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {done}/{studies} studies of generation {generation} "
                               f"reported after {timeout:g} s:\n{_tail(log_path)}")
        mem.poll()
        time.sleep(0.1)


def run_reprocess(proc: subprocess.Popen[bytes], db: ReadOnlyDb, config: Path, tree: Tree,
                  inputs: Inputs, log_path: Path, timeout: float,
                  mem: MemorySampler) -> dict[str, Any]:
    """``cxrd reprocess --since 2000-01-01`` against the running node, timed from the
    command's start to the last result of generation 2."""
    cmd = [sys.executable, "-m", "cxrd.cli", "reprocess", "--since", "2000-01-01",
           "--config", str(config)]
    t_start = utcnow()
    m_start = time.monotonic()
    out = subprocess.run(cmd, cwd=tree.root, env=tree.env, capture_output=True, text=True,
                         timeout=timeout)
    command_s = time.monotonic() - m_start
    if out.returncode != 0:
        raise RuntimeError(f"cxrd reprocess exited with {out.returncode}:\n{out.stderr[-2000:]}")
    wait_reported(proc, db, log_path, inputs.studies, timeout, mem, generation=2)
    images = len(inputs.files)
    written = [parse_ts(r[0]) for r in db.rows(
        "SELECT created_at FROM results WHERE generation = 2 UNION ALL "
        "SELECT reported_at FROM studies WHERE generation = 2")]
    last = max((w for w in written if w is not None), default=utcnow())
    jobs = int(db.scalar("SELECT count(*) FROM jobs WHERE generation = 2 AND state = 'done' "
                         f"AND {db.image_jobs()}") or 0)
    seconds = (last - t_start).total_seconds()
    # The counterpart of a fresh run's processing figure: from the first study requeued
    # (its jobs queued, as admission queues a fresh study's) to the last result, so the
    # command's own start-up is left out as the fresh run's ingest and stable wait are.
    requeued = [parse_ts(r[0]) for r in db.rows(
        "SELECT stable_at FROM studies WHERE generation = 2")]
    first = min((w for w in requeued if w is not None), default=t_start)
    processing_s = (last - first).total_seconds()
    return {"images": images, "jobs_done": jobs, "seconds": seconds, "command_s": command_s,
            "images_per_s": images / seconds if seconds > 0 else float("nan"),
            "processing_s": processing_s,
            "processing_images_per_s": (images / processing_s if processing_s > 0
                                        else float("nan")),
            "output": out.stdout.strip()}


def scheduler_cpu(log_path: Path, studies: int) -> dict[str, Any] | None:
    """The main process's CPU from the node's ``action=drain-done`` line, when logged."""
    fields = log_fields(log_path, "drain-done") or {}
    cpu = _float(fields.get("scheduler_cpu_s"))
    if cpu is None:
        return None
    ticks = fields.get("scheduler_ticks", "")
    admitting = _float(fields.get("admitting_cpu_s"))
    admitted = fields.get("admitted_studies", "")
    per_admitted = (admitting / int(admitted) if admitting is not None and admitted.isdigit()
                    and int(admitted) else float("nan"))
    return {"scheduler_cpu_s": cpu, "scheduler_ticks": int(ticks) if ticks.isdigit() else None,
            "per_study_s": cpu / studies if studies else float("nan"),
            "admitting_cpu_s": admitting,
            "admitted_studies": int(admitted) if admitted.isdigit() else None,
            "per_admitted_study_s": per_admitted}


def run_daemon(inputs: Inputs, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The current tree's node, with ``--processes`` and ``--reprocess`` as given."""
    return run_node(inputs, run_dir, args, current_tree(), args.processes, args.reprocess)


def run_node(inputs: Inputs, run_dir: Path, args: argparse.Namespace, tree: Tree,
             processes: int | str, reprocess: bool) -> dict[str, Any]:
    """Drop the files into a fresh node's incoming/ and measure until all are reported."""
    data_dir = run_dir / "data"
    staging = run_dir / "staging"  # same file system as incoming/: the drop is a rename
    incoming = data_dir / "incoming"
    for d in (staging, incoming):
        d.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(inputs.files):
        shutil.copyfile(f, staging / f"{i:04d}_{f.name}")
    # The copies are written back before the clock starts: the files are at rest when they
    # are dropped, as the reference arms' inputs are, so the node's fsync of each one
    # measures cxrd, not the writeback of the bench's own copy.
    os.sync()
    config = run_dir / "cxrd.toml"
    write_config(config, data_dir, args, processes, tree)
    log_path = run_dir / "cxrd-serve.log"
    cmd = [sys.executable, "-m", "cxrd.cli", "serve", "--config", str(config)]
    log(f"{inputs.variant}: starting {' '.join(cmd[1:])} ({tree.label} tree)")
    db = ReadOnlyDb(data_dir / "cxrd.sqlite3")
    again: dict[str, Any] | None = None
    with log_path.open("wb") as log_fh:
        t_start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=tree.env,
                                cwd=str(tree.root))
        mem = MemorySampler(proc.pid)
        try:
            workers = wait_ready(proc, db, log_path, processes, mem)
            startup = time.monotonic() - t_start
            files = sorted(staging.iterdir())
            mem.mark_cpu()
            t_drop = utcnow()
            m_drop = time.monotonic()
            for f in files:
                os.replace(f, incoming / f.name)
            drop_seconds = time.monotonic() - m_drop
            log(f"{inputs.variant}: node ready in {startup:.1f} s with {workers} workers; "
                f"dropped {len(files)} files")
            wait_reported(proc, db, log_path, inputs.studies, args.timeout, mem)
            wait_seconds = time.monotonic() - m_drop
            mem.mark_cpu()
            metrics = collect_metrics(db, t_drop, len(inputs.files))
            if reprocess:
                log(f"{inputs.variant}: cxrd reprocess --since 2000-01-01")
                again = run_reprocess(proc, db, config, tree, inputs, log_path,
                                      args.timeout, mem)
            worker_pids = _worker_pids(db)
        finally:
            if proc.poll() is None:
                mem.sample()  # VmHWM of every live process, just before SIGTERM
            db.close()
            rc, drain = _stop(proc)
    metrics.update(startup_s=startup, drop_s=drop_seconds, wait_s=wait_seconds,
                   drain_s=drain, exit_code=rc, log=str(log_path), tree=tree.label,
                   processes_config=processes, workers=workers,
                   memory=mem.result(worker_pids),
                   scheduler=scheduler_cpu(log_path, inputs.studies), reprocess=again)
    if rc != 0:
        log(f"{inputs.variant}: cxrd serve exited with {rc} after SIGTERM (see {log_path})")
    return metrics


def collect_metrics(db: ReadOnlyDb, t_drop: dt.datetime, n_files: int) -> dict[str, Any]:
    """Throughput, latency and stage times from the node's rows."""
    received = [parse_ts(r[0]) for r in db.rows("SELECT received_at FROM instances")]
    studies = db.rows("SELECT stable_at, reported_at, report_seconds, state, "
                      "(SELECT count(*) FROM jobs j WHERE j.study_instance_uid = "
                      f"s.study_instance_uid AND j.state = 'done' AND {db.image_jobs('j')}) "
                      "AS images FROM studies s")
    jobs = db.rows(f"SELECT state, timings, finished_at, created_at FROM jobs "
                   f"WHERE {db.image_jobs()}")
    results = db.rows("SELECT kind, created_at FROM results")
    providers = sorted({r[0] for r in db.rows("SELECT providers FROM workers")})

    written = [parse_ts(r["created_at"]) for r in results]
    written += [parse_ts(r["reported_at"]) for r in studies if r["reported_at"]]
    last_written = max((w for w in written if w is not None), default=utcnow())
    stable = [parse_ts(r["stable_at"]) for r in studies if r["stable_at"]]
    first_stable = min((s for s in stable if s is not None), default=t_drop)
    latency = [(reported - stable_at).total_seconds() for r in studies
               if (reported := parse_ts(r["reported_at"]))
               and (stable_at := parse_ts(r["stable_at"]))]
    stage_values: dict[str, list[float]] = {k: [] for k in STAGES}
    for r in jobs:
        if r["state"] == "done" and r["timings"]:
            timing = json.loads(r["timings"])
            for k in STAGES:
                if k in timing:
                    stage_values[k].append(float(timing[k]))
    sr = [float(r["report_seconds"]) for r in studies if r["report_seconds"] is not None]
    sr_per_image = [float(r["report_seconds"]) / r["images"] for r in studies
                    if r["report_seconds"] is not None and r["images"]]
    total = (last_written - t_drop).total_seconds()
    # Processing: from the first classify job queued to the last result. Queued at
    # admission (the first stable study), that leaves the stable wait out; queued as the
    # instances arrive (``[study] classify_on_arrival``), the workers run during the wait
    # and the window is most of the run: then it is a lower bound of what the workers can
    # do (the reprocess figure, all jobs queued at once, is the other measure).
    queued = [parse_ts(r["created_at"]) for r in jobs]
    first_queued = min((q for q in queued if q is not None), default=first_stable)
    processing = (last_written - first_queued).total_seconds()
    received_ok = [r for r in received if r is not None]
    return {
        "images": n_files,
        "jobs_done": sum(r["state"] == "done" for r in jobs),
        "jobs_not_done": sum(r["state"] != "done" for r in jobs),
        "studies": len(studies),
        "sr_written": sum(r["kind"] == "sr" for r in results),
        "sc_written": sum(r["kind"] == "sc" for r in results),
        "wall_s": total,
        "images_per_s": n_files / total if total > 0 else float("nan"),
        "ingest_s": (max(received_ok) - t_drop).total_seconds() if received_ok else None,
        "first_stable_after_drop_s": (first_stable - t_drop).total_seconds(),
        "first_queued_after_drop_s": (first_queued - t_drop).total_seconds(),
        "processing_s": processing,
        "processing_images_per_s": n_files / processing if processing > 0 else float("nan"),
        "latency_s": {"p50": pct(latency, 50), "p95": pct(latency, 95),
                      "max": max(latency, default=float("nan")), "n": len(latency)},
        "stages": {k: summary(v) for k, v in stage_values.items()},
        "sr_per_study": summary(sr),
        "sr_per_image": summary(sr_per_image),
        "worker_providers": providers,
    }


# --------------------------------------------------------------------------- stage-only


def run_stages(inputs: Inputs, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The worker's stages in-process, batch by batch (prepare, infer, the lung segmenter,
    SC, SEG, findings record),
    then one SR per study built from the records, as a worker's report job builds it."""
    import pydicom

    from cxrd.dicom import SECONDARY_CAPTURE, SEGMENTATION
    from cxrd.findings import ImageFindings
    from cxrd.infer import Classifier, Segmenter
    from cxrd.preprocess import decode_min_side, decode_pixels
    from cxrd.seg import LungSegEncoder
    from cxrd.sr import build_sr
    from cxrd.uids import derived_uid
    from cxrd.worker import (
        heatmap_uids,
        lung_fields,
        prepare,
        save_result,
        seg_uids,
        segmenter_input,
        sr_series_uid,
        warm_up_results,
        write_heatmap,
        write_seg,
    )

    results_dir = run_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    bs = args.batch_size
    clf = Classifier(args.model or None, args.providers, max_batch=bs)
    seg = Segmenter(None, args.providers, max_batch=bs)
    size = clf.input_size

    def segment(preps: list[Any]) -> Any:
        """The worker's segmenter step (``WorkerLoop._segment``)."""
        inputs = []
        for p in preps:
            t = time.perf_counter()
            inputs.append(segmenter_input(p, clf.info, seg.info))
            p.timings["segment"] = time.perf_counter() - t
        t = time.perf_counter()
        out = seg.run(np.stack(inputs))
        for p, o in zip(preps, out, strict=True):
            p.timings["segment"] += (time.perf_counter() - t) / len(preps)
            p.lung_grid = lung_fields(o, seg.info)
        return out

    threshold = clf.info.operating_point.tb_threshold
    # Warm-up, untimed: every batch shape the session runs (CUDA kernels) and the first SC
    # and SR (highdicom loads its tables on first use; a worker pays this once).
    t = time.perf_counter()
    clf.warm_up()
    seg.warm_up()
    warm_up_results(clf.info, seg.info)
    scratch = run_dir / "warm-up"
    p = prepare(inputs.files[0], clf.info)
    probs, cams = clf.run(p.model_input[None])
    write_heatmap(p, probs[0], cams[0], clf.info, scratch, 1)
    encoder = LungSegEncoder(seg.info)
    write_seg(p, segment([p])[0], encoder, scratch, 1)
    build_sr([ImageFindings.of(p.dataset, probs[0], cams[0], threshold)], clf.info)
    shutil.rmtree(scratch, ignore_errors=True)
    # The resolution prepare() decodes at (JPEG 2000: reduced, see cxrd.preprocess).
    min_side = decode_min_side(size)
    decoded = decode_pixels(pydicom.dcmread(inputs.files[0]), min_side=min_side).shape
    warm_up = time.perf_counter() - t
    stage_values: dict[str, list[float]] = {k: [] for k in STAGES}
    records: dict[str, list[tuple[list[float], str]]] = {}
    related: dict[str, list[tuple[str, str, str]]] = {}
    t0 = time.perf_counter()
    for start in range(0, len(inputs.files), bs):
        preps = [prepare(f, clf.info) for f in inputs.files[start:start + bs]]
        t = time.perf_counter()
        probs, cams = clf.run(np.stack([p.model_input for p in preps]))
        infer = (time.perf_counter() - t) / len(preps)
        lungs = segment(preps)
        for i, p in enumerate(preps):
            p.timings["infer"] = infer
            study_uid = str(p.dataset.StudyInstanceUID)
            report = sr_series_uid(study_uid, clf.info)
            sc_uid, _ = write_heatmap(p, probs[i], cams[i], clf.info, results_dir, 1,
                                      report_series_uid=report)
            seg_uid, _ = write_seg(p, lungs[i], encoder, results_dir, 1,
                                   report_series_uid=report)
            source = str(p.dataset.SOPInstanceUID)
            related.setdefault(study_uid, []).extend([  # the SR's evidence, as a worker's
                (SECONDARY_CAPTURE, heatmap_uids(source, study_uid, 1, clf.info)[0], sc_uid),
                (SEGMENTATION, seg_uids(source, study_uid, 1, seg.info)[0], seg_uid)])
            t = time.perf_counter()
            record = ImageFindings.of(p.dataset, probs[i], cams[i], threshold).record()
            p.timings["record"] = time.perf_counter() - t
            for k in STAGES:
                stage_values[k].append(p.timings[k])
            records.setdefault(str(p.dataset.StudyInstanceUID), []).append(
                (probs[i].tolist(), json.dumps(record)))
    sr_seconds, sr_per_image = [], []
    for study_uid, items in records.items():
        t = time.perf_counter()
        images = [ImageFindings.from_record(pr, json.loads(rec)) for pr, rec in items]
        sr = build_sr(images, clf.info, sop_instance_uid=derived_uid("bench-sr", study_uid),
                      series_instance_uid=sr_series_uid(study_uid, clf.info),
                      related=related[study_uid])
        save_result(sr, results_dir)
        sr_seconds.append(time.perf_counter() - t)
        sr_per_image.append(sr_seconds[-1] / len(items))
    wall = time.perf_counter() - t0
    return {
        "images": len(inputs.files),
        "wall_s": wall,
        "images_per_s": len(inputs.files) / wall,
        "input_size": size,
        "providers": clf.providers,
        "warm_up_s": warm_up,
        "decoded_shape": [int(n) for n in decoded],
        "decode_min_side": min_side,
        "stages": {k: summary(v) for k, v in stage_values.items()},
        "sr_per_study": summary(sr_seconds),
        "sr_per_image": summary(sr_per_image),
    }


# --------------------------------------------------------------------------- baseline


def tensorflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


class Baseline:
    """The naive research pipeline: one image at a time, Keras at batch 1, matplotlib."""

    def __init__(self, size: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from training.model import build_classifier  # sets the TF env guards (no XLA)

        self.size = size
        t = time.perf_counter()
        self.model = build_classifier(size)
        self.model.predict(np.zeros((1, size, size, 3), dtype=np.float32), verbose=0)
        self.build_s = time.perf_counter() - t
        # A CAM-like 7x7 map; the overlay's cost does not depend on its values.
        self.heat = np.random.default_rng(0).random((7, 7)).astype(np.float32)

    def run(self, files: Sequence[Path], out_dir: Path) -> dict[str, Any]:
        import matplotlib.pyplot as plt
        import pydicom
        from PIL import Image

        out_dir.mkdir(parents=True, exist_ok=True)
        steps: dict[str, list[float]] = {"decode": [], "preprocess": [], "predict": [],
                                         "overlay": []}
        t_all = time.perf_counter()
        for i, f in enumerate(files):
            t0 = time.perf_counter()
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array
            t1 = time.perf_counter()
            img = pixels.astype(np.float32)
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
            small = np.asarray(Image.fromarray(img).resize((self.size, self.size),
                                                           Image.Resampling.BILINEAR))
            x = np.repeat((small * 2.0 - 1.0)[None, ..., None], 3, axis=-1)
            t2 = time.perf_counter()
            self.model.predict(x, verbose=0)
            t3 = time.perf_counter()
            fig, ax = plt.subplots()
            ax.imshow(img, cmap="gray")
            ax.imshow(self.heat, cmap="jet", alpha=0.4, interpolation="bilinear",
                      extent=(0, img.shape[1], img.shape[0], 0))
            ax.axis("off")
            fig.savefig(out_dir / f"{i:04d}.png")
            plt.close(fig)
            t4 = time.perf_counter()
            for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                steps[k].append(v)
        wall = time.perf_counter() - t_all
        return {"images": len(files), "wall_s": wall, "images_per_s": len(files) / wall,
                "size": self.size, "steps": {k: summary(v) for k, v in steps.items()}}


# --------------------------------------------------------------------------- lean reference


#: Patient and study attributes a derived object copies from its source (PS3.3 C.7.1.1,
#: C.7.2.1).
LEAN_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
               "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
               "ReferringPhysicianName", "StudyDescription")
LEAN_DISPLAY_SIDE = 1024
#: The heatmap's opacity at the hottest point; it falls to 0 with the activation.
LEAN_MAX_ALPHA = 0.6


def _jet_palette() -> list[int]:
    """A 256-entry jet colour map as a flat Pillow palette."""
    x = np.linspace(0.0, 1.0, 256)
    rgb = [np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)]
    return [int(v) for v in np.rint(np.stack(rgb, axis=-1) * 255).astype(np.uint8).ravel()]


class Lean:
    """The job written tightly in one process, with none of cxrd's worker code: the
    per-core reference.

    Per file: ``pydicom.dcmread`` and ``pixel_array`` (full resolution); an 8-bit lookup
    table over the stored values present (rescale, then the first window or a 0.5-99.5
    percentile window, MONOCHROME1 inverted) applied with ``np.take``; Pillow ``reduce`` +
    ``resize`` to the display size (long side 1024) and from there to the model input;
    onnxruntime at batch 1 on one thread; the CAM of the likeliest class upsampled, coloured
    and blended on the display image (opacity growing with the activation) as an RGB
    Secondary Capture (plain pydicom), written with an fsync of the file (cxrd also writes a
    temporary file, renames it and fsyncs the folder). One TID 1500 SR per study
    (highdicom) with each image's three probabilities, written the same way.
    """

    def __init__(self, model: str | None, providers: Sequence[str]) -> None:
        import onnxruntime as ort

        from cxrd.modelinfo import demo_model_path

        self.path = Path(model) if model else demo_model_path()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        available = set(ort.get_available_providers())
        wanted = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.path), options, providers=wanted)
        self.providers: list[str] = list(self.session.get_providers())
        meta = self.session.get_modelmeta().custom_metadata_map
        self.size = int(meta.get("cxrd.input_size") or self.session.get_inputs()[0].shape[1])
        self.device_uid = meta.get("cxrd.device_uid") or "2.25.1"
        self.palette = _jet_palette()
        self.alpha = [round(v * LEAN_MAX_ALPHA) for v in range(256)]

    # -- per image ------------------------------------------------------------------------
    @staticmethod
    def gray8(ds: Any, pixels: np.ndarray) -> np.ndarray:
        """Stored values to 8 bits through a lookup table built over the values present."""
        lo, hi = int(pixels.min()), int(pixels.max())
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = np.arange(lo, hi + 1, dtype=np.float64) * slope + intercept
        if "WindowCenter" in ds and "WindowWidth" in ds:
            centre, width = (float(ds[k].value[0] if ds[k].VM > 1 else ds[k].value)
                             for k in ("WindowCenter", "WindowWidth"))
            low, high = centre - width / 2, centre + width / 2
        else:
            low, high = np.percentile(pixels[::4, ::4] * slope + intercept, (0.5, 99.5))
        unit = np.clip((values - low) / max(float(high - low), 1e-6), 0.0, 1.0)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            unit = 1.0 - unit
        lut = np.rint(unit * 255.0).astype(np.uint8)
        if lo >= 0 and pixels.dtype.kind == "u":  # index by the stored value itself
            lut, index = np.concatenate([np.zeros(lo, np.uint8), lut]), pixels
        else:
            index = pixels.astype(np.int32) - lo
        # In blocks of rows: np.take widens the indices to intp, and a block's copy stays
        # in cache (about 2x faster than one take over a 10 MB image).
        gray = np.empty(pixels.shape, dtype=np.uint8)
        for r in range(0, len(gray), 64):
            np.take(lut, index[r:r + 64], out=gray[r:r + 64], mode="clip")
        return gray

    def downsample(self, gray: np.ndarray) -> tuple[Any, np.ndarray]:
        """The display image (long side LEAN_DISPLAY_SIDE) and the model input from it."""
        from PIL import Image

        img = Image.fromarray(gray)
        rows, cols = gray.shape
        scale = min(1.0, LEAN_DISPLAY_SIDE / max(rows, cols))
        target = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        factor = max(1, int(1 / scale))
        display = img.reduce(factor) if factor > 1 else img
        if display.size != target:
            display = display.resize(target, Image.Resampling.BILINEAR)
        factor = max(1, min(display.size) // self.size)
        small = (display.reduce(factor) if factor > 1 else display).resize(
            (self.size, self.size), Image.Resampling.BILINEAR)
        x = np.asarray(small, dtype=np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
        return display, np.repeat(x[None, :, :, None], 3, axis=3)

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from cxrd.modelinfo import INPUT_NAME, OUTPUT_CAM, OUTPUT_PROBS

        probs, cam = self.session.run([OUTPUT_PROBS, OUTPUT_CAM], {INPUT_NAME: x})
        return probs[0], cam[0]

    def heatmap_sc(self, src: Any, display: Any, probs: np.ndarray, cam: np.ndarray,
                   series_uid: str) -> Any:
        """The CAM of the likeliest class on the display image, as an RGB SC data set."""
        from PIL import Image
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

        k = int(np.argmax(probs))
        c = cam[..., k]
        span = float(c.max() - c.min())
        level = np.rint((c - c.min()) * (255.0 / span if span > 0 else 0.0)).astype(np.uint8)
        heat = Image.fromarray(level).resize(display.size, Image.Resampling.BILINEAR)
        alpha = heat.point(self.alpha)
        heat.putpalette(self.palette)
        rgb = Image.composite(heat.convert("RGB"), display.convert("RGB"), alpha)

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword in LEAN_COPIED:
            if keyword in src:
                setattr(ds, keyword, src[keyword].value)
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 9002
        ds.InstanceNumber = int(src.get("InstanceNumber", 1) or 1)
        ds.Modality, ds.ConversionType = "OT", "WSD"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SeriesDescription = "AI heatmap, not for diagnostic use"
        ds.PatientOrientation = src.get("PatientOrientation", "")
        ds.BodyPartExamined = src.get("BodyPartExamined", "") or "CHEST"
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        ds.SourceImageSequence = [ref]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.Columns, ds.Rows = rgb.size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rgb.tobytes()
        ds["PixelData"].VR = "OB"
        return ds

    @staticmethod
    def write(ds: Any, folder: Path) -> Path:
        from pydicom import dcmwrite

        path = folder / f"{ds.SOPInstanceUID}.dcm"
        with path.open("wb") as fh:
            dcmwrite(fh, ds, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        return path

    # -- per study ------------------------------------------------------------------------
    def sr(self, items: Sequence[tuple[Any, np.ndarray]], folder: Path) -> Path:
        """A minimal TID 1500 report: per image one group holding its three probabilities."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        unit = hd.sr.CodedConcept("1", "UCUM", "no units")
        names = [hd.sr.CodedConcept(f"P-{c}", "99CXRDBENCH", f"Probability of {c}")
                 for c in LABELS]
        groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(), identifier=f"image {src.SOPInstanceUID}"),
            measurements=[hd.sr.Measurement(name=name, value=float(p), unit=unit)
                          for name, p in zip(names, probs, strict=True)],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src)])
            for src, probs in items]
        device = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=self.device_uid, name="cxrd bench lean"))
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=device),
            procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
            imaging_measurements=groups)
        sr = hd.sr.Comprehensive3DSR(
            evidence=[src for src, _ in items], content=report, series_instance_uid=hd.UID(),
            series_number=9001, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="cxrd bench lean", is_complete=True)
        return self.write(sr, folder)

    # -- the loop -------------------------------------------------------------------------
    def run(self, files: Sequence[Path], out_dir: Path) -> dict[str, Any]:
        """Warm up on the first file (untimed), then time every file and study."""
        out_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        self._timed(files[:1], out_dir / "warm-up")
        warm_up = time.perf_counter() - t
        shutil.rmtree(out_dir / "warm-up", ignore_errors=True)
        t0 = time.perf_counter()
        stages, sr_seconds, sr_per_image, decoded = self._timed(files, out_dir)
        wall = time.perf_counter() - t0
        return {"images": len(files), "wall_s": wall, "images_per_s": len(files) / wall,
                "input_size": self.size, "providers": self.providers, "warm_up_s": warm_up,
                "decoded_shape": decoded,
                "stages": {k: summary(v) for k, v in stages.items()},
                "sr_per_study": summary(sr_seconds), "sr_per_image": summary(sr_per_image)}

    def _timed(self, files: Sequence[Path], out_dir: Path
               ) -> tuple[dict[str, list[float]], list[float], list[float], list[int]]:
        """Stage times per image, SR seconds per study and per image, the decoded shape."""
        import pydicom
        from pydicom.uid import generate_uid

        out_dir.mkdir(parents=True, exist_ok=True)
        stages: dict[str, list[float]] = {k: [] for k in STAGES}
        sr_seconds: list[float] = []
        sr_per_image: list[float] = []
        decoded: list[int] = []
        study: list[tuple[Any, np.ndarray]] = []
        series: dict[str, str] = {}

        def flush() -> None:
            if study:
                t = time.perf_counter()
                self.sr(study, out_dir)
                sr_seconds.append(time.perf_counter() - t)
                sr_per_image.append(sr_seconds[-1] / len(study))
                study.clear()

        for f in files:
            t0 = time.perf_counter()
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array
            del ds.PixelData  # the header stays for the SC and the SR's evidence
            t1 = time.perf_counter()
            display, x = self.downsample(self.gray8(ds, pixels))
            decoded = [int(n) for n in pixels.shape]
            del pixels
            t2 = time.perf_counter()
            probs, cam = self.infer(x)
            t3 = time.perf_counter()
            uid = str(ds.StudyInstanceUID)
            if study and str(study[0][0].StudyInstanceUID) != uid:
                flush()
            sc = self.heatmap_sc(ds, display, probs, cam,
                                 series.setdefault(uid, generate_uid()))
            t4 = time.perf_counter()
            self.write(sc, out_dir)
            t5 = time.perf_counter()
            study.append((ds, probs))
            for k, v in (("decode", t1 - t0), ("preprocess", t2 - t1), ("infer", t3 - t2),
                         ("sc", t4 - t3), ("write", t5 - t4)):
                stages[k].append(v)
        flush()
        return stages, sr_seconds, sr_per_image, decoded



# --------------------------------------------------------------------------- printing


def print_header(args: argparse.Namespace, info: dict[str, Any]) -> None:
    print("cxrd pipeline benchmark")
    print(f"  images      {args.n} x {ROWS}x{COLS} CR, {args.per_study} per study")
    print(f"  model       {info['model']} (input {info['input_size']}px"
          f"{', demo' if info['demo'] else ''})")
    print(f"  providers   asked {','.join(args.providers)}; in use {','.join(info['providers'])}")
    mode = "in-process stages (--stage-only)" if args.stage_only else (
        f"cxrd serve, processes={args.processes}, batch_size={args.batch_size}, "
        f"stable_seconds={args.stable_seconds:g}, settle_seconds=0.2, "
        f"lung segmenter {args.segmenter}")
    print(f"  mode        {mode}")
    print(f"  cpus        {os.cpu_count()}")


def print_stage_table(m: dict[str, Any]) -> None:
    print(f"    {'stage':<12}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}{'n':>6}")
    total = 0.0
    for k in STAGES:
        s = m["stages"][k]
        total += s["mean"] if s["n"] else 0.0
        print(f"    {k:<12}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p95']):>10}{s['n']:>6}")
    s = m["sr_per_image"]
    total += s["mean"] if s["n"] else 0.0
    print(f"    {'SR/image':<12}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p95']):>10}{s['n']:>6}"
          "   (study SR time / its images)")
    s = m["sr_per_study"]
    print(f"    {'SR/study':<12}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p95']):>10}{s['n']:>6}")
    print(f"    {'sum/image':<12}{ms(total):>10}{'':>10}{'':>10}{'':>6}"
          f"   (serial work per image -> {1 / total if total else float('nan'):.1f} images/s "
          "per busy core)")


def print_daemon(variant: str, m: dict[str, Any]) -> None:
    print(f"\n== {variant}: cxrd serve, watched folder -> SR + SC ==")
    print(f"  images/s      {m['images_per_s']:.2f}   ({m['images']} images, first file "
          f"dropped -> last result written {m['wall_s']:.2f} s)")
    print(f"  processing    {m['processing_images_per_s']:.2f} images/s   (first classify job "
          f"queued -> last result {m['processing_s']:.2f} s: excludes the stable_seconds wait "
          "when jobs are queued at admission; with classify_on_arrival the workers run "
          "during it, and this is a lower bound)")
    print(f"  timeline      first job queued +{m['first_queued_after_drop_s']:.2f} s, all "
          f"ingested +{m['ingest_s']:.2f} s, first study stable "
          f"+{m['first_stable_after_drop_s']:.2f} s, last result +{m['wall_s']:.2f} s")
    lat = m["latency_s"]
    print(f"  latency       stable -> results written, per study: p50 {lat['p50']:.2f} s, "
          f"p95 {lat['p95']:.2f} s, max {lat['max']:.2f} s (n={lat['n']})")
    print(f"  written       {m['sc_written']} SC, {m['sr_written']} SR; jobs done "
          f"{m['jobs_done']}, not done {m['jobs_not_done']}")
    print(f"  node          ready in {m['startup_s']:.1f} s with {m['workers']} workers "
          f"(processes = {json.dumps(m['processes_config'])}), drained in "
          f"{m['drain_s']:.1f} s (exit {m['exit_code']}); worker providers "
          f"{', '.join(m['worker_providers'])}")
    print_memory(m["memory"])
    cpu = m["memory"].get("cpu_s") or {}
    if cpu:
        n = m["images"]
        parts = ", ".join(f"{k} {v / n * 1000:.1f}" for k, v in sorted(cpu.items()))
        print(f"  CPU per image {sum(cpu.values()) / n * 1000:.1f} ms ({parts}; drop -> all "
              f"reported, utime + stime from /proc)")
    sched = m["scheduler"]
    if sched is None:
        print("  scheduler CPU per study: n/a   (no scheduler_cpu_s in the node's "
              "action=drain-done line)")
    else:
        again = "; node lifetime, so the reprocess pass too" if m["reprocess"] else ""
        admitting = sched.get("per_admitted_study_s", float("nan"))
        if admitting == admitting:  # not NaN: the node splits the admitting ticks out
            print(f"  scheduler CPU per admitted study: {admitting * 1000:.1f} ms   (the "
                  f"ticks that admitted studies: {sched['admitting_cpu_s']:.3f} s CPU / "
                  f"{sched['admitted_studies']} studies{again})")
        print(f"  scheduler CPU per study: {sched['per_study_s'] * 1000:.1f} ms   (main process "
              f"{sched['scheduler_cpu_s']:.3f} s CPU over {sched['scheduler_ticks'] or '?'} "
              f"ticks / {m['studies']} studies: node lifetime, start-up and idle rounds "
              f"included{again})")
    if m["reprocess"]:
        print_reprocess(m)
    print("  per-image stage times (Job.timings; SR from Study.report_seconds):")
    print_stage_table(m)


def print_memory(mem: dict[str, Any]) -> None:
    def mb(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f} MB"

    print(f"  memory        peak RSS (VmHWM): main process {mb(mem['main_vmhwm_mb'])}, "
          f"max child {mb(mem['max_child_vmhwm_mb'])}")
    for c in mem["children"]:
        print(f"                  pid {c['pid']:<8} {c['what']:<22} {mb(c['vmhwm_mb'])}")


def print_reprocess(m: dict[str, Any]) -> None:
    r = m["reprocess"]
    fresh = m["processing_images_per_s"]
    print(f"  reprocess     {r['images_per_s']:.2f} images/s   ({r['images']} images, "
          f"{r['jobs_done']} image jobs done, "
          f"`cxrd reprocess` start -> last generation-2 result {r['seconds']:.2f} s; the "
          f"command itself {r['command_s']:.2f} s)")
    print(f"                vs fresh processing {fresh:.2f} images/s: reprocess/fresh "
          f"{r['images_per_s'] / fresh:.2f}x   [{r['output']}]")
    print(f"  reprocess processing {r['processing_images_per_s']:.2f} images/s   (first study "
          f"requeued -> last generation-2 result {r['processing_s']:.2f} s, as fresh processing "
          f"is timed): reprocess/fresh {r['processing_images_per_s'] / fresh:.2f}x")


def print_lean(variant: str, m: dict[str, Any]) -> None:
    print(f"\n== {variant}: lean reference (one process: pydicom + uint8 LUT + Pillow + "
          "onnxruntime batch 1, 1 thread + pydicom SC + highdicom SR) ==")
    print(f"  images/s      {m['images_per_s']:.2f}   ({m['images']} images in "
          f"{m['wall_s']:.2f} s, one process, one core)")
    rows, cols = m["decoded_shape"]
    print(f"  providers     {', '.join(m['providers'])} (input {m['input_size']}px); "
          f"decoded at {rows}x{cols} (pixel_array); untimed warm-up {m['warm_up_s']:.2f} s")
    print_stage_table(m)


def print_compare(variant: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    print(f"\n== {variant}: before ({before['tree']}) / after (this tree), cxrd serve ==")
    print(f"    {'':<16}{'before':>10}{'after':>10}{'after/before':>14}")
    rows = [("images/s", before["images_per_s"], after["images_per_s"]),
            ("processing/s", before["processing_images_per_s"],
             after["processing_images_per_s"]),
            ("latency p50 s", before["latency_s"]["p50"], after["latency_s"]["p50"]),
            ("latency p95 s", before["latency_s"]["p95"], after["latency_s"]["p95"])]
    for name, b, a in rows:
        print(f"    {name:<16}{b:>10.2f}{a:>10.2f}{a / b if b else float('nan'):>13.2f}x")
    print(f"    {'workers':<16}{before['workers']:>10}{after['workers']:>10}")
    print("  (after/before above 1 is faster for images/s, slower for latency)")
    if before["workers"] != after["workers"]:
        print(f"  note: the trees ran {before['workers']} and {after['workers']} workers; pass "
              f"--compare-processes {after['workers']} (or an integer --processes) to compare "
              "like with like")


def ratios(entry: dict[str, Any], stage_only: bool) -> dict[str, float]:
    """cxrd's images/s over the naive and the lean arm's, from the same run."""
    c = entry["cxrd"]
    out: dict[str, float] = {}
    if "baseline" in entry:
        naive = entry["baseline"]["images_per_s"]
        out["cxrd_over_naive"] = c["images_per_s"] / naive
        if not stage_only:
            out["cxrd_over_naive_processing"] = c["processing_images_per_s"] / naive
    if "lean" in entry:
        ours = c["images_per_s"] if stage_only else c["processing_images_per_s"]
        out["cxrd_over_lean"] = ours / entry["lean"]["images_per_s"]
    return out


def print_ratios(report: dict[str, Any], stage_only: bool) -> None:
    rows = {v: e["ratios"] for v, e in report["variants"].items() if e.get("ratios")}
    if not rows:
        return
    def cell(r: dict[str, float], key: str) -> str:
        return f"{r[key]:.2f}x" if key in r else "-"

    what = "in-process" if stage_only else "end-to-end"
    print("\n== ratios (all arms from this run) ==")
    print(f"    {'variant':<14}{'cxrd/naive':>12}{'excl. wait':>12}{'cxrd/lean':>12}")
    for v, r in rows.items():
        print(f"    {v:<14}{cell(r, 'cxrd_over_naive'):>12}"
              f"{cell(r, 'cxrd_over_naive_processing'):>12}{cell(r, 'cxrd_over_lean'):>12}")
    lean = ("cxrd's in-process images/s" if stage_only else
            "cxrd's processing images/s (excludes the stable_seconds wait; all its workers)")
    print(f"  cxrd/naive: {what} cxrd images/s over the naive arm's; excl. wait: cxrd's "
          "processing images/s over it")
    print(f"  cxrd/lean: {lean} over the lean arm's (one process, one core)")


def print_stage_only(variant: str, m: dict[str, Any]) -> None:
    print(f"\n== {variant}: in-process stages (no queue, no watcher) ==")
    print(f"  images/s      {m['images_per_s']:.2f}   ({m['images']} images in "
          f"{m['wall_s']:.2f} s, one process)")
    print(f"  providers     {', '.join(m['providers'])} (input {m['input_size']}px); "
          f"untimed warm-up {m['warm_up_s']:.2f} s")
    rows, cols = m["decoded_shape"]
    how = "full" if (rows, cols) == (ROWS, COLS) else "reduced JPEG 2000"
    print(f"  decoded at    {rows}x{cols} of {ROWS}x{COLS} ({how} decode; min_side "
          f"{m['decode_min_side']})")
    print_stage_table(m)


def print_baseline(variant: str, b: dict[str, Any], cxrd: dict[str, Any],
                   stage_only: bool) -> None:
    print(f"\n== {variant}: naive baseline (pydicom + min-max + Keras predict batch 1 + "
          "matplotlib overlay) ==")
    print(f"  images/s      {b['images_per_s']:.2f}   ({b['images']} images in "
          f"{b['wall_s']:.2f} s, Keras input {b['size']}px)")
    print(f"    {'step':<12}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}")
    for k, s in b["steps"].items():
        print(f"    {k:<12}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p95']):>10}")
    ratio = cxrd["images_per_s"] / b["images_per_s"]
    what = "in-process" if stage_only else "end-to-end"
    print(f"  cxrd/baseline {ratio:.2f}x ({what} cxrd {cxrd['images_per_s']:.2f} images/s)")
    if not stage_only:
        r2 = cxrd["processing_images_per_s"] / b["images_per_s"]
        print(f"                {r2:.2f}x excluding the stable_seconds wait")


# --------------------------------------------------------------------------- main


def _plain(value: Any) -> Any:
    """JSON-safe: NaN becomes null, paths and numpy scalars plain values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if value != value else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)


def processes_arg(value: str) -> int | str:
    """``auto`` or an integer >= 1."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not 'auto' or an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark cxrd from the watched folder to SR + SC on disk, per "
                    "transfer syntax, against a naive Keras/matplotlib baseline.")
    p.add_argument("--n", type=int, default=48, help="images per variant (default 48)")
    p.add_argument("--per-study", type=int, default=4, help="images per study (default 4)")
    p.add_argument("--variants", default="uncompressed,j2k",
                   help="comma-separated: uncompressed, j2k (default both)")
    p.add_argument("--processes", type=processes_arg, default="auto",
                   help="workers.processes: an integer or auto (default auto)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="workers.batch_size (default 4, the node's default)")
    p.add_argument("--model", help="ONNX model file (default: the embedded demo model)")
    p.add_argument("--providers", default=DEFAULT_PROVIDERS,
                   help=f"onnxruntime providers in order (default {DEFAULT_PROVIDERS})")
    p.add_argument("--segmenter", choices=("on", "off"), default="on",
                   help="the node's lung segmenter and SEG (default on, the node's default); "
                        "off: [model] segmenter = \"off\" (trees without one run as they are)")
    p.add_argument("--stable-seconds", type=float, default=1.0,
                   help="study.stable_seconds for the node (default 1)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cxrd-bench",
                   help="work folder: cache/ holds generated inputs, runs/ the node data "
                        "(default $TMPDIR/cxrd-bench)")
    p.add_argument("--keep", action="store_true",
                   help="keep each run's data folder (spool, results, DB, log)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every number as JSON")
    p.add_argument("--stage-only", action="store_true",
                   help="skip the daemon: run prepare/infer/SC/write/SR in-process")
    p.add_argument("--no-baseline", action="store_true", help="skip the Keras baseline")
    p.add_argument("--no-lean", action="store_true",
                   help="skip the lean one-process reference arm")
    p.add_argument("--compare", metavar="REF",
                   help="also run the daemon from a git worktree of REF (a commit-ish), "
                        "before this tree, on the same files")
    p.add_argument("--compare-processes", type=int, metavar="N",
                   help="workers.processes for the --compare tree (default: --processes "
                        "when it is an integer, else 1)")
    p.add_argument("--reprocess", action="store_true",
                   help="after each fresh daemon run (not the --compare tree's), time "
                        "`cxrd reprocess` of every study against the running node")
    p.add_argument("--baseline-size", type=int, default=224,
                   help="Keras baseline input size (default 224, the founding model's)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for all studies per variant (default 600)")
    p.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    return p


def in_run_dir(name: str, runs: Path, run: Callable[..., dict[str, Any]], inputs: Inputs,
               args: argparse.Namespace, *more: Any) -> dict[str, Any] | None:
    """``run(inputs, run_dir, args, *more)`` in a fresh folder under ``runs``, deleted
    afterwards unless --keep or it failed; None when it failed."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=runs))
    try:
        result = run(inputs, run_dir, args, *more)
    except RuntimeError as exc:
        log(f"{name}: FAILED: {exc}\n(kept {run_dir})")
        return None
    result["run_dir"] = str(run_dir)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def compare_processes(args: argparse.Namespace) -> int:
    """The compare tree's workers.processes: an old tree may not accept "auto"."""
    if args.compare_processes is not None:
        return int(args.compare_processes)
    return args.processes if isinstance(args.processes, int) else 1


def run_variants(args: argparse.Namespace, inputs: dict[str, Inputs], runs: Path,
                 report: dict[str, Any], compare: Tree | None) -> bool:
    """cxrd (and the compare tree before it) per variant; False when a run failed."""
    ok = True
    for v in args.variants:
        before = None
        if compare is not None:
            before = in_run_dir(f"{v}-compare", runs, run_node, inputs[v], args, compare,
                                compare_processes(args), False)
            ok = ok and before is not None
        after = in_run_dir(v, runs, run_stages if args.stage_only else run_daemon, inputs[v],
                           args)
        if after is None:
            ok = False
            continue
        entry: dict[str, Any] = {"cxrd": after, "run_dir": after["run_dir"]}
        if before is not None:
            entry["compare"] = before
        report["variants"][v] = entry
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        print(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.n < 1 or args.per_study < 1 or args.batch_size < 1:
        print("--n, --per-study and --batch-size must be >= 1", file=sys.stderr)
        return 2
    if args.compare and args.stage_only:
        print("--compare runs the daemon: not with --stage-only", file=sys.stderr)
        return 2
    if args.compare_processes is not None and args.compare_processes < 1:
        print("--compare-processes must be >= 1", file=sys.stderr)
        return 2

    from cxrd.infer import Classifier

    clf = Classifier(args.model or None, args.providers)  # input size and providers in use
    info = {"model": clf.info.display_name, "input_size": clf.input_size,
            "demo": clf.info.demo, "providers": clf.providers, "path": str(clf.path)}
    del clf

    args.work.mkdir(parents=True, exist_ok=True)
    inputs = generate_inputs(args.work / "cache", args.n, args.per_study, args.seed,
                             args.variants)
    runs = args.work / "runs"
    runs.mkdir(exist_ok=True)
    report: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v
                                       for k, v in vars(args).items()},
                              "model": info, "cpus": os.cpu_count(), "variants": {}}
    compare = None
    if args.compare:
        try:
            compare = compare_tree(args.compare, args.work)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            log(f"--compare {args.compare}: FAILED: {exc}")
            return 1
    failed = not run_variants(args, inputs, runs, report, compare)

    if not args.no_lean and report["variants"]:
        lean = Lean(args.model or None, args.providers)
        for v, entry in report["variants"].items():
            with tempfile.TemporaryDirectory(dir=runs) as tmp:
                log(f"{v}: lean reference over {len(inputs[v].files)} images")
                entry["lean"] = lean.run(inputs[v].files, Path(tmp))
        del lean

    baseline_note = "skipped (--no-baseline)"
    if not args.no_baseline and report["variants"]:
        if tensorflow_available():
            log("baseline: building the Keras model (TensorFlow import takes a while)")
            base = Baseline(args.baseline_size)
            report["baseline_build_s"] = base.build_s
            for v, entry in report["variants"].items():
                with tempfile.TemporaryDirectory(dir=runs) as tmp:
                    log(f"{v}: baseline over {len(inputs[v].files)} images")
                    entry["baseline"] = base.run(inputs[v].files, Path(tmp))
            baseline_note = ""
        else:
            baseline_note = ("skipped: TensorFlow is not importable (install the [train] "
                             "extra to time the naive baseline)")

    for entry in report["variants"].values():
        entry["ratios"] = ratios(entry, args.stage_only)
    print_header(args, info)
    for v, entry in report["variants"].items():
        (print_stage_only if args.stage_only else print_daemon)(v, entry["cxrd"])
        if "compare" in entry:
            print_compare(v, entry["compare"], entry["cxrd"])
        if "baseline" in entry:
            print_baseline(v, entry["baseline"], entry["cxrd"], args.stage_only)
        if "lean" in entry:
            print_lean(v, entry["lean"])
    print_ratios(report, args.stage_only)
    if baseline_note:
        print(f"\nbaseline {baseline_note}")
        report["baseline_note"] = baseline_note
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_plain(report), indent=2, allow_nan=False) + "\n")
        log(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
