"""Retention on a running ``cxrd serve``: ``cxrd purge --before DATE`` removes the spool
files of finished studies and the results delivered to the destination (dcmtk's
``storescp``), keeps the results not yet delivered until they are, ``cxrd status`` shows
the bytes in use and the last purge, and ``cxrd reprocess`` names the studies it can no
longer reach. With ``[storage] retention_days`` the node purges by itself soon after it
starts."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from dicompeers import StoreSCP, free_port
from nodehelpers import (
    DONE_TIMEOUT,
    DbView,
    NodeDirs,
    Nodes,
    PhantomSet,
    run_cli,
    settled,
    status_json,
    wait_until,
    write_config,
)
from sqlalchemy import func, select, update

from cxrd.db import Instance, Job, Result, Study, utcnow
from cxrd.domain import DeliveryState, JobState

pytestmark = pytest.mark.slow


def by_state(dirs: NodeDirs) -> dict[str, int]:
    deliveries: dict[str, int] = status_json(dirs)["deliveries"]["by_state"]
    return deliveries


def spool_files(dirs: NodeDirs) -> list[Path]:
    return sorted((dirs.data_dir / "spool").rglob("*.dcm"))


def result_paths(db: DbView, study_uid: str) -> list[Path]:
    with db.session() as s:
        # keys (results/<uid>.dcm): the default results folder is data_dir/results
        return [db.path.parent / p for p in s.scalars(select(Result.path).where(
            Result.study_instance_uid == study_uid))]


def purge(dirs: NodeDirs, *args: str) -> str:
    tomorrow = (utcnow() + dt.timedelta(days=1)).date().isoformat()
    done = run_cli("purge", "--before", tomorrow, *args, "--config", str(dirs.config))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_purge_keeps_what_is_not_delivered_and_reprocess_names_what_it_cannot_reach(
        tmp_path: Path, nodes: Nodes, db_of: Any, dozen: PhantomSet) -> None:
    port = free_port()
    dirs = write_config(tmp_path, extra=f"""
[sender]
initial_backoff_seconds = 0.2
max_backoff_seconds = 0.5
max_age_hours = 1

