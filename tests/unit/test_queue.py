"""cxrd.queue on in-memory SQLite: leases, expiry, retries with backoff, lost leases."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest
from queuehelpers import (
    claim_order_case,
    expire_leases,
    get_instance,
    get_job,
    make_due,
    make_jobs,
)
from sqlalchemy import select

from cxrd import queue
from cxrd.db import Database, Delivery, Job, Result, Study, Worker, utcnow
from cxrd.domain import InstanceState, JobKind, JobState, ResultKind, SkipReason, StudyState

LEASE = 300.0


def claim(db: Database, owner: str, batch: int = 8, max_attempts: int = 3,
          lease: float = LEASE) -> list[queue.ClaimedJob]:
    return queue.claim(db, owner, batch, lease, max_attempts)


def test_claim_leases_oldest_jobs_across_studies_up_to_batch_size(memdb):
    ids = make_jobs(memdb, studies=3, per_study=2)
    before = utcnow()
    got = claim(memdb, "w1", batch=4)
    assert [j.job_id for j in got] == ids[:4]
    assert len({j.study_instance_uid for j in got}) == 2  # batches span studies
    for c in got:
        row = get_job(memdb, c.job_id)
        assert row.state == JobState.RUNNING.value and row.lease_owner == "w1"
        assert row.attempts == 1 and c.attempts == 1
        assert row.lease_expires >= before + dt.timedelta(seconds=LEASE - 1)
        inst = get_instance(memdb, c.instance_id)
        assert (c.sop_instance_uid, c.path) == (inst.sop_instance_uid, inst.path)
        assert c.generation == 1


def test_a_second_claimer_gets_other_jobs(memdb):
    ids = make_jobs(memdb, studies=3, per_study=2)
    first = claim(memdb, "w1", batch=4)
    second = claim(memdb, "w2", batch=4)
    assert [j.job_id for j in second] == ids[4:]
    assert not {j.job_id for j in first} & {j.job_id for j in second}
    assert claim(memdb, "w3") == []


def test_claim_order_reports_first_then_oldest(memdb):
    """SQLite: one query; a job whose lease expired is due in its place by id."""
    ids, report_ids, got = claim_order_case(memdb)
    assert got == [*report_ids, ids[0], ids[1]]
    assert [j.job_id for j in claim(memdb, "w", batch=2)] == ids[2:4]


def test_jobs_not_yet_due_are_not_claimed(memdb):
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    with memdb.session() as s:
        s.get(Job, job_id).not_before = utcnow() + dt.timedelta(minutes=5)
    assert claim(memdb, "w") == []


def test_expired_lease_returns_the_job_and_counts_the_attempt(memdb):
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    assert [j.job_id for j in claim(memdb, "w1")] == [job_id]
    assert claim(memdb, "w2") == []  # leased, not expired
    expire_leases(memdb)
    (again,) = claim(memdb, "w2")
    assert again.job_id == job_id and again.attempts == 2
    row = get_job(memdb, job_id)
    assert row.lease_owner == "w2" and row.attempts == 2


def test_expired_job_fails_after_max_attempts(memdb):
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    for n in range(2):
        assert len(claim(memdb, f"w{n}", max_attempts=2)) == 1
        expire_leases(memdb)
    assert claim(memdb, "w9", max_attempts=2) == []
    row = get_job(memdb, job_id)
    assert row.state == JobState.FAILED.value and row.attempts == 2
    assert "gave up after 2 attempts" in row.error and "worker died" in row.error
    assert row.finished_at is not None and row.lease_owner is None
    inst = get_instance(memdb, row.instance_id)
    assert inst.state == InstanceState.FAILED.value and "gave up" in inst.detail


def test_retry_backs_off_exponentially_then_fails(memdb):
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    delays = []
    for attempt in (1, 2):
        (c,) = claim(memdb, "w", max_attempts=3)
        assert c.attempts == attempt
        t0 = utcnow()
        queue.retry_or_fail(memdb, c, "w", f"boom {attempt}", max_attempts=3,
                            backoff_seconds=10)
        row = get_job(memdb, job_id)
        assert row.state == JobState.PENDING.value and row.lease_owner is None
        assert row.error == f"boom {attempt}"
        delays.append((row.not_before - t0).total_seconds())
        assert claim(memdb, "w", max_attempts=3) == []  # backing off
        make_due(memdb)
    assert delays[0] == pytest.approx(10, abs=1)
    assert delays[1] == pytest.approx(20, abs=1)
    (c,) = claim(memdb, "w", max_attempts=3)
    queue.retry_or_fail(memdb, c, "w", "boom 3", max_attempts=3, backoff_seconds=10)
    row = get_job(memdb, job_id)
    assert row.state == JobState.FAILED.value
    assert "failed 3 times" in row.error and "boom 3" in row.error
    assert get_instance(memdb, row.instance_id).state == InstanceState.FAILED.value
    make_due(memdb)
    # No classify job is left: what remains is the study's report job.
    assert [j.kind for j in claim(memdb, "w")] == [JobKind.REPORT]


def test_complete_records_outputs_and_marks_the_instance_done(memdb, tmp_path):
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    (c,) = claim(memdb, "w")
    record = {"header": {}, "region": [1.0, 2.0, 3.0, 4.0]}
    ok = queue.complete(memdb, c, "w", [0.1, 0.2, 0.7], record, "1.2.3", {"infer": 0.01},
                        sc=("1.2.3.4", tmp_path / "sc.dcm"), destinations=["pacs", "archive"])
    assert ok
    row = get_job(memdb, job_id)
    assert row.state == JobState.DONE.value and row.lease_owner is None
    assert json.loads(row.probs) == [0.1, 0.2, 0.7] and json.loads(row.record) == record
    assert row.model_device_uid == "1.2.3" and json.loads(row.timings) == {"infer": 0.01}
    assert get_instance(memdb, c.instance_id).state == InstanceState.DONE.value
    with memdb.session() as s:
        (result,) = s.scalars(select(Result)).all()
        assert result.kind == ResultKind.SC.value
        assert result.source_sop_instance_uid == c.sop_instance_uid
        assert result.path == str(Path(tmp_path / "sc.dcm"))
        assert sorted(d.destination for d in s.scalars(select(Delivery))) == ["archive", "pacs"]


def test_complete_with_a_lost_lease_returns_false(memdb):
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    (old,) = claim(memdb, "w1")
    expire_leases(memdb)
    (new,) = claim(memdb, "w2")
    assert queue.complete(memdb, old, "w1", [1, 0, 0], None, "1.2", {}) is False
    row = get_job(memdb, job_id)
    assert row.state == JobState.RUNNING.value and row.lease_owner == "w2"
    # the lost lease's retry and skip are ignored too
    queue.retry_or_fail(memdb, old, "w1", "late", max_attempts=3, backoff_seconds=1)
    queue.skip(memdb, old, "w1", SkipReason.DECODE_FAILED, "late")
    assert get_job(memdb, job_id).state == JobState.RUNNING.value
    assert queue.complete(memdb, new, "w2", [1, 0, 0], None, "1.2", {}) is True
    assert get_job(memdb, job_id).state == JobState.DONE.value
    assert queue.complete(memdb, new, "w2", [1, 0, 0], None, "1.2", {}) is False  # once


def test_complete_batch_ends_a_batch_in_one_transaction(memdb, tmp_path):
    """A batch across studies: each job done with its own outputs, a job whose lease was
    lost left to its new owner, and the report job of each study whose last classify job
    ended (and only of those) enqueued."""
    make_jobs(memdb, studies=2, per_study=2)
    first, second, third, fourth = claim(memdb, "w1", batch=4)
    assert first.study_instance_uid == second.study_instance_uid != third.study_instance_uid
    with memdb.session() as s:  # the fourth job's lease passes to another worker
        s.get(Job, fourth.job_id).lease_owner = "w2"
    completions = [queue.Completion(c, [0.1 * n, 0.2, 0.7 - 0.1 * n], {"n": n}, {"infer": n},
                                    sc=(f"1.2.9.{n}", tmp_path / f"sc{n}.dcm"),
                                    seg=(f"1.2.8.{n}", tmp_path / f"seg{n}.dcm"))
                   for n, c in enumerate((first, second, third, fourth))]

    done = queue.complete_batch(memdb, completions, "w1", "1.2.3", destinations=["pacs"])

    assert done == [True, True, True, False]
    for n, c in enumerate((first, second, third)):
        row = get_job(memdb, c.job_id)
        assert row.state == JobState.DONE.value and json.loads(row.record) == {"n": n}
        assert json.loads(row.timings) == {"infer": n} and row.model_device_uid == "1.2.3"
    assert get_job(memdb, fourth.job_id).state == JobState.RUNNING.value
    with memdb.session() as s:
        results = s.scalars(select(Result)).all()
        assert sorted(r.sop_instance_uid for r in results) == [
            "1.2.8.0", "1.2.8.1", "1.2.8.2", "1.2.9.0", "1.2.9.1", "1.2.9.2"]
        assert len(s.scalars(select(Delivery)).all()) == 6
        reports = s.scalars(select(Job).where(Job.kind == JobKind.REPORT.value)).all()
        # the first study's jobs all ended; the second's fourth job is still running
        assert [r.study_instance_uid for r in reports] == [first.study_instance_uid]


def test_skip_is_permanent(memdb):
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    (c,) = claim(memdb, "w")
    queue.skip(memdb, c, "w", SkipReason.UNSUPPORTED_PHOTOMETRIC, "YBR_FULL")
    row = get_job(memdb, job_id)
    assert row.state == JobState.SKIPPED.value
    assert row.reason == SkipReason.UNSUPPORTED_PHOTOMETRIC.value
    inst = get_instance(memdb, c.instance_id)
    assert inst.state == InstanceState.SKIPPED.value and inst.detail == "YBR_FULL"
    make_due(memdb)
    assert [j.kind for j in claim(memdb, "w")] == [JobKind.REPORT]


def test_release_dead_leases_returns_only_this_hosts_jobs(memdb):
    ids = make_jobs(memdb, studies=1, per_study=4)
    dead = _dead_pid()
    claim(memdb, f"node_a:{dead}:w0", batch=1)
    claim(memdb, f"node_a:{dead}:w1", batch=1)
    claim(memdb, f"nodeXa:{dead}:w0", batch=1)  # "_" must not act as a LIKE wildcard
    claim(memdb, f"other:{dead}:w0", batch=1)
    assert queue.release_dead_leases(memdb, "node_a:") == 2
    states = {i: get_job(memdb, i) for i in ids}
    assert [states[i].state for i in ids] == [JobState.PENDING.value] * 2 + [
        JobState.RUNNING.value] * 2
    assert states[ids[0]].lease_owner is None
    assert states[ids[0]].attempts == 0  # the node stopped: not the image's fault
    # released jobs are due at once
    assert sorted(j.job_id for j in claim(memdb, "node_a:200:w0")) == ids[:2]


def _dead_pid() -> int:
    """The pid of a process that has exited (lease owners are host:pid:wN)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_node_killed_again_and_again_never_fails_a_job_for_it(memdb):
    """Each restart gives back the attempt of the jobs that were in hand (kill -9 storms,
    power losses): more restarts than max_attempts and the job is still claimable."""
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    for _ in range(5):
        (job,) = claim(memdb, f"h:{_dead_pid()}:w0", max_attempts=2)
        assert job.attempts == 1
        assert queue.release_dead_leases(memdb, "h:") == 1
    assert get_job(memdb, job_id).state == JobState.PENDING.value


