"""The job queue on database rows, and every job and study state change that work makes:
claim with a lease, complete, retry with backoff, skip, fail, and the study's report job.

Two kinds of job share the same lease, retry and crash rules (``cxrd.domain.JobKind``):
classify (one instance) and report (the SR of one study generation). The transaction that
ends a study's last open classify job enqueues its report job (``study_progress``), so
exactly one report job exists per study generation whichever worker or node ends it.

A claim increments ``attempts``, so a job whose processing kills its worker (a decoder
crash, say) comes back after its lease expires and fails for good after ``max_attempts``
instead of crash-looping. A job that failed for want of a resource (a full disk, a
database that is full or unreachable) is not the image's failure: it waits and gets its
attempt back (``retry_or_fail(resource=True)``). On PostgreSQL several nodes share the
queue: rows are claimed with ``FOR UPDATE SKIP LOCKED``. On SQLite the claim runs under
``BEGIN IMMEDIATE``.

A failed job stays failed, with its error, until an operator answers it: ``cxrd jobs
retry`` (``retry_failed``) queues it again in its generation, ``cxrd reprocess`` queues its
study as a new generation. ``unresolved_failures`` says which failures are unanswered.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, aliased

from cxrd.actions import JOBS_RETRY, log_action, record
from cxrd.config import NotificationConfig
from cxrd.db import Database, Instance, Job, Result, Study, Worker, utcnow
from cxrd.domain import InstanceState, JobKind, JobState, ResultKind, SkipReason, StudyState
from cxrd.durable import pid_alive
from cxrd.outbox import add_result

log = logging.getLogger(__name__)


_OPEN = (JobState.PENDING.value, JobState.RUNNING.value)


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    instance_id: int | None  # None for a report job
    sop_instance_uid: str  # "" for a report job
    study_instance_uid: str
    path: str  # the spool key (cxrd.store); "" for a report job
    generation: int
    attempts: int
    kind: JobKind = JobKind.CLASSIFY


def _due_jobs(s: Session, db: Database, now: dt.datetime, batch_size: int) -> list[Job]:
    """Up to ``batch_size`` due jobs, in the claim's order.

    SQLite (one node): one query, report jobs first (each finishes a study), then
    classify jobs, oldest first, across studies; an expired lease makes its job due in
    its place. PostgreSQL: the same jobs in nearly the same order, from three
    index-ordered reads, each stopping at what is still missing: jobs whose lease expired
    (their worker or node died; the oldest work) through ``ix_jobs_claim`` (state running:
    at most the workers' batches), then the pending report jobs, then the pending
    classify jobs, each walking ``ix_jobs_due`` (kind, state, id) in id order. The one
    query sorts the whole backlog at every claim: ``bench/coordinator.py`` measured 43 ms
    of PostgreSQL CPU per read with 100,000 jobs pending (a reprocess, an outage's
    arrivals) against 0.5 ms for the three reads, flat from 2,000 to 100,000."""
    if db.is_sqlite:
        due = or_(
            (Job.state == JobState.PENDING.value) & (Job.not_before <= now),
            (Job.state == JobState.RUNNING.value) & (Job.lease_expires < now),
        )
        reports_first = case((Job.kind == JobKind.REPORT.value, 0), else_=1)
        return list(s.scalars(select(Job).where(due).order_by(reports_first, Job.id)
                              .limit(batch_size)).all())
    jobs: list[Job] = []
    for query in (
        select(Job).where(Job.state == JobState.RUNNING.value, Job.lease_expires < now)
        .order_by(case((Job.kind == JobKind.REPORT.value, 0), else_=1), Job.id),
        *(select(Job).where(Job.kind == kind.value, Job.state == JobState.PENDING.value,
                            Job.not_before <= now).order_by(Job.id)
          for kind in (JobKind.REPORT, JobKind.CLASSIFY)),
    ):
        if len(jobs) >= batch_size:
            break
        query = query.limit(batch_size - len(jobs)).with_for_update(skip_locked=True)
        jobs.extend(s.scalars(query).all())
    return jobs


def claim(db: Database, owner: str, batch_size: int, lease_seconds: float,
          max_attempts: int) -> list[ClaimedJob]:
    """Lease up to ``batch_size`` due jobs (``_due_jobs``): expired leases, then report
    jobs (each finishes a study), then classify jobs, oldest first, across studies."""
    now = utcnow()
    with db.session() as s:
        jobs = _due_jobs(s, db, now, batch_size)
        claimed: list[ClaimedJob] = []
        for job in jobs:
            inst = s.get(Instance, job.instance_id) if job.instance_id is not None else None
            what = inst.sop_instance_uid if inst is not None else f"report:{job.study_instance_uid}"
            if job.state == JobState.RUNNING.value:
                log.warning("action=lease-expired job_id=%d kind=%s sop_instance_uid=%s owner=%s",
                            job.id, job.kind, what, job.lease_owner)
            if job.attempts >= max_attempts:
                _fail(s, job, inst, f"gave up after {job.attempts} attempts; last error: "
                                    f"{job.error or 'the worker died while processing it'}", now)
                continue
            job.state = JobState.RUNNING.value
            job.lease_owner = owner
            job.lease_expires = now + dt.timedelta(seconds=lease_seconds)
            job.attempts += 1
            claimed.append(ClaimedJob(
                job.id, job.instance_id, inst.sop_instance_uid if inst is not None else "",
                job.study_instance_uid, inst.path if inst is not None else "",
                job.generation, job.attempts, JobKind(job.kind)))
        return claimed


def error_kind(error: str) -> str:
    """The exception type at the front of an error text. Library messages can quote data
    element values (patient data), so log lines at INFO and above carry only this; the
    full text is in the job row (``cxrd status``) and at DEBUG."""
    head = error.split(":", 1)[0].strip()
    return head if head.replace(".", "").replace("_", "").isalnum() else "error"


def _fail(s: Session, job: Job, inst: Instance | None, error: str, now: dt.datetime) -> None:
    job.state = JobState.FAILED.value
    job.error = error[:4000]
    job.finished_at = now
    job.lease_owner = None
    if inst is not None:
        inst.state = InstanceState.FAILED.value
        inst.detail = error[:4000]
    log.error("action=job-failed job_id=%d kind=%s sop_instance_uid=%s study_instance_uid=%s "
              "error_type=%s", job.id, job.kind, inst.sop_instance_uid if inst else "",
              job.study_instance_uid, error_kind(error))
    log.debug("action=job-failed job_id=%d detail=%s", job.id, error)
    if job.kind == JobKind.CLASSIFY.value:
        study_progress(s, job.study_instance_uid, now)


def _locked_study(s: Session, study_uid: str) -> Study | None:
    # On PostgreSQL the row lock serialises the transactions that end a study's jobs, so
    # the last one to commit sees every other one ended (READ COMMITTED re-reads after
    # the lock). SQLite's BEGIN IMMEDIATE serialises them already.
    return s.scalars(select(Study).where(Study.study_instance_uid == study_uid)
                     .with_for_update()).first()


def study_progress(s: Session, study_uid: str, now: dt.datetime,
                   study: Study | None = None) -> None:
    """Enqueue the study's report job once its last open classify job has ended.

    Called in the transaction that ends a classify job (done, skipped, failed) and by
    admission. Nothing happens while the study is collecting (reopened by a late
    instance: admission calls again) or while classify jobs are open. A report job of this
    generation that already ended is put back to pending: its study has changed since
    (a late instance was classified); the rebuilt SR supersedes the one it wrote, or, when
    nothing it reports changed, the job writes nothing. A pending or running one is left
    alone: a running one checks, when it completes, that it saw the latest results.
    ``study``: the study's row when the caller holds it locked already (admission).
    """
    if study is None:
        study = _locked_study(s, study_uid)
    if study is None or study.state != StudyState.ADMITTED.value:
        return
    _enqueue_report(s, study, _study_jobs(s, study_uid), now)


def _study_jobs(s: Session, study_uid: str) -> Sequence[Any]:
    """(id, kind, state, generation) of every job of a study: one query (a study has a
    few jobs per image and generation)."""
    return s.execute(select(Job.id, Job.kind, Job.state, Job.generation).where(
        Job.study_instance_uid == study_uid)).all()


def _enqueue_report(s: Session, study: Study, jobs: Sequence[Any], now: dt.datetime) -> None:
    """``study_progress``'s rule, on the study's ``_study_jobs``: nothing while a classify
    job is open; else its generation's report job, new, or put back to pending when it
    ended (a pending or running one is left alone)."""
    if any(j.kind == JobKind.CLASSIFY.value and j.state in _OPEN for j in jobs):
        return
    report = next((j for j in jobs if j.kind == JobKind.REPORT.value
                   and j.generation == study.generation), None)
    if report is None:
        s.add(Job(kind=JobKind.REPORT.value, instance_id=None,
                  study_instance_uid=study.study_instance_uid, generation=study.generation,
                  state=JobState.PENDING.value, not_before=now, created_at=now))
    elif report.state not in _OPEN:
        row = s.get(Job, report.id)
        assert row is not None
        row.state = JobState.PENDING.value
        row.attempts = 0
        row.error = None
        row.not_before = now
        row.finished_at = None


#: The scheduler's writes, built once, run as executemany on the round's connection.
_QUEUE_INSTANCE = update(Instance).where(Instance.id == bindparam("iid")).values(
    state=InstanceState.QUEUED.value)
_SKIP_INSTANCE = update(Instance).where(Instance.id == bindparam("iid")).values(
    state=InstanceState.SKIPPED.value, reason=bindparam("why"))
_NEW_JOB = insert(Job)


def queue_instances(conn: Connection, study_uid: str, generation: int,
                    decisions: Sequence[tuple[Any, SkipReason | None]],
                    now: dt.datetime) -> tuple[int, int]:
    """A classify job of generation ``generation`` for each instance without a skip
    reason, the reason recorded for the others; the study's state is left as it is.
    Returns (queued, skipped). Each instance is a row with its ``id`` and
    ``sop_instance_uid``. Admission of a stable study (``admit_study``), and the
    classification of instances as they arrive (``[study] classify_on_arrival``,
    ``cxrd.admit.queue_arrivals``) while their study is still collecting: their jobs run
    then, and the study's report job waits until it is stable and admitted
    (``study_progress``). Core statements, a few per round: the scheduler runs this for
    every instance, and ORM objects cost it more than the statements."""
    queued = [inst for inst, reason in decisions if reason is None]
    skipped = [(inst, reason) for inst, reason in decisions if reason is not None]
    if queued:
        conn.execute(_QUEUE_INSTANCE, [{"iid": inst.id} for inst in queued])
        conn.execute(_NEW_JOB, [
            {"kind": JobKind.CLASSIFY.value, "instance_id": inst.id,
             "study_instance_uid": study_uid, "generation": generation,
             "state": JobState.PENDING.value, "attempts": 0, "not_before": now,
             "created_at": now} for inst in queued])
    if skipped:
        conn.execute(_SKIP_INSTANCE, [{"iid": inst.id, "why": reason.value}
                                      for inst, reason in skipped])
    for inst, reason in skipped:
        log.info("action=skipped sop_instance_uid=%s study_instance_uid=%s reason=%s",
                 inst.sop_instance_uid, study_uid, reason.value)
    return len(queued), len(skipped)


def admit_study(s: Session, study: Study, decisions: Sequence[tuple[Any, SkipReason | None]],
                now: dt.datetime) -> tuple[int, int]:
    """Admission's outcome for a stable study (``cxrd.admit`` decides): its instances not
    queued yet (``queue_instances``), and the study's state. Returns (queued, skipped)."""
    queued, skipped = queue_instances(s.connection(), study.study_instance_uid,
                                      study.generation, decisions, now)
    study.stable_at = now
    if queued:
        study.state = StudyState.ADMITTED.value
        return queued, skipped  # its last classify job enqueues the report job
    jobs = _study_jobs(s, study.study_instance_uid)
    if jobs:
        # Queued on arrival (``[study] classify_on_arrival``), or only skipped instances
        # arrived late: earlier jobs may still be running, or done without an SR yet. The
        # report job decides (it keeps the current SR when nothing new was classified).
        study.state = StudyState.ADMITTED.value
        _enqueue_report(s, study, jobs, now)
    else:
        study.state = StudyState.NOTHING_TO_DO.value
    return queued, skipped


def requeue(s: Session, study: Study,
            decisions: Sequence[tuple[Instance, SkipReason | None]], now: dt.datetime) -> int:
    """A reprocess of an idle study: a new generation with a classify job for each
    instance without a skip reason (the reasons recorded for the others); returns how many
    were queued. Nothing changes when none is classifiable."""
    classify = []
    for inst, reason in decisions:
        if reason is None:
            classify.append(inst)
        else:
            inst.state, inst.reason = InstanceState.SKIPPED.value, reason.value
    if classify:
        study.generation += 1
        for inst in classify:
            inst.state, inst.reason, inst.detail = InstanceState.QUEUED.value, None, None
            s.add(Job(instance_id=inst.id, study_instance_uid=study.study_instance_uid,
                      generation=study.generation, state=JobState.PENDING.value,
                      not_before=now, created_at=now))
        study.state = StudyState.ADMITTED.value
        study.stable_at = now
    return len(classify)


def ensure_report_jobs(db: Database) -> int:
    """The scheduler's safety net: admitted studies with no open job and no report job of
    their generation get one (a database upgraded from schema 1 with studies in flight).
    Returns how many were enqueued; a cheap query when there is nothing to do."""
    now = utcnow()
    with db.session() as s:
        open_or_reported = select(Job.study_instance_uid).where(or_(
            Job.state.in_(_OPEN),
            (Job.kind == JobKind.REPORT.value) & (Job.generation == Study.generation)))
        uids = s.scalars(select(Study.study_instance_uid).where(
            Study.state == StudyState.ADMITTED.value,
            Study.study_instance_uid.not_in(open_or_reported)).limit(100)).all()
        for uid in uids:
            study_progress(s, uid, now)
    return len(uids)


def _locked_job(s: Session, job_id: int) -> Job | None:
    # On PostgreSQL the row lock makes the ownership check and the update one step: a
    # claimer re-leasing the job meanwhile either went first (we see its owner) or waits.
    return s.get(Job, job_id, with_for_update=True)


def _owned(db_job: Job | None, owner: str) -> bool:
    return (db_job is not None and db_job.state == JobState.RUNNING.value
            and db_job.lease_owner == owner)


def _leased(s: Session, job: ClaimedJob, owner: str) -> tuple[Job, Instance | None] | None:
    """The job's row (locked) and its instance (None for a report job), if ``owner``
    still holds the lease."""
    row = _locked_job(s, job.job_id)
    if row is None or not _owned(row, owner):
        return None
    if job.instance_id is None:
        return row, None
    inst = s.get(Instance, job.instance_id)
    assert inst is not None
    return row, inst


@dataclass(frozen=True)
class Completion:
    """A classify job's outputs, for ``complete_batch``: the probabilities and the
    findings record the SR is built from, its timings, and its result objects (the heatmap
    ``sc`` and the lung ``seg``, each a SOP Instance UID and store key)."""

    job: ClaimedJob
    probs: Sequence[float]
    record: Mapping[str, object] | None
    timings: Mapping[str, float]
    sc: tuple[str, str | Path] | None = None
    seg: tuple[str, str | Path] | None = None


def complete(db: Database, job: ClaimedJob, owner: str, probs: Sequence[float],
             record: Mapping[str, object] | None, device_uid: str,
             timings: Mapping[str, float], *, sc: tuple[str, str | Path] | None = None,
             seg: tuple[str, str | Path] | None = None,
             destinations: Sequence[str] = ()) -> bool:
    """``complete_batch`` of one job."""
    (done,) = complete_batch(db, [Completion(job, probs, record, timings, sc, seg)], owner,
                             device_uid, destinations=destinations)
    return done


def complete_batch(db: Database, completions: Sequence[Completion], owner: str,
                   device_uid: str, *, destinations: Sequence[str] = ()) -> list[bool]:
    """Mark classify jobs done with their outputs (``Completion``), each result object
    with a delivery per destination, all in one transaction: a worker ends its batch with
    one commit, not one per image. Per job, False when its lease was lost meanwhile
    (another worker owns the job now; its results have the same UIDs, so nothing is
    duplicated); the others are done. The studies' report jobs are then considered in
    the order of their UIDs, so that two workers ending batches of the same studies lock
    those studies in the same order."""
    now = utcnow()
    done: list[bool] = []
    with db.session() as s:
        for c in completions:
            job = c.job
            leased = _leased(s, job, owner)
            if leased is None:
                log.warning("action=lease-lost job_id=%d sop_instance_uid=%s", job.job_id,
                            job.sop_instance_uid)
                done.append(False)
                continue
            row, inst = leased
            assert inst is not None, "complete_batch() is for classify jobs"
            row.state = JobState.DONE.value
            row.probs = json.dumps([float(p) for p in c.probs])
            row.record = (json.dumps(c.record, separators=(",", ":"))
                          if c.record is not None else None)
            row.model_device_uid = device_uid
            row.timings = json.dumps(dict(c.timings))
            row.finished_at = now
            row.lease_owner = None
            row.error = None
            inst.state = InstanceState.DONE.value
            inst.reason = None
            inst.detail = None
            for kind, result in ((ResultKind.SC, c.sc), (ResultKind.SEG, c.seg)):
                if result is not None:
                    add_result(s, kind=kind, sop_instance_uid=result[0],
                               study_instance_uid=job.study_instance_uid,
                               generation=job.generation, path=result[1],
                               destinations=destinations,
                               source_sop_instance_uid=job.sop_instance_uid)
            done.append(True)
        for study_uid in sorted({c.job.study_instance_uid
                                 for c, ok in zip(completions, done, strict=True) if ok}):
            study_progress(s, study_uid, now)
    return done


@dataclass(frozen=True)
class StudyFindings:
    """What a report job reads: the study's generation and current SR, and the latest done
    classify job of each of its instances (id, probabilities JSON, record JSON)."""

    study_instance_uid: str
    generation: int
    current_sr: str | None
    current_sr_path: str | None  # its store key
    jobs: list[tuple[int, str, str | None]]

    @property
    def latest_job(self) -> int | None:
        return max((j[0] for j in self.jobs), default=None)


def _latest_done_jobs(study_uid: str, generation: int) -> Any:
    """The newest done classify job of each instance, in the study's current generation:
    an SR reports what its generation's model found (after a reprocess, an image whose
    new job failed is not reported with the previous model's finding)."""
    return select(func.max(Job.id)).where(
        Job.study_instance_uid == study_uid, Job.kind == JobKind.CLASSIFY.value,
        Job.generation == generation, Job.state == JobState.DONE.value
    ).group_by(Job.instance_id)


def study_findings(db: Database, study_uid: str) -> StudyFindings:
    """Everything a report job needs, from the database alone (no spool reads)."""
    with db.session() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        rows = s.execute(select(Job.id, Job.probs, Job.record)
                         .where(Job.id.in_(_latest_done_jobs(study_uid, study.generation)))
                         .order_by(Job.instance_id)).all()
        path = None
        if study.sr_sop_instance_uid:
            path = s.scalars(select(Result.path).where(
                Result.sop_instance_uid == study.sr_sop_instance_uid)).first()
        return StudyFindings(study_uid, study.generation, study.sr_sop_instance_uid, path,
                             [(int(r[0]), str(r[1] or "[]"), r[2]) for r in rows])


ReportOutcome = Literal["done", "lost", "stale"]


def complete_report(db: Database, job: ClaimedJob, owner: str, findings: StudyFindings, *,
                    sr: tuple[str, str | Path] | None, seconds: float,
                    destinations: Sequence[str] = (),
                    summary: Mapping[str, Any] | None = None,
                    notifications: Sequence[NotificationConfig] = ()) -> ReportOutcome:
    """End a report job: record the SR written from ``findings`` (None: nothing new to
    write) as the study's current SR, in the same transaction as the study's state, with
    its deliveries: one per destination and, by its study-level finding ``summary``, one
    per notification it is urgent for (``cxrd.outbox.add_result``). A crash before the
    commit records none of it, and the job redone writes the same SR UID; a transaction
    run again after the commit finds the SR recorded and queues nothing.

    When a classify job of the study finished after ``findings`` was read (a late
    instance), the SR is stale: the job goes back to pending and is rebuilt ("stale": the
    caller removes the file it wrote, which nothing records). "lost" when the lease was
    lost (another worker holds the job and writes the same UID: leave the file alone).
    """
    now = utcnow()
    with db.session() as s:
        leased = _leased(s, job, owner)
        if leased is None:
            log.warning("action=lease-lost job_id=%d kind=report study_instance_uid=%s",
                        job.job_id, job.study_instance_uid)
            return "lost"
        row, _ = leased
        study = _locked_study(s, job.study_instance_uid)
        assert study is not None
        latest = s.scalars(select(func.max(Job.id)).where(
            Job.id.in_(_latest_done_jobs(job.study_instance_uid, study.generation)))).first()
        if latest != findings.latest_job or study.generation != findings.generation:
            row.state = JobState.PENDING.value
            row.lease_owner = None
            row.not_before = now
            row.attempts = max(0, row.attempts - 1)  # not a failure: the study moved on
            log.info("action=report-stale study_instance_uid=%s", job.study_instance_uid)
            return "stale"
        if sr is not None:
            add_result(s, kind=ResultKind.SR, sop_instance_uid=sr[0],
                       study_instance_uid=job.study_instance_uid, generation=job.generation,
                       path=sr[1], destinations=destinations, supersedes=findings.current_sr,
                       summary=summary, notifications=notifications)
            study.sr_sop_instance_uid = sr[0]
        if study.state == StudyState.ADMITTED.value:
            # A study reopened by a late instance meanwhile stays collecting; its next
            # SR will supersede this one. Without SRs ([results] structured_report off)
            # a study with classified images is reported all the same.
            study.state = (StudyState.REPORTED.value
                           if study.sr_sop_instance_uid or findings.jobs
                           else StudyState.NOTHING_TO_DO.value)
        study.reported_at = now
        study.report_seconds = seconds
        row.state = JobState.DONE.value
        row.finished_at = now
        row.lease_owner = None
        row.error = None
    return "done"


def skip(db: Database, job: ClaimedJob, owner: str, reason: SkipReason, detail: str) -> None:
    """A permanent property of the image: no retry."""
    now = utcnow()
    with db.session() as s:
        leased = _leased(s, job, owner)
        if leased is None:
            return
        row, inst = leased
        row.state = JobState.SKIPPED.value
        row.reason = reason.value
        row.error = detail[:4000]
        row.finished_at = now
        row.lease_owner = None
        if inst is not None:
            inst.state = InstanceState.SKIPPED.value
            inst.reason = reason.value
            inst.detail = detail[:4000]
        if job.kind == JobKind.CLASSIFY:
            study_progress(s, job.study_instance_uid, now)
    log.info("action=skipped sop_instance_uid=%s study_instance_uid=%s reason=%s",
             job.sop_instance_uid, job.study_instance_uid, reason.value)


#: A job that waits for a resource (disk space, the database) is tried again after this.
RESOURCE_WAIT_SECONDS = 10.0


def retry_or_fail(db: Database, job: ClaimedJob, owner: str, error: str, max_attempts: int,
                  backoff_seconds: float, *, resource: bool = False) -> None:
    """Put a failed job back with exponential backoff, or fail it for good.

    ``resource``: it failed for want of a resource (a full disk, a database that is full
    or unreachable; ``cxrd.space.is_resource_error``), which says nothing about the image.
    It goes back to pending, due in ``RESOURCE_WAIT_SECONDS``, and its claim's attempt is
    given back: it waits as long as the resource is missing and never fails for it."""
    now = utcnow()
    with db.session() as s:
        leased = _leased(s, job, owner)
        if leased is None:
            return
        row, inst = leased
        if resource:
            delay = RESOURCE_WAIT_SECONDS
            row.attempts = max(0, row.attempts - 1)
            row.error = f"waiting for a resource: {error}"[:4000]
        elif row.attempts >= max_attempts:
            _fail(s, row, inst, f"failed {row.attempts} times; last error: {error}", now)
            return
        else:
            delay = backoff_seconds * 2 ** (row.attempts - 1)
            row.error = error[:4000]
        row.state = JobState.PENDING.value
        row.lease_owner = None
        row.not_before = now + dt.timedelta(seconds=delay)
    if resource:
        log.debug("action=job-wait job_id=%d detail=%s", job.job_id, error)
        log.warning("action=job-wait job_id=%d kind=%s sop_instance_uid=%s "
                    "study_instance_uid=%s delay_s=%.0f error_type=%s note=a resource is "
                    "missing; the attempt does not count", job.job_id, job.kind.value,
                    job.sop_instance_uid, job.study_instance_uid, delay, error_kind(error))
        return
    log.debug("action=job-retry job_id=%d detail=%s", job.job_id, error)
    log.warning("action=job-retry job_id=%d sop_instance_uid=%s attempt=%d delay_s=%.0f "
                "error_type=%s", job.job_id, job.sop_instance_uid, job.attempts, delay,
                error_kind(error))


def unresolved_failures() -> ColumnElement[bool]:
    """Failed jobs nothing has answered yet (a condition on ``Job``): not in an older
    generation than their study's (a reprocess answered them), and, for a classify job, no
    later job of the same instance in the same generation (``retry_failed`` answered it;
    if that one fails too, it is the unanswered failure). A failed report job is retried
    in place (one report job per study generation), so it counts until it is re-armed."""
    later = aliased(Job)
    return and_(
        Job.state == JobState.FAILED.value,
        ~exists().where(Study.study_instance_uid == Job.study_instance_uid,
                        Study.generation > Job.generation),
        ~exists().where(later.instance_id == Job.instance_id,
                        later.generation == Job.generation, later.id > Job.id),
    )


def study_finished_before(cutoff: dt.datetime) -> ColumnElement[bool]:
    """Studies whose received instances retention may remove (a condition on ``Study``):
    finished (reported, or nothing to do), with no open job and no unanswered failure
    (``cxrd jobs retry`` still needs the images), and no activity (received, admitted,
    reprocessed, reported) since ``cutoff``."""
    return and_(
        Study.state.in_((StudyState.REPORTED.value, StudyState.NOTHING_TO_DO.value)),
        Study.last_received_at < cutoff,
        or_(Study.stable_at.is_(None), Study.stable_at < cutoff),
        or_(Study.reported_at.is_(None), Study.reported_at < cutoff),
        ~exists().where(Job.study_instance_uid == Study.study_instance_uid,
                        or_(Job.state.in_(_OPEN), unresolved_failures())),
    )


@dataclass(frozen=True)
class Retried:
    """What ``retry_failed`` queued again."""

    classify: int
    report: int
    studies: int

    @property
    def jobs(self) -> int:
        return self.classify + self.report


def retry_failed(db: Database, *, actor: str, now: dt.datetime | None = None) -> Retried:
    """``cxrd jobs retry``: every unanswered failed job (``unresolved_failures``) is run
    again, in its study's current generation, so its study's report follows.

    A failed classify job gets a new pending job for the same instance and generation,
    with no attempts used (the failed row stays, with its error, as the record of the
    failure; the new one answers it). A new row, not the old one set back to pending: the
    SR's UID and the stale-report check follow the newest classify job of the study, so
    a job that ends later must have a larger id. Its instance is queued again, and its
    study, reported (or nothing-to-do) without it, is admitted again: when the study's
    last open classify job ends, ``study_progress`` re-arms the report job, whose new SR
    supersedes the current one. A failed report job is re-armed in place by the same rule,
    at once when none of its study's classify jobs is open. A study collecting meanwhile
    is left to admission. The operator action is recorded in the same transaction and
    logged."""
    now = utcnow() if now is None else now
    classify = report = 0
    queued: list[tuple[int, str, str]] = []
    with db.session() as s:
        uids = sorted(s.scalars(select(Job.study_instance_uid).where(
            unresolved_failures()).distinct()).all())
        for uid in uids:  # one order for the study locks
            study = _locked_study(s, uid)
            if study is None:
                continue
            # Read after the study lock: a concurrent retry of this study has committed.
            failed = s.scalars(select(Job).where(Job.study_instance_uid == uid,
                                                 unresolved_failures()).order_by(Job.id)).all()
            for job in failed:
                if job.kind == JobKind.REPORT.value:
                    report += 1
                    continue
                inst = s.get(Instance, job.instance_id)
                assert inst is not None
                inst.state, inst.reason, inst.detail = InstanceState.QUEUED.value, None, None
                s.add(Job(instance_id=job.instance_id, study_instance_uid=uid,
                          generation=job.generation, state=JobState.PENDING.value,
                          not_before=now, created_at=now))
                queued.append((job.id, inst.sop_instance_uid, uid))
                classify += 1
            if study.state in (StudyState.REPORTED.value, StudyState.NOTHING_TO_DO.value):
                study.state = StudyState.ADMITTED.value
            s.flush()
            study_progress(s, uid, now)
        retried = Retried(classify, report, len(uids))
        action = record(s, JOBS_RETRY, retried.jobs, actor=actor,
                        detail=f"classify={classify} report={report} studies={len(uids)}")
    for job_id, sop_uid, study_uid in queued:
        log.info("action=job-requeued failed_job_id=%d sop_instance_uid=%s "
                 "study_instance_uid=%s", job_id, sop_uid, study_uid)
    log_action(action)
    return retried


def release(db: Database, jobs: Sequence[ClaimedJob], owner: str, reason: str) -> int:
    """Give back jobs ``owner`` still holds, due now and without spending an attempt:
    nothing was wrong with them (the database went away while they were in hand, say).
    A job whose lease was lost meanwhile is left to its new owner. Returns how many."""
    if not jobs:
        return 0
    now = utcnow()
    released = 0
    with db.session() as s:
        for job in jobs:
            row = _locked_job(s, job.job_id)
            if row is None or not _owned(row, owner):
                continue
            row.state = JobState.PENDING.value
            row.lease_owner = None
            row.not_before = now
            row.attempts = max(0, row.attempts - 1)
            released += 1
    if released:
        log.info("action=jobs-released worker=%s count=%d reason=%s", owner, released, reason)
    return released


def release_dead_leases(db: Database, owner_prefix: str) -> int:
    """At start-up: jobs leased by dead processes of this host return to the queue at once,
    their attempt given back. They were in hand when the node itself stopped (a kill, a
    power loss, a restart): that says nothing about the image, so a node killed again and
    again never fails a job for it. A worker that dies under a running node is another
    matter (``release_worker_leases``: its attempt counts). Owners are ``host:pid:wN``; a
    lease whose process is still alive (another node on the same host) is left alone."""
    with db.session() as s:
        owners = s.scalars(select(Job.lease_owner).where(
            Job.state == JobState.RUNNING.value,
            # autoescape: a host name may hold "_" or "%", LIKE wildcards.
            Job.lease_owner.startswith(owner_prefix, autoescape=True)).distinct()).all()
        dead = []
        for owner in owners:
            pid = (owner or "")[len(owner_prefix):].split(":", 1)[0]
            if not pid.isdigit() or not pid_alive(int(pid)):
                dead.append(owner)
        count = 0
        if dead:
            result = s.execute(update(Job).where(
                Job.state == JobState.RUNNING.value, Job.lease_owner.in_(dead)
            ).values(state=JobState.PENDING.value, lease_owner=None, not_before=utcnow(),
                     attempts=case((Job.attempts > 0, Job.attempts - 1), else_=0)))
            count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        log.warning("action=released-leases reason=node-restart count=%d", count)
    return count


def release_worker_leases(db: Database, owner: str) -> int:
    """A worker process died while its node runs (a crash, the OOM killer): its jobs
    return to the queue at once instead of when their lease expires, and their attempt
    counts, so a job that kills its worker fails for good after ``max_attempts`` instead of
    looping (the claim records "the worker died while processing it")."""
    with db.session() as s:
        result = s.execute(update(Job).where(
            Job.state == JobState.RUNNING.value, Job.lease_owner == owner
        ).values(state=JobState.PENDING.value, lease_owner=None, not_before=utcnow()))
        count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        log.warning("action=released-leases reason=worker-died worker=%s count=%d", owner,
                    count)
    return count


def heartbeat(db: Database, worker_id: str, *, model: str = "", device_uid: str = "",
              demo: bool = False, providers: Sequence[str] = (), processed: int = 0) -> None:
    """Upsert this worker's row (status shows the providers actually in use)."""
    now = utcnow()
    with db.session() as s:
        row = s.get(Worker, worker_id)
        if row is None:
            s.add(Worker(id=worker_id, started_at=now, heartbeat_at=now, model=model,
                         model_device_uid=device_uid, demo=demo,
                         providers=",".join(providers), processed=processed))
        else:
            row.heartbeat_at = now
            row.processed = processed

