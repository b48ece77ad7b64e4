#!/usr/bin/env python
"""kill -9 storm: crash the whole node again and again while a PACS sends, then check that
nothing acknowledged was lost or duplicated.

Each round starts ``cxrd serve`` on one data folder (SQLite by default, ``--database-url``
for PostgreSQL), waits for its DICOM port, starts ``--senders`` dcmtk ``storescu``
associations at once, each with small synthetic frontal chest CR studies of its own
(``training.phantoms``), and after a random delay (``--kill-after``) sends SIGKILL to the
node's whole process group: the main process, its workers and receivers. Whatever the
senders did not see acknowledged with Success is sent again in the next round, as a PACS
would retry it (the node may have stored it before it died: a duplicate then).

After the last round the node is started once more, the leftovers are sent, and it runs
until every study is reported; then it is stopped (SIGTERM) and the database and the
results folder are checked:

- every instance acknowledged Success is stored and done, with exactly one heatmap SC
  (row and file) of its study's current generation;
- every study has exactly one current SR (the head of its chain of superseded SRs), and it
  names exactly the study's done instances;
- no job failed, nothing is left in flight, and the results folder holds exactly the
  recorded results (no temp files, no strays).

It prints rounds, instances acknowledged, results, lost and duplicated, and exits 1 when
anything was lost or duplicated (or another check failed), 2 when the run itself broke.

    python bench/storm.py                      # 50 rounds, SQLite
    python bench/storm.py --rounds 5 --json storm.json
    python bench/storm.py --database-url postgresql://postgres@127.0.0.1:5432/cxrd_storm
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: import cxrd, training
    sys.path.insert(0, str(ROOT))

START_TIMEOUT = 120.0
LEASE_SECONDS = 5
SUCCESS = re.compile(r"^I: Received Store Response \(Success\)", re.M)


@dataclass(frozen=True)
class Image:
    path: Path
    sop_instance_uid: str
    study_instance_uid: str


@dataclass
class Tally:
    rounds: int = 0
    sent: int = 0  # C-STOREs attempted (a retry counts again)
    acknowledged: set[str] = field(default_factory=set)
    mid_send: int = 0  # rounds whose kill came while a sender was still sending
    mid_job: int = 0  # rounds whose kill came while a worker held a job


# ------------------------------------------------------------------------------ inputs


def make_images(folder: Path, rng: np.random.Generator, n_studies: int, per_study: int,
                size: int) -> list[Image]:
    """``n_studies`` new studies of ``per_study`` frontal chest CR phantoms each."""
    from training.phantoms import DicomOptions, make_phantom, random_patient_study, write_dicom

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for _ in range(n_studies):
        study = random_patient_study(rng)
        for j in range(per_study):
            ph = make_phantom(rng, ("TB", "NTB", "NORM")[j % 3], size, size)
            path = folder / f"{study.study_instance_uid}-{j}.dcm"
            ds = write_dicom(ph, path, study, DicomOptions(modality="CR"), series_number=j + 1)
            images.append(Image(path, str(ds.SOPInstanceUID), study.study_instance_uid))
    return images


# -------------------------------------------------------------------------------- node


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    """Whether a socket listens on TCP ``port`` (read from /proc: no probe connection)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def write_config(work: Path, port: int, database_url: str | None, receivers: int,
                 processes: int) -> Path:
    data_dir = work / "data"
    config = work / "cxrd.toml"
    db_line = f'database_url = "{database_url}"\n' if database_url else ""
    config.write_text(f"""\
[node]
host = "127.0.0.1"
port = {port}
receivers = {receivers}

[storage]
data_dir = "{data_dir}"
{db_line}
[study]
stable_seconds = 1

[model]
providers = ["CPUExecutionProvider"]

[workers]
processes = {processes}
batch_size = 4
lease_seconds = {LEASE_SECONDS}
max_attempts = 5
retry_backoff_seconds = 0

[metrics]
listen = ""
""")
    return config


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