def test_a_job_whose_worker_died_under_a_running_node_fails_after_max_attempts(memdb):
    """A job that kills its worker (the node survives and restarts it) counts an attempt
    each time, so it fails for good instead of looping."""
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    for attempt in (1, 2):
        (job,) = claim(memdb, f"h:10{attempt}:w0", max_attempts=2)
        assert job.attempts == attempt
        assert queue.release_worker_leases(memdb, f"h:10{attempt}:w0") == 1
        assert get_job(memdb, job_id).state == JobState.PENDING.value
    assert claim(memdb, "h:103:w0", max_attempts=2) == []
    row = get_job(memdb, job_id)
    assert row.state == JobState.FAILED.value
    assert "the worker died while processing it" in row.error
    assert queue.release_worker_leases(memdb, "h:104:w0") == 0  # nothing of another owner


def test_leases_of_live_processes_are_not_released(memdb):
    """Another node on the same host keeps its jobs; only dead owners' leases return."""
    (live_job, dead_job) = make_jobs(memdb, studies=1, per_study=2)
    claim(memdb, f"h:{os.getpid()}:w0", batch=1)
    claim(memdb, f"h:{_dead_pid()}:w0", batch=1)
    assert queue.release_dead_leases(memdb, "h:") == 1
    assert get_job(memdb, live_job).state == JobState.RUNNING.value
    assert get_job(memdb, dead_job).state == JobState.PENDING.value


