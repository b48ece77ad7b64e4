"""cxrd.retention on a SQLite file and real files: which spool files and results a purge
removes (finished studies only; results delivered to every destination or dead), what it
keeps, the rows it marks and records, and what reprocess and ``deliveries retry`` make of
purged files."""

from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
from pathlib import Path

import pytest
from dicomfactory import CR, uid
from sqlalchemy import select

from cxrd.actions import current_actor
from cxrd.admit import requeue_study
from cxrd.config import Config, validate
from cxrd.db import SCHEMA_VERSION, Database, Delivery, Instance, Job, Purge, Result, Study, utcnow
from cxrd.domain import DeliveryState, InstanceState, JobKind, JobState, ResultKind, StudyState
from cxrd.ingest import NO_DIGEST
from cxrd.outbox import add_result, retry_dead
from cxrd.retention import (
    TRIGGER_COMMAND,
    purge,
    purged_studies,
    storage_status,
)

OLD = utcnow() - dt.timedelta(days=10)
CUTOFF = utcnow() - dt.timedelta(days=5)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return validate({"storage": {"data_dir": str(tmp_path / "data"), "retention_days": 5}},
                    base_dir=tmp_path)


def make_study(db: Database, config: Config, *, state: StudyState = StudyState.REPORTED,
               at: dt.datetime = OLD, images: int = 2, job: JobState = JobState.DONE,
               size: int = 1000, digest: str = "0" * 64) -> tuple[str, list[Path]]:
    """A study whose last activity was ``at``, ``images`` spool files of ``size`` bytes,
    each with a classify job in state ``job``; ``digest`` is the rows' sha256."""
    study_uid = uid()
    folder = config.storage.spool_dir / study_uid
    folder.mkdir(parents=True)
    paths = []
    with db.session() as s:
        s.add(Study(study_instance_uid=study_uid, state=state.value, first_received_at=at,
                    last_received_at=at, stable_at=at,
                    reported_at=at if state == StudyState.REPORTED else None))
        for _ in range(images):
            sop_uid = uid()
            path = folder / f"{sop_uid}.dcm"
            path.write_bytes(b"x" * size)
            paths.append(path)
            inst = Instance(sop_instance_uid=sop_uid, study_instance_uid=study_uid,
                            series_instance_uid=uid(), sop_class_uid=CR,
                            transfer_syntax_uid="", modality="CR", photometric="MONOCHROME2",
                            path=str(path),
                            sha256=digest, size=size, source="test", received_at=at,
                            state=InstanceState.DONE.value)
            s.add(inst)
            s.flush()
            s.add(Job(instance_id=inst.id, study_instance_uid=study_uid, state=job.value,
                      not_before=at, created_at=at, finished_at=at))
    return study_uid, paths


def make_result(db: Database, config: Config, states: list[DeliveryState], *,
                at: dt.datetime = OLD, size: int = 500) -> Path:
    """A result file created at ``at`` with one delivery in each of ``states``."""
    folder = config.results.results_dir
    folder.mkdir(parents=True, exist_ok=True)
    sop_uid = uid()
    path = folder / f"{sop_uid}.dcm"
    path.write_bytes(b"r" * size)
    names = [f"dest{i}" for i in range(len(states))]
    with db.session() as s:
        add_result(s, kind=ResultKind.SC, sop_instance_uid=sop_uid, study_instance_uid=uid(),
                   generation=1, path=path, destinations=names)
        s.flush()
        result = s.scalars(select(Result).where(Result.sop_instance_uid == sop_uid)).one()
        result.created_at = at
        for delivery, state in zip(
                s.scalars(select(Delivery).where(Delivery.result_id == result.id)
                          .order_by(Delivery.id)), states, strict=True):
            delivery.state = state.value
    return path


def purged_at(db: Database, model: type, path: Path) -> dt.datetime | None:
    with db.session() as s:
        return s.scalars(select(model.purged_at).where(  # type: ignore[attr-defined]
            model.path == str(path))).one()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------- results


@pytest.mark.parametrize(("states", "goes"), [
    ([DeliveryState.DONE, DeliveryState.DONE], True),
    ([DeliveryState.DONE, DeliveryState.DEAD], True),
    ([DeliveryState.DEAD], True),
    ([], True),  # queued for no destination
    ([DeliveryState.DONE, DeliveryState.PENDING], False),
    ([DeliveryState.PENDING], False),
])
def test_a_result_goes_only_when_no_delivery_is_pending(
        db: Database, config: Config, states: list[DeliveryState], goes: bool) -> None:
    path = make_result(db, config, states)
    report = purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND)
    assert path.exists() is not goes
    assert (purged_at(db, Result, path) is not None) is goes
    assert (report.results, report.result_bytes, report.results_kept) == (
        (1, 500, 0) if goes else (0, 0, 1))
    with db.session() as s:  # the row and its deliveries stay, as the record
        assert s.scalars(select(Result.path)).all() == [str(path)]
        assert len(s.scalars(select(Delivery)).all()) == len(states)


