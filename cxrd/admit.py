"""Admission: when a study has been quiet for ``stable_seconds``, decide per instance whether
it is a frontal chest radiograph, queue a job for each one that is, and record a reason
for each one that is not."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select

from cxrd.db import Database, Instance, Job, Study, utcnow
from cxrd.domain import InstanceState, JobState, SkipReason, StudyState
from cxrd.ingest import CR, DX_PRESENTATION, DX_PROCESSING, SECONDARY_CAPTURE

log = logging.getLogger(__name__)

LATERAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LATERAL", "LAT"}
CHEST_BODY_PARTS = {"", "CHEST", "THORAX", "LUNG", "CHEST_LAT", "CHEST_PA", "CHEST_AP"}


def skip_reason(inst: Instance) -> SkipReason | None:
    """None when the instance is a frontal chest radiograph cxrd classifies."""
    if inst.sop_class_uid == DX_PROCESSING or inst.presentation_intent == "FOR PROCESSING":
        return SkipReason.FOR_PROCESSING
    if inst.sop_class_uid not in (CR, DX_PRESENTATION) and not (
        inst.sop_class_uid == SECONDARY_CAPTURE and inst.modality in ("CR", "DX")
    ):
        return SkipReason.NOT_RADIOGRAPH
    if inst.modality not in ("CR", "DX"):
        return SkipReason.NOT_RADIOGRAPH
    if inst.body_part not in CHEST_BODY_PARTS:
        return SkipReason.NOT_CHEST
    if inst.view_position in LATERAL_VIEWS:
        return SkipReason.LATERAL_VIEW
    if not inst.has_pixels:
        return SkipReason.NO_PIXEL_DATA
    if inst.frames > 1:
        return SkipReason.MULTI_FRAME
    if inst.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return SkipReason.UNSUPPORTED_PHOTOMETRIC
    return None


def admit_stable_studies(db: Database, stable_seconds: float, now: dt.datetime | None = None) -> int:
    """Admit every study quiet for ``stable_seconds``; returns how many were admitted."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=stable_seconds)
    admitted = 0
    with db.session() as s:
        studies = s.scalars(select(Study).where(
            Study.state == StudyState.COLLECTING.value, Study.last_received_at <= cutoff
        ).limit(200)).all()
        for study in studies:
            instances = s.scalars(select(Instance).where(
                Instance.study_instance_uid == study.study_instance_uid,
                Instance.state == InstanceState.RECEIVED.value)).all()
            queued = skipped = 0
            for inst in instances:
                reason = skip_reason(inst)
                if reason is None:
                    inst.state = InstanceState.QUEUED.value
                    s.add(Job(instance_id=inst.id, study_instance_uid=study.study_instance_uid,
                              generation=study.generation, state=JobState.PENDING.value,
                              not_before=now, created_at=now))
                    queued += 1
                else:
                    inst.state = InstanceState.SKIPPED.value
                    inst.reason = reason.value
                    skipped += 1
                    log.info("action=skipped sop_instance_uid=%s study_instance_uid=%s reason=%s",
                             inst.sop_instance_uid, study.study_instance_uid, reason.value)
            study.stable_at = now
            if queued:
                study.state = StudyState.ADMITTED.value
            elif study.sr_sop_instance_uid:
                # Reopened by instances that were all skipped: the current SR still holds.
                study.state = StudyState.REPORTED.value
            else:
                study.state = StudyState.NOTHING_TO_DO.value
            log.info("action=admitted study_instance_uid=%s queued=%d skipped=%d",
                     study.study_instance_uid, queued, skipped)
            admitted += 1
    return admitted



def studies_to_reprocess(db: Database, since: dt.datetime | None, until: dt.datetime | None,
                         study_uid: str | None) -> list[str]:
    """Stored studies first received in [since, until), or the one named."""
    with db.session() as s:
        query = select(Study.study_instance_uid)
        if study_uid:
            query = query.where(Study.study_instance_uid == study_uid)
        if since:
            query = query.where(Study.first_received_at >= since)
        if until:
            query = query.where(Study.first_received_at < until)
        return list(s.scalars(query.order_by(Study.id)).all())


def requeue_study(db: Database, study_uid: str) -> int:
    """Queue every classifiable instance of a study again, as a new generation.

    The admission rules are applied afresh, so an image skipped under older rules (or
    whose decoding failed) is tried again. The new SR supersedes the current one.
    """
    now = utcnow()
    with db.session() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        busy = s.scalars(select(Job.id).where(
            Job.study_instance_uid == study_uid,
            Job.state.in_((JobState.PENDING.value, JobState.RUNNING.value))).limit(1)).first()
        if busy is not None or study.state == StudyState.COLLECTING.value:
            log.info("action=reprocess-deferred study_instance_uid=%s reason=study-busy",
                     study_uid)
            return 0
        study.generation += 1
        queued = 0
        for inst in s.scalars(select(Instance).where(
                Instance.study_instance_uid == study_uid)).all():
            reason = skip_reason(inst)
            if reason is not None:
                inst.state, inst.reason = InstanceState.SKIPPED.value, reason.value
                continue
            inst.state, inst.reason, inst.detail = InstanceState.QUEUED.value, None, None
            s.add(Job(instance_id=inst.id, study_instance_uid=study_uid,
                      generation=study.generation, state=JobState.PENDING.value,
                      not_before=now, created_at=now))
            queued += 1
        study.state = StudyState.ADMITTED.value if queued else study.state
        study.stable_at = now
    log.info("action=reprocess study_instance_uid=%s generation=%d queued=%d",
             study_uid, study.generation, queued)
    return queued
