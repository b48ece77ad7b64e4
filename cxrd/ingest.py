"""Ingest: validate a DICOM object, spool it durably, commit its row. Shared by the watched
folder (``cxrd.watch``) and the DICOM receiver.

Order of operations, which is what makes a crash at any point safe:

1. parse the header (never the pixels: decoding belongs to the workers);
2. write the bytes to a temp file beside ``spool/<study>/<sop>.dcm`` and fsync it (a new
   study folder is first fsynced into the spool folder): ``cxrd.durable``;
3. in one transaction: insert the instance row (which claims the UID), update the study,
   rename the temp file to its final path, fsync the directory, commit (a rerun after a
   crash rewrites the same path). Instances stored at the same moment (several
   associations) share that transaction (``_GroupCommit``);
4. only then acknowledge: remove the watched file, or answer Success to the C-STORE.

A duplicate (same SOP Instance UID and same bytes) is recorded once; the same UID with
other bytes is refused and the first copy kept. The SHA-256 digest that tells the two apart
is computed only when a UID comes a second time (``_same_content``): hashing every 10 MB
instance as it arrived cost about 8 ms of CPU, a seventh of all the work an image takes,
for a question that resends alone ask. Until then ``instances.sha256`` is empty; the
stored copy's digest is computed from its spool file when first needed, and kept, and
retention records it before it removes the file (``cxrd.retention``).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import shutil
import stat
import struct
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from cxrd import durable
from cxrd.db import Database, Instance, Rejection, Study, utcnow
from cxrd.dicom import ACCEPTED_SOP_CLASSES, DEFLATED
from cxrd.domain import InstanceState, RejectReason, StudyState
from cxrd.errors import ObjectMissing
from cxrd.imagesize import deflated_too_large, too_large
from cxrd.metrics import metrics
from cxrd.space import FreeSpace
from cxrd.store import LocalStore, NodeStore, spool_key
from cxrd.uids import is_valid_uid

log = logging.getLogger(__name__)

_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
UNDEFINED_LENGTH = 0xFFFFFFFF
#: Beside each file moved to ``rejected/``: why it was refused.
REASON_SUFFIX = ".reason.txt"
#: Refusals that say nothing about the file: a watched file stays where it is.
_LEAVE_IN_PLACE = (RejectReason.STORAGE_FAILED, RejectReason.DISK_LOW)


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
    #: Once the header was read and its UIDs found valid (a STOW-RS response names it).
    sop_class_uid: str = ""


class IncompleteFile(ValueError):
    """The data set ends before its last element does: the file is truncated."""


def _check_complete(ds: Dataset, size: int) -> None:
    """Raise IncompleteFile when an element's value runs past the end of the data.

    pydicom reads a truncated file without complaint (deferred values are skipped with a
    seek, short reads are kept short), so a half-copied file would be spooled as if whole.
    """
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)  # no read of deferred (pixel) values
        if not isinstance(elem, RawDataElement) or elem.length == UNDEFINED_LENGTH:
            continue
        end = elem.value_tell + elem.length
        if end > size:
            raise IncompleteFile(
                f"truncated: element {tag} needs {end} bytes, the data set has {size}")


def parse_header(data: bytes) -> Dataset:
    """Parse everything but the pixel values (deferred), or raise InvalidDicomError
    (not DICOM) or IncompleteFile (truncated)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=1024)
    except InvalidDicomError:
        # No preamble: a bare data set, as some old tools write. Accept it only if it
        # parses to something with a SOP Instance UID.
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=1024, force=True)
        if "SOPInstanceUID" not in ds:
            raise
    if len(ds) == 0:
        # pydicom drops the whole data set when it hits the end of the file inside an
        # undefined-length item: bytes beyond the file meta that yield nothing are a
        # truncated data set; a file that ends with its meta has none at all.
        meta = getattr(ds, "file_meta", None)
        try:
            group_length = int(meta.get("FileMetaInformationGroupLength", 0) or 0) if meta else 0
        except (TypeError, ValueError):
            group_length = 0
        meta_end = 132 + 12 + group_length if data[128:132] == b"DICM" else 0
        if group_length and len(data) > meta_end:
            raise IncompleteFile("truncated: no data set element could be read whole")
        raise InvalidDicomError("no data set: the file holds no data elements")
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in DEFLATED:
        # (a deflated data set is inflated in memory: its offsets are not file offsets)
        _check_complete(ds, len(data))
    return ds


