"""Ingest: validate a DICOM object, spool it durably, commit its row. Shared by the watched
folder (``cxrd.watch``) and the DICOM receiver.

Order of operations, which is what makes a crash at any point safe:

1. parse the header (never the pixels: decoding belongs to the workers);
2. write the bytes to ``spool/<study>/<sop>.dcm`` through a temp file, fsync, rename,
   fsync the directory (a rerun after a crash rewrites the same path);
3. commit the instance row and the study's ``last_received_at``;
4. only then acknowledge: remove the watched file, or answer Success to the C-STORE.

A duplicate (same SOP Instance UID and same bytes) is recorded once; the same UID with
other bytes is refused and the first copy kept.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import select

from cxrd.db import Database, Instance, Rejection, Study, utcnow
from cxrd.domain import InstanceState, RejectReason, StudyState
from cxrd.uids import is_valid_uid

log = logging.getLogger(__name__)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: The SOP classes cxrd stores (dicom-output.md section 5).
ACCEPTED_SOP_CLASSES = {
    CR: "Computed Radiography Image Storage",
    DX_PRESENTATION: "Digital X-Ray Image Storage - For Presentation",
    DX_PROCESSING: "Digital X-Ray Image Storage - For Processing",
    SECONDARY_CAPTURE: "Secondary Capture Image Storage",
}
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one offered object."""

    accepted: bool
    duplicate: bool = False
    reason: RejectReason | None = None
    detail: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    rejection_id: int | None = None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either nothing or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def parse_header(data: bytes) -> Dataset:
    """Parse everything but the pixel values (deferred), or raise InvalidDicomError."""
    try:
        return pydicom.dcmread(io.BytesIO(data), defer_size=1024)
    except InvalidDicomError:
        # No preamble: a bare data set, as some old tools write. Accept it only if it
        # parses to something with a SOP Instance UID.
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=1024, force=True)
        if "SOPInstanceUID" not in ds:
            raise
        return ds


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element raises when read; treat it as absent
        return ""
    return str(value or "").strip().upper()


