"""Admission: decide per instance whether it is a frontal chest radiograph
(``skip_reason``); ``cxrd.queue`` then queues a job for each one that is and records the
reason for each one that is not: the decisions live here, the state changes there.

Two moments. With ``[study] classify_on_arrival`` (the default) instances are queued as they
arrive (``queue_arrivals``, each scheduler round), while their study is still collecting:
the workers classify them during the stable wait instead of after it. A study is admitted
when it has been quiet for ``stable_seconds`` (``admit_stable_studies``, which queues what
is still unqueued): only then may its report job run, so the SR still covers the whole
study. Every decision is per instance, so classifying early changes no outcome, only
when the work is done."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, bindparam, func, or_, select

from cxrd.db import Database, Instance, Job, Study, utcnow
from cxrd.dicom import CR, DX_PRESENTATION, DX_PROCESSING, SECONDARY_CAPTURE
from cxrd.domain import InstanceState, JobState, SkipReason, StudyState
from cxrd.queue import admit_study, queue_instances, requeue

log = logging.getLogger(__name__)

LATERAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LATERAL", "LAT"}
CHEST_BODY_PARTS = {"", "CHEST", "THORAX", "LUNG", "CHEST_LAT", "CHEST_PA", "CHEST_AP"}


def skip_reason(inst: Instance | Any) -> SkipReason | None:
    """None when the instance is a frontal chest radiograph cxrd classifies. ``inst`` is
    an ``Instance`` or a row with its columns (``_RECEIVED_OF``)."""
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


def _lock(query: Select[Any], db: Database) -> Select[Any]:
    # Several nodes may share a PostgreSQL queue: each study is admitted by one of them,
    # and an instance stored meanwhile waits for the lock instead of being overwritten.
    # SQLite needs nothing: BEGIN IMMEDIATE already serialises the transaction.
    return query if db.is_sqlite else query.with_for_update(skip_locked=True)


# The scheduler's statements, built once (building one costs more than running it on a
# quiet queue): the studies due for admission, their new instances, the next one due.
_WAITING = select(Instance.study_instance_uid).where(
    Instance.state == InstanceState.RECEIVED.value)
_DUE = select(Study).where(
    or_(Study.state == StudyState.COLLECTING.value, Study.study_instance_uid.in_(_WAITING)),
    Study.last_received_at <= bindparam("cutoff"),
).order_by(Study.id).limit(200)
_DUE_LOCKED = _DUE.with_for_update(skip_locked=True)
#: What admission reads of a received instance: its ids and what ``skip_reason`` needs.
_RECEIVED_OF = select(
    Instance.id, Instance.sop_instance_uid, Instance.study_instance_uid,
    Instance.sop_class_uid, Instance.presentation_intent, Instance.modality,
    Instance.body_part, Instance.view_position, Instance.has_pixels, Instance.frames,
    Instance.photometric,
).where(
    Instance.study_instance_uid.in_(bindparam("studies", expanding=True)),
    Instance.state == InstanceState.RECEIVED.value).order_by(Instance.id)
_EARLIEST_COLLECTING = select(func.min(Study.last_received_at)).where(
    Study.state == StudyState.COLLECTING.value)
_ARRIVING = select(Study.study_instance_uid, Study.generation).where(
    Study.state == StudyState.COLLECTING.value, Study.study_instance_uid.in_(_WAITING),
).order_by(Study.id).limit(200)
_ARRIVING_LOCKED = _ARRIVING.with_for_update(skip_locked=True)


def _received(conn: Any, study_uids: Sequence[str]) -> dict[str, list[Any]]:
    """The received (not yet queued or skipped) instances of each study, as rows of
    ``_RECEIVED_OF``: one query."""
    received: dict[str, list[Any]] = {uid: [] for uid in study_uids}
    if received:
        for row in conn.execute(_RECEIVED_OF, {"studies": list(received)}):
            received[row.study_instance_uid].append(row)
    return received


def queue_arrivals(db: Database, now: dt.datetime | None = None) -> int:
    """Queue the received instances of collecting studies (``[study] classify_on_arrival``);
    returns how many jobs were queued. The studies stay collecting: admission, once they
    are stable, lets their report jobs run. On PostgreSQL the study rows are locked (SKIP
    LOCKED), as admission locks them, so an instance is queued by one node once."""
    now = now or utcnow()
    queued = 0
    with db.engine.begin() as conn:
        studies = conn.execute(_ARRIVING if db.is_sqlite else _ARRIVING_LOCKED).all()
        received = _received(conn, [uid for uid, _ in studies])
        for uid, generation in studies:
            decisions = [(inst, skip_reason(inst)) for inst in received[uid]]
            n, skipped = queue_instances(conn, uid, generation, decisions, now)
            queued += n
            log.debug("action=queued-on-arrival study_instance_uid=%s queued=%d skipped=%d",
                      uid, n, skipped)
    return queued


def admit_stable_studies(db: Database, stable_seconds: float,
                         now: dt.datetime | None = None) -> int:
    """Admit every study quiet for ``stable_seconds``; returns how many were admitted.

    A study is due when it is collecting, or (as a safety net against a lost state
    update) when it holds instances that were received but never admitted.
    """
    return admission_round(db, stable_seconds, now)[0]


def admission_round(db: Database, stable_seconds: float,
                    now: dt.datetime | None = None) -> tuple[int, float | None]:
    """``admit_stable_studies`` and then ``seconds_to_next_admission``, in one transaction
    (the scheduler's round): (studies admitted, seconds until the next is due or None)."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=stable_seconds)
    admitted = 0
    with db.session() as s:
        # Several nodes may share a PostgreSQL queue: each study is admitted by one of
        # them (see _lock).
        studies = s.scalars(_DUE if db.is_sqlite else _DUE_LOCKED, {"cutoff": cutoff}).all()
        received = _received(s, [study.study_instance_uid for study in studies])
        for study in studies:
            decisions = [(inst, skip_reason(inst))
                         for inst in received[study.study_instance_uid]]
            queued, skipped = admit_study(s, study, decisions, now)
            log.info("action=admitted study_instance_uid=%s queued=%d skipped=%d",
                     study.study_instance_uid, queued, skipped)
            admitted += 1
        s.flush()
        last = s.scalar(_EARLIEST_COLLECTING)
    wait = None if last is None else max(0.0, (last - now).total_seconds() + stable_seconds)
    return admitted, wait


def seconds_to_next_admission(db: Database, stable_seconds: float,
                               now: dt.datetime | None = None) -> float | None:
    """Seconds until the next collecting study has been quiet for ``stable_seconds`` (0 when
    one already has), None when no study is collecting: the scheduler wakes then rather
    than on its next round, so a study is admitted when it becomes stable."""
    now = now or utcnow()
    with db.session() as s:
        last = s.scalar(_EARLIEST_COLLECTING)
    if last is None:
        return None
    return max(0.0, (last - now).total_seconds() + stable_seconds)


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
    """Queue every classifiable instance of a study again, as a new generation; returns
    how many were queued (0 when the study is busy, unknown or has nothing to classify).

    The admission rules are applied afresh, so an image skipped under older rules (or
    whose decoding failed) is tried again. The new SR supersedes the current one. A study
    still collecting, or with jobs pending or running, is left alone (try again later),
    and so is one whose received images retention purged (it cannot be reached again).
    """
    now = utcnow()
    with db.session() as s:
        study = s.scalars(_lock(select(Study).where(
            Study.study_instance_uid == study_uid), db)).first()
        if study is None:
            log.info("action=reprocess-deferred study_instance_uid=%s reason=unknown-or-locked",
                     study_uid)
            return 0
        busy = s.scalars(select(Job.id).where(
            Job.study_instance_uid == study_uid,
            Job.state.in_((JobState.PENDING.value, JobState.RUNNING.value))).limit(1)).first()
        if busy is not None or study.state == StudyState.COLLECTING.value:
            log.info("action=reprocess-deferred study_instance_uid=%s reason=study-busy",
                     study_uid)
            return 0
        instances = s.scalars(select(Instance).where(
            Instance.study_instance_uid == study_uid).order_by(Instance.id)).all()
        if any(inst.purged_at is not None for inst in instances):
            log.info("action=reprocess-skipped study_instance_uid=%s reason=spool-purged",
                     study_uid)
            return 0
        classify = requeue(s, study, [(inst, skip_reason(inst)) for inst in instances], now)
        generation = study.generation
    log.info("action=reprocess study_instance_uid=%s generation=%d queued=%d",
             study_uid, generation, classify)
    return classify