class Node:
    """``cxrd serve`` in a session of its own, so its process group is the whole node."""

    def __init__(self, config: Path, log: Path) -> None:
        env = dict(os.environ)
        env.pop("CXRD_CONFIG", None)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                          env.get("PYTHONPATH", "")]))
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cxrd.cli", "serve", "--config", str(config)],
            cwd=config.parent, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_listening(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not listening(port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"cxrd serve exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"cxrd serve did not listen within {START_TIMEOUT:.0f}s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL to the whole process group; wait until none of it is left."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        deadline = time.monotonic() + 30
        while group_members(self.proc.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of the node outlived its kill: "
                                   f"{group_members(self.proc.pid)}")
            time.sleep(0.05)
        self._log.close()

    def stop(self, timeout: float = 90.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("cxrd serve did not drain on SIGTERM") from None
        self._log.close()
        return code


# ----------------------------------------------------------------------------- senders


def start_sender(port: int, files: Sequence[Image], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # Debian's dcmtk leaves Nagle on otherwise
    args = ["storescu", "-v", "-aet", "STORM", "-aec", "CXRD", "127.0.0.1", str(port),
            *(str(f.path) for f in files)]
    with log.open("wb") as out:
        return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


def acknowledged(log: Path, files: Sequence[Image]) -> set[str]:
    """The SOP Instance UIDs that storescu saw answered Success. It logs ``Sending file:
    <path>`` before each C-STORE and the response after it, in order."""
    by_path = {str(f.path): f.sop_instance_uid for f in files}
    acked, current = set(), None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("I: Sending file: "):
            current = by_path.get(line[len("I: Sending file: "):].strip())
        elif SUCCESS.match(line) and current is not None:
            acked.add(current)
            current = None
    return acked


@dataclass(frozen=True)
class Moment:
    """When a round's kill comes, drawn at random: after ``acks`` Success responses (while
    the senders send), once a worker holds a job plus ``delay`` seconds (mid-job), or
    ``delay`` seconds after the senders start."""

    kind: str  # "send", "job" or "time"
    acks: int = 0
    delay: float = 0.0

    def describe(self) -> str:
        if self.kind == "send":
            return f"after {self.acks} acknowledgements"
        if self.kind == "job":
            return f"{self.delay:.2f} s into a job"
        return f"at {self.delay:.1f} s"


def pick_moment(pick: random.Random, batch: int, window: Sequence[float]) -> Moment:
    kind = pick.choice(("send", "job", "time"))
    if kind == "send":
        return Moment(kind, acks=pick.randint(1, max(1, batch - 1)))
    if kind == "job":
        return Moment(kind, delay=pick.uniform(0.0, 0.3))
    return Moment(kind, delay=pick.uniform(*window))


#: The longest a round waits for its moment; the kill comes then regardless.
MOMENT_TIMEOUT = 10.0


def wait_for_moment(moment: Moment, senders: Sequence[tuple[Any, Path, Any]], db: Any,
                    pick: random.Random) -> None:
    if moment.kind == "time":
        time.sleep(moment.delay)
        return
    deadline = time.monotonic() + MOMENT_TIMEOUT
    while time.monotonic() < deadline:
        if moment.kind == "send":
            acks = sum(len(SUCCESS.findall(log.read_text(errors="replace")))
                       for _, log, _ in senders)
            if acks >= moment.acks:
                return
        elif running_jobs(db):
            time.sleep(moment.delay)
            return
        time.sleep(0.005)


def split(items: Sequence[Image], n: int) -> list[list[Image]]:
    return [list(items[i::n]) for i in range(n)]


# ------------------------------------------------------------------------------ checks


def settled(db: Any, expected: set[str]) -> bool:
    """Every acknowledged instance stored and past admission; nothing in flight."""
    from sqlalchemy import func, select

    from cxrd.db import Instance, Job, Study
    from cxrd.domain import InstanceState, JobState, StudyState

    try:
        with db.session() as s:
            stored = set(s.scalars(select(Instance.sop_instance_uid).where(
                Instance.sop_instance_uid.in_(expected))).all()) if expected else set()
            busy = s.scalar(select(func.count()).select_from(Instance).where(
                Instance.state.in_((InstanceState.RECEIVED.value,
                                    InstanceState.QUEUED.value))))
            jobs = s.scalar(select(func.count()).select_from(Job).where(
                Job.state.in_((JobState.PENDING.value, JobState.RUNNING.value))))
            studies = s.scalar(select(func.count()).select_from(Study).where(
                Study.state.in_((StudyState.COLLECTING.value, StudyState.ADMITTED.value))))
    except Exception:  # the database is not there yet
        return False
    return stored == expected and not busy and not jobs and not studies


def running_jobs(db: Any) -> int:
    """Jobs leased when the node died (read after the kill: nothing changes them now)."""
    from sqlalchemy import func, select

    from cxrd.db import Job
    from cxrd.domain import JobState

    try:
        with db.session() as s:
            return int(s.scalar(select(func.count()).select_from(Job).where(
                Job.state == JobState.RUNNING.value)) or 0)
    except Exception:  # no database yet
        return 0


def sr_evidence(path: Path) -> set[str]:
    import pydicom

    ds = pydicom.dcmread(path)
    return {str(sop.ReferencedSOPInstanceUID)
            for item in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in item.get("ReferencedSeriesSequence", [])
            for sop in series.get("ReferencedSOPSequence", [])}


def check(db: Any, results_dir: Path, acked: set[str]) -> dict[str, Any]:
    """What became of the acknowledged instances: lost, duplicated and other problems."""
    from sqlalchemy import select

    from cxrd.db import Instance, Job, Result, Study
    from cxrd.domain import InstanceState, JobState, ResultKind

    with db.session() as s:
        instances = {i.sop_instance_uid: i for i in s.scalars(select(Instance)).all()}
        studies = {st.study_instance_uid: st for st in s.scalars(select(Study)).all()}
        results = s.scalars(select(Result)).all()
        failed = s.scalars(select(Job).where(Job.state == JobState.FAILED.value)).all()
    scs = [r for r in results if r.kind == ResultKind.SC.value]
    srs = [r for r in results if r.kind == ResultKind.SR.value]
    result_uids = {r.sop_instance_uid for r in results}
    superseded = {r.supersedes for r in srs if r.supersedes}
    sc_of: dict[str, list[Any]] = {}
    for r in scs:
        if r.generation == studies[r.study_instance_uid].generation:
            sc_of.setdefault(r.source_sop_instance_uid or "", []).append(r)
    files = {p.name for p in results_dir.iterdir()} if results_dir.is_dir() else set()

    lost: list[str] = []
    duplicated: list[str] = []
    problems: list[str] = []
    acked_studies: set[str] = set()
    for uid in sorted(acked):
        inst = instances.get(uid)
        if inst is None:
            lost.append(f"instance {uid}: no row")
            continue
        acked_studies.add(inst.study_instance_uid)
        if inst.state != InstanceState.DONE.value:
            lost.append(f"instance {uid}: {inst.state} {inst.reason or ''} {inst.detail or ''}")
        mine = sc_of.get(uid, [])
        if not mine:
            lost.append(f"instance {uid}: no SC")
        elif len(mine) > 1:
            duplicated.append(f"instance {uid}: {len(mine)} SCs")
        elif f"{mine[0].sop_instance_uid}.dcm" not in files:
            lost.append(f"instance {uid}: SC file {mine[0].sop_instance_uid}.dcm missing")
    for study_uid in sorted(acked_studies):
        heads = [r for r in srs if r.study_instance_uid == study_uid
                 and r.sop_instance_uid not in superseded]
        if not heads:
            lost.append(f"study {study_uid}: no current SR")
            continue
        if len(heads) > 1:
            duplicated.append(f"study {study_uid}: {len(heads)} current SRs")
            continue
        head = heads[0]
        if head.sop_instance_uid != studies[study_uid].sr_sop_instance_uid:
            problems.append(f"study {study_uid}: its SR row is not the chain's head")
        if f"{head.sop_instance_uid}.dcm" not in files:
            lost.append(f"study {study_uid}: SR file missing")
            continue
        done = {u for u, i in instances.items() if i.study_instance_uid == study_uid
                and i.state == InstanceState.DONE.value}
        # Its evidence: the study's done images, and (IHE AIR) the SCs and SEGs of its
        # generation, which are result rows too.
        named = sr_evidence(results_dir / f"{head.sop_instance_uid}.dcm")
        made = {r.sop_instance_uid for r in results if r.study_instance_uid == study_uid
                and r.generation == head.generation
                and r.kind in (ResultKind.SC.value, ResultKind.SEG.value)}
        if named - result_uids != done:
            problems.append(f"study {study_uid}: the SR does not name exactly its done images")
        if named & result_uids != made:
            problems.append(f"study {study_uid}: the SR does not name exactly its SCs and SEGs")
    if len({r.sop_instance_uid for r in results}) != len(results):
        duplicated.append("results: a SOP Instance UID recorded twice")
    recorded = {f"{r.sop_instance_uid}.dcm" for r in results}
    stray = sorted(files - recorded)
    if stray:
        problems.append(f"results folder: files no result row names: {stray[:5]}")
    problems += [f"job {j.id} failed: {j.error}" for j in failed]
    return {"instances_stored": len(instances), "studies": len(acked_studies),
            "sc": len(scs), "sr": len(srs),
            "sr_current": sum(1 for r in srs if r.sop_instance_uid not in superseded),
            "lost": lost, "duplicated": duplicated, "problems": problems}


# -------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    from cxrd.db import Database

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cxrd-storm-"))
    if work.exists() and any(work.iterdir()):
        raise RuntimeError(f"the work folder {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_config(work, port, args.database_url, args.receivers, args.processes)
    db = Database(args.database_url or f"sqlite:///{work / 'data' / 'cxrd.sqlite3'}")
    rng = np.random.default_rng(args.seed)
    pick = random.Random(args.seed)
    tally = Tally()
    outstanding: list[Image] = []  # sent, not acknowledged: the next round sends them again
    every: dict[str, Image] = {}
    node_log = work / "serve.log"
    t_start = time.monotonic()

    def send_round(name: str, images: list[Image], moment: Moment | None) -> None:
        senders = []
        for k, part in enumerate(split(images, args.senders)):
            if part:
                log = work / "logs" / f"{name}-storescu-{k}.log"
                senders.append((start_sender(port, part, log), log, part))
        tally.sent += len(images)
        if moment is not None:
            wait_for_moment(moment, senders, db, pick)
            sending = any(proc.poll() is None for proc, _, _ in senders)
            node.kill()
            tally.mid_send += sending
            tally.mid_job += running_jobs(db) > 0
        for proc, _, _ in senders:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        acked: set[str] = set()
        for _, log, part in senders:
            acked |= acknowledged(log, part)
        tally.acknowledged |= acked
        outstanding[:] = [i for i in images if i.sop_instance_uid not in tally.acknowledged]

    (work / "logs").mkdir(exist_ok=True)
    for r in range(1, args.rounds + 1):
        fresh = make_images(work / "inputs" / f"r{r:03d}", rng, args.senders * args.studies,
                            args.per_study, args.size)
        every.update((i.sop_instance_uid, i) for i in fresh)
        batch = outstanding + fresh
        node = Node(config, node_log)
        node.wait_listening(port)
        moment = pick_moment(pick, len(batch), args.kill_after)
        before = len(tally.acknowledged)
        t0 = time.monotonic()
        send_round(f"r{r:03d}", batch, moment)
        tally.rounds = r
        print(f"round {r:3d}: sent {len(batch):3d}, acknowledged "
              f"{len(tally.acknowledged) - before:3d}, killed {moment.describe()} "
              f"({time.monotonic() - t0:.1f} s), outstanding {len(outstanding)}", flush=True)

    # the last start: no kill; the leftovers go again; run until everything is reported
    node = Node(config, node_log)
    node.wait_listening(port)
    if outstanding:
        send_round("final", list(outstanding), None)
    deadline = time.monotonic() + args.settle_timeout
    while not settled(db, tally.acknowledged):
        if node.proc.poll() is not None:
            print(f"cxrd serve exited with {node.proc.returncode}; see {node_log}")
            return 2
        if time.monotonic() > deadline:
            node.kill()
            print(f"not settled within {args.settle_timeout:.0f}s; see {node_log}")
            return 2
        time.sleep(0.5)
    code = node.stop()
    outcome = check(db, work / "data" / "results", tally.acknowledged)
    db.dispose()
    summary = {
        "rounds": tally.rounds,
        "senders": args.senders,
        "database": "postgresql" if args.database_url else "sqlite",
        "killed_mid_send": tally.mid_send,
        "killed_mid_job": tally.mid_job,
        "instances_sent": len(every),
        "c_stores": tally.sent,
        "instances_acknowledged": len(tally.acknowledged),
        "never_acknowledged": len(outstanding),
        "instances_stored": outcome["instances_stored"],
        "studies": outcome["studies"],
        "results_sc": outcome["sc"],
        "results_sr": outcome["sr"],
        "results_sr_current": outcome["sr_current"],
        "lost": len(outcome["lost"]),
        "duplicated": len(outcome["duplicated"]),
        "problems": len(outcome["problems"]),
        "drain_exit": code,
        "seconds": round(time.monotonic() - t_start, 1),
        "work": str(work),
    }
    for what in ("lost", "duplicated", "problems"):
        for line in outcome[what][:20]:
            print(f"{what}: {line}")
    print(f"rounds: {summary['rounds']} (killed while sending: {tally.mid_send}, "
          f"while a worker held a job: {tally.mid_job})")
    print(f"instances acknowledged: {summary['instances_acknowledged']} "
          f"(of {summary['instances_sent']} sent in {summary['c_stores']} C-STOREs)")
    print(f"results: {summary['results_sc']} SC, {summary['results_sr']} SR "
          f"({summary['results_sr_current']} current, {summary['studies']} studies)")
    print(f"lost: {summary['lost']}")
    print(f"duplicated: {summary['duplicated']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    bad = summary["lost"] or summary["duplicated"] or summary["problems"] or code != 0
    if not bad and not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    elif bad:
        print(f"work folder kept: {work}")
    return 1 if bad else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--senders", type=int, default=2, help="storescu associations at once")
    p.add_argument("--studies", type=int, default=4, help="new studies per sender per round")
    p.add_argument("--per-study", type=int, default=3, help="images per study")
    p.add_argument("--size", type=int, default=256, help="image rows and columns")
    p.add_argument("--kill-after", type=float, nargs=2, default=(0.05, 3.5),
                   metavar=("MIN", "MAX"), help="seconds after the senders start")
    p.add_argument("--processes", type=int, default=1, help="[workers] processes")
    p.add_argument("--receivers", type=int, default=1, help="[node] receivers")
    p.add_argument("--database-url", help="PostgreSQL (an empty database); default SQLite")
    p.add_argument("--work", help="work folder (new or empty); default a temp folder, "
                                  "removed after a clean run")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--settle-timeout", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    if args.senders < 1 or args.rounds < 0:
        p.error("--senders must be at least 1, --rounds at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("storescu") is None:
        print("storescu (dcmtk) is not installed", file=sys.stderr)
        return 2
    try:
        return run(args)
    except RuntimeError as exc:
        print(f"storm broke: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