[[destinations]]
name = "pacs"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {port}
""")
    node = nodes.start(dirs)
    db = db_of(dirs)
    first, second = dozen.files[:3], dozen.files[3:6]
    uid_a, uid_b = first[0].study_instance_uid, second[0].study_instance_uid
    assert uid_a != uid_b

    scp = StoreSCP(tmp_path / "pacs", port=port)
    dozen.drop(dirs.incoming, first)  # delivered: 3 SCs, 3 lung SEGs and the SR
    wait_until(lambda: settled(dirs, db) and by_state(dirs) == {"done": 7}, DONE_TIMEOUT,
               "the first study to be reported and delivered")
    scp.stop()
    dozen.drop(dirs.incoming, second)  # the destination is down: not delivered
    wait_until(lambda: settled(dirs, db) and by_state(dirs) == {"done": 7, "pending": 7},
               DONE_TIMEOUT, "the second study to be reported, its deliveries pending")

    before = status_json(dirs)["storage"]
    spooled = spool_files(dirs)
    assert len(spooled) == 6
    assert before["spool_bytes"] == sum(p.stat().st_size for p in spooled)
    assert before["results_bytes"] == sum(
        p.stat().st_size for p in result_paths(db, uid_a) + result_paths(db, uid_b))
    assert before["last_purge"] is None and before["file_systems"][0]["free_bytes"] > 0

    # A dry run counts and removes nothing.
    assert purge(dirs, "--dry-run").startswith(
        "would remove 6 received instances in 2 studies")
    assert spool_files(dirs) == spooled

    text = purge(dirs)
    assert text.startswith("removed 6 received instances in 2 studies"), text
    assert "and 7 results" in text and "kept 7 results" in text
    assert spool_files(dirs) == []
    assert not any(p.exists() for p in result_paths(db, uid_a))  # delivered: gone
    assert all(p.exists() for p in result_paths(db, uid_b))  # pending: kept
    with db.session() as s:  # the rows stay, marked
        assert len(s.scalars(select(Instance.purged_at)).all()) == 6
        assert None not in s.scalars(select(Instance.purged_at)).all()

    doc = status_json(dirs)
    storage = doc["storage"]
    assert storage["spool_bytes"] == 0
    assert storage["results_bytes"] == sum(p.stat().st_size for p in result_paths(db, uid_b))
    last = storage["last_purge"]
    assert (last["trigger"], last["studies"], last["instances"], last["results"],
            last["results_kept"]) == ("command", 2, 6, 7, 7)
    assert last["spool_bytes"] == before["spool_bytes"]
    text = run_cli("status", "--config", str(dirs.config)).stdout
    assert "last purge: " in text and "7 results kept undelivered" in text

    # reprocess names both studies and queues nothing
    done = run_cli("reprocess", "--since", "2000-01-01", "--config", str(dirs.config))
    assert done.returncode == 0, done.stderr
    assert f"cannot reprocess {uid_a}: its received images were purged" in done.stdout
    assert f"cannot reprocess {uid_b}: its received images were purged" in done.stdout
    assert "skipped 2 studies no longer reachable" in done.stdout
    with db.session() as s:
        assert s.scalars(select(Job.id).where(Job.state.in_(
            (JobState.PENDING.value, JobState.RUNNING.value)))).all() == []
        assert set(s.scalars(select(Study.generation)).all()) == {1}

    # The destination returns: the kept results are delivered, then purged too.
    scp = StoreSCP(tmp_path / "pacs-again", port=port)
    try:
        wait_until(lambda: by_state(dirs) == {DeliveryState.DONE.value: 14}, DONE_TIMEOUT,
                   "the kept results to be delivered")
        assert len(scp.received()) == 7
        assert "and 7 results" in purge(dirs)
        assert not any(p.exists() for p in result_paths(db, uid_b))
        doc = status_json(dirs)
        assert doc["storage"]["results_bytes"] == 0 and doc["healthy"] is True
        assert node.stop() == 0
    finally:
        scp.stop()


def test_the_node_purges_by_itself_after_retention_days(
        tmp_path: Path, nodes: Nodes, db_of: Any, dozen: PhantomSet) -> None:
    dirs = write_config(tmp_path, extra="")
    text = dirs.config.read_text().replace(
        f'data_dir = "{dirs.data_dir}"', f'data_dir = "{dirs.data_dir}"\nretention_days = 1')
    dirs.config.write_text(text)
    node = nodes.start(dirs)
    db = db_of(dirs)
    study = dozen.files[:3]
    dozen.drop(dirs.incoming, study)
    wait_until(lambda: settled(dirs, db), DONE_TIMEOUT, "the study to be reported")
    assert node.stop() == 0
    assert len(spool_files(dirs)) == 3
    uid = study[0].study_instance_uid
    results = result_paths(db, uid)
    assert len(results) == 7 and all(p.exists() for p in results)  # 3 SCs, 3 SEGs, SR

    # Two days pass (the rows are moved back, in SQLite's date arithmetic); a study of
    # today stays.
    with db.engine.begin() as conn:
        for column in (Study.first_received_at, Study.last_received_at, Study.stable_at,
                       Study.reported_at):
            conn.execute(update(Study).values({column: func.datetime(column, "-2 days")}))
        conn.execute(update(Result).values(
            created_at=func.datetime(Result.created_at, "-2 days")))
    recent = dozen.files[3:6]
    node = nodes.start(dirs)
    dozen.drop(dirs.incoming, recent)

    def purged() -> dict[str, Any] | None:
        last: dict[str, Any] | None = status_json(dirs)["storage"]["last_purge"]
        return last if last is not None and last["instances"] else None

    last = wait_until(purged, DONE_TIMEOUT, "the node's own purge")
    assert last is not None
    assert (last["trigger"], last["studies"], last["instances"], last["results"]) == (
        "retention", 1, 3, 7)
    assert not any(p.exists() for p in results)
    assert "action=purge trigger=retention" in node.log()
    wait_until(lambda: settled(dirs, db), DONE_TIMEOUT, "the recent study to be reported")
    remaining = spool_files(dirs)
    assert len(remaining) == 3 and all(recent[0].study_instance_uid in str(p)
                                       for p in remaining)
    assert json.loads(run_cli("purge", "--before", "2000-01-01", "--json", "--config",
                              str(dirs.config)).stdout)["instances"] == 0
    assert node.stop() == 0
