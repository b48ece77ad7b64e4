"""The mending functions on SQLite (a file, WAL) and on PostgreSQL: ``cxrd.outbox.retry_dead``
(dead deliveries back to pending), ``cxrd.queue.retry_failed`` (failed jobs run again, the
study's report following), the ``operator_actions`` record of each, and its migration."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomfactory import uid
from pgschema import postgres_url
from queuehelpers import get_instance, get_job, make_jobs
from sqlalchemy import func, inspect, select, text

from cxrd import queue
from cxrd.db import SCHEMA_VERSION, Database, Delivery, Job, OperatorAction, Study, utcnow
from cxrd.domain import DeliveryState, InstanceState, JobKind, JobState, ResultKind, StudyState
from cxrd.outbox import RetryPolicy, add_result, due_deliveries, mark_failed, retry_dead

POLICY = RetryPolicy(initial_backoff_seconds=1, max_backoff_seconds=8, max_age_hours=1)
ACTOR = "tester@host"


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cxrd.sqlite'}"
    else:
        yield from postgres_url()


@pytest.fixture
def anydb(url: str) -> Iterator[Database]:
    db = Database(url)
    db.migrate()
    yield db
    db.dispose()


def actions(db: Database) -> list[OperatorAction]:
    with db.session() as s:
        return list(s.scalars(select(OperatorAction).order_by(OperatorAction.id)))


# ---------------------------------------------------------------------------- deliveries


def dead_deliveries(db: Database, destinations: list[str], n: int) -> dt.datetime:
    """``n`` results queued for each destination, every delivery dead after a permanent
    failure, created an hour ago; returns that creation time."""
    created = utcnow() - dt.timedelta(hours=1)
    study = uid()
    with db.session() as s:
        for _ in range(n):
            sop_uid = uid()
            add_result(s, kind=ResultKind.SC, sop_instance_uid=sop_uid,
                       study_instance_uid=study, generation=1,
                       path=Path(f"/results/{sop_uid}.dcm"), destinations=destinations)
        for row in s.scalars(select(Delivery)):
            row.created_at = row.next_attempt_at = created
    due = [d for items in due_deliveries(db, 1000, now=created).values() for d in items]
    mark_failed(db, due, "refused: 0xA700", POLICY, permanent=True, now=created)
    return created


def by_destination(db: Database) -> dict[str, list[Delivery]]:
    out: dict[str, list[Delivery]] = {}
    with db.session() as s:
        for row in s.scalars(select(Delivery).order_by(Delivery.id)):
            out.setdefault(row.destination, []).append(row)
    return out


def test_deliveries_retry_requeues_the_dead_of_one_destination_then_all(
        anydb: Database, caplog: pytest.LogCaptureFixture) -> None:
    created = dead_deliveries(anydb, ["pacs", "archive"], 3)
    with anydb.session() as s:  # one delivery was done before: it stays done
        s.scalars(select(Delivery)).first().state = DeliveryState.DONE.value  # type: ignore[union-attr]
    caplog.set_level(logging.INFO, logger="cxrd")
    t0 = utcnow()

    assert retry_dead(anydb, actor=ACTOR, destination="pacs") == 2
    rows = by_destination(anydb)
    assert [r.state for r in rows["pacs"]] == ["done", "pending", "pending"]
    for r in rows["pacs"][1:]:
        assert r.attempts == 0 and r.next_attempt_at >= t0 and r.created_at >= t0
        assert r.last_error == "refused: 0xA700"  # kept until the next attempt
    assert rows["pacs"][0].created_at == created  # the done one is untouched
    assert {r.state for r in rows["archive"]} == {DeliveryState.DEAD.value}
    # the node's sender finds them due now
    due = due_deliveries(anydb, 100)
    assert list(due) == ["pacs"] and len(due["pacs"]) == 2

    assert retry_dead(anydb, actor=ACTOR) == 3
    assert {r.state for r in by_destination(anydb)["archive"]} == {DeliveryState.PENDING.value}
    assert retry_dead(anydb, actor=ACTOR) == 0  # nothing dead: recorded all the same

    recorded = [(a.action, a.actor, a.scope, a.count) for a in actions(anydb)]
    assert recorded == [("deliveries-retry", ACTOR, "destination=pacs", 2),
                        ("deliveries-retry", ACTOR, None, 3),
                        ("deliveries-retry", ACTOR, None, 0)]
    lines = [r.getMessage() for r in caplog.records if r.name == "cxrd.actions"]
    assert lines[0].startswith("action=deliveries-retry count=2 destination=pacs "
                               f"actor={ACTOR} at=")
    assert lines[1].startswith("action=deliveries-retry count=3 scope=all")


def test_a_retried_delivery_gets_the_whole_retry_policy_again(anydb: Database) -> None:
    """Its age counts from the retry: a failure backs off instead of being dead at once
    (the delivery is an hour old, the policy's maximum age)."""
    dead_deliveries(anydb, ["pacs"], 1)
    retry_dead(anydb, actor=ACTOR)
    (delivery,) = due_deliveries(anydb, 10)["pacs"]
    mark_failed(anydb, [delivery], "connection refused", POLICY)
    (row,) = by_destination(anydb)["pacs"]
    assert (row.state, row.attempts) == (DeliveryState.PENDING.value, 1)


# ---------------------------------------------------------------------------------- jobs


def claim(db: Database, owner: str = "w", batch: int = 8) -> list[queue.ClaimedJob]:
    return queue.claim(db, owner, batch, 300.0, 1)


def unresolved(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(
            queue.unresolved_failures())) or 0)


