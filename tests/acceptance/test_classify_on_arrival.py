"""``[study] classify_on_arrival`` on a running ``cxrd serve``: images are classified (and
their SCs written) while their study is still collecting, and the study's SR waits until
it is stable; switched off, nothing is queued before the study is stable."""

from __future__ import annotations

import time

import pytest
from nodehelpers import DONE_TIMEOUT, frontal_set, wait_until, write_config

from cxrd.db import Job, Result, Study
from cxrd.domain import JobKind, JobState, ResultKind, StudyState

pytestmark = pytest.mark.slow

#: Long enough that nothing in the test could wait it out.
STABLE_SECONDS = 300


def _long_stable_wait(dirs, extra: str = "") -> None:
    text = dirs.config.read_text().replace("stable_seconds = 1",
                                           f"stable_seconds = {STABLE_SECONDS}{extra}")
    dirs.config.write_text(text)


def test_images_are_classified_during_the_stable_wait_and_the_sr_waits(tmp_path, nodes,
                                                                         db_of):
    images = frontal_set(tmp_path / "in", n_studies=2, per_study=3, seed=11)
    dirs = write_config(tmp_path)
    _long_stable_wait(dirs)
    db = db_of(dirs)
    node = nodes.start(dirs)
    images.drop(dirs.incoming)

    n = len(images.files)
    wait_until(lambda: db.count(Job, Job.kind == JobKind.CLASSIFY.value,
                                Job.state == JobState.DONE.value) == n,
               DONE_TIMEOUT, "every image classified while its study collects")
    assert db.count(Result, Result.kind == ResultKind.SC.value) == n
    # the studies are still collecting: no report job, no SR
    assert db.states(Study.state) == {StudyState.COLLECTING.value: 2}
    assert db.count(Job, Job.kind == JobKind.REPORT.value) == 0
    assert db.count(Result, Result.kind == ResultKind.SR.value) == 0
    assert node.stop() == 0


def test_switched_off_nothing_is_queued_before_the_study_is_stable(tmp_path, nodes, db_of):
    images = frontal_set(tmp_path / "in", n_studies=1, per_study=2, seed=12)
    dirs = write_config(tmp_path)
    _long_stable_wait(dirs, "\nclassify_on_arrival = false")
    db = db_of(dirs)
    node = nodes.start(dirs)
    images.drop(dirs.incoming)
    wait_until(lambda: not any(dirs.incoming.glob("*.dcm")), DONE_TIMEOUT,
               "the watched files to be ingested")
    time.sleep(3)  # several scheduler rounds
    assert db.count(Job) == 0
    assert db.states(Study.state) == {StudyState.COLLECTING.value: 1}
    assert node.stop() == 0
