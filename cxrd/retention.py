"""Retention: remove the files that are no longer needed, keep the rows that record them.

``[storage] retention_days`` (0: keep for ever) makes the running node purge now and then
(``cxrd.node``); ``cxrd purge --before DATE`` runs the same purge by hand. A purge with
cutoff ``before`` removes:

- the spool files (received instances) of each study finished before the cutoff, by the
  rule ``cxrd.queue.study_finished_before`` (reported or nothing to do, no open job, no
  unanswered failure, no activity since), and the study's folder once it is empty;
- the result files (SR, SC) created before the cutoff that the outbox lets go
  (``cxrd.outbox.result_may_go``: delivered to every destination, or dead).

Before a spool file goes, the instance's SHA-256 is recorded if it never was (ingest
computes it only when a UID comes twice: ``cxrd.ingest``), so a copy the PACS sends again
after the purge is still told apart from a conflicting one. It is computed outside the
purge's transaction (``_record_digests``), in batches of short transactions.

Every row stays; ``purged_at`` marks the files removed, so ``cxrd status`` counts only
what is on disk and ``cxrd reprocess`` names the studies it can no longer reach. Each run
is recorded in ``purges`` (``status`` shows the last one).

Work goes in batches, one transaction each: the rows are read (and locked on PostgreSQL,
where nodes share the queue), the files unlinked, each folder touched fsynced once, then
the rows marked and committed. A crash in between leaves rows unmarked whose files are
gone; the next purge marks them (a missing file counts as removed, with 0 bytes).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from cxrd.config import Config
from cxrd.db import Database, Instance, Purge, Result, Study, utcnow
from cxrd.durable import fsync_dir
from cxrd.errors import ObjectMissing, StoreError
from cxrd.ingest import NO_DIGEST, object_digest
from cxrd.outbox import result_may_go
from cxrd.queue import study_finished_before
from cxrd.store import NodeStore, local_folders, open_node_store, store_location

log = logging.getLogger(__name__)

#: Studies (or results) per transaction: the write lock is held while their files go.
BATCH = 50
TRIGGER_RETENTION = "retention"  # the node's periodic purge
TRIGGER_COMMAND = "command"  # cxrd purge


@dataclass
class PurgeReport:
    """What one purge removed (or, in a dry run, would remove) and kept."""

    before: dt.datetime
    studies: int = 0
    instances: int = 0
    spool_bytes: int = 0
    results: int = 0
    result_bytes: int = 0
    #: results older than the cutoff kept because a delivery of theirs is still pending
    results_kept: int = 0
    errors: int = 0
    dry_run: bool = False
    studies_purged: list[str] = field(default_factory=list, repr=False)

    @property
    def bytes(self) -> int:
        return self.spool_bytes + self.result_bytes


def cutoff_for(retention_days: int, now: dt.datetime | None = None) -> dt.datetime:
    """The cutoff of the node's periodic purge: ``retention_days`` ago (UTC)."""
    return (utcnow() if now is None else now) - dt.timedelta(days=retention_days)


def _lock(query: Any, db: Database) -> Any:
    # PostgreSQL: a row another node is purging (or changing) is skipped, not waited for.
    # SQLite needs nothing: BEGIN IMMEDIATE already serialises the transaction.
    return query if db.is_sqlite else query.with_for_update(skip_locked=True)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _remove(objects: NodeStore, key: str) -> tuple[bool, int, Path | None]:
    """Remove the object under ``key``: (done, bytes freed, the local folder it was in, to
    fsync once per batch). A local file is unlinked here (its folder synced by the caller,
    once per batch); an S3 object deleted. One already gone counts as done, 0 bytes; any
    other error is logged and leaves the row unmarked (the next purge tries again)."""
    path = objects.local_path(key)
    if path is None:
        try:
            size = objects.head(key) or 0
            objects.delete(key)
        except StoreError as exc:
            log.error("action=purge-file-failed key=%s error=%s", key, exc)
            return False, 0, None
        return True, size, None
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return True, 0, None
    except OSError as exc:
        log.error("action=purge-file-failed path=%s error=%s", path, exc)
        return False, 0, None
    return True, size, path.parent


