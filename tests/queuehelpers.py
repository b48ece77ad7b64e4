"""Rows for queue tests: studies, instances and pending jobs without any DICOM behind
them (the queue never reads the spool)."""

from __future__ import annotations

import datetime as dt

from dicomfactory import CR, uid
from sqlalchemy import select

from cxrd import queue
from cxrd.db import Database, Instance, Job, Study, utcnow
from cxrd.domain import InstanceState, JobKind, JobState, StudyState


def make_jobs(db: Database, studies: int = 3, per_study: int = 2) -> list[int]:
    """Admitted studies with one pending job per instance; returns the job ids in order."""
    ids: list[int] = []
    now = utcnow() - dt.timedelta(seconds=1)
    with db.session() as s:
        for _ in range(studies):
            study_uid = uid()
            s.add(Study(study_instance_uid=study_uid, state=StudyState.ADMITTED.value))
            for _ in range(per_study):
                sop_uid = uid()
                inst = Instance(
                    sop_instance_uid=sop_uid, study_instance_uid=study_uid,
                    series_instance_uid=uid(), sop_class_uid=CR, transfer_syntax_uid="",
                    modality="CR", path=f"/spool/{study_uid}/{sop_uid}.dcm", sha256="0" * 64,
                    size=1, source="test", state=InstanceState.QUEUED.value)
                s.add(inst)
                s.flush()
                job = Job(instance_id=inst.id, study_instance_uid=study_uid,
                          state=JobState.PENDING.value, not_before=now, created_at=now)
                s.add(job)
                s.flush()
                ids.append(job.id)
    return ids


def get_job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def get_instance(db: Database, instance_id: int) -> Instance:
    with db.session() as s:
        inst = s.get(Instance, instance_id)
        assert inst is not None
        return inst


def expire_leases(db: Database) -> None:
    """Move every running job's lease into the past (instead of sleeping)."""
    with db.session() as s:
        for job in s.scalars(select(Job).where(Job.state == JobState.RUNNING.value)):
            job.lease_expires = utcnow() - dt.timedelta(seconds=1)


def make_due(db: Database) -> None:
    """Move every pending job's not_before into the past."""
    with db.session() as s:
        for job in s.scalars(select(Job).where(Job.state == JobState.PENDING.value)):
            job.not_before = utcnow() - dt.timedelta(seconds=1)


def claim_order_case(db: Database) -> tuple[list[int], list[int], list[int]]:
    """Six classify jobs, the first one's lease expired, and two pending report jobs;
    returns (classify ids, report ids, the ids of a claim of four)."""
    ids = make_jobs(db, studies=3, per_study=2)
    (expired,) = queue.claim(db, "gone", 1, 300.0, 3)  # its worker died; the lease runs out
    assert expired.job_id == ids[0]
    expire_leases(db)
    with db.session() as s:
        study_uid = s.get(Job, ids[5]).study_instance_uid  # type: ignore[union-attr]
        s.add_all(Job(kind=JobKind.REPORT.value, instance_id=None, study_instance_uid=uid,
                      generation=1, state=JobState.PENDING.value,
                      not_before=utcnow() - dt.timedelta(seconds=1))
                  for uid in (study_uid, "9.9.late"))
    with db.session() as s:
        report_ids = sorted(s.scalars(select(Job.id).where(Job.kind == JobKind.REPORT.value)))
    return ids, report_ids, [j.job_id for j in queue.claim(db, "w", 4, 300.0, 3)]