def test_a_delivered_result_younger_than_the_cutoff_stays(db: Database, config: Config) -> None:
    path = make_result(db, config, [DeliveryState.DONE], at=utcnow())
    report = purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND)
    assert path.exists() and report.results == 0 and report.results_kept == 0


def test_a_result_pending_then_delivered_goes_at_the_next_purge(
        db: Database, config: Config) -> None:
    path = make_result(db, config, [DeliveryState.PENDING])
    assert purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND).results_kept == 1
    with db.session() as s:
        s.scalars(select(Delivery)).one().state = DeliveryState.DONE.value
    assert purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND).results == 1
    assert not path.exists()


def test_dead_deliveries_of_purged_results_are_not_sent_again(
        db: Database, config: Config) -> None:
    purged = make_result(db, config, [DeliveryState.DEAD])
    purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND)
    kept = make_result(db, config, [DeliveryState.DEAD], at=utcnow())
    assert retry_dead(db, actor=current_actor()) == 1  # only the one whose file is there
    with db.session() as s:
        states = dict(s.execute(select(Result.path, Delivery.state).join(
            Result, Delivery.result_id == Result.id)).all())
    assert states == {str(purged): DeliveryState.DEAD.value,
                      str(kept): DeliveryState.PENDING.value}


# --------------------------------------------------------------------------------- spool


def test_finished_studies_lose_their_spool_files_and_keep_their_rows(
        db: Database, config: Config) -> None:
    reported, reported_files = make_study(db, config)
    nothing, nothing_files = make_study(db, config, state=StudyState.NOTHING_TO_DO,
                                        job=JobState.SKIPPED)
    report = purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND)
    assert (report.studies, report.instances, report.spool_bytes) == (2, 4, 4000)
    assert sorted(report.studies_purged) == sorted([reported, nothing])
    for path in reported_files + nothing_files:
        assert not path.exists()
        assert purged_at(db, Instance, path) is not None
    # the emptied study folders are gone too
    assert not (config.storage.spool_dir / reported).exists()
    assert list(config.storage.spool_dir.iterdir()) == []
    with db.session() as s:
        assert len(s.scalars(select(Instance)).all()) == 4
        assert len(s.scalars(select(Study)).all()) == 2


def test_a_purge_first_records_the_digests_ingest_left_uncomputed(
        db: Database, config: Config) -> None:
    # ingest leaves sha256 empty until a UID comes twice; once the file is gone a resend
    # could no longer be compared, so the purge records it before it removes the file
    finished, finished_files = make_study(db, config, digest=NO_DIGEST, size=3000)
    kept, kept_files = make_study(db, config, state=StudyState.ADMITTED, digest=NO_DIGEST)
    expected = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in finished_files}
    report = purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND)
    assert report.studies_purged == [finished]
    with db.session() as s:
        digests = {i.path: i.sha256 for i in s.scalars(select(Instance)).all()}
    assert {p: digests[p] for p in expected} == expected
    assert all(not p.exists() for p in finished_files)
    # a study that stays keeps its files, and its digests are left for later
    assert all(p.exists() and digests[str(p)] == NO_DIGEST for p in kept_files)


@pytest.mark.parametrize("case", ["pending-job", "running-job", "unresolved-failure",
                                  "admitted", "collecting", "recent"])
def test_unfinished_or_recent_studies_keep_their_spool_files(
        db: Database, config: Config, case: str) -> None:
    kw: dict[str, object] = {
        "pending-job": {"job": JobState.PENDING},
        "running-job": {"job": JobState.RUNNING},
        "unresolved-failure": {"job": JobState.FAILED},
        "admitted": {"state": StudyState.ADMITTED},
        "collecting": {"state": StudyState.COLLECTING},
        "recent": {"at": utcnow()},
    }[case]  # type: ignore[assignment]
    _, files = make_study(db, config, **kw)  # type: ignore[arg-type]
    report = purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND)
    assert report.instances == 0
    assert all(p.exists() and purged_at(db, Instance, p) is None for p in files)


def test_a_failure_answered_by_a_reprocess_does_not_keep_the_files(
        db: Database, config: Config) -> None:
    study_uid, files = make_study(db, config, job=JobState.FAILED)
    with db.session() as s:  # the reprocess: generation 2, whose jobs are done
        study = s.scalars(select(Study)).one()
        study.generation = 2
        for inst in s.scalars(select(Instance)):
            s.add(Job(instance_id=inst.id, study_instance_uid=study_uid, generation=2,
                      state=JobState.DONE.value, not_before=OLD, created_at=OLD))
        s.add(Job(kind=JobKind.REPORT.value, study_instance_uid=study_uid, generation=2,
                  state=JobState.DONE.value, not_before=OLD, created_at=OLD))
    assert purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND).instances == 2
    assert not any(p.exists() for p in files)


