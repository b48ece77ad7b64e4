"""cxrd.admit: skip rules, the stable-study rule, late instances, and reprocessing."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from dicomfactory import DX_PROCESSING, SC, make_dataset, part10_bytes, uid
from sqlalchemy import select

from cxrd import queue
from cxrd.admit import (
    admission_round,
    admit_stable_studies,
    queue_arrivals,
    requeue_study,
    seconds_to_next_admission,
    studies_to_reprocess,
)
from cxrd.db import Database, Instance, Job, Study, utcnow
from cxrd.domain import InstanceState, JobKind, JobState, SkipReason, StudyState
from cxrd.ingest import Ingestor

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR CS:UserWarning")

LATER = dt.timedelta(hours=1)


def store(ingestor: Ingestor, **kwargs) -> str:
    ds = make_dataset(**kwargs)
    outcome = ingestor.store(part10_bytes(ds), "test")
    assert outcome.accepted, outcome
    return str(ds.SOPInstanceUID)


def admit_all(db: Database) -> int:
    return admit_stable_studies(db, 10, now=utcnow() + LATER)


def instance(db: Database, sop_uid: str) -> Instance:
    with db.session() as s:
        return s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one()


def study(db: Database, study_uid: str) -> Study:
    with db.session() as s:
        return s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()


def jobs(db: Database, study_uid: str | None = None) -> list[Job]:
    with db.session() as s:
        q = select(Job).order_by(Job.id)
        if study_uid:
            q = q.where(Job.study_instance_uid == study_uid)
        return list(s.scalars(q).all())


def set_state(db: Database, model: type, row_id: int, **values) -> None:
    with db.session() as s:
        row = s.get(model, row_id)
        for k, v in values.items():
            setattr(row, k, v)


# --------------------------------------------------------------------------- skip rules


@pytest.mark.parametrize(("attrs", "reason"), [
    ({"modality": "CR"}, None),
    ({"modality": "DX"}, None),
    ({"modality": "CR", "photometric": "MONOCHROME1"}, None),
    ({"modality": "CR", "body_part": None}, None),
    ({"modality": "CR", "body_part": ""}, None),
    ({"modality": "CR", "body_part": "thorax"}, None),
    ({"modality": "CR", "view_position": None}, None),
    ({"modality": "DX", "view_position": "AP"}, None),
    ({"modality": "CR", "sop_class_uid": SC}, None),  # a CR digitised as SC
    ({"modality": "CR", "view_position": "LL"}, SkipReason.LATERAL_VIEW),
    ({"modality": "DX", "view_position": "RL"}, SkipReason.LATERAL_VIEW),
    ({"modality": "DX", "presentation_intent": "FOR PROCESSING"}, SkipReason.FOR_PROCESSING),
    ({"modality": "DX", "sop_class_uid": DX_PROCESSING}, SkipReason.FOR_PROCESSING),
    ({"modality": "CR", "body_part": "HAND"}, SkipReason.NOT_CHEST),
    ({"modality": "DX", "body_part": "SKULL"}, SkipReason.NOT_CHEST),
    ({"modality": "OT", "sop_class_uid": SC}, SkipReason.NOT_RADIOGRAPH),
    ({"modality": "US", "sop_class_uid": SC}, SkipReason.NOT_RADIOGRAPH),
    ({"modality": "CR", "pixels": False}, SkipReason.NO_PIXEL_DATA),
    ({"modality": "CR", "photometric": "RGB"}, SkipReason.UNSUPPORTED_PHOTOMETRIC),
    ({"modality": "CR", "photometric": "PALETTE COLOR"}, SkipReason.UNSUPPORTED_PHOTOMETRIC),
    ({"modality": "DX", "frames": 2}, SkipReason.MULTI_FRAME),
])
def test_skip_rules(ingestor, attrs, reason):
    sop = store(ingestor, **attrs)
    assert admit_all(ingestor.db) == 1
    inst = instance(ingestor.db, sop)
    if reason is None:
        assert inst.state == InstanceState.QUEUED.value and inst.reason is None
        (job,) = jobs(ingestor.db)
        assert job.instance_id == inst.id and job.state == JobState.PENDING.value
        assert study(ingestor.db, inst.study_instance_uid).state == StudyState.ADMITTED.value
    else:
        assert inst.state == InstanceState.SKIPPED.value
        assert inst.reason == reason.value
        assert jobs(ingestor.db) == []
        assert study(ingestor.db, inst.study_instance_uid).state == \
            StudyState.NOTHING_TO_DO.value


def test_mixed_study_queues_frontal_and_explains_the_rest(ingestor, caplog):
    caplog.set_level(logging.INFO, logger="cxrd")
    study_uid = uid()
    pa = store(ingestor, modality="CR", study_uid=study_uid, seed=1)
    lat = store(ingestor, modality="CR", study_uid=study_uid, view_position="LL", seed=2)
    hand = store(ingestor, modality="CR", study_uid=study_uid, body_part="HAND", seed=3)
    admit_all(ingestor.db)
    assert instance(ingestor.db, pa).state == InstanceState.QUEUED.value
    assert instance(ingestor.db, lat).reason == SkipReason.LATERAL_VIEW.value
    assert instance(ingestor.db, hand).reason == SkipReason.NOT_CHEST.value
    assert [j.instance_id for j in jobs(ingestor.db)] == [instance(ingestor.db, pa).id]
    assert study(ingestor.db, study_uid).state == StudyState.ADMITTED.value
    lines = [r.getMessage() for r in caplog.records if "action=skipped" in r.getMessage()]
    assert any(lat in line and "reason=lateral-view" in line for line in lines)


# --------------------------------------------------------------------------- stable rule


def test_study_is_admitted_only_after_stable_seconds(ingestor):
    sop = store(ingestor, modality="CR")
    received = instance(ingestor.db, sop).received_at
    db = ingestor.db
    assert admit_stable_studies(db, 10, now=received + dt.timedelta(seconds=9)) == 0
    assert instance(db, sop).state == InstanceState.RECEIVED.value
    assert jobs(db) == []
    assert admit_stable_studies(db, 10, now=received + dt.timedelta(seconds=10)) == 1
    assert instance(db, sop).state == InstanceState.QUEUED.value
    # admitted once: a second round finds nothing to do
    assert admit_stable_studies(db, 10, now=received + dt.timedelta(seconds=60)) == 0
    assert len(jobs(db)) == 1


def test_seconds_to_next_admission_follow_the_earliest_collecting_study(ingestor):
    db = ingestor.db
    assert seconds_to_next_admission(db, 10) is None  # nothing collecting: no wake-up
    first = store(ingestor, modality="CR")
    received = instance(db, first).received_at
    assert seconds_to_next_admission(db, 10, now=received + dt.timedelta(seconds=4)) == \
        pytest.approx(6, abs=0.01)
    assert seconds_to_next_admission(db, 10, now=received + dt.timedelta(seconds=12)) == 0
    store(ingestor, modality="CR")  # a second study, received later, is due later
    assert seconds_to_next_admission(db, 10, now=received + dt.timedelta(seconds=4)) == \
        pytest.approx(6, abs=0.01)
    admit_stable_studies(db, 10, now=received + dt.timedelta(seconds=10))
    later = seconds_to_next_admission(db, 10, now=received + dt.timedelta(seconds=10))
    assert later is not None and later > 0  # the first admitted, the second still collecting
    admit_all(db)
    assert seconds_to_next_admission(db, 10) is None


def test_new_instance_restarts_the_stable_clock(ingestor):
    study_uid = uid()
    first = store(ingestor, modality="CR", study_uid=study_uid, seed=1)
    t0 = instance(ingestor.db, first).received_at
    second = store(ingestor, modality="CR", study_uid=study_uid, seed=2)
    t1 = instance(ingestor.db, second).received_at
    assert admit_stable_studies(ingestor.db, 10, now=t1 + dt.timedelta(seconds=5)) == 0
    assert admit_stable_studies(ingestor.db, 10, now=t0 + dt.timedelta(seconds=11)) in (0, 1)
    assert admit_stable_studies(ingestor.db, 10, now=t1 + dt.timedelta(seconds=10)) in (0, 1)
    assert len(jobs(ingestor.db)) == 2  # both admitted together, once


def test_late_instance_reopens_a_reported_study(ingestor):
    study_uid = uid()
    first = store(ingestor, modality="CR", study_uid=study_uid, seed=1)
    admit_all(ingestor.db)
    (job,) = jobs(ingestor.db)
    # what the worker and the report stage do
    set_state(ingestor.db, Job, job.id, state=JobState.DONE.value)
    st = study(ingestor.db, study_uid)
    set_state(ingestor.db, Study, st.id, state=StudyState.REPORTED.value,
              sr_sop_instance_uid=uid())

    late = store(ingestor, modality="DX", study_uid=study_uid, seed=2)
    assert study(ingestor.db, study_uid).state == StudyState.COLLECTING.value
    assert admit_all(ingestor.db) == 1
    assert instance(ingestor.db, late).state == InstanceState.QUEUED.value
    assert instance(ingestor.db, first).state == InstanceState.QUEUED.value  # untouched
    assert [j.instance_id for j in jobs(ingestor.db)] == [
        instance(ingestor.db, first).id, instance(ingestor.db, late).id]
    assert study(ingestor.db, study_uid).state == StudyState.ADMITTED.value


def test_late_skipped_instance_does_not_strand_running_jobs(ingestor):
    """A late lateral view arrives while the frontal's job is still running: the study must
    stay admitted, or its SR would never be written."""
    study_uid = uid()
    store(ingestor, modality="CR", study_uid=study_uid, seed=1)
    admit_all(ingestor.db)
    (job,) = jobs(ingestor.db)
    set_state(ingestor.db, Job, job.id, state=JobState.RUNNING.value, lease_owner="w")
    store(ingestor, modality="CR", study_uid=study_uid, view_position="LL", seed=2)
    admit_all(ingestor.db)
    assert study(ingestor.db, study_uid).state == StudyState.ADMITTED.value
    assert len(jobs(ingestor.db)) == 1


def test_received_instance_in_a_non_collecting_study_is_still_admitted(ingestor):
    """Safety net: if a state update is lost (another stage overwrote COLLECTING), an
    instance left in RECEIVED is admitted anyway."""
    study_uid = uid()
    sop = store(ingestor, modality="CR", study_uid=study_uid)
    st = study(ingestor.db, study_uid)
    set_state(ingestor.db, Study, st.id, state=StudyState.REPORTED.value)
    assert admit_all(ingestor.db) == 1
    assert instance(ingestor.db, sop).state == InstanceState.QUEUED.value


# --------------------------------------------------------------------------- reprocess


def finish(db: Database, study_uid: str) -> None:
    """Pretend the worker and the report stage finished the study."""
    with db.session() as s:
        for job in s.scalars(select(Job).where(Job.study_instance_uid == study_uid)):
            if job.state in (JobState.PENDING.value, JobState.RUNNING.value):
                job.state = JobState.DONE.value
                s.get(Instance, job.instance_id).state = InstanceState.DONE.value
        st = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        st.state = StudyState.REPORTED.value
        st.sr_sop_instance_uid = uid()


def test_requeue_creates_a_new_generation_and_honours_skip_rules(ingestor):
    db = ingestor.db
    study_uid = uid()
    pa = store(ingestor, modality="CR", study_uid=study_uid, seed=1)
    failed = store(ingestor, modality="DX", study_uid=study_uid, seed=2)
    lat = store(ingestor, modality="CR", study_uid=study_uid, view_position="LL", seed=3)
    admit_all(db)
    finish(db, study_uid)
    # the worker had skipped one as undecodable: reprocessing tries it again
    with db.session() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == failed)).one()
        inst.state, inst.reason = InstanceState.SKIPPED.value, SkipReason.DECODE_FAILED.value

    assert requeue_study(db, study_uid) == 2
    st = study(db, study_uid)
    assert st.generation == 2 and st.state == StudyState.ADMITTED.value
    new = [j for j in jobs(db, study_uid) if j.generation == 2]
    assert sorted(j.instance_id for j in new) == sorted(
        [instance(db, pa).id, instance(db, failed).id])
    assert all(j.state == JobState.PENDING.value for j in new)
    assert instance(db, failed).state == InstanceState.QUEUED.value
    assert instance(db, failed).reason is None
    assert instance(db, lat).reason == SkipReason.LATERAL_VIEW.value
    # old generation's jobs are kept (the SR names what they produced)
    assert len([j for j in jobs(db, study_uid) if j.generation == 1]) == 2


def test_requeue_defers_busy_studies(ingestor):
    db = ingestor.db
    collecting = uid()
    store(ingestor, modality="CR", study_uid=collecting)
    assert requeue_study(db, collecting) == 0  # still collecting
    admit_all(db)
    assert requeue_study(db, collecting) == 0  # its job is pending
    (job,) = jobs(db, collecting)
    set_state(db, Job, job.id, state=JobState.RUNNING.value, lease_owner="w")
    assert requeue_study(db, collecting) == 0  # running
    assert study(db, collecting).generation == 1
    finish(db, collecting)
    assert requeue_study(db, collecting) == 1
    assert study(db, collecting).generation == 2


def test_requeue_of_a_study_with_nothing_to_classify(ingestor):
    db = ingestor.db
    study_uid = uid()
    store(ingestor, modality="CR", study_uid=study_uid, body_part="KNEE")
    admit_all(db)
    assert study(db, study_uid).state == StudyState.NOTHING_TO_DO.value
    assert requeue_study(db, study_uid) == 0
    st = study(db, study_uid)
    assert st.generation == 1 and st.state == StudyState.NOTHING_TO_DO.value
    assert requeue_study(db, "1.2.3.4.5.6.7.8.9") == 0  # unknown study


def test_studies_to_reprocess_filters(ingestor):
    db = ingestor.db
    a, b, c = uid(), uid(), uid()
    for study_uid in (a, b, c):
        store(ingestor, modality="CR", study_uid=study_uid)
    base = dt.datetime(2024, 1, 1)
    with db.session() as s:
        for n, study_uid in enumerate((a, b, c)):
            st = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
            st.first_received_at = base + dt.timedelta(days=n)
    assert studies_to_reprocess(db, None, None, None) == [a, b, c]
    assert studies_to_reprocess(db, base + dt.timedelta(days=1), None, None) == [b, c]
    assert studies_to_reprocess(db, base, base + dt.timedelta(days=2), None) == [a, b]
    assert studies_to_reprocess(db, None, None, c) == [c]
    assert studies_to_reprocess(db, base + dt.timedelta(days=5), None, c) == []


# ----------------------------------------------------------------- classify on arrival


def report_jobs(db: Database, study_uid: str) -> list[Job]:
    return [j for j in jobs(db, study_uid) if j.kind == JobKind.REPORT.value]


def test_arrivals_are_queued_at_once_and_the_report_waits_for_the_stable_study(ingestor):
    db = ingestor.db
    study_uid = uid()
    pa = store(ingestor, modality="CR", study_uid=study_uid, seed=1)
    lat = store(ingestor, modality="CR", study_uid=study_uid, view_position="LL", seed=2)
    assert queue_arrivals(db) == 1
    assert instance(db, pa).state == InstanceState.QUEUED.value
    assert instance(db, lat).reason == SkipReason.LATERAL_VIEW.value
    assert study(db, study_uid).state == StudyState.COLLECTING.value  # not stable yet
    assert study(db, study_uid).stable_at is None
    assert queue_arrivals(db) == 0  # each instance is queued once

    # the worker ends the job while the study still collects: no report job yet
    (claimed,) = queue.claim(db, "w", 4, 300, 3)
    assert claimed.sop_instance_uid == pa
    assert queue.complete(db, claimed, "w", [0.1, 0.2, 0.7], None, "1.2.3", {})
    assert report_jobs(db, study_uid) == []

    # stable: admission queues nothing more and lets the report job run
    assert admit_all(db) == 1
    assert study(db, study_uid).state == StudyState.ADMITTED.value
    assert [j.kind for j in jobs(db, study_uid)] == [JobKind.CLASSIFY.value,
                                                     JobKind.REPORT.value]
    assert report_jobs(db, study_uid)[0].state == JobState.PENDING.value


def test_an_arrival_after_its_study_is_queued_waits_for_the_new_stable_time(ingestor):
    db = ingestor.db
    study_uid = uid()
    store(ingestor, modality="CR", study_uid=study_uid, seed=1)
    assert queue_arrivals(db) == 1
    late = store(ingestor, modality="DX", study_uid=study_uid, seed=2)
    t1 = instance(db, late).received_at
    assert queue_arrivals(db) == 1
    assert admit_stable_studies(db, 10, now=t1 + dt.timedelta(seconds=5)) == 0
    (first, second) = queue.claim(db, "w", 4, 300, 3)
    for job in (first, second):
        queue.complete(db, job, "w", [0.1, 0.2, 0.7], None, "1.2.3", {})
    assert report_jobs(db, study_uid) == []  # done, but the study is not stable yet
    assert admit_stable_studies(db, 10, now=t1 + dt.timedelta(seconds=10)) == 1
    assert len(report_jobs(db, study_uid)) == 1
    assert len([j for j in jobs(db, study_uid) if j.kind == JobKind.CLASSIFY.value]) == 2


def test_arrivals_of_a_study_that_is_not_collecting_wait_for_admission(ingestor):
    # only collecting studies are queued on arrival; the safety net for a received
    # instance of a study in another state stays admission's
    db = ingestor.db
    sop = store(ingestor, modality="CR")
    st = study(db, instance(db, sop).study_instance_uid)
    set_state(db, Study, st.id, state=StudyState.ADMITTED.value)
    assert queue_arrivals(db) == 0
    assert admit_all(db) == 1
    assert instance(db, sop).state == InstanceState.QUEUED.value


def test_an_admission_round_also_says_when_the_next_study_is_due(ingestor):
    db = ingestor.db
    first = store(ingestor, modality="CR")
    t0 = instance(db, first).received_at
    second = store(ingestor, modality="CR")
    t1 = instance(db, second).received_at
    # the first is due and admitted; the second is due stable_seconds after its arrival
    admitted, wait = admission_round(db, 10, now=t0 + dt.timedelta(seconds=10))
    assert admitted == 1
    assert wait == pytest.approx((t1 - t0).total_seconds(), abs=0.01)
    assert admission_round(db, 10, now=t1 + dt.timedelta(seconds=10)) == (1, None)
