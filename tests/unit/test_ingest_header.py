"""A watched file whose header says all ingest needs is spooled without its pixel values
being read (``cxrd.ingest.native_header``); every other file is read whole, as before."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pytest
from dicomfactory import make_dataset, part10_bytes, write
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from sqlalchemy import select

from cxrd.db import Instance
from cxrd.domain import RejectReason
from cxrd.ingest import HEAD_BYTES, Ingestor, _Content, native_header

#: 1024 x 1024 x 2 bytes: the pixel values are eight times the bytes read first.
SIDE = 1024


def large(seed: int = 0, **kwargs: object) -> bytes:
    return part10_bytes(make_dataset("CR", rows=SIDE, columns=SIDE, seed=seed, **kwargs))


def bytes_read() -> int:
    """Bytes this process has read through read(2) and its kin so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def spooled_bytes(ingestor: Ingestor, sop_uid: str) -> bytes:
    with ingestor.db.session() as s:
        key = s.scalars(select(Instance.path).where(
            Instance.sop_instance_uid == sop_uid)).one()
    path = ingestor.objects.local_path(key)
    assert path is not None
    return path.read_bytes()


def test_a_linkable_native_file_is_spooled_without_reading_its_pixels(ingestor, dirs):
    data = large()
    assert len(data) > 8 * HEAD_BYTES
    src = write(dirs.incoming / "a.dcm", data)
    before = bytes_read()

    outcome = ingestor.ingest_file(src, "watch:test")

    read = bytes_read() - before
    assert outcome.accepted and not outcome.duplicate
    # the first bytes, and the database's pages: not the pixel values
    assert read < len(data) // 2, f"read {read} bytes of a {len(data)}-byte file"
    assert spooled_bytes(ingestor, outcome.sop_instance_uid) == data
    with ingestor.db.session() as s:
        assert s.scalars(select(Instance.size)).one() == len(data)
    assert not src.exists()


def test_a_file_with_a_second_name_is_copied_whole(ingestor, dirs):
    data = large(seed=3)
    src = write(dirs.incoming / "b.dcm", data)
    os.link(src, dirs.root / "kept-elsewhere.dcm")  # not cxrd's alone: never linked
    before = bytes_read()

    outcome = ingestor.ingest_file(src, "watch:test")

    assert outcome.accepted
    assert bytes_read() - before >= len(data)
    assert spooled_bytes(ingestor, outcome.sop_instance_uid) == data
    assert (dirs.root / "kept-elsewhere.dcm").read_bytes() == data


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_truncated_large_file_is_refused(ingestor, dirs, keep):
    data = large()
    src = write(dirs.incoming / "cut.dcm", data[: int(len(data) * keep)])
    outcome = ingestor.ingest_file(src, "t")
    assert not outcome.accepted and outcome.reason == RejectReason.TRUNCATED


def test_copies_that_differ_only_in_their_pixels_are_told_apart(ingestor, dirs):
    """The comparison with a stored copy reads the rest of the file: a second copy whose
    header is the same and whose pixels differ past the bytes read first is refused."""
    ds = make_dataset("CR", rows=SIDE, columns=SIDE, seed=1)
    first = part10_bytes(ds)
    other = bytearray(first)
    other[-10] ^= 0xFF
    assert first[:HEAD_BYTES] == other[:HEAD_BYTES]
    assert ingestor.ingest_file(write(dirs.incoming / "1.dcm", first), "t").accepted
    same = ingestor.ingest_file(write(dirs.incoming / "2.dcm", first), "t")
    assert same.accepted and same.duplicate

    refused = ingestor.ingest_file(write(dirs.incoming / "3.dcm", bytes(other)), "t")

    assert not refused.accepted
    assert refused.reason == RejectReason.CONFLICTING_DUPLICATE
    assert spooled_bytes(ingestor, ds.SOPInstanceUID) == first


def test_elements_after_the_pixels_are_read_and_kept(ingestor, dirs):
    ds = make_dataset("CR", rows=SIDE, columns=SIDE)
    ds.DataSetTrailingPadding = b"\0" * 64
    data = part10_bytes(ds)
    assert native_header(data[:HEAD_BYTES], len(data)) is None

    outcome = ingestor.ingest_file(write(dirs.incoming / "t.dcm", data), "t")

    assert outcome.accepted
    assert spooled_bytes(ingestor, outcome.sop_instance_uid) == data


def test_a_header_longer_than_the_first_read_is_read_whole(ingestor, dirs):
    ds = make_dataset("CR", rows=SIDE, columns=SIDE)
    ds.add_new(0x00291010, "OB", b"\1" * (HEAD_BYTES + 1000))  # a large private element
    data = part10_bytes(ds)
    assert native_header(data[:HEAD_BYTES], len(data)) is None

    outcome = ingestor.ingest_file(write(dirs.incoming / "h.dcm", data), "t")

    assert outcome.accepted
    assert spooled_bytes(ingestor, outcome.sop_instance_uid) == data


def test_native_header_reads_the_header_of_a_native_file() -> None:
    ds = make_dataset("CR", rows=SIDE, columns=SIDE, body_part="CHEST")
    data = part10_bytes(ds)
    header = native_header(data[:HEAD_BYTES], len(data))
    assert header is not None
    assert header.SOPInstanceUID == ds.SOPInstanceUID
    assert header.BodyPartExamined == "CHEST"
    assert header.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    # the whole file is no head, nor is a head of a file of another size
    assert native_header(data, len(data)) is None
    assert native_header(data[:HEAD_BYTES], len(data) + 2) is None


def test_native_header_leaves_other_files_to_a_whole_read() -> None:
    ds = make_dataset("CR", rows=SIDE, columns=SIDE)
    implicit = part10_bytes(ds, implicit=True)
    assert native_header(implicit[:HEAD_BYTES], len(implicit)) is not None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    deflated = buf.getvalue()
    assert native_header(deflated[:HEAD_BYTES], len(deflated)) is None
    bare = implicit[132:]  # no preamble: a bare data set is read whole and re-encoded
    assert native_header(bare[:HEAD_BYTES], len(bare)) is None
    assert native_header(b"\0" * HEAD_BYTES, 10 * HEAD_BYTES) is None


def test_content_refuses_a_file_that_changed_while_it_was_read() -> None:
    content = _Content(b"abc", 6, None, lambda: b"de")
    with pytest.raises(OSError, match="changed while it was read"):
        content.whole()
    whole = _Content(b"abc", 5, None, lambda: b"de")
    assert whole.whole() == b"abcde" and whole.whole() == b"abcde"