#: A watched file is read this far first. When its header and the position of its pixel
#: data are known from these bytes (``native_header``), the rest is not read at all.
HEAD_BYTES = 256 * 1024
_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def native_header(head: bytes, size: int) -> Dataset | None:
    """The header of a Part 10 file of ``size`` bytes from its first bytes ``head``, when
    that is all ingest needs to read of it; else None (read the whole file).

    That is when the file is in a native little-endian syntax and its Pixel Data, of a
    defined length, is its last element and ends exactly at the end of the file: every
    element before it was then read whole from ``head`` (pydicom reads elements in order,
    and it reached the Pixel Data's header), and the pixel values, which ingest never
    looks at, are the rest of the file. Anything else (compressed, deflated or bare data,
    elements after the pixels, a header longer than ``head``) returns None."""
    if len(head) >= size or head[128:132] != b"DICM":
        return None
    try:
        ds = pydicom.dcmread(io.BytesIO(head), defer_size=1024)
        meta = ds.file_meta
        if meta.get("TransferSyntaxUID") not in _NATIVE_SYNTAXES:
            return None
        pixels = ds.get_item("PixelData", keep_deferred=True)
    except Exception:
        return None  # the whole file is read, and its parse says what is wrong
    if (not isinstance(pixels, RawDataElement) or pixels.length == UNDEFINED_LENGTH
            or pixels.value_tell > len(head) or pixels.value_tell + pixels.length != size
            or ds.keys() and max(ds.keys()) != pixels.tag):
        return None
    return ds


@dataclass(eq=False)
class _Content:
    """An object's bytes as ingest reads them: all of them (``rest`` None), or a watched
    file's first bytes with its header parsed (``native_header``) and ``rest``, which reads
    the others from the open file only if they are needed: to compare the file with a
    stored copy of the same UID, to copy it when it cannot be linked, or to put it in an
    object store. A spooled hard link needs none of them."""

    head: bytes
    size: int
    header: Dataset | None = None
    rest: Callable[[], bytes] | None = None

    @classmethod
    def of(cls, data: bytes) -> _Content:
        return cls(data, len(data))

    def whole(self) -> bytes:
        """All the bytes; OSError when the file no longer has the size it had."""
        if self.rest is not None:
            data = self.head + self.rest()
            if len(data) != self.size:
                raise OSError(f"the file changed while it was read ({self.size} bytes, "
                              f"then {len(data)})")
            self.head, self.rest = data, None
        return self.head


def _ascii_value(ds: Dataset, keyword: str) -> str:
    """A UI or CS value as text, read from the raw element when it has not been converted
    yet (both VRs are ASCII by definition): converting through pydicom's value validation
    was a tenth of the receiver's time on small images. Several values stay joined by
    backslashes; a missing or malformed element is empty."""
    try:
        elem = ds.get_item(keyword, keep_deferred=True)
        if elem is None:
            return ""
        if isinstance(elem, RawDataElement):
            raw = elem.value
            if isinstance(raw, bytes):
                return raw.decode("ascii", "replace").strip("\x00 ")
            return ""
        value = elem.value
    except Exception:  # a malformed element raises when read; treat it as absent
        return ""
    return str(value or "").strip()


def _text(ds: Dataset, keyword: str) -> str:
    return _ascii_value(ds, keyword).upper()


def _uid(ds: Dataset, keyword: str) -> str:
    return _ascii_value(ds, keyword)