def test_heartbeat_upserts_the_worker_row(memdb):
    queue.heartbeat(memdb, "h:1:w0", model="m 1.0", device_uid="1.2", demo=True,
                    providers=["CPUExecutionProvider"])
    queue.heartbeat(memdb, "h:1:w0", processed=7)
    with memdb.session() as s:
        (w,) = s.scalars(select(Worker)).all()
        assert (w.model, w.providers, w.processed, w.demo) == (
            "m 1.0", "CPUExecutionProvider", 7, True)


# --------------------------------------------------------------------------- report jobs


def _report_jobs(db: Database) -> list[Job]:
    with db.session() as s:
        return list(s.scalars(select(Job).where(Job.kind == JobKind.REPORT.value)))


def test_the_last_classify_job_of_a_study_enqueues_its_one_report_job(memdb):
    ids = make_jobs(memdb, studies=2, per_study=2)
    first, second, other, _ = claim(memdb, "w", batch=4)
    assert queue.complete(memdb, first, "w", [0.1, 0.2, 0.7], None, "1.2", {})
    assert _report_jobs(memdb) == []  # the study's second job is still running
    queue.skip(memdb, second, "w", SkipReason.DECODE_FAILED, "bad")
    (report,) = _report_jobs(memdb)
    assert (report.study_instance_uid, report.generation, report.state, report.instance_id) == (
        first.study_instance_uid, 1, JobState.PENDING.value, None)
    # the other study is not finished: its report job does not exist yet
    assert other.study_instance_uid != first.study_instance_uid
    # a report job is claimed before classify jobs, and carries no instance
    make_jobs(memdb, studies=1, per_study=1)
    (got, classify) = claim(memdb, "w2", batch=2)
    assert (got.kind, got.job_id, got.instance_id, got.path) == (
        JobKind.REPORT, report.id, None, "")
    assert classify.kind == JobKind.CLASSIFY and classify.job_id > ids[-1]


