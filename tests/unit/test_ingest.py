"""cxrd.ingest: validate, spool, commit; duplicates, conflicts and every kind of refusal."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomfactory import (
    CR,
    DX,
    SC,
    assert_no_phi,
    bare_bytes,
    deflate_bomb,
    make_dataset,
    part10_bytes,
    uid,
    write,
)
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import func, select

from cxrd import durable
from cxrd import ingest as ingest_mod
from cxrd.db import Database, Instance, Rejection, Study
from cxrd.domain import InstanceState, RejectReason, StudyState
from cxrd.ingest import NO_DIGEST, Ingestor, StoreOutcome

PHI_NAME = "Doe^Jane_PID-4711.dcm"  # file names can carry patient names


def rows(db: Database, model: type) -> list:
    with db.session() as s:
        return list(s.scalars(select(model).order_by(model.id)).all())


def count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def spooled(dirs, study_uid: str, sop_uid: str) -> Path:
    return dirs.spool / study_uid / f"{sop_uid}.dcm"


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def assert_rejected(ingestor: Ingestor, dirs, outcome: StoreOutcome, source: Path,
                    reason: RejectReason) -> Rejection:
    """The refused file left incoming/, lies in rejected/ beside a reason note, and its
    Rejection row points there."""
    assert not outcome.accepted
    assert outcome.reason is reason, outcome
    assert not source.exists()
    (row,) = [r for r in rows(ingestor.db, Rejection) if r.id == outcome.rejection_id]
    assert row.reason == reason.value
    assert row.detail
    assert row.moved_to is not None
    moved = Path(row.moved_to)
    assert moved.parent == dirs.rejected and moved.name.endswith(source.name)
    assert moved.is_file()
    note = moved.with_name(moved.name + ".reason.txt").read_text()
    assert f"reason: {reason.value}" in note
    return row


# --------------------------------------------------------------------------- accepted


def test_valid_cr_is_spooled_byte_for_byte_and_committed(ingestor, dirs, caplog):
    caplog.set_level(logging.DEBUG, logger="cxrd")
    ds = make_dataset("CR", body_part="CHEST", view_position="PA")
    data = part10_bytes(ds)
    src = write(dirs.incoming / PHI_NAME, data)

    outcome = ingestor.ingest_file(src, "watch:test")

    assert outcome.accepted and not outcome.duplicate
    assert outcome.sop_instance_uid == ds.SOPInstanceUID
    target = spooled(dirs, ds.StudyInstanceUID, ds.SOPInstanceUID)
    assert target.read_bytes() == data
    assert not src.exists()
    # no temp file left beside it
    assert all_files(dirs.spool) == [target]
    (inst,) = rows(ingestor.db, Instance)
    assert inst.sop_instance_uid == ds.SOPInstanceUID
    assert inst.study_instance_uid == ds.StudyInstanceUID
    assert inst.series_instance_uid == ds.SeriesInstanceUID
    assert inst.sop_class_uid == CR
    assert inst.transfer_syntax_uid == ExplicitVRLittleEndian
    assert (inst.modality, inst.body_part, inst.view_position) == ("CR", "CHEST", "PA")
    assert inst.photometric == "MONOCHROME2" and inst.has_pixels and inst.frames == 1
    assert inst.path == f"spool/{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"  # a key
    assert dirs.file(inst.path) == target
    assert inst.sha256 == NO_DIGEST and inst.size == len(data)  # until a second copy comes
    assert inst.state == InstanceState.RECEIVED.value and inst.source == "watch:test"
    (study,) = rows(ingestor.db, Study)
    assert study.study_instance_uid == ds.StudyInstanceUID
    assert study.state == StudyState.COLLECTING.value
    assert count(ingestor.db, Rejection) == 0
    assert any("action=stored" in r.getMessage() for r in caplog.records)
    assert_no_phi(caplog.records, PHI_NAME, "Doe^Jane_PID")


def test_instances_of_one_study_share_a_study_row(ingestor, dirs):
    study_uid = uid()
    for i in range(3):
        ds = make_dataset("DX", study_uid=study_uid, seed=i)
        assert ingestor.store(part10_bytes(ds), "test").accepted
    (study,) = rows(ingestor.db, Study)
    assert study.study_instance_uid == study_uid
    assert study.first_received_at <= study.last_received_at
    assert len(all_files(dirs.spool / study_uid)) == 3
    assert {i.sop_class_uid for i in rows(ingestor.db, Instance)} == {DX}


def test_a_new_study_folder_and_each_rename_are_fsynced(ingestor, dirs, monkeypatch):
    """A file renamed into a new folder survives a power loss only if the folder's own
    entry does: the spool folder is fsynced once per new study folder (per process), the
    study folder once per instance renamed into it, all before the row is committed."""
    synced: list[Path] = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (synced.append(p), real(p)))
    study_uid = uid()
    for i in range(2):
        assert ingestor.store(part10_bytes(make_dataset("CR", study_uid=study_uid, seed=i)),
                              "test").accepted
    study_dir = dirs.spool / study_uid
    assert synced.count(dirs.spool) == 1
    assert synced.count(study_dir) == 2


def test_duplicate_with_same_bytes_is_recorded_once_and_source_removed(ingestor, dirs):
    data = part10_bytes(make_dataset("CR"))
    first = ingestor.ingest_file(write(dirs.incoming / "a.dcm", data), "test")
    again = write(dirs.incoming / "b.dcm", data)
    second = ingestor.ingest_file(again, "test")
    assert first.accepted and not first.duplicate
    assert second.accepted and second.duplicate
    assert not again.exists()
    assert count(ingestor.db, Instance) == 1
    assert count(ingestor.db, Rejection) == 0
    assert len(all_files(dirs.spool)) == 1
    assert not dirs.rejected.exists()


def test_same_uid_other_bytes_is_refused_and_first_copy_kept(ingestor, dirs):
    ds = make_dataset("CR", seed=1)
    first_bytes = part10_bytes(ds)
    other = make_dataset("CR", seed=2, sop_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID,
                         series_uid=ds.SeriesInstanceUID)
    assert ingestor.ingest_file(write(dirs.incoming / "first.dcm", first_bytes), "t").accepted
    src = write(dirs.incoming / "second.dcm", part10_bytes(other))

    outcome = ingestor.ingest_file(src, "t")

    row = assert_rejected(ingestor, dirs, outcome, src, RejectReason.CONFLICTING_DUPLICATE)
    assert row.name == ds.SOPInstanceUID
    assert spooled(dirs, ds.StudyInstanceUID, ds.SOPInstanceUID).read_bytes() == first_bytes
    (inst,) = rows(ingestor.db, Instance)
    assert inst.sha256 == hashlib.sha256(first_bytes).hexdigest()


def test_a_second_copy_records_the_stored_digest_and_a_third_reuses_it(ingestor, dirs,
                                                                       monkeypatch):
    ds = make_dataset("CR", seed=1)
    data = part10_bytes(ds)
    assert ingestor.store(data, "t").accepted
    (inst,) = rows(ingestor.db, Instance)
    assert inst.sha256 == NO_DIGEST  # not computed while no second copy came
    again = ingestor.store(data, "t")
    assert again.accepted and again.duplicate
    (inst,) = rows(ingestor.db, Instance)
    assert inst.sha256 == hashlib.sha256(data).hexdigest()
    # the third copy compares with the recorded digest: the spool file is not read again
    dirs.file(inst.path).rename(dirs.file(inst.path).with_suffix(".moved"))
    third = ingestor.store(data, "t")
    assert third.accepted and third.duplicate


def test_a_second_copy_whose_first_lost_its_file_unhashed_is_refused(ingestor, dirs):
    # the stored copy's digest was never needed and its spool file is gone (removed
    # outside cxrd): nothing to compare with, so the second copy is refused, not taken
    # for a duplicate, and the first row is left as it is
    ds = make_dataset("CR", seed=1)
    data = part10_bytes(ds)
    assert ingestor.store(data, "t").accepted
    (inst,) = rows(ingestor.db, Instance)
    dirs.file(inst.path).unlink()
    outcome = ingestor.store(data, "t")
    assert not outcome.accepted and outcome.reason is RejectReason.CONFLICTING_DUPLICATE
    assert "cannot be compared" in outcome.detail
    (inst,) = rows(ingestor.db, Instance)
    assert inst.sha256 == NO_DIGEST


def test_bare_data_set_is_accepted_and_reencoded_as_part10(ingestor, dirs):
    ds = make_dataset("CR")
    src = write(dirs.incoming / "bare", bare_bytes(ds, implicit=True))
    outcome = ingestor.ingest_file(src, "t")
    assert outcome.accepted
    target = spooled(dirs, ds.StudyInstanceUID, ds.SOPInstanceUID)
    data = target.read_bytes()
    assert data[128:132] == b"DICM"
    back = pydicom.dcmread(target)
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPClassUID == CR
    assert back.PixelData == ds.PixelData
    assert back.PatientName == ds.PatientName
    (inst,) = rows(ingestor.db, Instance)
    assert inst.transfer_syntax_uid == ImplicitVRLittleEndian
    # the same bare bytes again: the same Part 10 bytes, so a plain duplicate
    again = ingestor.store(bare_bytes(ds, implicit=True), "t")
    assert again.accepted and again.duplicate
    (inst,) = rows(ingestor.db, Instance)
    assert inst.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("implicit", "little", "syntax"), [
    (False, True, ExplicitVRLittleEndian),
    (False, False, ExplicitVRBigEndian),
])
def test_bare_explicit_data_sets_keep_their_encoding(ingestor, dirs, implicit, little, syntax):
    ds = make_dataset("DX")
    outcome = ingestor.store(bare_bytes(ds, implicit=implicit, little_endian=little), "t")
    assert outcome.accepted, outcome
    back = pydicom.dcmread(spooled(dirs, ds.StudyInstanceUID, ds.SOPInstanceUID))
    assert back.file_meta.TransferSyntaxUID == syntax
    # the bytes are kept as they were, so a big-endian reader sees them big-endian
    expected = np.frombuffer(ds.PixelData, dtype="<u2" if little else ">u2")
    expected = (expected & 0x0FFF).reshape(ds.Rows, ds.Columns)  # Bits Stored 12
    assert back.pixel_array.tolist() == expected.tolist()


def test_data_set_with_meta_but_no_preamble_keeps_its_transfer_syntax(ingestor, dirs):
    # JPEG 2000 pixel data: the meta group names the codec, so it must be kept
    data = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPClassUID = DX  # it is an MR file; make it one cxrd stores
    buf = io.BytesIO()
    ds.save_as(buf)
    no_preamble = buf.getvalue()[132:]
    outcome = ingestor.store(no_preamble, "t")
    assert outcome.accepted, outcome
    back = pydicom.dcmread(spooled(dirs, ds.StudyInstanceUID, ds.SOPInstanceUID))
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert back.PixelData == ds.PixelData


def test_bare_data_set_with_compressed_pixels_and_no_syntax_is_refused(ingestor, dirs):
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.SOPClassUID = DX
    del ds.file_meta
    src = write(dirs.incoming / "bare-j2k", bare_bytes(ds, implicit=False))
    outcome = ingestor.ingest_file(src, "t")
    assert_rejected(ingestor, dirs, outcome, src, RejectReason.UNREADABLE)
    assert count(ingestor.db, Instance) == 0


def test_secondary_capture_is_stored(ingestor, dirs):
    ds = make_dataset("OT", sop_class_uid=SC)
    assert ingestor.store(part10_bytes(ds), "t").accepted
    (inst,) = rows(ingestor.db, Instance)
    assert inst.sop_class_uid == SC and inst.modality == "OT"


def test_data_set_without_pixel_data_is_stored_with_has_pixels_false(ingestor):
    assert ingestor.store(part10_bytes(make_dataset("CR", pixels=False)), "t").accepted
    (inst,) = rows(ingestor.db, Instance)
    assert inst.has_pixels is False


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("notes.txt", b"Patient Doe^Jane came in on Tuesday.\n" * 20, RejectReason.NOT_DICOM),
    ("empty.dcm", b"", RejectReason.NOT_DICOM),
    ("noise.dcm", bytes(range(256)) * 8, RejectReason.NOT_DICOM),
    ("DICM-only.dcm", b"\0" * 128 + b"DICM", RejectReason.NOT_DICOM),
])
def test_non_dicom_files_are_moved_to_rejected(ingestor, dirs, caplog, name, content, reason):
    src = write(dirs.incoming / name, content)
    outcome = ingestor.ingest_file(src, "t")
    row = assert_rejected(ingestor, dirs, outcome, src, reason)
    assert row.name == name
    assert count(ingestor.db, Instance) == 0
    assert all_files(dirs.spool) == []
    assert_no_phi(caplog.records, name)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file_is_refused(ingestor, dirs, keep):
    data = part10_bytes(make_dataset("CR", rows=64, columns=64))
    src = write(dirs.incoming / "cut.dcm", data[: int(len(data) * keep)])
    outcome = ingestor.ingest_file(src, "t")
    assert_rejected(ingestor, dirs, outcome, src, RejectReason.TRUNCATED)
    assert count(ingestor.db, Instance) == 0
    assert all_files(dirs.spool) == []


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_truncated_compressed_file_is_refused(ingestor, dirs):
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.SOPClassUID = DX
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    outcome = ingestor.store(data[:-10], "t", name="cut-j2k")
    assert not outcome.accepted
    assert outcome.reason in (RejectReason.TRUNCATED, RejectReason.NOT_DICOM)
    assert count(ingestor.db, Instance) == 0


@pytest.mark.parametrize("missing", ["SOPInstanceUID", "StudyInstanceUID",
                                     "SeriesInstanceUID", "SOPClassUID"])
def test_missing_uid_is_refused(ingestor, dirs, missing):
    # A Part 10 file whose meta still names the instance, but whose data set lacks the UID.
    parsed = pydicom.dcmread(io.BytesIO(part10_bytes(make_dataset("CR"))))
    delattr(parsed, missing)
    buf = io.BytesIO()
    parsed.save_as(buf)
    src = write(dirs.incoming / "x.dcm", buf.getvalue())
    outcome = ingestor.ingest_file(src, "t")
    row = assert_rejected(ingestor, dirs, outcome, src, RejectReason.MISSING_UID)
    assert missing in row.detail
    assert all_files(dirs.spool) == []


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")
@pytest.mark.filterwarnings("ignore:The value length:UserWarning")
@pytest.mark.parametrize(("keyword", "value"), [
    ("StudyInstanceUID", "1.2.abc"),
    ("StudyInstanceUID", "../../x"),
    ("SOPInstanceUID", "../../../etc/passwd"),
    ("SOPInstanceUID", "1.02.3"),
    ("SeriesInstanceUID", "1." + "2" * 70),
    ("SOPInstanceUID", "/tmp/abs"),
])
def test_invalid_uid_never_becomes_a_path(ingestor, dirs, keyword, value):
    ds = make_dataset("CR")
    setattr(ds, keyword, value)
    src = write(dirs.incoming / "bad-uid.dcm", part10_bytes(ds))
    before = sorted(p for p in dirs.root.rglob("*"))
    outcome = ingestor.ingest_file(src, "t")
    row = assert_rejected(ingestor, dirs, outcome, src, RejectReason.INVALID_UID)
    assert keyword in row.detail
    assert not dirs.spool.exists() or all_files(dirs.spool) == []
    created = {p for p in dirs.root.rglob("*")} - set(before)
    assert all(p.is_relative_to(dirs.rejected) for p in created), created
    assert count(ingestor.db, Instance) == 0


def test_unsupported_sop_class_ct_is_refused(ingestor, dirs):
    ct = Path(get_testdata_file("CT_small.dcm"))
    src = write(dirs.incoming / "ct.dcm", ct.read_bytes())
    outcome = ingestor.ingest_file(src, "t")
    row = assert_rejected(ingestor, dirs, outcome, src, RejectReason.UNSUPPORTED_SOP_CLASS)
    assert "1.2.840.10008.5.1.4.1.1.2" in row.detail
    assert Path(row.moved_to).read_bytes() == ct.read_bytes()


def test_expected_sop_class_mismatch_is_refused(ingestor):
    ds = make_dataset("CR")
    outcome = ingestor.store(part10_bytes(ds), "dicom:PACS@h", expected_sop_class=DX)
    assert outcome.reason is RejectReason.SOP_CLASS_MISMATCH
    (row,) = rows(ingestor.db, Rejection)
    assert row.name == ds.SOPInstanceUID and row.moved_to is None
    assert row.source == "dicom:PACS@h"


def test_rejected_names_never_collide(ingestor, dirs):
    for sub in ("a", "b", "c"):
        src = write(dirs.incoming / sub / "same.txt", b"not dicom")
        assert ingestor.ingest_file(src, "t").reason is RejectReason.NOT_DICOM
    moved = [p for p in dirs.rejected.iterdir() if not p.name.endswith(".reason.txt")]
    assert len(moved) == 3
    assert {r.moved_to for r in rows(ingestor.db, Rejection)} == {str(p) for p in moved}


# --------------------------------------------------------------------------- failures


def test_storage_failure_leaves_the_file_for_a_retry(ingestor, dirs, monkeypatch):
    ds = make_dataset("CR")
    src = write(dirs.incoming / "x.dcm", part10_bytes(ds))

    def disk_full(path: Path, data: bytes) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_room_for_a_link(path: Path, source: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable, "write_temp", disk_full)
    monkeypatch.setattr(durable, "link_temp", no_room_for_a_link)
    outcome = ingestor.ingest_file(src, "t")
    assert not outcome.accepted and outcome.reason is RejectReason.STORAGE_FAILED
    assert src.exists(), "the file must stay for a retry"
    assert not dirs.rejected.exists()
    assert count(ingestor.db, Instance) == 0
    (row,) = rows(ingestor.db, Rejection)
    assert row.reason == RejectReason.STORAGE_FAILED.value and row.moved_to is None
    monkeypatch.undo()
    assert ingestor.ingest_file(src, "t").accepted
    assert not src.exists()


def test_database_failure_after_write_leaves_no_row_and_no_temp(ingestor, dirs, monkeypatch):
    ds = make_dataset("CR")

    def boom(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(Ingestor, "_add_rows", boom)
    outcome = ingestor.store(part10_bytes(ds), "t")
    assert outcome.reason is RejectReason.STORAGE_FAILED
    assert count(ingestor.db, Instance) == 0
    assert all_files(dirs.spool) == []  # neither the final file nor a temp file


def test_vanished_file_is_not_a_rejection(ingestor, dirs):
    outcome = ingestor.ingest_file(dirs.incoming / "gone.dcm", "t")
    assert not outcome.accepted and outcome.reason is None
    assert count(ingestor.db, Rejection) == 0


def test_unreadable_file_is_rejected_without_naming_it_in_the_log(ingestor, dirs, monkeypatch,
                                                                   caplog):
    src = write(dirs.incoming / PHI_NAME, b"whatever")
    real = Path.open

    def denied(self: Path, *args, **kwargs):
        if self == src:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    outcome = ingestor.ingest_file(src, "t")
    row = assert_rejected(ingestor, dirs, outcome, src, RejectReason.UNREADABLE)
    assert PHI_NAME not in row.detail
    assert_no_phi(caplog.records, PHI_NAME)


# --------------------------------------------------------------------------- races


def _store_concurrently(ingestor: Ingestor, payloads: list[bytes]) -> list[StoreOutcome]:
    barrier = threading.Barrier(len(payloads))
    results: list[StoreOutcome | BaseException] = [None] * len(payloads)  # type: ignore

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = ingestor.store(payloads[i], f"thread-{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, StoreOutcome) for r in results), results
    return results  # type: ignore[return-value]


def test_concurrent_stores_of_one_uid_keep_one_consistent_copy(ingestor, dirs):
    ds = make_dataset("CR", seed=0)
    variants = [part10_bytes(make_dataset("CR", seed=i, sop_uid=ds.SOPInstanceUID,
                                          study_uid=ds.StudyInstanceUID,
                                          series_uid=ds.SeriesInstanceUID))
                for i in range(6)]
    outcomes = _store_concurrently(ingestor, variants + variants)
    fresh = [o for o in outcomes if o.accepted and not o.duplicate]
    assert len(fresh) == 1
    assert all(o.accepted or o.reason is RejectReason.CONFLICTING_DUPLICATE for o in outcomes)
    (inst,) = rows(ingestor.db, Instance)
    on_disk = dirs.file(inst.path).read_bytes()
    assert hashlib.sha256(on_disk).hexdigest() == inst.sha256
    assert all_files(dirs.spool) == [dirs.file(inst.path)]
    assert count(ingestor.db, Study) == 1


def test_concurrent_first_instances_of_a_new_study_make_one_study_row(ingestor):
    study_uid = uid()
    payloads = [part10_bytes(make_dataset("CR", study_uid=study_uid, seed=i)) for i in range(8)]
    outcomes = _store_concurrently(ingestor, payloads)
    assert all(o.accepted and not o.duplicate for o in outcomes)
    assert count(ingestor.db, Instance) == 8
    assert count(ingestor.db, Study) == 1


# ------------------------------------------------------------------ Part 10 framing


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    "1.2.840.10008.1.2.4.90"])
@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45"])  # odd and even lengths
def test_part10_framing_matches_pynetdicom_and_parses(syntax, sop_uid):
    """The receiver's framing of a C-STORE data set is byte for byte what pynetdicom's
    Event.encoded_dataset() writes, and pydicom reads the meta back."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    body = b"\x08\x00\x16\x00" + b"payload!"  # any bytes: the data set is not parsed
    expected = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(create_file_meta(
        sop_class_uid=CR, sop_instance_uid=sop_uid, transfer_syntax=syntax)), body))
    framed = ingest_mod.part10([body], CR, sop_uid, syntax, PYNETDICOM_IMPLEMENTATION_UID,
                               PYNETDICOM_IMPLEMENTATION_VERSION)
    assert framed == expected
    fragments = [body[:3], bytearray(body[3:7]), memoryview(body)[7:]]  # as received
    assert ingest_mod.part10(fragments, CR, sop_uid, syntax, PYNETDICOM_IMPLEMENTATION_UID,
                             PYNETDICOM_IMPLEMENTATION_VERSION) == expected
    meta = pydicom.dcmread(io.BytesIO(framed[: -len(body)])).file_meta
    assert meta.MediaStorageSOPInstanceUID == sop_uid
    assert meta.TransferSyntaxUID == syntax
    assert framed.endswith(body)