def study_row(db: Database) -> Study:
    with db.session() as s:
        return s.scalars(select(Study)).one()


def report_job(db: Database) -> Job:
    with db.session() as s:
        return s.scalars(select(Job).where(Job.kind == JobKind.REPORT.value)).one()


def fail(db: Database, job: queue.ClaimedJob, error: str = "OSError: No space left") -> None:
    queue.retry_or_fail(db, job, "w", error, max_attempts=1, backoff_seconds=0)


def report(db: Database, sr: str, tmp_path: Path) -> queue.StudyFindings:
    (r,) = claim(db)
    assert r.kind == JobKind.REPORT
    findings = queue.study_findings(db, r.study_instance_uid)
    assert queue.complete_report(db, r, "w", findings, sr=(sr, tmp_path / f"{sr}.dcm"),
                                 seconds=0.01) == "done"
    return findings


def test_jobs_retry_runs_a_failed_image_again_and_its_study_is_reported_again(
        anydb: Database, tmp_path: Path) -> None:
    first_id, failed_id = make_jobs(anydb, studies=1, per_study=2)
    done, failing = claim(anydb)
    assert queue.complete(anydb, done, "w", [0.1, 0.2, 0.7], None, "1.2", {})
    fail(anydb, failing)
    report(anydb, "1.2.9", tmp_path)  # the SR without the failed image
    assert study_row(anydb).state == StudyState.REPORTED.value
    assert unresolved(anydb) == 1

    retried = queue.retry_failed(anydb, actor=ACTOR)
    assert (retried.classify, retried.report, retried.studies, retried.jobs) == (1, 0, 1, 1)
    old = get_job(anydb, failed_id)
    assert old.state == JobState.FAILED.value and "No space left" in (old.error or "")
    with anydb.session() as s:
        (new,) = s.scalars(select(Job).where(Job.state == JobState.PENDING.value)).all()
    assert (new.instance_id, new.generation, new.attempts, new.kind) == (
        old.instance_id, old.generation, 0, JobKind.CLASSIFY.value)
    assert new.id > failed_id
    assert get_instance(anydb, new.instance_id).state == InstanceState.QUEUED.value  # type: ignore[arg-type]
    assert study_row(anydb).state == StudyState.ADMITTED.value
    assert unresolved(anydb) == 0
    (a,) = actions(anydb)
    assert (a.action, a.count, a.actor, a.detail) == (
        "jobs-retry", 1, ACTOR, "classify=1 report=0 studies=1")

    # the worker runs it; the study's report job follows and its SR supersedes the first
    (again,) = claim(anydb)
    assert again.job_id == new.id
    assert queue.complete(anydb, again, "w", [0.7, 0.2, 0.1], None, "1.2", {})
    assert report_job(anydb).state == JobState.PENDING.value
    findings = report(anydb, "1.2.10", tmp_path)
    assert findings.latest_job == new.id and findings.current_sr == "1.2.9"
    assert [j[0] for j in findings.jobs] == [first_id, new.id]
    study = study_row(anydb)
    assert (study.state, study.sr_sop_instance_uid) == (StudyState.REPORTED.value, "1.2.10")
    assert get_instance(anydb, new.instance_id).state == InstanceState.DONE.value  # type: ignore[arg-type]
    assert queue.retry_failed(anydb, actor=ACTOR).jobs == 0


