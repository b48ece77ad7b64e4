"""Temp files of writers that died mid-write are removed at start-up; others stay."""

from __future__ import annotations

import os
import subprocess
import sys

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrd.durable import HOST_TAG, remove_stale_temp_files, save_dataset, temp_path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_removes_temp_files_of_dead_writers_only(tmp_path):
    gone = dead_pid()
    results = tmp_path / "results"
    spool = tmp_path / "spool" / "1.2.3"
    results.mkdir()
    spool.mkdir(parents=True)
    stale_result = results / f".1.2.3.4.{gone}.abc_12xy.tmp"  # report.save_dataset
    stale_spool = spool / f".1.2.3.5.dcm.{gone}.0123abcd.tmp"  # ingest.write_temp
    live = results / f".1.2.3.6.{os.getpid()}.abc_12xy.tmp"
    other = results / ".someone-elses.tmp"
    done = results / "1.2.3.4.dcm"
    for p in (stale_result, stale_spool, live, other, done):
        p.write_bytes(b"x")

    assert remove_stale_temp_files(results) == 1
    assert remove_stale_temp_files(tmp_path / "spool", recursive=True) == 1
    assert not stale_result.exists() and not stale_spool.exists()
    assert live.exists() and other.exists() and done.exists()
    assert remove_stale_temp_files(tmp_path / "missing") == 0


def test_save_dataset_names_its_temp_file_after_the_writer(tmp_path, monkeypatch):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: object) -> None:
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    path = save_dataset(ds, tmp_path)
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert len(seen) == 1 and seen[0].split(".")[-3] == str(os.getpid())


def test_a_temp_file_of_another_host_is_left_to_that_host(tmp_path):
    """Nodes on several hosts may share the data folder: a pid is this host's to judge
    only in a name that carries this host's mark (or none, as before there was one)."""
    gone = dead_pid()
    mine = temp_path(tmp_path / "1.2.3.7.dcm")
    assert f".h{HOST_TAG}-" in mine.name
    mine = mine.with_name(mine.name.replace(f".{os.getpid()}.", f".{gone}.", 1))
    other = "0" * 8 if HOST_TAG != "0" * 8 else "1" * 8
    theirs = tmp_path / f".1.2.3.8.dcm.{gone}.h{other}-0123abcd.tmp"
    for p in (mine, theirs):
        p.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == 1
    assert not mine.exists() and theirs.exists()