def _sync(folders: Iterable[Path], spool_dir: Path) -> None:
    """Make the unlinks durable: an emptied study folder is removed and the spool folder
    fsynced once; any other folder touched is fsynced once."""
    parents: set[Path] = set()
    for folder in folders:
        if folder.parent == spool_dir:
            try:
                folder.rmdir()  # only when empty: a late instance's temp file keeps it
                parents.add(spool_dir)
                continue
            except FileNotFoundError:
                continue
            except OSError:
                pass
        parents.add(folder)
    _fsync_all(parents)


def _fsync_all(folders: Iterable[Path]) -> None:
    for folder in sorted(folders):
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(folder)


def _record_digests(db: Database, objects: NodeStore, before: dt.datetime,
                    stop: threading.Event | None) -> int:
    """Record the SHA-256 of every instance that the purge is about to remove and whose
    digest was never computed: read outside any transaction (a 10 MB file takes about
    8 ms), written in one short transaction per batch. Returns the number recorded."""
    done = 0
    last_id = 0
    while stop is None or not stop.is_set():
        with db.session() as s:
            rows = s.execute(select(Instance.id, Instance.path).where(
                Instance.id > last_id, Instance.sha256 == NO_DIGEST,
                Instance.purged_at.is_(None),
                Instance.study_instance_uid.in_(select(Study.study_instance_uid).where(
                    study_finished_before(before))),
            ).order_by(Instance.id).limit(BATCH)).all()
        if not rows:
            return done
        last_id = rows[-1].id
        digests: dict[int, str] = {}
        for instance_id, key in rows:
            try:
                digests[instance_id] = object_digest(objects, key)
            except ObjectMissing:
                continue  # gone already: nothing to compare a resend with
            except (OSError, StoreError) as exc:
                log.error("action=purge-digest-failed instance_id=%d error=%s", instance_id,
                          getattr(exc, "strerror", None) or type(exc).__name__)
        if digests:
            with db.session() as s:
                for instance_id, digest in digests.items():
                    s.execute(update(Instance).where(
                        Instance.id == instance_id, Instance.sha256 == NO_DIGEST).values(
                        sha256=digest))
            done += len(digests)
    return done


def _purge_spool(db: Database, objects: NodeStore, report: PurgeReport,
                 stop: threading.Event | None) -> None:
    spool_dir = objects.spool_dir
    _record_digests(db, objects, report.before, stop)
    last_id = 0
    while stop is None or not stop.is_set():
        now = utcnow()
        with db.session() as s:
            studies = s.scalars(_lock(select(Study).where(
                Study.id > last_id, study_finished_before(report.before),
                Study.study_instance_uid.in_(select(Instance.study_instance_uid).where(
                    Instance.purged_at.is_(None))),
            ).order_by(Study.id).limit(BATCH), db)).all()
            if not studies:
                return
            last_id = studies[-1].id
            folders: set[Path] = set()
            done: list[tuple[str, int, int]] = []
            for study in studies:
                instances = s.scalars(select(Instance).where(
                    Instance.study_instance_uid == study.study_instance_uid,
                    Instance.purged_at.is_(None))).all()
                count = freed = 0
                for inst in instances:
                    ok, size, folder = _remove(objects, inst.path)
                    if not ok:
                        report.errors += 1
                        continue
                    inst.purged_at = now
                    if folder is not None:
                        folders.add(folder)
                    count += 1
                    freed += size
                if count:
                    done.append((study.study_instance_uid, count, freed))
            if spool_dir is not None:
                _sync(folders, spool_dir)
        for uid, count, freed in done:  # committed
            report.studies += 1
            report.instances += count
            report.spool_bytes += freed
            report.studies_purged.append(uid)
            log.info("action=purged-study study_instance_uid=%s instances=%d bytes=%d",
                     uid, count, freed)