def _spooled(ingestor: Ingestor, ds) -> Path:
    (row,) = [r for r in rows(ingestor.db, Instance) if r.sop_instance_uid == ds.SOPInstanceUID]
    path = ingestor.objects.local_path(row.path)
    assert path is not None
    return path


def test_a_watched_file_is_spooled_as_a_link_not_a_copy(ingestor, dirs):
    ds = make_dataset("CR")
    data = part10_bytes(ds)
    src = write(dirs.incoming / "x.dcm", data)
    inode = src.stat().st_ino
    assert ingestor.ingest_file(src, "t").accepted
    assert not src.exists()
    spool = _spooled(ingestor, ds)
    assert spool.stat().st_ino == inode and spool.stat().st_nlink == 1
    assert spool.read_bytes() == data
    assert [p for p in all_files(dirs.spool) if p.name.endswith(".tmp")] == []


def test_a_watched_file_with_another_name_is_copied(ingestor, dirs, tmp_path):
    ds = make_dataset("CR")
    src = write(dirs.incoming / "x.dcm", part10_bytes(ds))
    other = tmp_path / "other-name.dcm"
    other.hardlink_to(src)  # its owner keeps a name for it: it could change the bytes
    assert ingestor.ingest_file(src, "t").accepted
    spool = _spooled(ingestor, ds)
    assert spool.stat().st_ino != other.stat().st_ino
    assert spool.read_bytes() == other.read_bytes()


