"""Stopping ``cxrd serve``: SIGTERM drains and exits 0, a second SIGTERM exits at once, a
SIGTERM to the whole process group (systemd, Ctrl-C) drains too; a restart finishes the
work without duplicates."""

from __future__ import annotations

import os
import signal
import time

import pytest
from nodehelpers import (
    DONE_TIMEOUT,
    DbView,
    check_outcome,
    frontal_set,
    pid_alive,
    settled,
    wait_until,
    write_config,
)

from cxrd.db import Job
from cxrd.domain import JobState

pytestmark = pytest.mark.slow

#: A drain lets each worker finish its batch (one small image here) and writes due SRs.
DRAIN_BOUND = 30.0


def wait_busy(db: DbView, done_before: int) -> int:
    """Wait until more images are classified than ``done_before`` while at least two
    still wait; returns the number classified."""
    def busy() -> int:
        done = db.count(Job, Job.state == JobState.DONE.value)
        waiting = db.count(Job, Job.state.in_((JobState.PENDING.value, JobState.RUNNING.value)))
        return done if done > done_before and waiting >= 2 else 0

    return wait_until(busy, 60, "the node to be busy classifying", interval=0.02)


def test_stop_signals_then_a_restart_completes_without_duplicates(tmp_path, nodes, db_of):
    # few studies (an SR takes longer to write than an image to classify), many images
    images = frontal_set(tmp_path / "in", n_studies=3, per_study=6, seed=5)
    dirs = write_config(tmp_path, batch_size=1)
    db = db_of(dirs)

    # 1. SIGTERM while classifying: drain, exit 0 within a bound
    node = nodes.start(dirs)
    images.drop(dirs.incoming)
    wait_busy(db, 0)
    workers = node.workers()
    started = time.monotonic()
    node.signal(signal.SIGTERM)
    assert node.wait(DRAIN_BOUND) == 0
    assert time.monotonic() - started < DRAIN_BOUND
    log = node.log()
    assert "action=drain-start" in log and "action=drain-done" in log
    # the drain line accounts the scheduler's CPU, the rounds that queued (the images,
    # on arrival) or admitted (the stable studies, maybe none yet) apart
    (drain,) = [ln for ln in log.splitlines() if "action=drain-done" in ln]
    fields = dict(f.split("=", 1) for f in drain.split() if "=" in f)
    assert 0 <= int(fields["admitted_studies"]) <= 3
    assert 0 < float(fields["admitting_cpu_s"]) <= float(fields["scheduler_cpu_s"])
    assert "action=worker-stop" in log, "the worker did not stop cleanly"
    assert not any(pid_alive(p) for p in workers)
    # the worker finished its batch: nothing is left leased to a process that is gone
    assert db.count(Job, Job.state == JobState.RUNNING.value) == 0
    assert db.count(Job, Job.state == JobState.PENDING.value) > 0, "the drain came too late"
    done = db.count(Job, Job.state == JobState.DONE.value)

    # 2. a second SIGTERM during the drain exits at once (any exit code)
    node = nodes.start(dirs)
    wait_busy(db, done)
    workers = node.workers()
    node.signal(signal.SIGTERM)
    time.sleep(0.1)
    started = time.monotonic()
    node.signal(signal.SIGTERM)
    node.wait(5)
    assert time.monotonic() - started < 5
    wait_until(lambda: not any(pid_alive(p) for p in workers), 5, "the workers to be gone")
    done = db.count(Job, Job.state == JobState.DONE.value)

    # 3. SIGTERM to the whole process group, as systemd (KillMode=control-group) and a
    # terminal's Ctrl-C send it: the worker finishes its batch too, and the node exits 0
    node = nodes.start(dirs)
    wait_busy(db, done)
    workers = node.workers()
    os.killpg(node.pid, signal.SIGTERM)
    assert node.wait(DRAIN_BOUND) == 0
    assert "action=worker-stop" in node.log(), "a worker died instead of finishing its batch"
    assert not any(pid_alive(p) for p in workers)
    assert db.count(Job, Job.state == JobState.RUNNING.value) == 0

    # 4. a restart finishes everything, once
    node = nodes.start(dirs)
    wait_until(lambda: settled(dirs, db), DONE_TIMEOUT, "every file to be processed")
    assert node.stop() == 0
    outcome = check_outcome(dirs, db, images.files)
    assert len(outcome["done"]) == len(images.files)
