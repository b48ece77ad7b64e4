"""Results: recording written SR/SC objects (and their deliveries), and the per-study SR.

The SR of a study is written here, in the node's scheduler, once every job of the study
has ended, so exactly one process decides it. Its UID is a function of the study, the
generation and the jobs it covers: a redo after a crash rewrites the same object.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxrd.db import Database, Delivery, Instance, Job, Result, Study, utcnow
from cxrd.domain import JobState, ResultKind, StudyState
from cxrd.metrics import observe_stages
from cxrd.modelinfo import ModelInfo
from cxrd.uids import derived_uid

log = logging.getLogger(__name__)


def add_result(s: Session, *, kind: ResultKind, sop_instance_uid: str, study_instance_uid: str,
               generation: int, path: Path, destinations: Sequence[str] = (),
               source_sop_instance_uid: str | None = None,
               supersedes: str | None = None) -> bool:
    """Record a written object and queue it for each destination; idempotent by UID."""
    exists = s.scalars(select(Result.id).where(
        Result.sop_instance_uid == sop_instance_uid)).first()
    if exists is not None:
        return False
    row = Result(sop_instance_uid=sop_instance_uid, study_instance_uid=study_instance_uid,
                 kind=kind.value, generation=generation, path=str(path),
                 source_sop_instance_uid=source_sop_instance_uid, supersedes=supersedes)
    s.add(row)
    s.flush()
    for name in destinations:
        s.add(Delivery(result_id=row.id, destination=name))
    return True


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temp_files(folder: Path, *, recursive: bool = False) -> int:
    """Remove temp files left by writers that died mid-write (kill -9, power loss).

    Results (``report.save_dataset``) and spool files (``ingest.write_temp``) are written
    to ``.<name>.<pid>.<random>.tmp`` and renamed into place, so a crash leaves the temp
    file behind, and nothing else ever removes it. One whose writer (on this host) is gone
    can go; one of a live process is left alone. Returns how many were removed.
    """
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        try:
            pid = int(path.name.split(".")[-3])
        except (IndexError, ValueError):
            continue  # not one of ours
        if pid == os.getpid() or _writer_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
    if removed:
        log.warning("action=removed-temp-files folder=%s count=%d", folder, removed)
    return removed


def finish_studies(db: Database, model: ModelInfo, results_dir: Path, *,
                   sr_sop_class: str = "comprehensive3d", structured_report: bool = True,
                   destinations: Sequence[str] = (), budget_seconds: float = 5.0) -> int:
    """Write the SR of admitted studies whose jobs have all ended; returns how many.

    Stops after ``budget_seconds`` so the scheduler loop (admission, the systemd watchdog)
    keeps its pace under a backlog; the rest are written on the next rounds."""
    with db.session() as s:
        open_studies = select(Job.study_instance_uid).where(
            Job.state.in_((JobState.PENDING.value, JobState.RUNNING.value)))
        uids = s.scalars(select(Study.study_instance_uid).where(
            Study.state == StudyState.ADMITTED.value,
            Study.study_instance_uid.not_in(open_studies)
        ).order_by(Study.stable_at, Study.id).limit(100)).all()
    deadline = time.monotonic() + budget_seconds
    done = 0
    for uid in uids:
        if done and time.monotonic() > deadline:
            break
        finish_study(db, uid, model, results_dir, sr_sop_class=sr_sop_class,
                     structured_report=structured_report, destinations=destinations)
        done += 1
    return done


def finish_study(db: Database, study_uid: str, model: ModelInfo, results_dir: Path, *,
                 sr_sop_class: str = "comprehensive3d", structured_report: bool = True,
                 destinations: Sequence[str] = ()) -> str | None:
    """Write (or rewrite) the study's SR from the latest done job of each instance."""
    from cxrd.report import ImageResult, build_sr, save_dataset

    t0 = time.perf_counter()
    with db.session() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        latest = select(func.max(Job.id)).where(
            Job.study_instance_uid == study_uid, Job.state == JobState.DONE.value
        ).group_by(Job.instance_id)
        rows = s.execute(select(Job, Instance).join(Instance, Job.instance_id == Instance.id)
                         .where(Job.id.in_(latest)).order_by(Instance.id)).all()
        generation, previous = study.generation, study.sr_sop_instance_uid
        previous_path = None
        if previous:
            previous_path = s.scalars(select(Result.path).where(
                Result.sop_instance_uid == previous)).first()
    if not rows:
        with db.session() as s:
            study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
            if study.state == StudyState.ADMITTED.value:  # not reopened meanwhile
                study.state = (StudyState.REPORTED.value if study.sr_sop_instance_uid
                               else StudyState.NOTHING_TO_DO.value)
        log.info("action=study-finished study_instance_uid=%s sr=none reason=no-classified-image",
                 study_uid)
        return None
    max_job = max(job.id for job, _ in rows)
    sr_uid = derived_uid("sr", study_uid, generation, max_job, model.device_uid)
    written: Path | None = None
    if structured_report and sr_uid != previous:
        images = []
        for job, inst in rows:
            header = pydicom.dcmread(inst.path, stop_before_pixels=True)
            images.append(ImageResult(
                header, np.zeros((1, 1), dtype=np.uint8),
                np.asarray(json.loads(job.probs or "[]"), dtype=np.float32),
                np.asarray(json.loads(job.cam or "[]"), dtype=np.float32)))
        predecessor = (pydicom.dcmread(previous_path, stop_before_pixels=True)
                       if previous_path and Path(previous_path).exists() else None)
        sr = build_sr(images, model, sop_class=sr_sop_class, predecessor=predecessor,
                      sop_instance_uid=sr_uid,
                      series_instance_uid=derived_uid("sr-series", study_uid, model.device_uid))
        written = save_dataset(sr, results_dir)
    with db.session() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        if written is not None:
            add_result(s, kind=ResultKind.SR, sop_instance_uid=sr_uid,
                       study_instance_uid=study_uid, generation=generation, path=written,
                       destinations=destinations, supersedes=previous)
            study.sr_sop_instance_uid = sr_uid
        if study.state == StudyState.ADMITTED.value:
            # A study reopened by a late instance meanwhile stays collecting; its next
            # SR will supersede this one.
            study.state = StudyState.REPORTED.value
        study.reported_at = utcnow()
        study.report_seconds = time.perf_counter() - t0
    observe_stages({"report": time.perf_counter() - t0})
    log.info("action=study-reported study_instance_uid=%s sr_sop_instance_uid=%s images=%d "
             "supersedes=%s model=%s", study_uid, sr_uid if written else None, len(rows),
             previous, model.display_name)
    return sr_uid if written else None
