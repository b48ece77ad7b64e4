"""Urgent-finding notifications end to end in process: the report job queues them with the
SR (a worker with a small fake classifier), and the sender delivers them to real peers on
loopback (``notifypeers``: an HTTP server, an MLLP listener) through the outbox of a real
SQLite file, and of PostgreSQL.

Checked: a TB-positive study gets exactly one notification row per endpoint, a NORM study
none, and a report job redone (after a crash, before or after its commit) none more; a
webhook answered 500 then 200 is retried and delivered, 400 is dead at once, a webhook
down holds the rest of its pass; an HL7 receiver answering AA, AE then AA, or dropping the
connection first, gets the message delivered exactly once (one AA), AR is retried only at
the maximum backoff; the bearer token goes in the header; status shows notifications as it
shows destinations.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomfactory import make_dataset, uid, write
from notifypeers import HookServer, MllpServer
from pgschema import postgres_url
from queuehelpers import expire_leases
from sqlalchemy import select, text, update
from test_worker import FakeClassifier, _drain, _store_study

from cxrd import queue
from cxrd.admit import admit_stable_studies, requeue_study
from cxrd.config import Config, load_config, validate
from cxrd.db import SCHEMA_VERSION, Database, Delivery, Job, Result, Study, utcnow
from cxrd.domain import DeliveryState, JobKind, JobState, ResultKind, StudyState
from cxrd.ingest import Ingestor
from cxrd.outbox import add_result
from cxrd.send import Sender
from cxrd.status import collect
from cxrd.worker import WorkerLoop

SUMMARY = {"finding": "TB", "probability": 0.93, "threshold": 0.5, "images": 1,
           "model": {"name": "cxrd-demo", "version": "1", "demo": True, "device_uid": "2.25.9"}}


@pytest.fixture
def peers() -> Iterator[Callable[..., Any]]:
    started: list[Any] = []

    def start(kind: type, *args: Any) -> Any:
        started.append(kind(*args))
        return started[-1]

    yield start
    for peer in started:
        peer.stop()


def notify_config(tmp_path: Path, notifications: list[dict[str, Any]], *,
                  initial: float = 1.0, maximum: float = 8.0) -> Config:
    return validate({
        "storage": {"data_dir": str(tmp_path / "data")},
        "sender": {"initial_backoff_seconds": initial, "max_backoff_seconds": maximum},
        "notifications": notifications,
    })


def queue_srs(db: Database, folder: Path, n: int, names: list[str]) -> list[str]:
    """``n`` SRs (OT stand-ins with patient data) of a TB finding, each queued for the
    notifications ``names``; returns their SOP Instance UIDs."""
    out = []
    for i in range(n):
        ds = make_dataset("OT", study_uid=uid(), rows=4, columns=4, seed=i,
                          AccessionNumber=f"ACC-{i}", PatientID=f"PID-{i}",
                          PatientName="Doe^Jane")
        path = write(folder / f"{ds.SOPInstanceUID}.dcm", ds)
        with db.session() as s:
            s.add(Result(sop_instance_uid=str(ds.SOPInstanceUID),
                         study_instance_uid=str(ds.StudyInstanceUID), kind=ResultKind.SR.value,
                         generation=1, path=str(path), summary=json.dumps(SUMMARY)))
            s.flush()
            row = s.scalars(select(Result).where(
                Result.sop_instance_uid == str(ds.SOPInstanceUID))).one()
            for name in names:
                s.add(Delivery(result_id=row.id, destination=name))
        out.append(str(ds.SOPInstanceUID))
    return out


def deliveries(db: Database) -> list[Delivery]:
    with db.session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def make_due(db: Database) -> None:
    with db.session() as s:
        s.execute(update(Delivery).values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))


# ---------------------------------------------------------------------- queued with the SR


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[WorkerLoop, Ingestor, Database]]:
    config_file = tmp_path / "cxrd.toml"
    config_file.write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"
[model]
segmenter = "off"

[[notifications]]
name = "worklist"
kind = "webhook"
url = "http://127.0.0.1:9/hooks"

[[notifications]]
name = "ris"
kind = "hl7"
host = "127.0.0.1"
port = 9
findings = ["TB", "NTB"]
""")
    config = load_config(config_file, env={})
    db = Database(config.storage.database_url_resolved)
    db.migrate()
    loop = WorkerLoop(config, "test:1:w0", db, classifier=FakeClassifier())  # type: ignore[arg-type]
    yield loop, Ingestor(db, config.storage.spool_dir, config.storage.rejected_dir), db
    db.dispose()


def _notifications(db: Database, study: str) -> list[tuple[str, str]]:
    with db.session() as s:
        return sorted((d, r) for d, r in s.execute(
            select(Delivery.destination, Result.sop_instance_uid)
            .join(Result, Delivery.result_id == Result.id)
            .where(Result.study_instance_uid == study)))


