"""Bad-input sweep: every file pydicom ships (its test, charset and palette files, and the
non-DICOM files beside them) dropped into a watched folder at once, nested as shipped.

Nothing may escape as an exception, and every file must end up accounted for: an Instance
row (received, then queued or skipped with a reason) or a Rejection row with a reason and
the place it was moved to. Exact duplicates (same SOP Instance UID, same bytes) are
recorded once, so the total is the file count less those, counted here independently.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
from collections import Counter
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from sqlalchemy import select

from cxrd.admit import admit_stable_studies
from cxrd.db import Instance, Rejection, utcnow
from cxrd.domain import InstanceState, RejectReason, SkipReason
from cxrd.ingest import NO_DIGEST, Ingestor
from cxrd.watch import FolderWatcher

PYDICOM_DATA = Path(pydicom.data.__file__).parent


def shipped_files() -> list[Path]:
    files = sorted(p for p in PYDICOM_DATA.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    # everything get_testdata_files() names is in there, and more (the non-DICOM files)
    listed = {Path(f) for f in pydicom.data.get_testdata_files() if Path(f).is_file()}
    assert listed <= set(files)
    assert len(files) > len(listed) > 100
    return files


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_shipped_file_is_accounted_for(ingestor: Ingestor, dirs, caplog):
    caplog.set_level(logging.INFO, logger="cxrd")
    files = shipped_files()
    copies: dict[Path, Path] = {}
    for src in files:
        dst = dirs.incoming / src.relative_to(PYDICOM_DATA)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        copies[dst] = src
    # ignored names would never be read: make sure the sweep has none
    assert not [p for p in copies if p.name.startswith(".") or p.suffix in (".tmp", ".part")]

    watcher = FolderWatcher(ingestor, [dirs.incoming], 0)
    handled = 0
    for _ in range(5):
        watcher.scan()
        handled += watcher.run_once()
    assert handled == len(files)
    assert not [p for p in dirs.incoming.rglob("*") if p.is_file()], "files left behind"

    db = ingestor.db
    admit_stable_studies(db, 0, now=utcnow() + dt.timedelta(hours=1))
    with db.session() as s:
        instances = list(s.scalars(select(Instance)).all())
        rejections = list(s.scalars(select(Rejection)).all())

    # exact duplicates, counted independently: files with the same bytes whose content
    # was stored (a Part 10 file is spooled byte for byte)
    stored_digests = {hashlib.sha256(dirs.file(i.path).read_bytes()).hexdigest() for i in instances}
    by_digest = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in copies.values())
    duplicates = sum(n - 1 for d, n in by_digest.items() if d in stored_digests)

    assert len(instances) + len(rejections) == len(files) - duplicates
    assert len(rejections) == len({r.moved_to for r in rejections})

    for inst in instances:
        assert inst.state in (InstanceState.QUEUED.value, InstanceState.SKIPPED.value)
        if inst.state == InstanceState.SKIPPED.value:
            assert SkipReason(inst.reason)
        assert dirs.file(inst.path).is_file()
        # the digest is recorded once a second copy came (a duplicate), else empty
        digest = hashlib.sha256(dirs.file(inst.path).read_bytes()).hexdigest()
        assert inst.sha256 in (NO_DIGEST, digest)
        assert dirs.file(inst.path).is_relative_to(dirs.spool)
    for row in rejections:
        reason = RejectReason(row.reason)
        assert reason is not RejectReason.STORAGE_FAILED, row.detail
        assert row.detail and row.moved_to
        moved = Path(row.moved_to)
        assert moved.is_file() and moved.is_relative_to(dirs.rejected)
        assert moved.with_name(moved.name + ".reason.txt").is_file()
    # nothing was lost: every file is either spooled, rejected, or a duplicate
    assert len(list(dirs.rejected.glob("*.reason.txt"))) == len(rejections)

    def rejected_as(name: str) -> set[str]:
        return {r.reason for r in rejections if str(r.moved_to).endswith("-" + name)}

    assert rejected_as("MR_truncated.dcm") == {RejectReason.TRUNCATED.value}
    assert rejected_as("rtplan_truncated.dcm") == {RejectReason.TRUNCATED.value}
    assert rejected_as("CT_small.dcm") == {RejectReason.UNSUPPORTED_SOP_CLASS.value}
    assert rejected_as("README.txt") == {RejectReason.NOT_DICOM.value}
    assert rejected_as("zipMR.gz") == {RejectReason.NOT_DICOM.value}
    # a deflated data set is whole even though its offsets exceed the file size
    deflated = pydicom.dcmread(pydicom.data.get_testdata_file("image_dfl.dcm"))
    assert deflated.SOPInstanceUID in {i.sop_instance_uid for i in instances}

    reasons = Counter(r.reason for r in rejections)
    skipped = Counter(i.reason for i in instances if i.reason)
    # the sweep covers the interesting paths, not just one of them
    assert reasons[RejectReason.NOT_DICOM.value] >= 5  # .py, .json, .txt, .md, ...
    assert reasons[RejectReason.UNSUPPORTED_SOP_CLASS.value] >= 50  # CT, MR, RT, ...
    assert instances, "pydicom ships CR/DX/SC files; some must be stored"
    assert sum(skipped.values()) + sum(
        1 for i in instances if i.state == InstanceState.QUEUED.value) == len(instances)

    # no file name reaches a log line (names can carry patient names)
    names = {p.name for p in copies if len(p.stem) > 6}
    for record in caplog.records:
        message = record.getMessage()
        leaked = [n for n in names if n in message]
        assert not leaked, f"{leaked} logged: {message}"
    print(f"\nsweep: {len(files)} files, {len(instances)} stored, {len(rejections)} refused,"
          f" {duplicates} duplicates; refused {dict(reasons)}; skipped {dict(skipped)}")