def _as_part10(ds: Dataset, data: bytes) -> bytes:
    """The bytes to spool: unchanged when already a Part 10 file, else re-encoded."""
    if data[128:132] == b"DICM":
        return data
    old_meta = getattr(ds, "file_meta", None)
    transfer_syntax: str = str(old_meta.get("TransferSyntaxUID", "")) if old_meta else ""
    if not transfer_syntax:
        # A bare data set: its encoding is what pydicom found while reading it. Nothing
        # names the codec of compressed (encapsulated) pixel data, so that is refused.
        pixel = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
        if isinstance(pixel, RawDataElement) and pixel.length == UNDEFINED_LENGTH:
            raise ValueError("a bare data set with compressed pixel data names no "
                             "transfer syntax")
        implicit, little = ds.original_encoding
        if implicit is None or little is None or implicit:
            if little is False:
                raise ValueError("implicit VR big endian is not a DICOM transfer syntax")
            transfer_syntax = ImplicitVRLittleEndian
        else:
            transfer_syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _meta_element(group_element: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", 0x0002, group_element)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10(dataset: Sequence[bytes | bytearray | memoryview], sop_class_uid: str,
           sop_instance_uid: str, transfer_syntax: str, implementation_uid: str,
           implementation_version: str) -> bytes:
    """A data set as received (C-STORE), in one piece or in the fragments it came in,
    framed as a Part 10 file: preamble, ``DICM`` and the File Meta Information (PS3.10
    7.1), the data set's bytes unchanged (copied once, into the result).

    The same bytes as pynetdicom's ``Event.encoded_dataset()``, without building and
    writing a pydicom FileMetaDataset: at hundreds of small instances a second that was a
    fifth of the receiver's time."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _even(implementation_uid, b"\x00")),
        _meta_element(0x0013, b"SH", _even(implementation_version, b" ")),
    ))
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"".join((b"\x00" * 128, b"DICM", group_length, body, *dataset))


#: The instance stored under a SOP Instance UID (built once: SQLAlchemy caches its
#: compilation): its digest (empty until needed) and spool key.
_STORED = select(Instance.sha256, Instance.path).where(
    Instance.sop_instance_uid == bindparam("uid"))
#: Records a stored copy's digest once computed (``_same_content``).
_RECORD_DIGEST = update(Instance).where(
    Instance.sop_instance_uid == bindparam("uid"), Instance.sha256 == "").values(
    sha256=bindparam("digest"))
#: ``instances.sha256`` of an instance whose digest has not been needed yet.
NO_DIGEST = ""


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a spooled file (hex), read in 1 MB pieces."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def object_digest(store: NodeStore, key: str) -> str:
    """The SHA-256 of a spooled instance (hex): its local file read in pieces, or the
    object's bytes. ObjectMissing when it is gone; StoreUnavailable / StoreFailed as the
    store says."""
    path = store.local_path(key)
    if path is None:
        return hashlib.sha256(store.get(key)).hexdigest()
    try:
        return file_digest(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ObjectMissing(f"no file {path}") from exc


@dataclass(frozen=True)
class _Stored:
    """The row that holds a SOP Instance UID already (``_STORED``)."""

    sha256: str
    path: str  # the spool key


_INSERT_INSTANCE = insert(Instance)
_UPSERT_STUDY: dict[str, Any] = {}


def _upsert_study(conn: Connection) -> Any:
    """``INSERT ... ON CONFLICT DO UPDATE`` of a study row for the connection's dialect
    (both support it): a new study starts collecting at generation 1; a known one is
    reopened (collecting again, last received now). Atomic, so two first instances of a
    new study (several receivers, several nodes) make one row."""
    dialect = conn.dialect.name
    stmt = _UPSERT_STUDY.get(dialect)
    if stmt is None:
        base = (pg_insert if dialect == "postgresql" else sqlite_insert)(Study)
        stmt = _UPSERT_STUDY[dialect] = base.on_conflict_do_update(
            index_elements=["study_instance_uid"],
            set_={"state": base.excluded.state,
                  "last_received_at": base.excluded.last_received_at})
    return stmt


@dataclass(frozen=True)
class _Origin:
    """A watched file as it was read (its ``fstat`` before the read).

    Such a file is already on disk, and the watched folder (``data_dir/incoming`` by
    default) is usually on the spool's file system: the spool file can then be the same
    file under a second name, fsynced, instead of a copy of its bytes (a 10 MB write, and
    the disk written twice). Only when the file is cxrd's own (its owner could otherwise
    change the spooled bytes later), has no other name, and is unchanged since it was read:
    same inode, size and modification time, so the spooled bytes are the ones checked and
    hashed. Anything else is copied as before.
    """

    path: Path
    seen: os.stat_result

    def link_temp(self, spool: Path) -> Path | None:
        """The spool's temp file as a hard link of this file, or None: copy instead."""
        st = self.seen
        if not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()):
            return None
        try:
            tmp = durable.link_temp(spool, self.path)
        except FileNotFoundError:
            return None  # taken away meanwhile: the bytes read are still good to copy
        if tmp is None:
            return None
        now = os.stat(tmp)
        if (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) != (
                st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns):
            tmp.unlink(missing_ok=True)  # changed since it was read: copy what was read
            return None
        return tmp


