"""The job queue on database rows: claim with a lease, complete, retry with backoff, skip.

A claim increments ``attempts``, so a job whose processing kills its worker (a decoder
crash, say) comes back after its lease expires and fails for good after ``max_attempts``
instead of crash-looping. On PostgreSQL several nodes share the queue: rows are claimed
with ``FOR UPDATE SKIP LOCKED``. On SQLite the claim runs under ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from cxrd.db import Database, Instance, Job, Worker, utcnow
from cxrd.domain import InstanceState, JobState, ResultKind, SkipReason
from cxrd.results import add_result

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    instance_id: int
    sop_instance_uid: str
    study_instance_uid: str
    path: str
    generation: int
    attempts: int


def claim(db: Database, owner: str, batch_size: int, lease_seconds: float,
          max_attempts: int) -> list[ClaimedJob]:
    """Lease up to ``batch_size`` due jobs, oldest first, across studies."""
    now = utcnow()
    with db.session() as s:
        due = or_(
            (Job.state == JobState.PENDING.value) & (Job.not_before <= now),
            (Job.state == JobState.RUNNING.value) & (Job.lease_expires < now),
        )
        query = select(Job).where(due).order_by(Job.id).limit(batch_size)
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        jobs = s.scalars(query).all()
        claimed: list[ClaimedJob] = []
        for job in jobs:
            inst = s.get(Instance, job.instance_id)
            assert inst is not None
            if job.state == JobState.RUNNING.value:
                log.warning("action=lease-expired job_id=%d sop_instance_uid=%s owner=%s",
                            job.id, inst.sop_instance_uid, job.lease_owner)
            if job.attempts >= max_attempts:
                _fail(job, inst, f"gave up after {job.attempts} attempts; last error: "
                                 f"{job.error or 'the worker died while processing it'}", now)
                continue
            job.state = JobState.RUNNING.value
            job.lease_owner = owner
            job.lease_expires = now + dt.timedelta(seconds=lease_seconds)
            job.attempts += 1
            claimed.append(ClaimedJob(job.id, inst.id, inst.sop_instance_uid,
                                      inst.study_instance_uid, inst.path, job.generation,
                                      job.attempts))
        return claimed


def error_kind(error: str) -> str:
    """The exception type at the front of an error text. Library messages can quote data
    element values (patient data), so log lines at INFO and above carry only this; the
    full text is in the job row (``cxrd status``) and at DEBUG."""
    head = error.split(":", 1)[0].strip()
    return head if head.replace(".", "").replace("_", "").isalnum() else "error"


def _fail(job: Job, inst: Instance, error: str, now: dt.datetime) -> None:
    job.state = JobState.FAILED.value
    job.error = error[:4000]
    job.finished_at = now
    job.lease_owner = None
    inst.state = InstanceState.FAILED.value
    inst.detail = error[:4000]
    log.error("action=job-failed job_id=%d sop_instance_uid=%s error_type=%s", job.id,
              inst.sop_instance_uid, error_kind(error))
    log.debug("action=job-failed job_id=%d detail=%s", job.id, error)


def _locked_job(s: Session, job_id: int) -> Job | None:
    # On PostgreSQL the row lock makes the ownership check and the update one step: a
    # claimer re-leasing the job meanwhile either went first (we see its owner) or waits.
    return s.get(Job, job_id, with_for_update=True)


def _owned(db_job: Job | None, owner: str) -> bool:
    return (db_job is not None and db_job.state == JobState.RUNNING.value
            and db_job.lease_owner == owner)


def _leased(s: Session, job: ClaimedJob, owner: str) -> tuple[Job, Instance] | None:
    """The job's row (locked) and its instance, if ``owner`` still holds the lease."""
    row = _locked_job(s, job.job_id)
    if row is None or not _owned(row, owner):
        return None
    inst = s.get(Instance, job.instance_id)
    assert inst is not None
    return row, inst


def complete(db: Database, job: ClaimedJob, owner: str, probs: Sequence[float],
             cam: object, device_uid: str, timings: Mapping[str, float], *,
             sc: tuple[str, Path] | None = None, destinations: Sequence[str] = ()) -> bool:
    """Mark a job done with its outputs. False when the lease was lost meanwhile (another
    worker owns the job now; its results have the same UIDs, so nothing is duplicated)."""
    now = utcnow()
    with db.session() as s:
        leased = _leased(s, job, owner)
        if leased is None:
            log.warning("action=lease-lost job_id=%d sop_instance_uid=%s", job.job_id,
                        job.sop_instance_uid)
            return False
        row, inst = leased
        row.state = JobState.DONE.value
        row.probs = json.dumps([float(p) for p in probs])
        row.cam = json.dumps(cam)
        row.model_device_uid = device_uid
        row.timings = json.dumps(dict(timings))
        row.finished_at = now
        row.lease_owner = None
        row.error = None
        inst.state = InstanceState.DONE.value
        inst.reason = None
        inst.detail = None
        if sc is not None:
            add_result(s, kind=ResultKind.SC, sop_instance_uid=sc[0],
                       study_instance_uid=job.study_instance_uid, generation=job.generation,
                       path=sc[1], destinations=destinations,
                       source_sop_instance_uid=job.sop_instance_uid)
    return True


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
        inst.state = InstanceState.SKIPPED.value
        inst.reason = reason.value
        inst.detail = detail[:4000]
    log.info("action=skipped sop_instance_uid=%s study_instance_uid=%s reason=%s",
             job.sop_instance_uid, job.study_instance_uid, reason.value)


def retry_or_fail(db: Database, job: ClaimedJob, owner: str, error: str, max_attempts: int,
                  backoff_seconds: float) -> None:
    """Put a failed job back with exponential backoff, or fail it for good."""
    now = utcnow()
    with db.session() as s:
        leased = _leased(s, job, owner)
        if leased is None:
            return
        row, inst = leased
        if row.attempts >= max_attempts:
            _fail(row, inst, f"failed {row.attempts} times; last error: {error}", now)
            return
        delay = backoff_seconds * 2 ** (row.attempts - 1)
        row.state = JobState.PENDING.value
        row.error = error[:4000]
        row.lease_owner = None
        row.not_before = now + dt.timedelta(seconds=delay)
    log.debug("action=job-retry job_id=%d detail=%s", job.job_id, error)
    log.warning("action=job-retry job_id=%d sop_instance_uid=%s attempt=%d delay_s=%.0f "
                "error_type=%s", job.job_id, job.sop_instance_uid, job.attempts, delay,
                error_kind(error))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_leases(db: Database, owner_prefix: str) -> int:
    """At start-up: jobs leased by dead processes of this host return to the queue at once
    (their attempt still counts). Owners are ``host:pid:wN``; a lease whose process is
    still alive (another node on the same host) is left to expire normally."""
    with db.session() as s:
        owners = s.scalars(select(Job.lease_owner).where(
            Job.state == JobState.RUNNING.value,
            # autoescape: a host name may hold "_" or "%", LIKE wildcards.
            Job.lease_owner.startswith(owner_prefix, autoescape=True)).distinct()).all()
        dead = []
        for owner in owners:
            pid = (owner or "")[len(owner_prefix):].split(":", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                dead.append(owner)
        count = 0
        if dead:
            result = s.execute(update(Job).where(
                Job.state == JobState.RUNNING.value, Job.lease_owner.in_(dead)
            ).values(state=JobState.PENDING.value, lease_owner=None, not_before=utcnow()))
            count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        log.warning("action=released-leases count=%d", count)
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

