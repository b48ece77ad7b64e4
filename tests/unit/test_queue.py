"""cxrd.queue on in-memory SQLite: leases, expiry, retries with backoff, lost leases."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest
from queuehelpers import expire_leases, get_instance, get_job, make_due, make_jobs
from sqlalchemy import select

from cxrd import queue
from cxrd.db import Database, Delivery, Job, Result, Worker, utcnow
from cxrd.domain import InstanceState, JobState, ResultKind, SkipReason

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
    assert claim(memdb, "w") == []


def test_complete_records_outputs_and_marks_the_instance_done(memdb, tmp_path):
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    (c,) = claim(memdb, "w")
    cam = [[[0.1, 0.2, 0.7]]]
    ok = queue.complete(memdb, c, "w", [0.1, 0.2, 0.7], cam, "1.2.3", {"infer": 0.01},
                        sc=("1.2.3.4", tmp_path / "sc.dcm"), destinations=["pacs", "archive"])
    assert ok
    row = get_job(memdb, job_id)
    assert row.state == JobState.DONE.value and row.lease_owner is None
    assert json.loads(row.probs) == [0.1, 0.2, 0.7] and json.loads(row.cam) == cam
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
    assert queue.complete(memdb, old, "w1", [1, 0, 0], [], "1.2", {}) is False
    row = get_job(memdb, job_id)
    assert row.state == JobState.RUNNING.value and row.lease_owner == "w2"
    # the lost lease's retry and skip are ignored too
    queue.retry_or_fail(memdb, old, "w1", "late", max_attempts=3, backoff_seconds=1)
    queue.skip(memdb, old, "w1", SkipReason.DECODE_FAILED, "late")
    assert get_job(memdb, job_id).state == JobState.RUNNING.value
    assert queue.complete(memdb, new, "w2", [1, 0, 0], [], "1.2", {}) is True
    assert get_job(memdb, job_id).state == JobState.DONE.value
    assert queue.complete(memdb, new, "w2", [1, 0, 0], [], "1.2", {}) is False  # once


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
    assert claim(memdb, "w") == []


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
    assert states[ids[0]].attempts == 1  # the attempt still counts
    # released jobs are due at once
    assert sorted(j.job_id for j in claim(memdb, "node_a:200:w0")) == ids[:2]


def _dead_pid() -> int:
    """The pid of a process that has exited (lease owners are host:pid:wN)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_released_job_at_max_attempts_fails_on_next_claim(memdb):
    (job_id,) = make_jobs(memdb, studies=1, per_study=1)
    claim(memdb, f"h:{_dead_pid()}:w0", max_attempts=1)
    queue.release_dead_leases(memdb, "h:")
    assert claim(memdb, "h:2:w0", max_attempts=1) == []
    assert get_job(memdb, job_id).state == JobState.FAILED.value


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