def test_a_tb_study_gets_one_notification_per_endpoint_and_a_norm_study_none(
        worker: tuple[WorkerLoop, Ingestor, Database]) -> None:
    loop, ingestor, db = worker
    tb = _store_study(ingestor, 2, bright=True)
    norm = _store_study(ingestor, 2, bright=False)
    admit_stable_studies(db, 0)
    # A worker dies holding the TB study's report job (it may have written the SR file):
    # its lease expires and the job is done again, with the same SR UID.
    w = loop.config.workers
    for job in queue.claim(db, loop.worker_id, 8, w.lease_seconds, w.max_attempts):
        loop.process([job])
    [report] = [j for j in queue.claim(db, loop.worker_id, 8, w.lease_seconds, w.max_attempts)
                if j.study_instance_uid == tb]
    expire_leases(db)
    _drain(loop)
    with db.session() as s:
        sr_uid = s.scalars(select(Study.sr_sop_instance_uid).where(
            Study.study_instance_uid == tb)).one()
        summary = json.loads(s.scalars(select(Result.summary).where(
            Result.sop_instance_uid == sr_uid)).one())
    assert report.kind == JobKind.REPORT
    assert _notifications(db, tb) == [("ris", sr_uid), ("worklist", sr_uid)]
    assert _notifications(db, norm) == []
    assert summary["finding"] == "TB" and summary["probability"] == pytest.approx(0.8)
    assert summary["threshold"] == 0.5 and summary["images"] == 2
    assert summary["model"]["name"] == "fake" and summary["model"]["demo"] is True
    assert "P-42" not in json.dumps(summary)  # no patient data in the row

    # The completing transaction run again after its commit (the report job redone, its
    # study's SR as before it): the SR is recorded already, nothing is queued again.
    with db.session() as s:
        s.execute(update(Job).where(Job.kind == JobKind.REPORT.value,
                                    Job.study_instance_uid == tb)
                  .values(state=JobState.PENDING.value))
        st = s.scalars(select(Study).where(Study.study_instance_uid == tb)).one()
        st.state, st.sr_sop_instance_uid = StudyState.ADMITTED.value, None
    _drain(loop)
    assert _notifications(db, tb) == [("ris", sr_uid), ("worklist", sr_uid)]

    # A reprocess with the same finding: a new SR, no new notification.
    assert requeue_study(db, tb) == 2
    _drain(loop)
    with db.session() as s:
        srs = s.scalars(select(Result.sop_instance_uid).where(
            Result.study_instance_uid == tb, Result.kind == ResultKind.SR.value)).all()
    assert len(srs) == 2
    assert _notifications(db, tb) == [("ris", sr_uid), ("worklist", sr_uid)]


# ------------------------------------------------------------------------------ webhook


def test_webhook_500_then_200_is_retried_then_delivered_with_its_token(
        tmp_path: Path, db: Database, peers: Callable[..., Any]) -> None:
    hook = peers(HookServer, [500, 200])
    token = tmp_path / "hook.token"
    token.write_text("s3cret-token\n")
    config = notify_config(tmp_path, [{"name": "worklist", "kind": "webhook",
                                       "url": hook.url, "token_file": str(token)}])
    [sr] = queue_srs(db, tmp_path / "results", 1, ["worklist"])
    sender = Sender(config, db)
    assert sender.run_once() == 1
    [row] = deliveries(db)
    assert row.state == DeliveryState.PENDING.value and row.attempts == 1
    assert "HTTP 500" in (row.last_error or "")
    assert sender.run_once() == 0  # backing off
    make_due(db)
    assert sender.run_once() == 1
    [row] = deliveries(db)
    assert row.state == DeliveryState.DONE.value and row.attempts == 2
    assert len(hook.requests) == 2
    for headers, body in hook.requests:
        assert headers["Authorization"] == "Bearer s3cret-token"
        assert headers["Idempotency-Key"] == f"{sr}/worklist"
        assert body["sr_sop_instance_uid"] == sr and body["accession_number"] == "ACC-0"
        assert (body["finding"], body["probability"], body["threshold"]) == ("TB", 0.93, 0.5)
        assert body["model"]["demo"] is True and "PID-0" not in json.dumps(body)
    # status and its counts show the notification as they show a destination
    doc = collect(config, db)
    assert doc["deliveries"]["by_destination"]["worklist"]["by_state"] == {"done": 1}


def test_webhook_400_is_dead_at_once(tmp_path: Path, db: Database,
                                     peers: Callable[..., Any]) -> None:
    hook = peers(HookServer, [400])
    config = notify_config(tmp_path, [{"name": "worklist", "kind": "webhook",
                                       "url": hook.url}])
    queue_srs(db, tmp_path / "results", 1, ["worklist"])
    assert Sender(config, db).run_once() == 1
    [row] = deliveries(db)
    assert row.state == DeliveryState.DEAD.value and row.attempts == 1
    assert "HTTP 400" in (row.last_error or "") and "refused by the test server" in (
        row.last_error or "")
    assert collect(config, db)["deliveries"]["recent_dead"][0]["destination"] == "worklist"