def _as_part10(ds: Dataset, data: bytes) -> bytes:
    """The bytes to spool: unchanged when already a Part 10 file, else re-encoded."""
    if data[128:132] == b"DICM":
        return data
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    implicit = ds.original_encoding[0] if ds.original_encoding else True
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Ingestor:
    """Validates, spools and records objects. Thread-safe (one DB session per call)."""

    def __init__(self, db: Database, spool_dir: Path, rejected_dir: Path) -> None:
        self.db = db
        self.spool_dir = spool_dir
        self.rejected_dir = rejected_dir

    # -- the watched folder ---------------------------------------------------------
    def ingest_file(self, path: Path, source: str) -> StoreOutcome:
        """Ingest one file; on success or duplicate the file is removed, on refusal it is
        moved to ``rejected/`` with a ``.reason.txt`` beside it."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            outcome = StoreOutcome(False, reason=RejectReason.UNREADABLE, detail=str(exc))
        else:
            outcome = self.store(data, source, name=path.name)
        if outcome.accepted:
            path.unlink(missing_ok=True)
        elif outcome.reason is not RejectReason.STORAGE_FAILED:
            self._move_rejected(path, outcome)
        return outcome

    def _move_rejected(self, path: Path, outcome: StoreOutcome) -> None:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        stamp = utcnow().strftime("%Y%m%dT%H%M%S%f")
        target = self.rejected_dir / f"{stamp}-{path.name}"
        try:
            shutil.move(str(path), target)
        except OSError as exc:
            log.error("action=reject-move file=%s error=%s", path.name, exc)
            return
        (target.parent / (target.name + ".reason.txt")).write_text(
            f"reason: {outcome.reason}\ndetail: {outcome.detail}\n"
        )
        if outcome.rejection_id is not None:
            with self.db.session() as s:
                row = s.get(Rejection, outcome.rejection_id)
                if row is not None:
                    row.moved_to = str(target)

    # -- shared by the folder and the receiver ---------------------------------------
    def store(self, data: bytes, source: str, *, name: str = "",
              expected_sop_class: str | None = None) -> StoreOutcome:
        """Validate, spool and commit one object given as bytes (Part 10 or bare)."""
        try:
            ds = parse_header(data)
        except Exception as exc:  # pydicom raises many types on garbage
            return self.reject(source, name, RejectReason.NOT_DICOM,
                               f"not a DICOM file: {type(exc).__name__}: {exc}")
        missing = [k for k in _REQUIRED_UIDS if not _text(ds, k)]
        if missing:
            return self.reject(source, name, RejectReason.MISSING_UID,
                               f"missing {', '.join(missing)}")
        uids = {k: str(ds.get(k)).strip() for k in _REQUIRED_UIDS}
        bad = [k for k, v in uids.items() if not is_valid_uid(v)]
        if bad:
            return self.reject(source, name, RejectReason.INVALID_UID,
                               f"invalid {', '.join(bad)}")
        sop_class, sop_uid, study_uid = (uids["SOPClassUID"], uids["SOPInstanceUID"],
                                         uids["StudyInstanceUID"])
        if expected_sop_class and sop_class != expected_sop_class:
            return self.reject(source, sop_uid, RejectReason.SOP_CLASS_MISMATCH,
                               f"data set SOP class {sop_class} sent as {expected_sop_class}")
        if sop_class not in ACCEPTED_SOP_CLASSES:
            return self.reject(source, sop_uid, RejectReason.UNSUPPORTED_SOP_CLASS,
                               f"SOP class {sop_class} is not CR, DX or Secondary Capture")
        try:
            part10 = _as_part10(ds, data)
        except Exception as exc:
            return self.reject(source, sop_uid, RejectReason.UNREADABLE,
                               f"cannot re-encode bare data set: {exc}")
        digest = hashlib.sha256(part10).hexdigest()
        with self.db.session() as s:
            existing = s.scalars(select(Instance).where(
                Instance.sop_instance_uid == sop_uid)).first()
            if existing is not None:
                same = existing.sha256 == digest
        if existing is not None:
            if same:
                log.info("action=duplicate sop_instance_uid=%s study_instance_uid=%s source=%s",
                         sop_uid, study_uid, source)
                return StoreOutcome(True, duplicate=True, sop_instance_uid=sop_uid,
                                    study_instance_uid=study_uid)
            return self.reject(source, sop_uid, RejectReason.CONFLICTING_DUPLICATE,
                               "an instance with this SOP Instance UID and other content "
                               "was stored before; the first one is kept")
        spool = self.spool_dir / study_uid / f"{sop_uid}.dcm"
        try:
            atomic_write(spool, part10)
            self._commit(ds, uids, spool, digest, len(part10), source)
        except Exception as exc:  # disk full, database down: the sender may retry
            log.error("action=store-failed sop_instance_uid=%s reason=%s error=%s",
                      sop_uid, RejectReason.STORAGE_FAILED.value, exc)
            try:
                self._record(source, sop_uid, RejectReason.STORAGE_FAILED, str(exc))
            except Exception:
                log.error("action=store-failed-unrecorded sop_instance_uid=%s", sop_uid)
            return StoreOutcome(False, reason=RejectReason.STORAGE_FAILED, detail=str(exc),
                                sop_instance_uid=sop_uid, study_instance_uid=study_uid)
        log.info("action=stored sop_instance_uid=%s study_instance_uid=%s sop_class=%s "
                 "bytes=%d source=%s", sop_uid, study_uid, sop_class, len(part10), source)
        return StoreOutcome(True, sop_instance_uid=sop_uid, study_instance_uid=study_uid)

    def _commit(self, ds: Dataset, uids: dict[str, str], spool: Path, digest: str,
                size: int, source: str) -> None:
        now = utcnow()
        meta = getattr(ds, "file_meta", None)
        tsuid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        with self.db.session() as s:
            s.add(Instance(
                sop_instance_uid=uids["SOPInstanceUID"],
                study_instance_uid=uids["StudyInstanceUID"],
                series_instance_uid=uids["SeriesInstanceUID"],
                sop_class_uid=uids["SOPClassUID"],
                transfer_syntax_uid=tsuid,
                modality=_text(ds, "Modality")[:16],
                body_part=_text(ds, "BodyPartExamined")[:64],
                view_position=_text(ds, "ViewPosition")[:16],
                presentation_intent=_text(ds, "PresentationIntentType")[:32],
                photometric=_text(ds, "PhotometricInterpretation")[:16],
                has_pixels="PixelData" in ds or "FloatPixelData" in ds,
                frames=frames,
                path=str(spool),
                sha256=digest,
                size=size,
                source=source[:256],
                received_at=now,
                state=InstanceState.RECEIVED.value,
            ))
            study = s.scalars(select(Study).where(
                Study.study_instance_uid == uids["StudyInstanceUID"])).first()
            if study is None:
                s.add(Study(study_instance_uid=uids["StudyInstanceUID"],
                            state=StudyState.COLLECTING.value, first_received_at=now,
                            last_received_at=now))
            else:
                # A late instance reopens the study; the next SR will supersede the last.
                study.state = StudyState.COLLECTING.value
                study.last_received_at = now

    def reject(self, source: str, name: str, reason: RejectReason, detail: str) -> StoreOutcome:
        """Record and log a refusal; nothing is spooled.

        File names can carry patient names, so the log names the rejection row (and the
        UID when there is one), never the file; the row and ``rejected/`` keep the name.
        """
        uid = name if is_valid_uid(name) else ""
        rejection_id: int | None = None
        try:
            rejection_id = self._record(source, name, reason, detail)
        except Exception as exc:
            log.error("action=reject-unrecorded sop_instance_uid=%s error=%s", uid, exc)
        log.warning("action=rejected rejection_id=%s sop_instance_uid=%s reason=%s detail=%s",
                    rejection_id, uid, reason.value, detail)
        return StoreOutcome(False, reason=reason, detail=detail, sop_instance_uid=uid,
                            rejection_id=rejection_id)

    def _record(self, source: str, name: str, reason: RejectReason, detail: str) -> int:
        with self.db.session() as s:
            row = Rejection(source=source[:256], name=name, reason=reason.value,
                            detail=detail[:2000])
            s.add(row)
            s.flush()
            return row.id