def test_one_report_job_per_study_generation_is_enforced_by_the_database(memdb):
    from sqlalchemy.exc import IntegrityError

    make_jobs(memdb, studies=1, per_study=1)
    (c,) = claim(memdb, "w")
    queue.complete(memdb, c, "w", [0.1, 0.2, 0.7], None, "1.2", {})
    with pytest.raises(IntegrityError), memdb.session() as s:
        s.add(Job(kind=JobKind.REPORT.value, study_instance_uid=c.study_instance_uid,
                  generation=1, state=JobState.PENDING.value))
    # another generation of the same study may have its own
    with memdb.session() as s:
        s.add(Job(kind=JobKind.REPORT.value, study_instance_uid=c.study_instance_uid,
                  generation=2, state=JobState.PENDING.value))


def _finish_classify(db: Database) -> queue.ClaimedJob:
    (c,) = claim(db, "w")
    assert c.kind == JobKind.CLASSIFY
    assert queue.complete(db, c, "w", [0.6, 0.2, 0.2], {"header": {}, "region": None},
                          "1.2", {})
    return c


def test_complete_report_records_the_sr_and_reports_the_study(memdb, tmp_path):
    make_jobs(memdb, studies=1, per_study=1)
    c = _finish_classify(memdb)
    (r,) = claim(memdb, "w")
    findings = queue.study_findings(memdb, c.study_instance_uid)
    assert len(findings.jobs) == 1 and findings.current_sr is None
    assert json.loads(findings.jobs[0][1]) == [0.6, 0.2, 0.2]
    assert queue.complete_report(memdb, r, "w", findings, sr=("1.2.9", tmp_path / "sr.dcm"),
                                 seconds=0.01, destinations=["pacs"]) == "done"
    with memdb.session() as s:
        study = s.scalars(select(Study)).one()
        assert (study.state, study.sr_sop_instance_uid) == (StudyState.REPORTED.value, "1.2.9")
        (result,) = s.scalars(select(Result)).all()
        assert (result.kind, result.supersedes) == (ResultKind.SR.value, None)
        assert s.scalars(select(Delivery)).one().destination == "pacs"
    assert get_job(memdb, r.job_id).state == JobState.DONE.value
    # a redo of the same job (its lease is gone) changes nothing
    assert queue.complete_report(memdb, r, "w", findings, sr=("1.2.9", tmp_path / "sr.dcm"),
                                 seconds=0.01) == "lost"


def test_a_report_built_before_a_late_image_finished_is_rebuilt(memdb, tmp_path):
    """A late instance of the same generation: the SR being built is stale, so the report
    job goes back to pending and nothing is recorded; once rebuilt it supersedes."""
    (first_job,) = make_jobs(memdb, studies=1, per_study=1)
    c = _finish_classify(memdb)
    (r,) = claim(memdb, "w")
    stale = queue.study_findings(memdb, c.study_instance_uid)
    # a late instance's job, queued and done while the report was being built
    with memdb.session() as s:
        first = s.get(Job, first_job)
        s.add(Job(instance_id=first.instance_id, study_instance_uid=c.study_instance_uid,
                  generation=1, state=JobState.PENDING.value, not_before=utcnow()))
    (late,) = claim(memdb, "w2")
    queue.complete(memdb, late, "w2", [0.1, 0.8, 0.1], None, "1.2", {})
    assert queue.complete_report(memdb, r, "w", stale, sr=("1.2.8", tmp_path / "a.dcm"),
                                 seconds=0.01) == "stale"
    row = get_job(memdb, r.job_id)
    assert row.state == JobState.PENDING.value and row.lease_owner is None
    with memdb.session() as s:
        assert s.scalars(select(Result)).all() == []
    (again,) = claim(memdb, "w")
    assert again.job_id == r.job_id
    fresh = queue.study_findings(memdb, c.study_instance_uid)
    assert fresh.latest_job == late.job_id
    assert queue.complete_report(memdb, again, "w", fresh, sr=("1.2.7", tmp_path / "b.dcm"),
                                 seconds=0.01) == "done"


