"""The same storage, admission and queue code on PostgreSQL, several claimers at once."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dicomfactory import make_dataset, part10_bytes, uid
from pgschema import postgres_url
from queuehelpers import expire_leases, get_job, make_jobs
from sqlalchemy import func, select

from cxrd import queue
from cxrd.admit import admit_stable_studies, requeue_study
from cxrd.db import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Database,
    Instance,
    Job,
    Result,
    SchemaVersion,
    Study,
    utcnow,
)
from cxrd.domain import InstanceState, JobKind, JobState, RejectReason, StudyState
from cxrd.ingest import Ingestor, StoreOutcome


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_url()


@pytest.fixture
def pgdb(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    assert db.engine.dialect.name == "postgresql"
    db.migrate()
    yield db
    db.dispose()


def in_threads(n: int, fn: Callable[[int], object]) -> list[object]:
    """Run fn(0..n-1) in n threads released together; re-raise the first error."""
    barrier = threading.Barrier(n)
    out: list[object] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


def test_concurrent_migrations(pg_url: str):
    def migrate(_: int) -> int:
        db = Database(pg_url)
        try:
            return db.migrate()
        finally:
            db.dispose()

    assert in_threads(3, migrate) == [SCHEMA_VERSION] * 3
    db = Database(pg_url)
    with db.session() as s:
        assert s.scalars(select(SchemaVersion.version).order_by(SchemaVersion.version)
                         ).all() == [v for v, _ in MIGRATIONS]
    db.dispose()


def test_two_claimers_get_disjoint_jobs(pg_url: str, pgdb: Database):
    ids = make_jobs(pgdb, studies=10, per_study=4)
    claimed: list[list[int]] = [[], []]

    def worker(i: int) -> None:
        db = Database(pg_url)  # its own engine, as in its own process
        try:
            while batch := queue.claim(db, f"node{i}:w", 3, 300, 3):
                claimed[i].extend(j.job_id for j in batch)
        finally:
            db.dispose()

    in_threads(2, worker)
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == ids
    assert claimed[0] and claimed[1], "both claimers should have got work"
    for job_id in ids:
        job = get_job(pgdb, job_id)
        assert job.attempts == 1 and job.state == JobState.RUNNING.value


def test_many_claimers_racing_for_few_jobs(pg_url: str, pgdb: Database):
    ids = make_jobs(pgdb, studies=2, per_study=3)
    dbs = [Database(pg_url) for _ in range(6)]
    try:
        got = in_threads(6, lambda i: [j.job_id for j in queue.claim(dbs[i], f"w{i}", 2, 300, 3)])
    finally:
        for db in dbs:
            db.dispose()
    flat = [j for batch in got for j in batch]  # type: ignore[union-attr]
    assert sorted(flat) == ids  # each job exactly once, none twice


def test_expired_lease_and_lost_lease_on_postgres(pgdb: Database):
    (job_id,) = make_jobs(pgdb, studies=1, per_study=1)
    (old,) = queue.claim(pgdb, "a", 4, 300, 3)
    assert queue.claim(pgdb, "b", 4, 300, 3) == []
    expire_leases(pgdb)
    (new,) = queue.claim(pgdb, "b", 4, 300, 3)
    assert new.attempts == 2
    assert queue.complete(pgdb, old, "a", [1, 0, 0], [], "1.2", {}) is False
    assert queue.complete(pgdb, new, "b", [1, 0, 0], [], "1.2", {}) is True
    assert get_job(pgdb, job_id).state == JobState.DONE.value


def test_retry_and_release_on_postgres(pgdb: Database):
    (job_id,) = make_jobs(pgdb, studies=1, per_study=1)
    (c,) = queue.claim(pgdb, "host_1:9:w0", 1, 300, 3)
    queue.retry_or_fail(pgdb, c, "host_1:9:w0", "boom", 3, 60)
    job = get_job(pgdb, job_id)
    assert job.state == JobState.PENDING.value
    assert job.not_before > utcnow() + dt.timedelta(seconds=50)
    with pgdb.session() as s:
        s.get(Job, job_id).not_before = utcnow() - dt.timedelta(seconds=1)
    child = subprocess.Popen(["true"])
    child.wait()  # a dead owner: its lease is released
    queue.claim(pgdb, f"host_1:{child.pid}:w0", 1, 300, 3)
    assert queue.release_dead_leases(pgdb, "hostX1:") == 0
    assert queue.release_dead_leases(pgdb, "host_1:") == 1


def test_ingest_and_admit_on_postgres(pgdb: Database, tmp_path: Path):
    ingestor = Ingestor(pgdb, tmp_path / "spool", tmp_path / "rejected")
    study_uid = uid()
    first = make_dataset("CR", study_uid=study_uid, seed=1)
    data = part10_bytes(first)
    assert ingestor.store(data, "t").accepted
    assert ingestor.store(data, "t").duplicate
    other = make_dataset("CR", study_uid=study_uid, sop_uid=first.SOPInstanceUID, seed=9)
    assert ingestor.store(part10_bytes(other), "t").reason is RejectReason.CONFLICTING_DUPLICATE
    assert ingestor.store(part10_bytes(make_dataset("CR", study_uid=study_uid,
                                                    view_position="LL", seed=2)), "t").accepted
    assert admit_stable_studies(pgdb, 10, now=utcnow() + dt.timedelta(minutes=5)) == 1
    with pgdb.session() as s:
        states = sorted(s.scalars(select(Instance.state)).all())
        assert states == [InstanceState.QUEUED.value, InstanceState.SKIPPED.value]
        study = s.scalars(select(Study)).one()
        assert study.state == StudyState.ADMITTED.value
        for job in s.scalars(select(Job)):
            job.state = JobState.DONE.value
        study.state = StudyState.REPORTED.value
    assert requeue_study(pgdb, study_uid) == 1


def test_concurrent_stores_of_one_uid_on_postgres(pgdb: Database, tmp_path: Path):
    ingestor = Ingestor(pgdb, tmp_path / "spool", tmp_path / "rejected")
    base = make_dataset("CR")
    variants = [part10_bytes(make_dataset(
        "CR", seed=i, sop_uid=base.SOPInstanceUID, study_uid=base.StudyInstanceUID,
        series_uid=base.SeriesInstanceUID)) for i in range(4)]
    payloads = variants + variants
    outcomes = in_threads(len(payloads), lambda i: ingestor.store(payloads[i], f"t{i}"))
    assert all(isinstance(o, StoreOutcome) for o in outcomes)
    fresh = [o for o in outcomes if o.accepted and not o.duplicate]  # type: ignore[union-attr]
    assert len(fresh) == 1
    assert all(o.accepted or o.reason is RejectReason.CONFLICTING_DUPLICATE  # type: ignore
               for o in outcomes)
    with pgdb.session() as s:
        (inst,) = s.scalars(select(Instance)).all()
        assert s.scalar(select(func.count()).select_from(Study)) == 1
    assert hashlib.sha256((tmp_path / inst.path).read_bytes()).hexdigest() == inst.sha256


def test_concurrent_first_instances_of_a_new_study_on_postgres(pgdb: Database, tmp_path: Path):
    ingestor = Ingestor(pgdb, tmp_path / "spool", tmp_path / "rejected")
    study_uid = uid()
    payloads = [part10_bytes(make_dataset("CR", study_uid=study_uid, seed=i)) for i in range(6)]
    outcomes = in_threads(6, lambda i: ingestor.store(payloads[i], "t"))
    assert all(o.accepted and not o.duplicate for o in outcomes)  # type: ignore[union-attr]
    with pgdb.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 6
        assert s.scalar(select(func.count()).select_from(Study)) == 1


def test_schema_1_jobs_migrate_on_postgres(pg_url: str):
    """A schema-1 jobs table (instance_id NOT NULL, no kind) gains report jobs."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    db = Database(pg_url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE jobs"))
        conn.execute(text(
            "CREATE TABLE jobs (id SERIAL PRIMARY KEY, instance_id INTEGER NOT NULL "
            "REFERENCES instances (id), study_instance_uid VARCHAR(64) NOT NULL, "
            "generation INTEGER NOT NULL, state VARCHAR(16) NOT NULL, attempts INTEGER NOT "
            "NULL, not_before TIMESTAMP NOT NULL, lease_owner VARCHAR(128), lease_expires "
            "TIMESTAMP, created_at TIMESTAMP NOT NULL, finished_at TIMESTAMP, error TEXT, "
            "reason VARCHAR(32), probs TEXT, cam TEXT, model_device_uid VARCHAR(64), "
            "timings TEXT)"))
        conn.execute(text("CREATE INDEX ix_jobs_claim ON jobs (state, not_before)"))
        conn.execute(text("DELETE FROM schema_version WHERE version > 1"))
    db.dispose()
    db = Database(pg_url)
    try:
        assert db.migrate() == SCHEMA_VERSION
        make_jobs(db, studies=1, per_study=1)
        with db.session() as s:
            job = s.scalars(select(Job)).one()
            assert job.kind == JobKind.CLASSIFY.value
            study = job.study_instance_uid
            s.add(Job(kind=JobKind.REPORT.value, instance_id=None, study_instance_uid=study,
                      generation=1, state=JobState.PENDING.value))
        with pytest.raises(IntegrityError), db.session() as s:
            s.add(Job(kind=JobKind.REPORT.value, instance_id=None, study_instance_uid=study,
                      generation=1, state=JobState.PENDING.value))
    finally:
        db.dispose()


