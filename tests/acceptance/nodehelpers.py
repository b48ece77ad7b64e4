"""Helpers of the acceptance tier: ``cxrd serve`` and the other subcommands run as real
subprocesses (the fixtures over them are in ``conftest.py``).

Each test gets its own data folder and config (short ``stable_seconds``, settle time and
lease, no metrics endpoint). The node runs in its own session (process group), so a test
can signal the group as systemd or a terminal would, and teardown can kill whatever a
crash left behind. The database is read through a plain SQLAlchemy engine that never
takes the write lock (``cxrd.db.Database`` begins every transaction IMMEDIATE), with the
ORM models of ``cxrd.db``. Processes are inspected through ``/proc`` (no psutil).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
import pytest
from dicompeers import free_port, wait_for
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from cxrd.db import Instance, Job, Rejection, Result, Study
from cxrd.domain import InstanceState, JobState, ResultKind, StudyState
from cxrd.modelinfo import CLASS_NAMES
from training.phantoms import (
    DicomOptions,
    generate_studies,
    make_phantom,
    random_patient_study,
    write_dicom,
)

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cxrd.cli"]
#: Small images keep decoding, inference and SC encoding fast on a 2-core machine.
IMAGE_SIZE = (400, 330)
LEASE_SECONDS = 5
#: Start-up imports onnxruntime and loads the model in each process; the machine is shared.
START_TIMEOUT = 90.0
DONE_TIMEOUT = 120.0

T = TypeVar("T")


# ------------------------------------------------------------------------------ waiting


def wait_until(condition: Callable[[], T], timeout: float, what: str,
               interval: float = 0.1) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    value: T = wait_for(condition, timeout, what, interval)
    return value


# ---------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # the state follows the parenthesised command name, which may itself hold spaces
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc/<pid>/task/*/children)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return sorted(p for p in found if pid_alive(p))


def session_members(sid: int) -> list[int]:
    """Live processes in session ``sid`` (a node started with ``start_new_session``): its
    children stay in it after the node has exited and they were reparented."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command name: state, ppid, pgrp, session
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return sorted(found)


def is_worker(pid: int) -> bool:
    """A multiprocessing spawn child (the resource tracker is not a worker)."""
    line = cmdline(pid)
    return "spawn_main" in line and "resource_tracker" not in line


# ------------------------------------------------------- nodes sharing PostgreSQL and a PACS

#: The local PostgreSQL server's maintenance database; each test makes its own database.
ADMIN_URL = os.environ.get("CXRD_TEST_POSTGRES_ADMIN_URL",
                           "postgresql://postgres@127.0.0.1:5432/postgres")


def admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


@contextlib.contextmanager
def shared_database(prefix: str) -> Iterator[str]:
    """A database of this test's own on the local server (its URL); dropped afterwards.
    The server missing fails the test, unless ``CXRD_SKIP_POSTGRES=1`` says to skip."""
    if os.environ.get("CXRD_SKIP_POSTGRES") == "1":
        pytest.skip("CXRD_SKIP_POSTGRES=1")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        pytest.fail(f"PostgreSQL at {ADMIN_URL} is unreachable ({exc}); set "
                    "CXRD_SKIP_POSTGRES=1 on machines without it")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin(f'DROP DATABASE "{name}" WITH (FORCE)')


