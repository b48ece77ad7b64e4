"""An operator mends what failed, on a running ``cxrd serve``: ``cxrd deliveries retry``
sends dead deliveries again to a destination (dcmtk's ``storescp``) that is back up, and
``cxrd jobs retry`` runs failed jobs again once their cause is fixed. ``cxrd status`` is
unhealthy while they are dead or failed, shows who mended what, and is healthy again once
what was retried has succeeded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicompeers import StoreSCP, free_port
from nodehelpers import (
    DONE_TIMEOUT,
    DbView,
    NodeDirs,
    Nodes,
    PhantomSet,
    check_outcome,
    run_cli,
    settled,
    status_json,
    wait_until,
    write_config,
)
from sqlalchemy import select

from cxrd.db import Delivery, Instance, Result
from cxrd.domain import DeliveryState, InstanceState

pytestmark = pytest.mark.slow

DESTINATIONS = ("pacs", "archive")


def status(dirs: NodeDirs) -> tuple[int, dict[str, Any]]:
    """``cxrd status --json``: its exit code (0 healthy, 2 unhealthy) and document."""
    done = run_cli("status", "--json", "--config", str(dirs.config))
    assert done.returncode in (0, 2), done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, doc


def by_state(dirs: NodeDirs) -> dict[str, int]:
    deliveries: dict[str, int] = status_json(dirs)["deliveries"]["by_state"]
    return deliveries


def deliveries_of(db: DbView, destination: str) -> dict[str, str]:
    """{result SOP Instance UID: delivery state} for one destination."""
    with db.session() as s:
        rows = s.execute(select(Result.sop_instance_uid, Delivery.state).join(
            Result, Delivery.result_id == Result.id).where(
            Delivery.destination == destination)).all()
    return {str(u): str(st) for u, st in rows}


def received_uids(scp: StoreSCP) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in scp.received()}


def test_dead_deliveries_are_sent_again_after_deliveries_retry(
        tmp_path: Path, nodes: Nodes, db_of: Any, dozen: PhantomSet) -> None:
    ports = {name: free_port() for name in DESTINATIONS}
    # Both destinations are down; a delivery is dead once it is about a second old.
    dirs = write_config(tmp_path, extra="""
[sender]
initial_backoff_seconds = 0.2
max_backoff_seconds = 0.5
max_age_hours = 0.0003
""" + "".join(f"""
[[destinations]]
name = "{name}"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {port}
""" for name, port in ports.items()))
    node = nodes.start(dirs)
    db = db_of(dirs)
    study = dozen.files[:3]  # one study: 3 SCs, 3 lung SEGs and an SR, for each destination
    dozen.drop(dirs.incoming, study)

    wait_until(lambda: by_state(dirs) == {DeliveryState.DEAD.value: 14}, DONE_TIMEOUT,
               "every delivery to be dead")
    code, doc = status(dirs)
    assert code == 2 and doc["healthy"] is False
    assert doc["deliveries"]["recent_dead"] and doc["operator_actions"] == []

    scps = {name: StoreSCP(tmp_path / name, port=port) for name, port in ports.items()}
    try:
        # One destination first: only its deliveries are sent; the other's stay dead.
        done = run_cli("deliveries", "retry", "--destination", "pacs",
                       "--config", str(dirs.config))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "re-queued 7 dead deliveries to pacs"
        assert "action=deliveries-retry count=7 destination=pacs actor=" in done.stderr
        wait_until(lambda: set(deliveries_of(db, "pacs").values()) == {"done"}, DONE_TIMEOUT,
                   "the deliveries to pacs to be done")
        assert received_uids(scps["pacs"]) == set(deliveries_of(db, "pacs"))
        assert set(deliveries_of(db, "archive").values()) == {"dead"}
        assert not scps["archive"].received()
        code, doc = status(dirs)
        assert code == 2 and doc["healthy"] is False  # the archive's are still dead

        # Then all of them.
        done = run_cli("deliveries", "retry", "--config", str(dirs.config))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "re-queued 7 dead deliveries"
        wait_until(lambda: status(dirs)[0] == 0, DONE_TIMEOUT, "status to be healthy")
        code, doc = status(dirs)
        assert doc["healthy"] is True
        assert doc["deliveries"]["by_state"] == {DeliveryState.DONE.value: 14}
        assert received_uids(scps["archive"]) == set(deliveries_of(db, "archive"))
        actions = [(a["action"], a["scope"], a["count"]) for a in doc["operator_actions"]]
        assert actions == [("deliveries-retry", None, 7),
                           ("deliveries-retry", "destination=pacs", 7)]
        assert all(a["actor"] and a["at"].endswith("Z") for a in doc["operator_actions"])
        text = run_cli("status", "--config", str(dirs.config)).stdout
        assert "deliveries-retry destination=pacs re-queued 7" in text
        assert text.rstrip().endswith("healthy")
        assert node.stop() == 0
    finally:
        for scp in scps.values():
            scp.stop()


def test_failed_jobs_are_run_again_after_jobs_retry(
        tmp_path: Path, nodes: Nodes, db_of: Any, dozen: PhantomSet) -> None:
    dirs = write_config(tmp_path)
    node = nodes.start(dirs)
    db = db_of(dirs)
    # The fault: the results folder is a file, so every heatmap SC write fails.
    dirs.results.rmdir()
    dirs.results.write_text("not a folder\n")
    study = dozen.files[:3]
    dozen.drop(dirs.incoming, study)

    wait_until(lambda: settled(dirs, db), DONE_TIMEOUT, "the study to end")
    assert db.states(Instance.state) == {InstanceState.FAILED.value: 3}
    code, doc = status(dirs)
    assert code == 2 and doc["healthy"] is False
    assert doc["jobs_failed_unresolved"] == 3
    assert {f["resolved"] for f in doc["recent_failures"]} == {False}
    assert doc["results"] == {}

    # The cause is fixed; the operator runs the failed jobs again.
    dirs.results.unlink()
    dirs.results.mkdir()
    done = run_cli("jobs", "retry", "--config", str(dirs.config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "re-queued 3 failed jobs (3 classify, 0 report) in 1 studies"
    assert "action=jobs-retry count=3 scope=all classify=3 report=0 studies=1" in done.stderr

    wait_until(lambda: settled(dirs, db), DONE_TIMEOUT, "the retried jobs to end")
    outcome = check_outcome(dirs, db, study)  # an SC per image, the study's one SR
    assert len(outcome["done"]) == 3 and outcome["srs"] == 1
    code, doc = status(dirs)
    assert code == 0 and doc["healthy"] is True
    assert doc["jobs_failed_unresolved"] == 0
    assert {f["resolved"] for f in doc["recent_failures"]} == {True}  # kept, answered
    [action] = doc["operator_actions"]
    assert (action["action"], action["count"], action["detail"]) == (
        "jobs-retry", 3, "classify=3 report=0 studies=1")
    assert node.stop() == 0
