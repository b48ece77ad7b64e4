"""Crash safety of ``cxrd serve``: kill -9 the main process mid-run, then one worker, and
check that nothing dropped into the watched folder is lost or duplicated."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time

import pytest
from nodehelpers import (
    DONE_TIMEOUT,
    DbView,
    NodeProcess,
    check_outcome,
    pid_alive,
    settled,
    wait_until,
    write_config,
)
from sqlalchemy import select

from cxrd.db import Instance, Job
from cxrd.domain import JobKind, JobState

pytestmark = pytest.mark.slow


def freeze_worker_mid_job(db: DbView, node: NodeProcess, timeout: float = 60.0
                          ) -> tuple[int, int, dt.datetime]:
    """Find a job some worker of ``node`` is running, and stop (SIGSTOP) that worker while
    the job is still leased to it; returns (job id, worker pid, lease expiry)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as s:
            row = s.execute(select(Job.id, Job.lease_owner).where(
                Job.state == JobState.RUNNING.value).order_by(Job.id).limit(1)).first()
        if row is not None and row.lease_owner:
            pid = int(row.lease_owner.rsplit(":", 2)[1])
            if pid in node.workers():
                os.kill(pid, signal.SIGSTOP)
                with db.session() as s:
                    again = s.execute(select(Job.state, Job.lease_owner, Job.lease_expires)
                                      .where(Job.id == row.id)).one()
                if again.state == JobState.RUNNING.value and again.lease_owner == row.lease_owner:
                    return row.id, pid, again.lease_expires
                os.kill(pid, signal.SIGCONT)  # it finished meanwhile: try the next one
        time.sleep(0.01)
    pytest.fail("no worker was caught running a job")


def test_kill_main_then_a_worker_nothing_lost_nothing_duplicated(tmp_path, nodes, db_of, fifty):
    dirs = write_config(tmp_path, batch_size=2)
    db = db_of(dirs)
    studies = fifty.studies()
    first = set(studies[: len(studies) // 2])
    wave1 = [f for f in fifty.files if f.study_instance_uid in first]
    wave2 = [f for f in fifty.files if f.study_instance_uid not in first]
    classifiable = sum(f.classifiable for f in fifty.files)

    # -- run 1: some studies processed, the rest arriving; then kill -9 the main process
    node = nodes.start(dirs)
    workers = node.workers()
    fifty.drop(dirs.incoming, wave1)
    (dirs.incoming / "notes.txt").write_text("not a DICOM file\n")
    wait_until(lambda: db.count(Job, Job.state == JobState.DONE.value) >= 2, 60,
               "the first images to be classified")
    fifty.drop(dirs.incoming, wave2)
    wait_until(lambda: db.count(Instance) >= len(wave1) + 3, 60,
               "the second wave to start arriving")
    node.signal(signal.SIGKILL)
    assert node.wait(10) == -signal.SIGKILL
    stored = db.count(Instance)
    classified = db.count(Job, Job.state == JobState.DONE.value)
    assert stored > 0 and classified < classifiable, "the crash came too late to matter"

    # its workers notice the parent is gone and exit on their own
    wait_until(lambda: not any(pid_alive(p) for p in workers), 10,
               "the orphaned workers to exit")
    assert "action=worker-orphaned" in node.log()

    # -- run 2: restart; kill -9 a worker while it holds a job
    node = nodes.start(dirs)
    job_id, victim, _ = freeze_worker_mid_job(db, node)
    os.kill(victim, signal.SIGKILL)
    replacement = wait_until(lambda: [p for p in node.workers() if p != victim], 30,
                             "the node to start a new worker")
    assert victim not in replacement
    assert "action=worker-died" in node.log()

    wait_until(lambda: settled(dirs, db), DONE_TIMEOUT, "every file to be processed")
    assert node.stop() == 0

    # the node released the dead worker's job at once (before its lease ran out), the
    # attempt counted, and it was done again
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.state == JobState.DONE.value
        assert job.attempts >= 2
        assert job.finished_at is not None
    assert "action=released-leases reason=worker-died" in node.log()
    assert f"action=lease-expired job_id={job_id} " not in node.log()

    outcome = check_outcome(dirs, db, fifty.files)
    assert len(outcome["done"]) == classifiable
    assert outcome["rejections"] >= 1
    rejected = [p.name for p in (dirs.data_dir / "rejected").iterdir()]
    assert any(name.endswith("-notes.txt") for name in rejected), rejected


def freeze_worker_in_report_job(db: DbView, node: NodeProcess, timeout: float = 90.0
                                ) -> tuple[int, int]:
    """SIGSTOP the worker holding a study's report job; returns (job id, worker pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as s:
            row = s.execute(select(Job.id, Job.lease_owner).where(
                Job.kind == JobKind.REPORT.value, Job.state == JobState.RUNNING.value)
                .limit(1)).first()
        if row is not None and row.lease_owner:
            pid = int(row.lease_owner.rsplit(":", 2)[1])
            if pid in node.workers():
                os.kill(pid, signal.SIGSTOP)
                with db.session() as s:
                    again = s.execute(select(Job.state, Job.lease_owner)
                                      .where(Job.id == row.id)).one()
                if again.state == JobState.RUNNING.value and again.lease_owner == row.lease_owner:
                    return row.id, pid
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.005)
    pytest.fail("no worker was caught holding a report job")


def test_a_study_sr_survives_a_kill_of_the_worker_holding_its_report_job(tmp_path, nodes,
                                                                          db_of):
    """kill -9 the worker while it builds a study's SR: the node releases the report job
    at once (its attempt counted), a new worker builds the SR, and the study ends with
    exactly one current SR naming all its images (no duplicate, no temp file)."""
    from nodehelpers import frontal_set

    images = frontal_set(tmp_path / "in", n_studies=3, per_study=2)
    dirs = write_config(tmp_path, batch_size=2)
    db = db_of(dirs)
    node = nodes.start(dirs)
    images.drop(dirs.incoming)
    job_id, victim = freeze_worker_in_report_job(db, node)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: [p for p in node.workers() if p != victim], 30,
               "the node to start a new worker")
    wait_until(lambda: settled(dirs, db), DONE_TIMEOUT, "every study to be reported")
    assert node.stop() == 0
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.kind == JobKind.REPORT.value
        assert job.state == JobState.DONE.value and job.attempts >= 2
    assert "action=released-leases reason=worker-died" in node.log()
    outcome = check_outcome(dirs, db, images.files)
    assert outcome["srs"] == 3
