"""The coordinator's ceiling: how many jobs a second one PostgreSQL database hands out and
takes back for simulated workers, and whether the database or the workers bind first.

No model and no files: each client is a process running a worker's database calls only,
as ``cxrd.worker.WorkerLoop.run_once`` makes them: ``queue.claim`` (a batch, report jobs
first), then for a classify job ``queue.complete`` with a small findings record and an SC
result row (one delivery per destination), for a report job ``queue.study_findings`` and
``queue.complete_report`` with an SR result row. The rows are seeded in a private schema
(dropped afterwards): ``--studies`` admitted studies of ``--per-study`` instances, one
pending classify job each, the spool paths pointing at nothing. Each level of clients
starts from the same fresh seed; all clients are forked, connected and waiting before the
clock starts.

It prints, per level, jobs/s and studies/s with the ratio against one client measured in
the same run, the CPU seconds per job of the clients and of the PostgreSQL server
processes (read from /proc, so the server must run on this machine), and how many worker
cores one database core can feed at ``--worker-images-per-core`` (bench/README.md: 20-30
images/s per core for one CPU worker)::

    python bench/coordinator.py                       # 400 studies, 1/16/32/64 clients, ~1 min
    python bench/coordinator.py --clients 1 8 16 --studies 100 --json coordinator.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import case, func, insert, or_, select  # noqa: E402

from cxrd import queue  # noqa: E402
from cxrd.db import Database, Instance, Job, Study, utcnow  # noqa: E402
from cxrd.domain import InstanceState, JobKind, JobState, StudyState  # noqa: E402

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
CR = "1.2.840.10008.5.1.4.1.1.1"
DEVICE_UID = "2.25.1"
#: A findings record of the size a worker writes (the source header subset and a region).
RECORD = {"header": {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J"}]},
                     "00080018": {"vr": "UI", "Value": ["1.2.3.4.5.6.7.8.9"]},
                     "0020000D": {"vr": "UI", "Value": ["1.2.3.4.5.6.7.8"]}},
          "region": [120, 340, 410, 620]}
PROBS = [0.12, 0.08, 0.80]
TIMINGS = {"decode": 0.01, "preprocess": 0.005, "infer": 0.004, "heatmap": 0.006}
IDLE_SECONDS = 0.005


# ------------------------------------------------------------------------------ schema


def private_url(base: str) -> tuple[str, str]:
    """A fresh schema in ``base``'s database; the URL whose search_path is that schema."""
    import psycopg

    schema = f"cxrd_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={schema}')}", schema


def drop_schema(base: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def seed(db: Database, studies: int, per_study: int) -> int:
    """Empty the work tables and seed ``studies`` admitted studies of ``per_study``
    instances with one pending classify job each; returns the classify jobs."""
    now = utcnow()
    with db.engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE deliveries, results, jobs, instances, studies, workers "
                             "RESTART IDENTITY")
        study_rows, inst_rows, job_rows = [], [], []
        for i in range(studies):
            study_uid = f"2.25.{i + 1}"
            study_rows.append({"study_instance_uid": study_uid,
                               "state": StudyState.ADMITTED.value, "generation": 1,
                               "first_received_at": now, "last_received_at": now,
                               "stable_at": now})
            for j in range(per_study):
                inst_id = i * per_study + j + 1
                sop_uid = f"{study_uid}.{j + 1}"
                inst_rows.append({
                    "id": inst_id, "sop_instance_uid": sop_uid,
                    "study_instance_uid": study_uid, "series_instance_uid": f"{study_uid}.0",
                    "sop_class_uid": CR, "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "modality": "CR", "path": f"/nonexistent/{sop_uid}.dcm", "sha256": "",
                    "size": 0, "source": "bench", "received_at": now,
                    "state": InstanceState.QUEUED.value})
                job_rows.append({"kind": JobKind.CLASSIFY.value, "instance_id": inst_id,
                                 "study_instance_uid": study_uid, "generation": 1,
                                 "state": JobState.PENDING.value, "attempts": 0,
                                 "not_before": now, "created_at": now})
        conn.execute(insert(Study), study_rows)
        conn.execute(insert(Instance), inst_rows)
        conn.execute(insert(Job), job_rows)
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    return len(job_rows)