def test_a_watched_file_changed_after_it_was_read_is_copied_as_read(ingestor, dirs,
                                                                   monkeypatch):
    ds = make_dataset("CR")
    data = part10_bytes(ds)
    src = write(dirs.incoming / "x.dcm", data)
    real_link_temp = durable.link_temp

    def written_meanwhile(path: Path, source: Path) -> Path | None:
        with source.open("ab") as fh:  # a late writer appends after the read
            fh.write(b"\0" * 16)
        return real_link_temp(path, source)

    monkeypatch.setattr(durable, "link_temp", written_meanwhile)
    assert ingestor.ingest_file(src, "t").accepted
    spool = _spooled(ingestor, ds)
    # the bytes that were parsed are the ones spooled, as a copy
    assert spool.read_bytes() == data
    (row,) = rows(ingestor.db, Instance)
    assert row.size == len(data)
    assert [p for p in all_files(dirs.spool) if p.name.endswith(".tmp")] == []


def test_a_deflate_bomb_is_refused_as_too_large_before_it_is_inflated(ingestor):
    _, bomb = deflate_bomb()
    outcome = ingestor.store(bomb, "t")
    assert not outcome.accepted and outcome.reason is RejectReason.IMAGE_TOO_LARGE
    assert count(ingestor.db, Instance) == 0