def test_an_ended_report_job_is_rearmed_when_its_study_changes(memdb, tmp_path):
    make_jobs(memdb, studies=1, per_study=1)
    c = _finish_classify(memdb)
    (r,) = claim(memdb, "w")
    findings = queue.study_findings(memdb, c.study_instance_uid)
    queue.complete_report(memdb, r, "w", findings, sr=("1.2.9", tmp_path / "sr.dcm"),
                          seconds=0.01)
    # the study is admitted again with a late instance's job, which then ends
    instance_id = get_job(memdb, c.job_id).instance_id
    with memdb.session() as s:
        s.scalars(select(Study)).one().state = StudyState.ADMITTED.value
        s.add(Job(instance_id=instance_id,
                  study_instance_uid=c.study_instance_uid, generation=1,
                  state=JobState.PENDING.value, not_before=utcnow()))
    _finish_classify(memdb)
    (report,) = _report_jobs(memdb)
    assert (report.id, report.state, report.attempts) == (r.job_id, JobState.PENDING.value, 0)


def test_the_scheduler_safety_net_enqueues_missing_report_jobs(memdb):
    make_jobs(memdb, studies=2, per_study=1)
    # finished jobs without a report job: a database upgraded with studies in flight
    with memdb.session() as s:
        for job in s.scalars(select(Job)):
            job.state = JobState.DONE.value
    assert queue.ensure_report_jobs(memdb) == 2
    assert len(_report_jobs(memdb)) == 2
    assert queue.ensure_report_jobs(memdb) == 0


def test_a_resource_error_does_not_use_up_attempts(memdb):
    """A job that failed for want of disk space (or of the database) waits and comes back
    as often as it takes; its attempts are given back, so it never fails for it."""
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    for _ in range(5):  # more than max_attempts
        make_due(memdb)
        (job,) = claim(memdb, "w1", max_attempts=2)
        before = utcnow()
        queue.retry_or_fail(memdb, job, "w1", "OSError: [Errno 28] No space left on device",
                            max_attempts=2, backoff_seconds=0, resource=True)
        row = get_job(memdb, job_id)
        assert row.state == JobState.PENDING.value and row.attempts == 0
        assert row.not_before >= before + dt.timedelta(seconds=queue.RESOURCE_WAIT_SECONDS - 1)
        assert row.error.startswith("waiting for a resource: OSError")
        assert row.lease_owner is None
        assert claim(memdb, "w2") == []  # waits: not due at once
    # A failure of the image itself still counts its attempts as before.
    for attempt in (1, 2):
        make_due(memdb)
        (job,) = claim(memdb, "w1", max_attempts=2)
        assert job.attempts == attempt
        queue.retry_or_fail(memdb, job, "w1", "ValueError: bad", max_attempts=2,
                            backoff_seconds=0)
    assert get_job(memdb, job_id).state == JobState.FAILED.value


def test_release_gives_jobs_back_without_spending_an_attempt(memdb):
    """A database outage in the middle of a batch: the worker gives its jobs back once the
    database answers again; they are due at once and their attempt is not counted. A job
    whose lease another worker holds by then is left alone."""
    first, second = make_jobs(memdb, studies=1, per_study=2)
    held = claim(memdb, "w1", max_attempts=3)
    assert [c.job_id for c in held] == [first, second]
    expire_leases(memdb)
    (taken,) = claim(memdb, "w2", batch=1, max_attempts=3)  # the first one, re-leased
    assert taken.job_id == first

    assert queue.release(memdb, held, "w1", "database-unavailable") == 1
    row = get_job(memdb, second)
    assert row.state == JobState.PENDING.value and row.lease_owner is None
    assert row.attempts == 0
    assert row.not_before <= utcnow()
    other = get_job(memdb, first)
    assert other.state == JobState.RUNNING.value and other.lease_owner == "w2"
    assert other.attempts == 2
    (again,) = claim(memdb, "w1", max_attempts=3)
    assert again.job_id == second and again.attempts == 1