def _old_results(before: dt.datetime) -> Any:
    return select(Result).where(Result.created_at < before, result_may_go())


def _purge_results(db: Database, objects: NodeStore, report: PurgeReport,
                   stop: threading.Event | None) -> None:
    last_id = 0
    while stop is None or not stop.is_set():
        now = utcnow()
        with db.session() as s:
            results = s.scalars(_lock(_old_results(report.before).where(
                Result.id > last_id).order_by(Result.id).limit(BATCH), db)).all()
            if not results:
                return
            last_id = results[-1].id
            folders: set[Path] = set()
            done: list[tuple[str, str, int]] = []
            for result in results:
                ok, size, folder = _remove(objects, result.path)
                if not ok:
                    report.errors += 1
                    continue
                result.purged_at = now
                if folder is not None:
                    folders.add(folder)
                done.append((result.sop_instance_uid, result.kind, size))
            _fsync_all(folders)
        for uid, kind, size in done:  # committed
            report.results += 1
            report.result_bytes += size
            log.debug("action=purged-result sop_instance_uid=%s kind=%s bytes=%d", uid, kind,
                      size)


def _kept_results(s: Session, before: dt.datetime) -> int:
    """Results older than the cutoff that stay because a delivery is still pending."""
    return int(s.scalar(select(func.count()).select_from(Result).where(
        Result.created_at < before, Result.purged_at.is_(None),
        ~result_may_go())) or 0)


def _size_of(objects: NodeStore, key: str) -> int:
    path = objects.local_path(key)
    if path is not None:
        return _size(path) or 0
    try:
        return objects.head(key) or 0
    except StoreError:
        return 0


def _dry_run(db: Database, objects: NodeStore, report: PurgeReport) -> None:
    with db.session() as s:
        finished = select(Study.study_instance_uid).where(study_finished_before(report.before))
        studies, instances, size = s.execute(select(
            func.count(func.distinct(Instance.study_instance_uid)), func.count(),
            func.coalesce(func.sum(Instance.size), 0)).where(
            Instance.purged_at.is_(None), Instance.study_instance_uid.in_(finished))).one()
        report.studies, report.instances, report.spool_bytes = (
            int(studies), int(instances), int(size))
        paths = s.scalars(select(Result.path).where(
            Result.created_at < report.before, result_may_go())).all()
        report.results = len(paths)
        report.result_bytes = sum(_size_of(objects, p) for p in paths)
        report.results_kept = _kept_results(s, report.before)


def purge(db: Database, config: Config, before: dt.datetime, *, trigger: str,
          actor: str | None = None, dry_run: bool = False,
          stop: threading.Event | None = None,
          objects: NodeStore | None = None) -> PurgeReport:
    """Remove the spool files and results that retention lets go before ``before`` (naive
    UTC), record the run in ``purges`` and log it; ``dry_run`` only counts (the spool's
    bytes as recorded at receipt) and records nothing. ``stop`` ends it between batches
    (a node draining). ``objects``: the node's store (``[storage] store``), opened here
    when not given: a local file is unlinked, an S3 object deleted."""
    if objects is None:
        objects = open_node_store(config)
    report = PurgeReport(before=before, dry_run=dry_run)
    if dry_run:
        _dry_run(db, objects, report)
        return report
    _purge_spool(db, objects, report, stop)
    _purge_results(db, objects, report, stop)
    with db.session() as s:
        report.results_kept = _kept_results(s, before)
        s.add(Purge(at=utcnow(), before=before, trigger=trigger, actor=actor,
                    studies=report.studies, instances=report.instances,
                    spool_bytes=report.spool_bytes, results=report.results,
                    result_bytes=report.result_bytes, results_kept=report.results_kept))
    removed = report.instances or report.results
    log.log(logging.INFO if removed or trigger == TRIGGER_COMMAND else logging.DEBUG,
            "action=purge trigger=%s before=%sZ studies=%d instances=%d spool_bytes=%d "
            "results=%d result_bytes=%d results_kept=%d errors=%d", trigger,
            before.isoformat(timespec="seconds"), report.studies, report.instances,
            report.spool_bytes, report.results, report.result_bytes, report.results_kept,
            report.errors)
    return report