def test_jobs_retry_rearms_a_failed_report_job(anydb: Database, tmp_path: Path) -> None:
    make_jobs(anydb, studies=1, per_study=1)
    (c,) = claim(anydb)
    queue.complete(anydb, c, "w", [0.1, 0.2, 0.7], None, "1.2", {})
    (r,) = claim(anydb)
    fail(anydb, r, "OperationalError: database is locked")
    assert unresolved(anydb) == 1 and study_row(anydb).state == StudyState.ADMITTED.value

    assert queue.retry_failed(anydb, actor=ACTOR).report == 1
    row = report_job(anydb)
    assert (row.id, row.state, row.attempts, row.error) == (
        r.job_id, JobState.PENDING.value, 0, None)
    assert unresolved(anydb) == 0
    report(anydb, "1.2.9", tmp_path)
    assert study_row(anydb).state == StudyState.REPORTED.value


def test_a_failed_image_and_report_of_one_study_report_after_the_image(
        anydb: Database, tmp_path: Path) -> None:
    """The report job is not run before the retried image ends (it would report the
    study without it); it stays failed until then."""
    make_jobs(anydb, studies=1, per_study=2)
    done, failing = claim(anydb)
    queue.complete(anydb, done, "w", [0.1, 0.2, 0.7], None, "1.2", {})
    fail(anydb, failing)
    (r,) = claim(anydb)
    fail(anydb, r)
    assert unresolved(anydb) == 2

    retried = queue.retry_failed(anydb, actor=ACTOR)
    assert (retried.classify, retried.report) == (1, 1)
    assert report_job(anydb).state == JobState.FAILED.value
    (c,) = claim(anydb)
    assert c.kind == JobKind.CLASSIFY
    queue.complete(anydb, c, "w", [0.1, 0.2, 0.7], None, "1.2", {})
    findings = report(anydb, "1.2.9", tmp_path)
    assert len(findings.jobs) == 2 and unresolved(anydb) == 0


def test_a_retry_that_fails_again_counts_and_can_be_retried_again(anydb: Database) -> None:
    make_jobs(anydb, studies=1, per_study=1)
    (c,) = claim(anydb)
    fail(anydb, c)
    queue.retry_failed(anydb, actor=ACTOR)
    (again,) = [j for j in claim(anydb) if j.kind == JobKind.CLASSIFY]
    fail(anydb, again, "OSError: still full")
    assert unresolved(anydb) == 1
    assert queue.retry_failed(anydb, actor=ACTOR).classify == 1


def test_failures_answered_by_a_reprocess_are_left_alone(anydb: Database) -> None:
    make_jobs(anydb, studies=1, per_study=1)
    (c,) = claim(anydb)
    fail(anydb, c)
    with anydb.session() as s:  # what `cxrd reprocess` does first
        s.scalars(select(Study)).one().generation += 1
    assert unresolved(anydb) == 0
    assert queue.retry_failed(anydb, actor=ACTOR).jobs == 0


def test_concurrent_retries_queue_each_failure_once(anydb: Database, url: str) -> None:
    make_jobs(anydb, studies=3, per_study=2)
    for c in claim(anydb):
        fail(anydb, c)
    assert unresolved(anydb) == 6
    barrier = threading.Barrier(3)
    counts: list[int] = []

    def run() -> None:
        db = Database(url)
        try:
            barrier.wait()
            counts.append(queue.retry_failed(db, actor=ACTOR).classify)
        finally:
            db.dispose()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(counts) == [0, 0, 6]
    with anydb.session() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(
            Job.state == JobState.PENDING.value, Job.kind == JobKind.CLASSIFY.value)) == 6


# ----------------------------------------------------------------------------- migration


def test_a_schema_2_database_gains_operator_actions(url: str) -> None:
    db = Database(url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE operator_actions"))
        conn.execute(text("DELETE FROM schema_version WHERE version > 2"))
    db.dispose()
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            assert not inspect(conn).has_table("operator_actions")
        assert db.migrate() == SCHEMA_VERSION >= 3
        assert retry_dead(db, actor=ACTOR) == 0
        assert [a.action for a in actions(db)] == ["deliveries-retry"]
        assert db.migrate() == SCHEMA_VERSION  # idempotent
    finally:
        db.dispose()