@dataclass(eq=False)
class _Pending:
    """An instance spooled to its temp file (a local store; renamed to ``spool`` at the
    commit) or already put in the store (S3: ``tmp`` is None), waiting for the commit of
    its row."""

    ds: Dataset
    uids: dict[str, str]
    key: str
    spool: Path | None
    tmp: Path | None
    size: int
    source: str
    done: bool = False
    existing: _Stored | None = None  # the row that held its UID already: not committed
    error: BaseException | None = None


class _GroupCommit:
    """Commits the rows of instances that arrive together (several associations) in one
    transaction: one database sync and one fsync per folder for the whole group.

    Each caller queues its instance, then takes the leader lock. The leader commits every
    instance queued so far; a caller whose instance a previous leader committed finds it
    done and returns. No caller returns before its own row is committed and its rename's
    folder fsynced, so nothing is acknowledged early.

    With SQLite the leader also holds an flock on the spool folder, which queues the
    receiver processes sharing the database: a writer that finds SQLite locked sleeps in
    its busy handler (1, 2, 5, 10, ... ms) instead of waking when the lock is released.
    """

    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor
        self._leader = threading.Lock()
        self._mutex = threading.Lock()
        self._queue: list[_Pending] = []
        self._lock_fd: int | None = None

    def commit(self, item: _Pending) -> None:
        """Return once ``item`` is committed (``item.existing`` set when its UID was
        taken); raise what made its group's transaction fail."""
        with self._mutex:
            self._queue.append(item)
        with self._leader:
            if not item.done:
                with self._mutex:
                    group, self._queue = self._queue, []
                self._commit(group)
        if item.error is not None:
            raise item.error

    def _commit(self, group: list[_Pending]) -> None:
        ingestor = self._ingestor
        try:
            with self._interprocess_lock(), ingestor.db.engine.begin() as conn:
                taken: dict[str, _Stored] = {}  # UIDs of this group's earlier instances
                folders: dict[Path, None] = {}
                for item in group:
                    uid = item.uids["SOPInstanceUID"]
                    existing = taken.get(uid)
                    if existing is None:
                        row = conn.execute(_STORED, {"uid": uid}).first()
                        existing = None if row is None else _Stored(str(row.sha256),
                                                                    str(row.path))
                    if existing is not None:
                        item.existing = existing
                        continue
                    ingestor._add_rows(conn, item.ds, item.uids, item.key, item.size,
                                       item.source)
                    if item.tmp is not None and item.spool is not None:
                        os.replace(item.tmp, item.spool)
                        folders[item.spool.parent] = None
                    taken[uid] = _Stored(NO_DIGEST, item.key)
                for folder in folders:
                    durable.fsync_dir(folder)
        except BaseException as exc:
            for item in group:
                item.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            for item in group:
                item.done = True

    @contextmanager
    def _interprocess_lock(self) -> Iterator[None]:
        if not self._ingestor.db.is_sqlite:
            yield  # PostgreSQL locks rows and wakes waiters itself
            return
        if self._lock_fd is None:
            # On S3 the local spool folder holds nothing but this lock: made when missing.
            self._ingestor.spool_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self._ingestor.spool_dir, os.O_RDONLY)
            weakref.finalize(self, os.close, self._lock_fd)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)