def purged_studies(db: Database, study_uids: Iterable[str]) -> list[str]:
    """Those of ``study_uids`` with a received instance whose spool file was purged: a
    reprocess can no longer reach them."""
    uids = list(study_uids)
    found: set[str] = set()
    with db.session() as s:
        for i in range(0, len(uids), 500):
            found.update(s.scalars(select(Instance.study_instance_uid).where(
                Instance.study_instance_uid.in_(uids[i:i + 500]),
                Instance.purged_at.is_not(None)).distinct()).all())
    return [u for u in uids if u in found]


# ------------------------------------------------------------------------------ status


def _folder_bytes(folder: Path) -> tuple[int | None, str | None]:
    """The bytes of the regular files directly in ``folder`` (the results folder is flat),
    or None and why when the folder cannot be read (status reports it; it must not fail
    for it: a broken results folder is one of the things status is asked about)."""
    total = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return 0, None
    except OSError as exc:
        return None, f"cannot read {folder}: {exc.strerror or type(exc).__name__}"
    return total, None


def storage_status(config: Config, s: Session) -> dict[str, Any]:
    """``status``'s ``storage``: the bytes in use (the spool's from its rows, the results
    folder's from its files), the free space of each file system holding them, what has
    been purged, and the last purge."""
    spool_bytes = int(s.scalar(select(func.coalesce(func.sum(Instance.size), 0)).where(
        Instance.purged_at.is_(None))) or 0)
    spool_dir, results_dir = local_folders(config)
    folders = {name: folder for name, folder in (("spool", spool_dir), ("results", results_dir))
               if folder is not None} or {"data_dir": config.storage.data_dir}
    file_systems: dict[int, dict[str, Any]] = {}
    for name, folder in folders.items():
        probe = folder if folder.exists() else config.storage.data_dir
        try:
            device = probe.stat().st_dev
            usage = shutil.disk_usage(probe)
        except OSError:
            continue
        entry = file_systems.setdefault(device, {"path": str(probe), "holds": [],
                                                 "free_bytes": usage.free,
                                                 "total_bytes": usage.total})
        entry["holds"].append(name)
    last = s.scalars(select(Purge).order_by(Purge.id.desc()).limit(1)).first()
    purged = defaultdict(int)
    purged["instances"] = int(s.scalar(select(func.count()).select_from(Instance).where(
        Instance.purged_at.is_not(None))) or 0)
    purged["results"] = int(s.scalar(select(func.count()).select_from(Result).where(
        Result.purged_at.is_not(None))) or 0)
    results_bytes, results_error = (_folder_bytes(results_dir) if results_dir is not None else
                                    (None, "in the object store, not counted"))
    return {
        "store": store_location(config),
        "retention_days": config.storage.retention_days,
        "spool_bytes": spool_bytes,
        "results_bytes": results_bytes,
        "results_error": results_error,
        "file_systems": list(file_systems.values()),
        "purged": dict(purged),
        "last_purge": None if last is None else {
            "at": last.at.isoformat() + "Z",
            "before": last.before.isoformat() + "Z",
            "trigger": last.trigger,
            "actor": last.actor,
            "studies": last.studies,
            "instances": last.instances,
            "spool_bytes": last.spool_bytes,
            "results": last.results,
            "result_bytes": last.result_bytes,
            "results_kept": last.results_kept,
        },
    }


def report_dict(report: PurgeReport) -> dict[str, Any]:
    doc = asdict(report)
    doc.pop("studies_purged")
    doc["before"] = report.before.isoformat() + "Z"
    return doc