def shared_node_config(root: Path, node_id: str, url: str, scp_port: int, *,
                       processes: int = 1, storage: str = "", extra: str = "") -> NodeDirs:
    """The config of one node of several that share the PostgreSQL database ``url``: its
    own ``[node] id`` and data folder, the destination ``storescp`` on ``scp_port`` (the
    same on every node: a worker queues its results for its own config's destinations),
    ``storage`` TOML lines added to ``[storage]`` (``store = ...``, or ``data_dir``
    replaced by a shared one), and ``extra`` TOML appended."""
    root.mkdir(parents=True)
    dirs = write_config(root, processes=processes, extra=f"""
[[destinations]]
name = "pacs"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {scp_port}
{extra}""")
    text = dirs.config.read_text()
    text = text.replace("[node]\n", f'[node]\nid = "{node_id}"\n', 1)
    text = text.replace("[storage]\n", f'[storage]\ndatabase_url = "{url}"\n', 1)
    data_dir = re.search(r'^data_dir = "(.*)"$', storage, re.M)
    if data_dir is not None:  # a shared data folder in place of this node's own
        text = text.replace(f'data_dir = "{dirs.data_dir}"\n', "", 1)
        dirs = NodeDirs(root, Path(data_dir[1]), dirs.config)
    text = text.replace("[storage]\n", f"[storage]\n{storage.strip()}\n", 1)
    dirs.config.write_text(text)
    return dirs


def node_port(dirs: NodeDirs) -> int:
    """The ``[node] port`` of a node's config."""
    port = re.search(r"^port = (\d+)$", dirs.config.read_text(), re.M)
    assert port is not None
    return int(port[1])


# -------------------------------------------------------------------------------- nodes