class Ingestor:
    """Validates, spools and records objects. Thread-safe: the receiver stores from one
    thread per association, and their rows are committed in groups (``_GroupCommit``).

    ``store``: where instances go (``cxrd.store.open_node_store``); by default the local
    folder above ``spool_dir``, whose name must then be ``spool`` (the keys' layout). On
    a local store the spool file is renamed into place inside the row's transaction; on
    S3 the object is PUT first, then the row committed, then the instance acknowledged.
    ``spool_dir`` also holds SQLite's inter-process lock file descriptor."""

    def __init__(self, db: Database, spool_dir: Path, rejected_dir: Path, *,
                 space: FreeSpace | None = None,
                 on_stored: Callable[[], None] | None = None,
                 store: NodeStore | None = None) -> None:
        self.db = db
        #: Called after each new instance is committed (the node's scheduler wakes).
        self.on_stored = on_stored
        if store is None:
            if spool_dir.name != "spool":
                raise ValueError(f"spool folder {spool_dir}: without a store, its name must "
                                 "be 'spool' (the store keys' layout)")
            store = NodeStore(LocalStore(spool_dir.parent))
        self.objects = store
        self.spool_dir = store.spool_dir or spool_dir
        self.rejected_dir = rejected_dir
        #: ``[storage] min_free_mb``; None: no check.
        self.space = space
        self._group = _GroupCommit(self)

    # -- free space ([storage] min_free_mb) ------------------------------------------
    def space_low(self) -> str | None:
        """Why nothing may be stored now (free space below the threshold), or None."""
        return self.space.low() if self.space is not None else None

    def refuse_if_low(self, source: str, name: str, *, via: str = "dicom"
                      ) -> StoreOutcome | None:
        """A receiver's first step: below the threshold, a ``disk-low`` refusal (logged,
        recorded, counted) before the data set is read or written; else None. ``via``: the
        receiver, as the refusal is counted (``dicom``: C-STORE, ``dicomweb``: STOW-RS)."""
        reason = self.space_low()
        if reason is None:
            return None
        metrics().instances_refused.labels(RejectReason.DISK_LOW.value, via).inc()
        metrics().instances_received.labels(RejectReason.DISK_LOW.value).inc()
        return self.reject(source, name, RejectReason.DISK_LOW, reason)

    # -- the watched folder ---------------------------------------------------------
    def ingest_file(self, path: Path, source: str) -> StoreOutcome:
        """Ingest one file; on success or duplicate the file is removed, on refusal it is
        moved to ``rejected/`` with a ``.reason.txt`` beside it. After a storage failure
        (disk full, database down) the file stays where it is, to be tried again; below
        ``[storage] min_free_mb`` it is not even opened (no rejection row either)."""
        low = self.space_low()
        if low is not None:
            metrics().instances_refused.labels(RejectReason.DISK_LOW.value, "watch").inc()
            log.debug("action=watch-wait reason=%s", low)
            return StoreOutcome(False, reason=RejectReason.DISK_LOW, detail=low)
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            # Taken away between notice and read (another node, an operator): not ours.
            return StoreOutcome(False, detail="the file vanished before it was read")
        except OSError as exc:
            outcome = self._unreadable(source, path, exc)
        else:
            with fh:
                try:
                    origin = _Origin(path, os.fstat(fh.fileno()))
                    content = self._read_watched(fh, origin)
                except OSError as exc:
                    outcome = self._unreadable(source, path, exc)
                else:
                    # Stored with the file still open: ``content`` may read the rest of it.
                    outcome = self.store(content, source, name=path.name, origin=origin)
        if outcome.accepted:
            path.unlink(missing_ok=True)
        elif outcome.reason is not None and outcome.reason not in _LEAVE_IN_PLACE:
            self._move_rejected(path, outcome)
        return outcome

    def _unreadable(self, source: str, path: Path, exc: OSError) -> StoreOutcome:
        # The exception's text names the file; the reason must not (names are PHI).
        return self.reject(source, path.name, RejectReason.UNREADABLE,
                           f"cannot read the file: {exc.strerror or type(exc).__name__}")

    @staticmethod
    def _read_watched(fh: BinaryIO, origin: _Origin) -> _Content:
        """A watched file's bytes: its header alone when that is all ingest needs of it
        (``native_header``), the pixel values left unread (a 10 MB radiograph's read cost
        2 ms of the node's main process, most of its ingest time); else all of it."""
        head = fh.read(HEAD_BYTES)
        size = origin.seen.st_size
        header = native_header(head, size) if len(head) == HEAD_BYTES else None
        if header is None:
            return _Content.of(head + fh.read())
        return _Content(head, size, header, fh.read)

    def _move_rejected(self, path: Path, outcome: StoreOutcome) -> None:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        stamp = utcnow().strftime("%Y%m%dT%H%M%S%f")
        target = self.rejected_dir / f"{stamp}-{path.name}"
        n = 1
        while target.exists() or target.with_name(target.name + REASON_SUFFIX).exists():
            n += 1
            target = self.rejected_dir / f"{stamp}-{n}-{path.name}"
        try:
            shutil.move(str(path), target)
        except OSError as exc:
            log.error("action=reject-move-failed rejection_id=%s reason=%s error=%s",
                      outcome.rejection_id, outcome.reason,
                      exc.strerror or type(exc).__name__)
            return
        try:
            target.with_name(target.name + REASON_SUFFIX).write_text(
                f"reason: {outcome.reason}\ndetail: {outcome.detail}\n"
                f"rejection_id: {outcome.rejection_id}\n")
            if outcome.rejection_id is not None:
                with self.db.session() as s:
                    row = s.get(Rejection, outcome.rejection_id)
                    if row is not None:
                        row.moved_to = str(target)
        except Exception as exc:  # the file is out of the way; the note is a courtesy
            log.error("action=reject-note-failed rejection_id=%s error=%s",
                      outcome.rejection_id, type(exc).__name__)

    # -- shared by the folder and the receiver ---------------------------------------
    def store(self, data: bytes | _Content, source: str, *, name: str = "",
              expected_sop_class: str | None = None, command_sop_class: str | None = None,
              expected_study_uid: str | None = None,
              origin: _Origin | None = None) -> StoreOutcome:
        """Validate, spool and commit one object given as bytes (Part 10 or bare).
        ``expected_sop_class``: the SOP class of the presentation context it came in;
        ``command_sop_class``: the one its C-STORE command names (the data set's must be
        both). ``expected_study_uid``: the study it was posted to (STOW-RS
        ``/studies/{uid}``); an instance of another is refused (``study-mismatch``).
        ``origin``: the watched file ``data`` was read from (see ``_Origin``)."""
        content = data if isinstance(data, _Content) else _Content.of(data)
        outcome = self._store(content, source, name=name, expected_sop_class=expected_sop_class,
                              command_sop_class=command_sop_class,
                              expected_study_uid=expected_study_uid, origin=origin)
        label = ("duplicate" if outcome.duplicate else "stored") if outcome.accepted else (
            str(outcome.reason.value) if outcome.reason else "rejected")
        metrics().instances_received.labels(label).inc()
        if self.on_stored is not None and outcome.accepted and not outcome.duplicate:
            self.on_stored()
        return outcome

    def _store(self, content: _Content, source: str, *, name: str,
               expected_sop_class: str | None, command_sop_class: str | None,
               expected_study_uid: str | None, origin: _Origin | None) -> StoreOutcome:
        if not content.size:
            return self.reject(source, name, RejectReason.NOT_DICOM, "empty file")
        bomb = deflated_too_large(content.head)  # a header read alone is never deflated
        if bomb is not None:  # before pydicom would inflate it whole
            return self.reject(source, name, RejectReason.IMAGE_TOO_LARGE, bomb)
        try:
            ds = content.header if content.header is not None else parse_header(content.head)
        except IncompleteFile as exc:
            return self.reject(source, name, RejectReason.TRUNCATED, str(exc))
        except Exception as exc:  # pydicom raises many types on garbage
            return self.reject(source, name, RejectReason.NOT_DICOM,
                               f"not a DICOM file: {type(exc).__name__}: {exc}")
        uids = {k: _uid(ds, k) for k in _REQUIRED_UIDS}
        missing = [k for k, v in uids.items() if not v]
        if missing:
            return self.reject(source, name, RejectReason.MISSING_UID,
                               f"missing {', '.join(missing)}")
        bad = [k for k, v in uids.items() if not is_valid_uid(v)]
        if bad:
            # The value itself is not echoed: it could be anything, a name included.
            return self.reject(source, name, RejectReason.INVALID_UID,
                               f"invalid {', '.join(bad)}")
        outcome = self._store_valid(ds, content, uids, source,
                                    expected_sop_class=expected_sop_class,
                                    command_sop_class=command_sop_class,
                                    expected_study_uid=expected_study_uid, origin=origin)
        return replace(outcome, sop_class_uid=uids["SOPClassUID"],
                       sop_instance_uid=uids["SOPInstanceUID"],
                       study_instance_uid=uids["StudyInstanceUID"])

    def _store_valid(self, ds: Dataset, content: _Content, uids: dict[str, str], source: str, *,
                     expected_sop_class: str | None, command_sop_class: str | None,
                     expected_study_uid: str | None, origin: _Origin | None
                     ) -> StoreOutcome:
        """``_store`` once the header is read and its four UIDs are valid."""
        sop_class, sop_uid, study_uid = (uids["SOPClassUID"], uids["SOPInstanceUID"],
                                         uids["StudyInstanceUID"])
        if expected_study_uid is not None and study_uid != expected_study_uid:
            return self.reject(source, sop_uid, RejectReason.STUDY_MISMATCH,
                               f"Study Instance UID {study_uid}, posted to study "
                               f"{expected_study_uid}")
        if expected_sop_class and sop_class != expected_sop_class:
            return self.reject(source, sop_uid, RejectReason.SOP_CLASS_MISMATCH,
                               f"data set SOP class {sop_class} sent as {expected_sop_class}")
        if command_sop_class is not None and sop_class != command_sop_class:
            return self.reject(source, sop_uid, RejectReason.SOP_CLASS_MISMATCH,
                               f"data set SOP class {sop_class}, the C-STORE command says "
                               f"{command_sop_class or '(none)'}")
        if sop_class not in ACCEPTED_SOP_CLASSES:
            return self.reject(source, sop_uid, RejectReason.UNSUPPORTED_SOP_CLASS,
                               f"SOP class {sop_class} is not CR, DX or Secondary Capture")
        problem = too_large(ds)
        if problem is not None:  # refused before anything would decode it
            return self.reject(source, sop_uid, RejectReason.IMAGE_TOO_LARGE, problem)
        try:
            # A header read alone is a Part 10 file's: kept as it is.
            part10 = content if content.header is not None else _Content.of(
                _as_part10(ds, content.head))
        except Exception as exc:
            return self.reject(source, sop_uid, RejectReason.UNREADABLE,
                               f"cannot re-encode bare data set: {exc}")
        key = spool_key(study_uid, sop_uid)
        try:
            known = self._known(sop_uid, study_uid, part10, source)
            if known is not None:
                return known
            for attempt in range(2):
                try:
                    outcome = self._spool_and_commit(
                        ds, uids, key, part10, source,
                        origin if part10.head is content.head else None)
                    break
                except IntegrityError:
                    # A concurrent store of the same UID (or the first instance of the
                    # same new study) committed first; look again.
                    if attempt:
                        raise
        except Exception as exc:  # disk full, database or store down: the sender may retry
            detail = f"{type(exc).__name__}: {exc}"
            log.error("action=store-failed sop_instance_uid=%s reason=%s error=%s",
                      sop_uid, RejectReason.STORAGE_FAILED.value, detail)
            rejection_id: int | None = None
            try:
                rejection_id = self._record(source, sop_uid, RejectReason.STORAGE_FAILED,
                                            detail)
            except Exception:
                log.error("action=store-failed-unrecorded sop_instance_uid=%s", sop_uid)
            return StoreOutcome(False, reason=RejectReason.STORAGE_FAILED, detail=detail,
                                sop_instance_uid=sop_uid, study_instance_uid=study_uid,
                                rejection_id=rejection_id)
        if outcome is not None:
            return outcome
        log.info("action=stored sop_instance_uid=%s study_instance_uid=%s sop_class=%s "
                 "bytes=%d source=%s", sop_uid, study_uid, sop_class, part10.size, source)
        return StoreOutcome(True, sop_instance_uid=sop_uid, study_instance_uid=study_uid)

    def _known(self, sop_uid: str, study_uid: str, part10: _Content, source: str,
               existing: _Stored | None = None) -> StoreOutcome | None:
        """The outcome for an instance stored before (None when it is new)."""
        if existing is None:
            existing = self._stored(sop_uid)
        if existing is None:
            return None
        same = self._same_content(sop_uid, existing, part10)
        if same:
            log.info("action=duplicate sop_instance_uid=%s study_instance_uid=%s source=%s",
                     sop_uid, study_uid, source)
            return StoreOutcome(True, duplicate=True, sop_instance_uid=sop_uid,
                                study_instance_uid=study_uid)
        detail = ("an instance with this SOP Instance UID and other content was stored "
                  "before; the first one is kept" if same is False else
                  "an instance with this SOP Instance UID was stored before and its spooled "
                  "file is gone, so this copy cannot be compared with it; the first one is "
                  "kept")
        outcome = self.reject(source, sop_uid, RejectReason.CONFLICTING_DUPLICATE, detail)
        return replace(outcome, study_instance_uid=study_uid)

    def _same_content(self, sop_uid: str, existing: _Stored, part10: _Content) -> bool | None:
        """Whether ``part10`` is the stored copy, by SHA-256; None when the stored copy's
        digest was never computed and its file is gone (removed outside cxrd).

        The stored copy's digest is computed from its spool file the first time a second
        copy comes, and recorded (one short transaction; a concurrent second copy that
        computed it too records nothing more)."""
        stored = existing.sha256
        if stored == NO_DIGEST:
            try:
                stored = object_digest(self.objects, existing.path)
            except ObjectMissing:
                return None
            with self.db.engine.begin() as conn:
                conn.execute(_RECORD_DIGEST, {"uid": sop_uid, "digest": stored})
        return hashlib.sha256(part10.whole()).hexdigest() == stored

    def _stored(self, sop_uid: str) -> _Stored | None:
        """The row stored under a SOP Instance UID, if any: a first look, before the
        bytes are written (the transaction looks again)."""
        if self.db.is_sqlite:
            # A plain read in autocommit mode: in WAL mode it neither waits for nor blocks
            # the writer, where the engine's BEGIN IMMEDIATE would queue behind it.
            raw = self.db.engine.raw_connection()
            try:
                row = raw.cursor().execute(
                    "SELECT sha256, path FROM instances WHERE sop_instance_uid = ?",
                    (sop_uid,)).fetchone()
            finally:
                raw.close()
            return _Stored(str(row[0]), str(row[1])) if row else None
        with self.db.engine.connect() as conn:
            found = conn.execute(_STORED, {"uid": sop_uid}).first()
        return None if found is None else _Stored(str(found.sha256), str(found.path))

    def _spool_and_commit(self, ds: Dataset, uids: dict[str, str], key: str, part10: _Content,
                          source: str, origin: _Origin | None = None) -> StoreOutcome | None:
        """Write the spool file and commit its row; None when stored, else the outcome
        for an instance a concurrent call stored first.

        The bytes go to a temp file first (slow, outside any transaction, in parallel
        with other associations). The rename to the final path happens inside the
        transaction, after the row's insert holds the unique SOP Instance UID: a
        concurrent store of the same UID with other bytes can then never replace the file
        that the committed row describes. Rows of instances arriving together are
        committed together (``_GroupCommit``); Core statements on a connection, not an
        ORM session, since at hundreds of instances a second its bookkeeping was a third
        of the time.

        On S3 (no local file) the object is PUT first, outside any transaction; the row is
        committed after the PUT succeeded, so nothing is acknowledged before both. S3 has
        no rename: a crash between the two leaves an object without a row (overwritten
        when the instance comes again), and two first stores of one UID with other bytes
        at the same moment leave the object of the later PUT under the row of the earlier
        commit (the local store's rename inside the transaction rules that out).
        """
        spool = self.objects.local_path(key)
        if spool is None:
            self.objects.put(key, part10.whole())
            item = _Pending(ds, uids, key, None, None, part10.size, source)
            self._group.commit(item)
        else:
            tmp = origin.link_temp(spool) if origin is not None else None
            if tmp is None:
                tmp = durable.write_temp(spool, part10.whole())
            item = _Pending(ds, uids, key, spool, tmp, part10.size, source)
            try:
                self._group.commit(item)
            finally:
                tmp.unlink(missing_ok=True)
        if item.existing is not None:
            return self._known(uids["SOPInstanceUID"], uids["StudyInstanceUID"], part10,
                               source, item.existing)
        return None

    def _add_rows(self, conn: Connection, ds: Dataset, uids: dict[str, str], key: str,
                  size: int, source: str) -> None:
        now = utcnow()
        meta = getattr(ds, "file_meta", None)
        tsuid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except Exception:  # malformed IS
            frames = 1
        study_uid = uids["StudyInstanceUID"]
        conn.execute(_INSERT_INSTANCE, dict(
            sop_instance_uid=uids["SOPInstanceUID"],
            study_instance_uid=study_uid,
            series_instance_uid=uids["SeriesInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            transfer_syntax_uid=tsuid[:64],
            modality=_text(ds, "Modality")[:16],
            body_part=_text(ds, "BodyPartExamined")[:64],
            view_position=_text(ds, "ViewPosition")[:16],
            presentation_intent=_text(ds, "PresentationIntentType")[:32],
            photometric=_text(ds, "PhotometricInterpretation")[:16],
            has_pixels=any(k in ds for k in PIXEL_KEYWORDS),
            frames=frames,
            path=key,
            sha256=NO_DIGEST,  # computed when the UID comes again (``_same_content``)
            size=size,
            source=source[:256],
            received_at=now,
            state=InstanceState.RECEIVED.value,
        ))
        # Two first instances of a new study may be stored at once (several receiver
        # threads, several nodes): one atomic upsert, no unique-key race. A late instance
        # reopens the study; the next SR will supersede the last.
        conn.execute(_upsert_study(conn), dict(
            study_instance_uid=study_uid, state=StudyState.COLLECTING.value, generation=1,
            first_received_at=now, last_received_at=now))

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
            log.error("action=reject-unrecorded sop_instance_uid=%s error=%s", uid,
                      type(exc).__name__)
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
