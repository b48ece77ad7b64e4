"""``cxrd serve`` with four ``[[destinations]]``: dcmtk's ``storescp`` (good), and three
faulty pynetdicom Storage SCPs on loopback (real peers on the wire): one that answers only
long after the DIMSE timeout, one that aborts the association once it has the data set, one
that answers warning 0xB000 (coercion of data elements).

The good destination gets every result promptly, within a bound that the slow one's DIMSE
timeout would exceed if it held the sender up; each faulty destination's deliveries have
their recorded outcome (row state, last error, a log line with the UIDs), and ``cxrd
status`` shows them per destination.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from dicompeers import FaultySCP, StoreSCP
from nodehelpers import (
    DbView,
    NodeDirs,
    Nodes,
    frontal_set,
    run_cli,
    settled,
    wait_until,
    write_config,
)
from sqlalchemy import select

from cxrd.db import Delivery, Result
from cxrd.domain import DeliveryState

pytestmark = pytest.mark.slow

#: [sender] dimse_timeout_seconds of the node: the slow destination answers far later.
DIMSE_TIMEOUT = 8
#: Each result reaches the good destination within this many seconds of being queued;
#: a sender held up by the slow destination would need a DIMSE timeout per pass.
PROMPT = 5.0


@pytest.fixture
def faulty() -> Iterator[dict[str, FaultySCP]]:
    peers = {"slow": FaultySCP("slow", delay=120), "aborts": FaultySCP("abort"),
             "warns": FaultySCP("warning", status=0xB000)}
    yield peers
    for peer in peers.values():
        peer.stop()


def destination(name: str, ae_title: str, port: int) -> str:
    return (f'\n[[destinations]]\nname = "{name}"\nae_title = "{ae_title}"\n'
            f'host = "127.0.0.1"\nport = {port}\n')


def rows(db: DbView) -> list[tuple[Delivery, str]]:
    with db.session() as s:
        return [(d, r.sop_instance_uid) for d, r in s.execute(
            select(Delivery, Result).join(Result, Delivery.result_id == Result.id)
            .order_by(Delivery.id)).all()]


def received_uids(scp: StoreSCP) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in scp.received()}


def test_faulty_destinations_do_not_block_the_good_one(
        tmp_path: Path, nodes: Nodes, db_of: Callable[[NodeDirs], DbView],
        faulty: dict[str, FaultySCP]) -> None:
    good = StoreSCP(tmp_path / "good")
    try:
        # the slow destination comes first: a sender going through them in turn would
        # reach the others only after its timeout
        extra = (f"\n[sender]\ninitial_backoff_seconds = 0.5\nmax_backoff_seconds = 2\n"
                 f"dimse_timeout_seconds = {DIMSE_TIMEOUT}\n"
                 + destination("slow", faulty["slow"].ae_title, faulty["slow"].port)
                 + destination("aborts", faulty["aborts"].ae_title, faulty["aborts"].port)
                 + destination("warns", faulty["warns"].ae_title, faulty["warns"].port)
                 + destination("good", "STORESCP", good.port))
        (tmp_path / "node").mkdir()
        dirs = write_config(tmp_path / "node", extra=extra)
        node = nodes.start(dirs)
        db = db_of(dirs)
        images = frontal_set(tmp_path / "images", n_studies=2, per_study=2)
        images.drop(dirs.incoming)
        wait_until(lambda: settled(dirs, db), 180, "the images to be classified and reported")

        def results() -> set[str]:
            return {uid for _, uid in rows(db)}

        expected = results()
        assert len(expected) == 4 + 4 + 2  # an SC and a SEG per image, an SR per study
        wait_until(lambda: received_uids(good) >= expected, 30,
                   "every result at the good destination")
        assert received_uids(good) == expected

        # good: every result done, each within PROMPT of being queued
        def delivered() -> list[Delivery] | None:
            found = [d for d, _ in rows(db) if d.destination == "good"]
            return found if {d.state for d in found} == {DeliveryState.DONE.value} else None

        waits = [(d.done_at - d.created_at).total_seconds()
                 for d in wait_until(delivered, 10, "the good deliveries recorded done")
                 if d.done_at is not None]
        assert len(waits) == 10 and max(waits) < PROMPT, waits

        # warns: stored with a warning, which is recorded: done, not retried
        def warned() -> list[Delivery] | None:
            found = [d for d, _ in rows(db) if d.destination == "warns"]
            return found if {d.state for d in found} == {DeliveryState.DONE.value} else None

        for d in wait_until(warned, 30, "the warning destination's deliveries"):
            assert d.attempts == 1
            assert (d.last_error or "").startswith(
                "stored with warning status 0xB000 (coercion of data elements)"), d.last_error
        assert sorted(faulty["warns"].received) == sorted(expected)

        # aborts and slow: pending, retried with their reason recorded
        def recorded(name: str, reason: str) -> list[tuple[Delivery, str]] | None:
            found = [(d, uid) for d, uid in rows(db) if d.destination == name]
            errors = [d.last_error or "" for d, _ in found]
            return found if len(found) == 10 and any(e.startswith(reason) for e in errors) \
                and all(e for e in errors) else None

        aborted = wait_until(lambda: recorded(
            "aborts", "destination aborted the association (A-ABORT"), 60,
            "the aborting destination's outcome")
        slow = wait_until(lambda: recorded(
            "slow", f"no response to C-STORE within {DIMSE_TIMEOUT} s"), 60,
            "the slow destination's outcome")
        for found in (aborted, slow):
            assert {d.state for d, _ in found} == {DeliveryState.PENDING.value}
            assert all(d.attempts >= 1 for d, _ in found)
            assert all(d.next_attempt_at > d.created_at for d, _ in found)
        assert faulty["aborts"].received and faulty["slow"].received

        # log lines: UIDs, destination and the status or reason
        log = node.log()
        warned_uid = next(iter(expected))
        assert any("action=delivered-with-warning" in ln and warned_uid in ln
                   and "destination=warns" in ln and "0xB000" in ln
                   for ln in log.splitlines()), log[-3000:]
        for name, found in (("aborts", aborted), ("slow", slow)):
            uid = found[0][1]
            assert any("action=delivery-retry" in ln and uid in ln
                       and f"destination={name}" in ln for ln in log.splitlines()), name

        # cxrd status: each destination with its outcome; pending retries are not dead
        status = run_cli("status", "--json", "--config", str(dirs.config))
        assert status.returncode == 0, status.stdout + status.stderr
        doc = json.loads(status.stdout)
        per = doc["deliveries"]["by_destination"]
        assert per["good"]["by_state"] == {DeliveryState.DONE.value: 10}
        assert per["good"]["last_error"] is None and per["good"]["with_warning"] == 0
        assert per["warns"]["by_state"] == {DeliveryState.DONE.value: 10}
        assert per["warns"]["with_warning"] == 10
        assert "0xB000" in per["warns"]["last_warning"]
        assert per["aborts"]["by_state"] == {DeliveryState.PENDING.value: 10}
        assert "A-ABORT" in per["aborts"]["last_error"]
        assert per["slow"]["by_state"] == {DeliveryState.PENDING.value: 10}
        assert "dimse_timeout_seconds" in per["slow"]["last_error"]
        assert {w["destination"] for w in doc["deliveries"]["recent_warnings"]} == {"warns"}
        assert doc["healthy"] is True
        text = run_cli("status", "--config", str(dirs.config))
        assert text.returncode == 0, text.stderr
        assert "to good: done 10" in text.stdout
        assert "to warns: done 10; 10 stored with a warning (stored with warning status " \
               "0xB000" in text.stdout
        assert "to slow: pending 10; last error:" in text.stdout
        assert "to aborts: pending 10; last error:" in text.stdout

        assert node.stop() == 0
    finally:
        good.stop()