@dataclass
class NodeDirs:
    root: Path
    data_dir: Path
    config: Path

    @property
    def incoming(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def results(self) -> Path:
        return self.data_dir / "results"

    @property
    def database(self) -> Path:
        return self.data_dir / "cxrd.sqlite3"


def write_config(root: Path, *, processes: int = 1, batch_size: int = 4,
                 level: str = "INFO", extra: str = "") -> NodeDirs:
    """A config for a fast test node in ``root``; ``extra`` is appended TOML."""
    data_dir = root / "data"
    config = root / "cxrd.toml"
    config.write_text(f"""\
[node]
host = "127.0.0.1"
port = {free_port()}

[storage]
data_dir = "{data_dir}"

[watch]
settle_seconds = 0.2

[study]
stable_seconds = 1

[model]
providers = ["CPUExecutionProvider"]

[workers]
processes = {processes}
batch_size = {batch_size}
lease_seconds = {LEASE_SECONDS}
max_attempts = 5
retry_backoff_seconds = 0

[metrics]
listen = ""

[logging]
level = "{level}"
{extra}""")
    return NodeDirs(root, data_dir, config)


def local_file(dirs: NodeDirs, key: str) -> Path:
    """The file of a store key (``instances.path``, ``results.path``) of a node with a
    local store: found through the node's own ``cxrd.store.NodeStore``, which maps
    ``results/`` keys to ``[results] folder``."""
    from cxrd.config import load_config
    from cxrd.store import open_node_store

    path = open_node_store(load_config(dirs.config, env={})).local_path(key)
    assert path is not None, f"{dirs.config}: not a local store"
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CXRD_CONFIG", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class NodeProcess:
    """One ``cxrd serve`` (or ``cxrd worker``: ``command``) subprocess; its stdout and
    stderr go to a log file. ``prefix`` goes before the command line: ``ip netns exec NS``
    runs the node in a network namespace (``netns.Host``); ip execs the node in its own
    place, so ``pid`` is still the node's and its process group the node's tree."""

    def __init__(self, dirs: NodeDirs, name: str, env: dict[str, str] | None = None,
                 command: str = "serve", prefix: Sequence[str] = ()) -> None:
        self.dirs = dirs
        self.command = command
        self.log_path = dirs.root / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*prefix, *CLI, command, "--config", str(dirs.config)], cwd=dirs.root,
            env=env or cli_env(),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        return [p for p in children(self.pid) if is_worker(p)]

    def wait_ready(self, processes: int = 1, timeout: float = START_TIMEOUT) -> list[int]:
        """Wait until ``processes`` workers have loaded the model; returns their pids."""
        def ready() -> list[int]:
            if self.proc.poll() is not None:
                pytest.fail(f"cxrd {self.command} exited with {self.proc.returncode}:\n"
                            f"{self.log()}")
            pids = self.workers()
            lines = [ln for ln in self.log().splitlines() if "action=worker-start" in ln]
            started = [p for p in pids if any(f":{p}:w" in ln for ln in lines)]
            return pids if len(started) >= processes else []
        return wait_until(ready, timeout,
                          f"{processes} worker(s) of cxrd {self.command} to start")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cxrd serve did not exit within {timeout:.0f}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the drain; returns the exit code."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill_group(self) -> None:
        """Teardown: nothing this node started (orphans included) may outlive the test."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


class Nodes:
    """Starts nodes for one test and kills their process groups afterwards."""

    def __init__(self) -> None:
        self.started: list[NodeProcess] = []

    def start(self, dirs: NodeDirs, processes: int = 1, command: str = "serve",
              env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> NodeProcess:
        """Start ``cxrd <command>`` and wait for its ``processes`` workers (with none, for
        the node's start line); ``env`` is added to ``cli_env()``, ``prefix`` goes before
        the command line (``NodeProcess``)."""
        node = NodeProcess(dirs, f"{command}-{len(self.started) + 1}", command=command,
                           env={**cli_env(), **env} if env else None, prefix=prefix)
        self.started.append(node)
        if processes:
            node.wait_ready(processes)
        else:
            def started() -> bool:
                if node.proc.poll() is not None:
                    pytest.fail(f"cxrd {command} exited with {node.proc.returncode}:\n"
                                f"{node.log()}")
                return "action=node-start" in node.log()
            wait_until(started, START_TIMEOUT, f"cxrd {command} to start")
        return node

    def close(self) -> None:
        for node in self.started:
            node.kill_group()


def run_cli(*args: str, timeout: float = 120.0, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a ``cxrd`` subcommand to completion; stdout and stderr are captured."""
    return subprocess.run([*CLI, *args], cwd=cwd, env=env or cli_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False)


def status_json(dirs: NodeDirs) -> dict[str, Any]:
    done = run_cli("status", "--json", "--config", str(dirs.config))
    assert done.returncode in (0, 2), done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


# ------------------------------------------------------------------------------ database


class DbView:
    """Read-only look at a node's SQLite database (plain BEGIN: no write lock taken)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(f"sqlite:///{self.path}", poolclass=NullPool,
                                         connect_args={"timeout": 30})
        return self._engine

    def session(self) -> Session:
        return Session(self.engine)

    def exists(self) -> bool:
        return self.path.exists()

    def count(self, model: type, *where: Any) -> int:
        if not self.exists():
            return 0
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    def states(self, column: Any) -> dict[str, int]:
        if not self.exists():
            return {}
        with self.session() as s:
            return {str(k): int(n) for k, n in s.execute(
                select(column, func.count()).group_by(column)).all()}

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def incoming_files(dirs: NodeDirs) -> list[Path]:
    return sorted(p for p in dirs.incoming.rglob("*") if p.is_file()) \
        if dirs.incoming.exists() else []


def settled(dirs: NodeDirs, db: DbView) -> bool:
    """Everything dropped has been ingested, admitted, classified and reported."""
    if incoming_files(dirs) or not db.exists():
        return False
    busy_instances = db.count(Instance, Instance.state.in_(
        (InstanceState.RECEIVED.value, InstanceState.QUEUED.value)))
    busy_jobs = db.count(Job, Job.state.in_((JobState.PENDING.value, JobState.RUNNING.value)))
    busy_studies = db.count(Study, Study.state.in_(
        (StudyState.COLLECTING.value, StudyState.ADMITTED.value)))
    return busy_instances == 0 and busy_jobs == 0 and busy_studies == 0 \
        and db.count(Instance) > 0


# ----------------------------------------------------------------------------- DICOM sets


@dataclass(frozen=True)
class Dropped:
    """One generated file and what the node should make of it."""

    path: Path  # relative to the set's folder
    study_instance_uid: str
    sop_instance_uid: str
    view: str
    body_part: str

    @property
    def classifiable(self) -> bool:
        return self.body_part == "CHEST" and self.view in ("PA", "AP")


@dataclass(frozen=True)
class PhantomSet:
    folder: Path
    files: tuple[Dropped, ...]

    def studies(self) -> list[str]:
        return list(dict.fromkeys(f.study_instance_uid for f in self.files))

    def drop(self, incoming: Path, files: Iterable[Dropped] | None = None) -> None:
        """Copy files into the watched folder as a slow copier would: plain writes."""
        incoming.mkdir(parents=True, exist_ok=True)
        for f in self.files if files is None else files:
            shutil.copyfile(self.folder / f.path, incoming / f.path.name)


def make_phantom_set(folder: Path, n_files: int, seed: int) -> PhantomSet:
    """``n_files`` DICOM files from whole studies of the phantom generator (frontal,
    lateral and non-chest, CR and DX, MONOCHROME1/2), cut to exactly ``n_files``."""
    n_studies = n_files // 2
    while len(rows := generate_studies(folder, n_studies=n_studies, seed=seed,
                                       images_per_study=(1, 4), size=IMAGE_SIZE)) < n_files:
        n_studies += 4
    keep = rows[:n_files]
    for extra in rows[n_files:]:
        (folder / extra.path).unlink()
    files = tuple(Dropped(Path(r.path), r.study_instance_uid, r.sop_instance_uid, r.view,
                          r.body_part) for r in keep)
    assert len(files) == n_files
    return PhantomSet(folder, files)


def frontal_set(folder: Path, n_studies: int = 4, per_study: int = 3,
                seed: int = 4711) -> PhantomSet:
    """Frontal chest CR images only (every one is classified)."""
    rng = np.random.default_rng(4711)
    files: list[Dropped] = []
    for study_no in range(n_studies):
        study = random_patient_study(rng)
        for j in range(per_study):
            ph = make_phantom(rng, ("TB", "NTB", "NORM")[j % 3], *IMAGE_SIZE)
            rel = Path(f"s{study_no}-{j}.dcm")
            ds = write_dicom(ph, folder / rel, study, DicomOptions(modality="CR"),
                             series_number=j + 1)
            files.append(Dropped(rel, study.study_instance_uid, str(ds.SOPInstanceUID),
                                 ph.view, ph.body_part))
    return PhantomSet(folder, tuple(files))


def phi_study(folder: Path, n: int = 2) -> PhantomSet:
    """Studies whose patient attributes are sentinels a log line must never carry: one
    conformant, and one (a single image) whose birth date is written the wrong way
    ("1901-12-31"), as some devices do: pydicom and highdicom quote such values in their
    warnings and errors."""
    rng = np.random.default_rng(99)
    files = []
    for k, birth_date in enumerate((PHI_BIRTH_DATE, PHI_BIRTH_DATE_MALFORMED)):
        study = dataclasses.replace(random_patient_study(rng), patient_name=PHI_NAME,
                                    patient_id=PHI_ID, birth_date=birth_date)
        for j in range(n if k == 0 else 1):
            ph = make_phantom(rng, "NORM", *IMAGE_SIZE)
            rel = Path(f"phi-{k}-{j}.dcm")
            ds = write_dicom(ph, folder / rel, study, DicomOptions(modality="DX"),
                             series_number=j + 1)
            files.append(Dropped(rel, study.study_instance_uid, str(ds.SOPInstanceUID),
                                 ph.view, ph.body_part))
    return PhantomSet(folder, tuple(files))


PHI_NAME = "PHITEST^SENTINEL"
PHI_ID = "PID-SENTINEL-123"
PHI_BIRTH_DATE = "19011231"
PHI_BIRTH_DATE_MALFORMED = "1901-12-31"


# ------------------------------------------------------------------------------- results


#: The SOP classes of cxrd's own results that an SR lists as evidence beside its source
#: images (the heatmap SCs and lung SEGs: IHE AIR). The acceptance tests' sources are CR
#: and DX, so these never name a source.
RESULT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.66.4")


def _sr_evidence(path: Path) -> tuple[str, set[tuple[str, str]]]:
    ds = pydicom.dcmread(path)
    refs = {(str(sop.ReferencedSOPClassUID), str(sop.ReferencedSOPInstanceUID))
            for item in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in item.get("ReferencedSeriesSequence", [])
            for sop in series.get("ReferencedSOPSequence", [])}
    return str(ds.StudyInstanceUID), refs


def sr_references(path: Path) -> tuple[str, set[str]]:
    """(StudyInstanceUID, the SOP Instance UIDs of the source images an SR names as its
    evidence)."""
    study, refs = _sr_evidence(path)
    return study, {uid for sop_class, uid in refs if sop_class not in RESULT_SOP_CLASSES}


def sr_results(path: Path) -> set[str]:
    """The SOP Instance UIDs of the SCs and SEGs an SR names as its evidence."""
    return {uid for sop_class, uid in _sr_evidence(path)[1] if sop_class in RESULT_SOP_CLASSES}


def sr_predecessors(path: Path) -> set[str]:
    ds = pydicom.dcmread(path)
    return {str(sop.ReferencedSOPInstanceUID)
            for item in ds.get("PredecessorDocumentsSequence", [])
            for series in item.get("ReferencedSeriesSequence", [])
            for sop in series.get("ReferencedSOPSequence", [])}


def sr_probabilities(path: Path) -> dict[str, dict[str, float]]:
    """{image SOP Instance UID: {class: probability}} from an SR's TID 1501 probability
    groups (tracking identifier "cxrd probability <class>, image <n>")."""
    found: dict[str, dict[str, float]] = {}

    def walk(items: Iterable[Any]) -> None:
        for item in items:
            content = list(item.get("ContentSequence", []))
            label = next((str(c.TextValue) for c in content if c.get("ValueType") == "TEXT"
                          and str(c.get("TextValue", "")).startswith("cxrd probability ")), None)
            if label is not None:
                class_name = label.split()[2].rstrip(",")
                number = next(c for c in content if c.get("ValueType") == "NUM")
                image = next(c for c in content if c.get("ValueType") == "IMAGE")
                uid = str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                value = float(number.MeasuredValueSequence[0].NumericValue)
                found.setdefault(uid, {})[class_name] = value
            walk(content)

    walk(pydicom.dcmread(path).get("ContentSequence", []))
    return found


def recorded_probabilities(db: DbView, study_uid: str) -> dict[str, dict[str, float]]:
    """What the workers recorded: the latest done job of each instance of a study."""
    with db.session() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Job.probs).join(
            Instance, Job.instance_id == Instance.id).where(
            Job.study_instance_uid == study_uid, Job.state == JobState.DONE.value)
            .order_by(Job.id)).all()
    return {uid: dict(zip(CLASS_NAMES, json.loads(probs), strict=True)) for uid, probs in rows}


def same_probabilities(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> bool:
    """Equal as the float32 values the model produced (the SR writes the shortest decimal
    that reads back as the same float32)."""
    return a.keys() == b.keys() and all(
        a[uid].keys() == b[uid].keys()
        and all(np.float32(a[uid][c]) == np.float32(b[uid][c]) for c in a[uid]) for uid in a)


def check_outcome(dirs: NodeDirs, db: DbView, dropped: Iterable[Dropped]) -> dict[str, Any]:
    """The end state every run must reach, whatever crashed on the way:

    - every dropped file is exactly one instance row (nothing lost, nothing doubled) and
      nothing is left in the watched folder;
    - each instance is done, or skipped with a reason; no job is pending or running;
    - each done instance has exactly one heatmap SC (file and result row) of its current
      generation, and there are no other files (no duplicates, no temp leftovers);
    - each study with a done instance has exactly one current SR, whose evidence is
      exactly its done instances; superseded SRs form a chain ending in it.
    Returns a summary for further checks.
    """
    dropped = list(dropped)
    assert not incoming_files(dirs), "files left in the watched folder"
    with db.session() as s:
        instances = s.scalars(select(Instance)).all()
        jobs = s.scalars(select(Job)).all()
        results = s.scalars(select(Result)).all()
        studies = {st.study_instance_uid: st for st in s.scalars(select(Study)).all()}
        rejections = s.scalars(select(Rejection)).all()

    by_uid = {i.sop_instance_uid: i for i in instances}
    assert len(by_uid) == len(instances)
    expected = {d.sop_instance_uid for d in dropped}
    assert set(by_uid) == expected, (
        f"lost: {sorted(expected - set(by_uid))}, unexpected: {sorted(set(by_uid) - expected)}")
    assert all(r.reason == "not-dicom" for r in rejections), [
        (r.reason, r.detail) for r in rejections]

    for d in dropped:
        inst = by_uid[d.sop_instance_uid]
        if d.classifiable:
            assert inst.state == InstanceState.DONE.value, (d, inst.state, inst.detail)
        else:
            assert inst.state == InstanceState.SKIPPED.value, (d, inst.state)
            assert inst.reason in ("lateral-view", "not-chest"), (d, inst.reason)
    assert not [j for j in jobs if j.state in (JobState.PENDING.value, JobState.RUNNING.value)]
    done = {uid for uid, i in by_uid.items() if i.state == InstanceState.DONE.value}

    # heatmap SCs: one per done instance for its study's current generation
    scs = [r for r in results if r.kind == ResultKind.SC.value]
    current = [r for r in scs if r.generation == studies[r.study_instance_uid].generation]
    sources = [r.source_sop_instance_uid for r in current]
    assert sorted(sources) == sorted(done), "done instances and their SCs differ"
    assert len({r.sop_instance_uid for r in results}) == len(results)

    # files: exactly the recorded results, no temp files
    files = sorted(p.name for p in dirs.results.iterdir()) if dirs.results.exists() else []
    assert not [f for f in files if f.endswith(".tmp") or f.startswith(".")], files
    assert sorted(files) == sorted(f"{r.sop_instance_uid}.dcm" for r in results)
    assert all(r.path == f"results/{r.sop_instance_uid}.dcm" for r in results)  # keys

    # SRs: one current per study with a done instance, naming exactly those instances
    srs = [r for r in results if r.kind == ResultKind.SR.value]
    superseded = {r.supersedes for r in srs if r.supersedes}
    done_by_study: dict[str, set[str]] = {}
    for uid in done:
        done_by_study.setdefault(by_uid[uid].study_instance_uid, set()).add(uid)
    for study_uid, study in studies.items():
        heads = [r for r in srs if r.study_instance_uid == study_uid
                 and r.sop_instance_uid not in superseded]
        if study_uid not in done_by_study:
            assert study.state == StudyState.NOTHING_TO_DO.value, study.state
            assert study.sr_sop_instance_uid is None and not heads
            continue
        assert study.state == StudyState.REPORTED.value, study.state
        assert len(heads) == 1, f"study {study_uid} has {len(heads)} current SRs"
        assert heads[0].sop_instance_uid == study.sr_sop_instance_uid
        sr_study, refs = sr_references(dirs.results / f"{study.sr_sop_instance_uid}.dcm")
        assert sr_study == study_uid
        assert refs == done_by_study[study_uid]
        sr_probs = sr_probabilities(dirs.results / f"{study.sr_sop_instance_uid}.dcm")
        assert same_probabilities(sr_probs, recorded_probabilities(db, study_uid)), (
            sr_probs, recorded_probabilities(db, study_uid))
    return {"done": done, "scs": len(scs), "srs": len(srs), "studies": studies,
            "jobs": jobs, "rejections": len(rejections)}