# ------------------------------------------------------------------------------ client


def client(url: str, index: int, batch_size: int, destinations: Sequence[str],
           ready: Any, start: Any, leave: Any, results: Any) -> None:
    """One simulated worker: claim, complete, report, until every study is reported."""
    db = Database(url)
    db.ping()  # connected before the clock starts (its server process already counted)
    owner = f"bench:{os.getpid()}:w{index}"
    counts = {"classify": 0, "report": 0, "claims": 0, "empty_claims": 0, "lost": 0}
    ready.release()
    start.wait()
    cpu0 = time.process_time()
    while True:
        jobs = queue.claim(db, owner, batch_size, 300.0, 3)
        counts["claims"] += 1
        if not jobs:
            counts["empty_claims"] += 1
            with db.session() as s:
                open_studies = s.scalar(select(func.count()).select_from(Study).where(
                    Study.state != StudyState.REPORTED.value))
            if not open_studies:
                break
            time.sleep(IDLE_SECONDS)
            continue
        for job in jobs:
            if job.kind == JobKind.REPORT:
                findings = queue.study_findings(db, job.study_instance_uid)
                sr = (f"2.25.9{job.job_id}", Path(f"/nonexistent/sr-{job.job_id}.dcm"))
                outcome = queue.complete_report(db, job, owner, findings, sr=sr, seconds=0.01,
                                                destinations=destinations)
                counts["report" if outcome == "done" else "lost"] += 1
            else:
                sc = (f"2.25.8{job.job_id}", Path(f"/nonexistent/sc-{job.job_id}.dcm"))
                done = queue.complete(db, job, owner, PROBS, RECORD, DEVICE_UID, TIMINGS,
                                      sc=sc, destinations=destinations)
                counts["classify" if done else "lost"] += 1
    results.put({"index": index, "finished": time.monotonic(),
                 "cpu_s": time.process_time() - cpu0, **counts})
    leave.wait()  # the server's CPU is read while this connection is still open
    db.dispose()


# ------------------------------------------------------------------------------- CPU