def test_nodes_ending_a_studys_last_jobs_together_enqueue_one_report_job(
        pg_url: str, pgdb: Database):
    """Two nodes complete the two jobs of each study at the same moment: the study row lock
    makes the later transaction see the earlier one, so every study gets exactly one report
    job (none lost to the race, none doubled)."""
    make_jobs(pgdb, studies=60, per_study=2)
    claimed = queue.claim(pgdb, "a", 100, 300, 3)
    by_study: dict[str, list[queue.ClaimedJob]] = {}
    for job in claimed:
        by_study.setdefault(job.study_instance_uid, []).append(job)
    dbs = [Database(pg_url) for _ in range(2)]
    try:
        def finish(i: int) -> None:
            for jobs in by_study.values():
                assert queue.complete(dbs[i], jobs[i], "a", [0.2, 0.3, 0.5], None, "1.2", {})

        in_threads(2, finish)
    finally:
        for db in dbs:
            db.dispose()
    with pgdb.session() as s:
        reports = s.execute(select(Job.study_instance_uid, func.count()).where(
            Job.kind == JobKind.REPORT.value).group_by(Job.study_instance_uid)).all()
    assert sorted(reports) == sorted((study, 1) for study in by_study)


def test_schema_3_gains_retention_columns_on_postgres(pg_url: str):
    """A schema-3 database (no purged_at, no purges table) migrates to the current one, and
    the columns take timestamps."""
    from sqlalchemy import inspect, text

    db = Database(pg_url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE purges"))
        conn.execute(text("ALTER TABLE instances DROP COLUMN purged_at"))
        conn.execute(text("ALTER TABLE results DROP COLUMN purged_at"))
        conn.execute(text("DELETE FROM schema_version WHERE version > 3"))
    db.dispose()
    db = Database(pg_url)
    try:
        assert db.migrate() == SCHEMA_VERSION
        with db.engine.connect() as conn:
            inspector = inspect(conn)
            for table in ("instances", "results"):
                assert "purged_at" in {c["name"] for c in inspector.get_columns(table)}
            assert inspector.has_table("purges")
        make_jobs(db, studies=1, per_study=1)
        with db.session() as s:
            inst = s.scalars(select(Instance)).one()
            inst.purged_at = dt.datetime(2026, 1, 2, 3, 4, 5)
        with db.session() as s:
            assert s.scalars(select(Instance)).one().purged_at == dt.datetime(2026, 1, 2, 3, 4, 5)
        assert db.migrate() == SCHEMA_VERSION  # again: nothing to do
    finally:
        db.dispose()


def test_schema_7_turns_absolute_paths_into_keys_on_postgres(pg_url: str, tmp_path: Path):
    """The keys migration on PostgreSQL: the absolute paths of spooled instances and
    results in the node's folders become keys; any other path stays as it was."""
    from sqlalchemy import text

    spool, results = tmp_path / "data" / "spool", tmp_path / "out"
    db = Database(pg_url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM schema_version WHERE version >= 7"))
        for n, path in enumerate((f"{spool}/1.2/1.2.3.dcm", "/elsewhere/spool/1.2/1.2.4.dcm")):
            conn.execute(text(
                "INSERT INTO instances (sop_instance_uid, study_instance_uid, "
                "series_instance_uid, sop_class_uid, transfer_syntax_uid, modality, body_part, "
                "view_position, presentation_intent, photometric, has_pixels, frames, path, "
                "sha256, size, source, received_at, state) VALUES (:uid, '1.2', '1.2.9', "
                "'1.2.840.10008.5.1.4.1.1.1', '', 'CR', '', '', '', '', true, 1, :path, '', 1, "
                "'t', now(), 'received')"), {"uid": f"1.2.{3 + n}", "path": path})
        conn.execute(text(
            "INSERT INTO results (sop_instance_uid, study_instance_uid, kind, generation, "
            "path, created_at) VALUES ('1.2.7', '1.2', 'sc', 1, :path, now())"),
            {"path": f"{results}/1.2.7.dcm"})
    db.dispose()
    db = Database(pg_url)
    try:
        assert db.migrate({"spool": spool, "results": results}) == SCHEMA_VERSION
        with db.session() as s:
            paths = dict(s.execute(select(Instance.sop_instance_uid, Instance.path)).all())
            (result_path,) = s.scalars(select(Result.path)).all()
        assert paths == {"1.2.3": "spool/1.2/1.2.3.dcm",
                         "1.2.4": "/elsewhere/spool/1.2/1.2.4.dcm"}  # not the node's spool
        assert result_path == "results/1.2.7.dcm"
    finally:
        db.dispose()