def test_a_late_instance_keeps_the_folder_and_a_rerun_finds_nothing_more(
        db: Database, config: Config) -> None:
    study_uid, _ = make_study(db, config)
    temp = config.storage.spool_dir / study_uid / ".late.dcm.1.x.tmp"
    temp.write_bytes(b"being written")  # a late instance's temp file
    assert purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND).instances == 2
    assert temp.exists()  # the folder is not empty: it stays
    again = purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND)
    assert (again.instances, again.results) == (0, 0)


def test_files_already_gone_are_marked_with_no_bytes(db: Database, config: Config) -> None:
    _, files = make_study(db, config)
    files[0].unlink()  # e.g. removed before a crash, the row left unmarked
    report = purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND)
    assert (report.instances, report.spool_bytes) == (2, 1000)
    assert all(purged_at(db, Instance, p) is not None for p in files)


# ------------------------------------------------------------------ dry run and records


def test_a_dry_run_counts_and_changes_nothing(db: Database, config: Config) -> None:
    _, files = make_study(db, config)
    result = make_result(db, config, [DeliveryState.DONE])
    make_result(db, config, [DeliveryState.PENDING])
    report = purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND, dry_run=True)
    assert (report.studies, report.instances, report.spool_bytes, report.results,
            report.result_bytes, report.results_kept) == (1, 2, 2000, 1, 500, 1)
    assert all(p.exists() for p in [*files, result])
    with db.session() as s:
        assert s.scalars(select(Purge)).all() == []
        assert s.scalars(select(Instance.purged_at)).all() == [None, None]


def test_each_purge_is_recorded_and_status_counts_what_is_on_disk(
        db: Database, config: Config) -> None:
    make_study(db, config)
    make_study(db, config, at=utcnow(), size=300)
    make_result(db, config, [DeliveryState.DONE])
    kept = make_result(db, config, [DeliveryState.PENDING], size=700)
    with db.session() as s:
        before = storage_status(config, s)
    assert (before["spool_bytes"], before["results_bytes"]) == (2600, 1200)
    assert before["last_purge"] is None and before["retention_days"] == 5
    purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND, actor="tester@host")
    with db.session() as s:
        after = storage_status(config, s)
    assert (after["spool_bytes"], after["results_bytes"]) == (600, kept.stat().st_size)
    assert after["purged"] == {"instances": 2, "results": 1}
    last = after["last_purge"]
    assert (last["trigger"], last["actor"], last["studies"], last["instances"],
            last["spool_bytes"], last["results"], last["result_bytes"],
            last["results_kept"]) == ("command", "tester@host", 1, 2, 2000, 1, 500, 1)
    assert last["at"].endswith("Z") and last["before"].endswith("Z")
    holds = [h for fs in after["file_systems"] for h in fs["holds"]]
    assert sorted(holds) == ["results", "spool"]
    assert all(fs["free_bytes"] > 0 for fs in after["file_systems"])


# ------------------------------------------------------------------------------ reprocess


def test_reprocess_cannot_reach_a_purged_study(db: Database, config: Config) -> None:
    purged_uid, _ = make_study(db, config)
    kept_uid, _ = make_study(db, config, at=utcnow())
    purge(db, config, CUTOFF, trigger=TRIGGER_COMMAND)
    assert purged_studies(db, [purged_uid, kept_uid]) == [purged_uid]
    assert requeue_study(db, purged_uid) == 0  # skipped: no job for a missing file
    assert requeue_study(db, kept_uid) == 2
    with db.session() as s:
        pending = s.scalars(select(Job.study_instance_uid).where(
            Job.state == JobState.PENDING.value).distinct()).all()
    assert pending == [kept_uid]


# ------------------------------------------------------------------------------ migration


def test_a_schema_3_database_migrates_to_purged_at(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    db.dispose()
    conn = sqlite3.connect(path)
    conn.executescript("""
        ALTER TABLE instances DROP COLUMN purged_at;
        ALTER TABLE results DROP COLUMN purged_at;
        DROP TABLE purges;
        DELETE FROM schema_version WHERE version > 3;
    """)
    conn.commit()
    conn.close()
    db = Database(f"sqlite:///{path}")
    assert db.migrate() == SCHEMA_VERSION
    with db.session() as s:
        assert s.scalars(select(Instance.purged_at)).all() == []
        assert s.scalars(select(Purge)).all() == []
    db.dispose()


def test_storage_status_reports_a_results_folder_it_cannot_read(
        db: Database, config: Config) -> None:
    """A results folder replaced by a file (a fault status is asked about): the storage
    section says so instead of failing the whole status."""
    import shutil

    results = config.results.results_dir
    shutil.rmtree(results, ignore_errors=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("not a folder")
    with db.session() as s:
        doc = storage_status(config, s)
    assert doc["results_bytes"] is None
    assert "cannot read" in doc["results_error"]