def postgres_cpu_s() -> float:
    """CPU seconds (user + system) of every process named ``postgres`` on this machine."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# -------------------------------------------------------------------------------- run


def run_level(url: str, db: Database, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    classify_jobs = seed(db, args.studies, args.per_study)
    ctx = mp.get_context("fork")
    ready, start, leave = ctx.Semaphore(0), ctx.Event(), ctx.Event()
    results = ctx.Queue()
    destinations = [f"dest{i}" for i in range(args.destinations)]
    procs = [ctx.Process(target=client, args=(url, i, args.batch_size, destinations, ready,
                                              start, leave, results), daemon=True)
             for i in range(clients)]
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=120):
            raise SystemExit("the clients did not connect within 120 s")
    pg0, busy0 = postgres_cpu_s(), machine_busy_s()
    t0 = time.monotonic()
    start.set()
    out = [results.get(timeout=args.timeout) for _ in procs]
    wall = max(r["finished"] for r in out) - t0
    pg_cpu, busy = postgres_cpu_s() - pg0, machine_busy_s() - busy0
    leave.set()
    for p in procs:
        p.join(30)
    with db.session() as s:
        reported = s.scalar(select(func.count()).select_from(Study).where(
            Study.state == StudyState.REPORTED.value))
    jobs = sum(r["classify"] + r["report"] for r in out)
    expected = classify_jobs + args.studies
    if reported != args.studies or jobs != expected:
        raise SystemExit(f"{clients} clients: {reported}/{args.studies} studies reported, "
                         f"{jobs}/{expected} jobs done")
    client_cpu = sum(r["cpu_s"] for r in out)
    return {
        "clients": clients, "seconds": wall, "jobs": jobs, "studies": args.studies,
        "jobs_per_s": jobs / wall, "studies_per_s": args.studies / wall,
        "images_per_s": classify_jobs / wall,
        "client_cpu_ms_per_job": 1000 * client_cpu / jobs,
        "postgres_cpu_ms_per_job": 1000 * pg_cpu / jobs,
        "machine_busy_cores": busy / wall, "postgres_cores": pg_cpu / wall,
        "client_cores": client_cpu / wall,
        "claims": sum(r["claims"] for r in out),
        "empty_claims": sum(r["empty_claims"] for r in out),
        "lost": sum(r["lost"] for r in out),
    }


def sorted_due_query(now: Any, batch_size: int) -> Any:
    """The claim's read before schema 6, for comparison: one query ordered by (report
    first, id), which sorts every due job at each claim."""
    due = or_((Job.state == JobState.PENDING.value) & (Job.not_before <= now),
              (Job.state == JobState.RUNNING.value) & (Job.lease_expires < now))
    reports_first = case((Job.kind == JobKind.REPORT.value, 0), else_=1)
    return (select(Job).where(due).order_by(reports_first, Job.id).limit(batch_size)
            .with_for_update(skip_locked=True))


def timed(db: Database, claims: int, read: Any) -> tuple[float, float]:
    """(wall ms, PostgreSQL CPU ms) per call of ``read(session)``, each in a transaction
    rolled back (so every call sees the same backlog)."""
    pg0, t0 = postgres_cpu_s(), time.perf_counter()
    for _ in range(claims):
        with db.sessions() as s:
            read(s)
            s.rollback()
    return (1000 * (time.perf_counter() - t0) / claims,
            1000 * (postgres_cpu_s() - pg0) / claims)


def claim_cost(db: Database, studies: int, per_study: int, batch_size: int,
               claims: int) -> dict[str, Any]:
    """What a claim costs with ``studies * per_study`` jobs pending (a backlog: a
    reprocess, an outage's arrivals), one client: the read before schema 6 (one sorted
    query) and now (``queue._due_jobs``, index-ordered), each rolled back, then
    ``queue.claim`` itself (the read, the leases written, the commit). Wall and
    PostgreSQL CPU per claim."""
    depth = seed(db, studies, per_study)
    batch = batch_size

    def before(s: Any) -> None:
        s.scalars(sorted_due_query(utcnow(), batch)).all()

    def after(s: Any) -> None:
        queue._due_jobs(s, db, utcnow(), batch)

    for read in (before, after):  # plans cached, as in a worker
        timed(db, 1, read)
    before_ms, before_pg = timed(db, claims, before)
    after_ms, after_pg = timed(db, claims, after)
    queue.claim(db, "bench:depth:w0", batch_size, 300.0, 3)
    pg0, t0 = postgres_cpu_s(), time.perf_counter()
    for _ in range(claims):
        queue.claim(db, "bench:depth:w0", batch_size, 300.0, 3)
    wall, pg_cpu = time.perf_counter() - t0, postgres_cpu_s() - pg0
    return {"pending_jobs": depth,
            "sorted_read_ms": before_ms, "sorted_read_postgres_cpu_ms": before_pg,
            "indexed_read_ms": after_ms, "indexed_read_postgres_cpu_ms": after_pg,
            "claim_ms": 1000 * wall / claims,
            "postgres_cpu_ms_per_claim": 1000 * pg_cpu / claims,
            # the claims alone: jobs one PostgreSQL core could hand out per second
            "jobs_per_postgres_core_s": batch_size * claims / max(pg_cpu, 1e-9)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("CXRD_TEST_POSTGRES_URL",
                                                            DEFAULT_URL),
                   help="a PostgreSQL database; a private schema is made in it and dropped")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16, 32, 64],
                   help="client processes at each level; the first is the ratios' base")
    p.add_argument("--studies", type=int, default=400)
    p.add_argument("--per-study", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4, help="[workers] batch_size")
    p.add_argument("--destinations", type=int, default=1,
                   help="delivery rows per result (the SC's and the SR's)")
    p.add_argument("--worker-images-per-core", type=float, default=25.0,
                   help="one CPU worker's images/s per core (bench/README.md: 20-30)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per level")
    p.add_argument("--depths", type=int, nargs="*", default=[500, 5000, 25000],
                   help="studies pending when one claim's cost is measured (none: skip)")
    p.add_argument("--depth-claims", type=int, default=100, help="claims timed per depth")
    p.add_argument("--keep", action="store_true", help="keep the private schema")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    url, schema = private_url(args.database_url)
    db = Database(url)
    db.migrate()
    rows: list[dict[str, Any]] = []
    depths: list[dict[str, Any]] = []
    try:
        for clients in args.clients:
            rows.append(run_level(url, db, clients, args))
            r = rows[-1]
            print(f"  {clients:3d} clients: {r['jobs_per_s']:7.1f} jobs/s in {r['seconds']:.1f} s",
                  file=sys.stderr, flush=True)
        for studies in args.depths:
            depths.append(claim_cost(db, studies, args.per_study, args.batch_size,
                                     args.depth_claims))
            print(f"  {depths[-1]['pending_jobs']:6d} pending: sorted read "
                  f"{depths[-1]['sorted_read_ms']:.2f} ms, indexed "
                  f"{depths[-1]['indexed_read_ms']:.2f} ms", file=sys.stderr, flush=True)
    finally:
        db.dispose()
        if not args.keep:
            drop_schema(args.database_url, schema)
    base = rows[0]
    print(f"coordinator ceiling: {args.studies} studies x {args.per_study} images "
          f"({args.studies * (args.per_study + 1)} jobs), batch {args.batch_size}, "
          f"{args.destinations} destination(s), {os.cpu_count()} cores, PostgreSQL on this "
          "machine")
    print(f"{'clients':>7} {'jobs/s':>8} {'studies/s':>9} {'x 1st':>6} {'images/s':>8} "
          f"{'client ms/job':>13} {'pg ms/job':>9} {'pg cores':>8} {'busy cores':>10} "
          f"{'empty claims':>12}")
    for r in rows:
        r["ratio"] = r["jobs_per_s"] / base["jobs_per_s"]
        print(f"{r['clients']:7d} {r['jobs_per_s']:8.1f} {r['studies_per_s']:9.1f} "
              f"{r['ratio']:6.2f} {r['images_per_s']:8.1f} {r['client_cpu_ms_per_job']:13.2f} "
              f"{r['postgres_cpu_ms_per_job']:9.2f} {r['postgres_cores']:8.2f} "
              f"{r['machine_busy_cores']:10.2f} {r['empty_claims']:12d}")
    best = max(rows, key=lambda r: r["jobs_per_s"])
    # Per image the database serves one classify job and 1/per_study of a report job.
    pg_ms_per_image = best["postgres_cpu_ms_per_job"] * (1 + 1 / args.per_study)
    worker_ms_per_image = 1000 / args.worker_images_per_core
    feeds = worker_ms_per_image / pg_ms_per_image
    print(f"best: {best['clients']} clients, {best['images_per_s']:.0f} images/s "
          f"= {best['images_per_s'] / args.worker_images_per_core:.1f} CPU worker cores at "
          f"{args.worker_images_per_core:g} images/s each")
    print(f"per image: PostgreSQL {pg_ms_per_image:.2f} ms CPU, a CPU worker "
          f"{worker_ms_per_image:.0f} ms: one database core feeds {feeds:.0f} worker cores; "
          + ("the workers bind first" if feeds > 1 else "the database binds first"))
    if depths:
        print(f"one claim (batch {args.batch_size}) against a backlog, one client: the read "
              "as one sorted query (before schema 6) and index-ordered (now), then "
              "queue.claim whole")
        print(f"{'pending jobs':>12} {'sorted ms':>9} {'pg ms':>6} {'indexed ms':>10} "
              f"{'pg ms':>6} {'sorted/indexed':>14} {'claim ms':>8} {'claim pg ms':>11} "
              f"{'jobs/s per pg core':>18}")
        for d in depths:
            d["ratio"] = d["sorted_read_ms"] / d["indexed_read_ms"]
            print(f"{d['pending_jobs']:12d} {d['sorted_read_ms']:9.2f} "
                  f"{d['sorted_read_postgres_cpu_ms']:6.2f} {d['indexed_read_ms']:10.2f} "
                  f"{d['indexed_read_postgres_cpu_ms']:6.2f} {d['ratio']:14.1f} "
                  f"{d['claim_ms']:8.2f} {d['postgres_cpu_ms_per_claim']:11.2f} "
                  f"{d['jobs_per_postgres_core_s']:18.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "studies": args.studies, "per_study": args.per_study,
            "batch_size": args.batch_size, "destinations": args.destinations,
            "cores": os.cpu_count(), "levels": rows, "claim_depths": depths,
            "postgres_ms_per_image": pg_ms_per_image,
            "worker_cores_per_database_core": feeds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
