"""A node on a small, real tmpfs that runs out of space: C-STORE is refused with 0xA700
below [storage] min_free_mb, watched files wait untouched, acknowledged images whose SC
cannot be written wait without using up their attempts, and once space is freed every
acknowledged instance ends with its SC and its study's SR, with no operator action."""

from __future__ import annotations

import os
import time

from dicompeers import output, storescu
from diskhelpers import fill
from nodehelpers import (
    DONE_TIMEOUT,
    PhantomSet,
    local_file,
    status_json,
    wait_until,
    write_config,
)
from sqlalchemy import select

from cxrd.db import Instance, Job, Rejection, Result, Study
from cxrd.domain import InstanceState, JobState, ResultKind
from cxrd.space import CACHE_SECONDS

MB = 1024 * 1024
MIN_FREE_MB = 8
REFUSED = "Received Store Response (Refused: OutOfResources)"
SUCCESS = "Received Store Response (Success)"


def test_full_disk_refuses_waits_and_recovers_by_itself(tmp_path, tmpfs, nodes, db_of,
                                                         dozen: PhantomSet):
    data = tmpfs(tmp_path / "data", 48)  # the node's data_dir: spool and database
    results = tmpfs(tmp_path / "results", 24)  # [results] folder: its own file system
    drop = tmp_path / "drop"  # a watched folder on yet another one
    drop.mkdir()
    dirs = write_config(tmp_path, extra=f'[results]\nfolder = "{results}"\n')
    text = dirs.config.read_text()
    text = (text.replace("[storage]\n", f"[storage]\nmin_free_mb = {MIN_FREE_MB}\n")
                .replace("[watch]\n", f'[watch]\nfolders = ["{drop}"]\n')
                .replace("max_attempts = 5", "max_attempts = 1")  # any counted failure ends it
                .replace("stable_seconds = 1", "stable_seconds = 3"))
    dirs.config.write_text(text)
    assert dirs.data_dir == data
    node = nodes.start(dirs)
    port = int(text.split("port = ")[1].split()[0])
    db = db_of(dirs)
    files = {f.study_instance_uid: [] for f in dozen.files}
    for f in dozen.files:
        files[f.study_instance_uid].append(f)
    first, second, third = (files[uid] for uid in list(files)[:3])

    # Above the threshold (by a few MB): stored and acknowledged.
    room = fill(results, (MIN_FREE_MB + 3) * MB, "room.bin")
    done = storescu(port, [dozen.folder / f.path for f in first])
    assert done.returncode == 0 and done.stderr.count(SUCCESS) == len(first), output(done)
    # Then the disk fills before their results are written.
    full = fill(results, 64 * 1024, "full.bin")
    time.sleep(CACHE_SECONDS + 0.5)  # the node looks at free space at most once a second

    # Below it: refused with 0xA700, nothing stored; watched files wait untouched.
    done = storescu(port, [dozen.folder / f.path for f in second],
                    options=["--no-halt"])  # go on after a refusal, as a PACS queue would
    assert done.stderr.count(REFUSED) == len(second), output(done)
    dozen.drop(drop, third)
    waiting = {p: os.stat(p) for p in drop.iterdir()}

    def resource_waits() -> bool:
        return node.log().count("action=job-wait") >= 2 * len(first)
    wait_until(resource_waits, DONE_TIMEOUT, "the SC writes to fail on the full disk, twice")
    assert "error_type=OSError" in node.log()
    with db.session() as s:
        jobs = s.scalars(select(Job)).all()
        uids = set(s.scalars(select(Instance.sop_instance_uid)).all())
        rejections = s.scalars(select(Rejection)).all()
    assert uids == {f.sop_instance_uid for f in first}  # the refused ones were not stored
    assert jobs and not [j for j in jobs if j.state == JobState.FAILED.value]
    assert all(j.attempts <= 1 for j in jobs)
    assert any((j.error or "").startswith("waiting for a resource: OSError") for j in jobs)
    assert sorted(r.reason for r in rejections) == ["disk-low"] * len(second)
    for path, before in waiting.items():
        now = os.stat(path)
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (
            before.st_ino, before.st_size, before.st_mtime_ns), path
    doc = status_json(dirs)
    assert doc["disk"]["low"] and doc["disk"]["refused"] == len(second)
    assert doc["disk"]["min_free_mb"] == MIN_FREE_MB and not doc["healthy"]
    assert [fs["free_mb"] < MIN_FREE_MB for fs in doc["disk"]["filesystems"]] == [False, True]

    # Space comes back: no restart, no command.
    full.unlink()
    room.unlink()
    time.sleep(CACHE_SECONDS + 0.5)
    done = storescu(port, [dozen.folder / f.path for f in second])  # the PACS retries
    assert done.returncode == 0 and done.stderr.count(SUCCESS) == len(second), output(done)
    acknowledged = [*first, *second, *third]

    def finished() -> bool:
        with db.session() as s:
            states = s.scalars(select(Instance.state)).all()
            reported = s.scalars(select(Study.sr_sop_instance_uid)).all()
        return (len(states) == len(acknowledged)
                and all(st == InstanceState.DONE.value for st in states)
                and len(reported) == 3 and all(reported))
    wait_until(finished, DONE_TIMEOUT, "every acknowledged instance to get its results")
    with db.session() as s:
        jobs = s.scalars(select(Job)).all()
        rows = s.scalars(select(Result)).all()
        studies = s.scalars(select(Study)).all()
    assert not list(drop.iterdir())
    assert not [j for j in jobs if j.state == JobState.FAILED.value]
    scs = {r.source_sop_instance_uid: r for r in rows if r.kind == ResultKind.SC.value}
    assert set(scs) == {f.sop_instance_uid for f in acknowledged}
    srs = {r.sop_instance_uid: r for r in rows if r.kind == ResultKind.SR.value}
    for study in studies:
        assert study.sr_sop_instance_uid in srs
    for r in rows:
        assert local_file(dirs, r.path).parent == results
        assert local_file(dirs, r.path).stat().st_size > 0
    doc = status_json(dirs)
    assert not doc["disk"]["low"] and doc["healthy"], doc
    assert "action=disk-low" in node.log() and "action=disk-ok" in node.log()
    assert node.stop() == 0