def test_a_webhook_down_holds_the_rest_of_its_pass(tmp_path: Path, db: Database) -> None:
    from dicompeers import free_port

    config = notify_config(tmp_path, [{"name": "worklist", "kind": "webhook",
                                       "url": f"http://127.0.0.1:{free_port()}/hook",
                                       "connect_timeout_seconds": 2}])
    queue_srs(db, tmp_path / "results", 3, ["worklist"])
    assert Sender(config, db).run_once() == 3
    rows = deliveries(db)
    assert {r.state for r in rows} == {DeliveryState.PENDING.value}
    assert "cannot connect" in (rows[0].last_error or "")
    assert all("not sent: an earlier notification failed" in (r.last_error or "")
               for r in rows[1:])


# ---------------------------------------------------------------------------------- HL7


@pytest.mark.parametrize("script", [["AA"], ["AE", "AA"], ["drop", "AA"]],
                         ids=["aa", "ae-then-aa", "drop-then-aa"])
def test_hl7_is_retried_until_acknowledged_and_delivered_exactly_once(
        tmp_path: Path, db: Database, peers: Callable[..., Any], script: list[str]) -> None:
    ris = peers(MllpServer, script)
    config = notify_config(tmp_path, [{"name": "ris", "kind": "hl7", "host": "127.0.0.1",
                                       "port": ris.port, "timeout_seconds": 5,
                                       "receiving_application": "RIS"}])
    [sr] = queue_srs(db, tmp_path / "results", 1, ["ris"])
    sender = Sender(config, db)
    for _ in range(len(script)):
        make_due(db)
        assert sender.run_once() == 1
    make_due(db)
    assert sender.run_once() == 0  # nothing left: done
    [row] = deliveries(db)
    assert row.state == DeliveryState.DONE.value and row.attempts == len(script)
    assert len(ris.received) == len(script) and len(ris.accepted) == 1
    ids = {str(m.segment("MSH")(10)) for m in ris.received}
    assert ids == {f"CXRD{row.id}"}  # the same control ID at every attempt
    message = ris.accepted[0]
    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert str(message.segment("PID")(3)) == "PID-0"  # no issuer: no components
    assert str(message.segment("OBR")(2)) == "ACC-0"
    assert sr in str(message)


def test_hl7_ar_is_retried_only_at_the_maximum_backoff(
        tmp_path: Path, db: Database, peers: Callable[..., Any]) -> None:
    ris = peers(MllpServer, ["AR"])
    config = notify_config(tmp_path, [{"name": "ris", "kind": "hl7", "host": "127.0.0.1",
                                       "port": ris.port}], initial=1, maximum=600)
    queue_srs(db, tmp_path / "results", 2, ["ris"])
    before = utcnow()
    assert Sender(config, db).run_once() == 2  # AR is about the message: the next goes on
    rows = deliveries(db)
    assert all(r.state == DeliveryState.PENDING.value for r in rows)
    assert all((r.last_error or "").startswith("PERMANENT: HL7 ACK AR") for r in rows)
    assert all(r.next_attempt_at >= before + dt.timedelta(seconds=590) for r in rows)
    assert len(ris.received) == 2 and ris.connections == 1  # one connection per pass


# ----------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_url()


def test_schema_8_and_a_notification_on_postgres(tmp_path: Path, pg_url: str,
                                                 peers: Callable[..., Any]) -> None:
    """A schema-7 PostgreSQL database gains ``results.summary``; an SR recorded with a
    TB finding is queued for the webhook and delivered by a sender holding a lease."""
    db = Database(pg_url)
    db.migrate()
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE results DROP COLUMN summary"))
        conn.execute(text("DELETE FROM schema_version WHERE version >= 8"))
    db.dispose()
    db = Database(pg_url)
    try:
        assert db.schema_version() == 7
        assert db.migrate() == SCHEMA_VERSION
        hook = peers(HookServer, [200])
        config = notify_config(tmp_path, [{"name": "worklist", "kind": "webhook",
                                           "url": hook.url}])
        ds = make_dataset("OT", study_uid=uid(), rows=4, columns=4, AccessionNumber="A-1")
        path = write(tmp_path / "sr.dcm", ds)
        with db.session() as s:
            assert add_result(s, kind=ResultKind.SR, sop_instance_uid=str(ds.SOPInstanceUID),
                              study_instance_uid=str(ds.StudyInstanceUID), generation=1,
                              path=str(path), summary=SUMMARY,
                              notifications=config.notifications)
        assert Sender(config, db).run_once() == 1
        [row] = deliveries(db)
        assert (row.destination, row.state, row.lease_owner) == (
            "worklist", DeliveryState.DONE.value, None)
        assert [b["accession_number"] for b in hook.bodies()] == ["A-1"]
    finally:
        db.dispose()
