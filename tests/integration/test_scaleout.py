"""Two nodes on one PostgreSQL database: what each shared decision is claimed with.

Deliveries: two ``Sender`` instances (two nodes, each with its own ``[node] id`` and its
own engine) against one database and one real dcmtk ``storescp`` deliver every result
exactly once (the destination's files counted, with unique file names so that a second
copy would show); a delivery whose lease holder vanished mid-send is sent by the other
node after the lease expires, and the vanished holder can no longer record an outcome; a
batch that outlasts its lease renews it as it goes. Schema 5 and 6 migrate in place.
The job claim reads the backlog in index order (no sort of the pending jobs).
Jobs: a lease held by a dead node on another host is not released by this host's restart
(its pids mean nothing here) but comes back when it expires. Metrics: two nodes' database
gauge collectors export the gauges from one node at a time (the advisory lock's holder),
and the other takes over when the holder goes.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomfactory import make_dataset, uid, write
from dicompeers import FaultySCP, StoreSCP
from pgschema import postgres_url
from queuehelpers import claim_order_case, get_job, make_jobs
from sqlalchemy import event, select, update

from cxrd import queue, send
from cxrd.config import Config, validate
from cxrd.db import SCHEMA_VERSION, Database, Delivery, Job, Result, SchemaVersion, utcnow
from cxrd.domain import DeliveryState, JobState, ResultKind
from cxrd.metrics import DatabaseCollector
from cxrd.outbox import (
    RetryPolicy,
    claim_deliveries,
    mark_delivered,
    mark_failed,
    release_dead_delivery_leases,
    release_leases,
    renew_leases,
)
from cxrd.send import Sender

POLICY = RetryPolicy(initial_backoff_seconds=1, max_backoff_seconds=8, max_age_hours=1)


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_url()


@pytest.fixture
def pgdb(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture
def second(pg_url: str, pgdb: Database) -> Iterator[Database]:
    """The same database through a second engine: another node's connections."""
    db = Database(pg_url)
    yield db
    db.dispose()


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    peer = StoreSCP(tmp_path / "pacs", options=["+uf"])  # a second copy gets its own file
    yield peer
    peer.stop()


def node_config(tmp_path: Path, node_id: str, port: int) -> Config:
    return validate({
        "node": {"id": node_id},
        "storage": {"data_dir": str(tmp_path / node_id)},
        "sender": {"dimse_timeout_seconds": 10},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": port}],
    })


def queue_results(db: Database, folder: Path, n: int, destinations: Sequence[str] = ("pacs",)
                  ) -> list[str]:
    """``n`` small Secondary Capture files, each queued for every destination."""
    study = uid()
    uids = []
    due = utcnow() - dt.timedelta(seconds=1)
    with db.session() as s:
        for i in range(n):
            ds = make_dataset("OT", study_uid=study, rows=16, columns=16, seed=i)
            path = write(folder / f"{ds.SOPInstanceUID}.dcm", ds)
            row = Result(sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=study,
                         kind=ResultKind.SC.value, generation=1, path=str(path))
            s.add(row)
            s.flush()
            for name in destinations:
                s.add(Delivery(result_id=row.id, destination=name, created_at=due,
                               next_attempt_at=due))
            uids.append(str(ds.SOPInstanceUID))
    return uids


def received_uids(scp: StoreSCP) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in scp.received())


def deliveries(db: Database) -> list[Delivery]:
    with db.session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)).all())


# ------------------------------------------------------------------------- deliveries


def test_v5_adds_the_lease_columns_to_a_version_4_database(pg_url: str):
    db = Database(pg_url)
    try:
        db.migrate()
        with db.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE deliveries DROP COLUMN lease_owner, "
                                 "DROP COLUMN lease_expires")
            conn.exec_driver_sql("DELETE FROM schema_version WHERE version >= 5")
        assert db.migrate() == SCHEMA_VERSION
        with db.session() as s:
            assert 5 in s.scalars(select(SchemaVersion.version)).all()
            s.add(Result(sop_instance_uid=uid(), study_instance_uid=uid(), kind="sc",
                         generation=1, path="/x"))
        assert claim_deliveries(db, 10, "n:1:send-pacs", 60) == {}
    finally:
        db.dispose()


def test_two_senders_deliver_each_result_exactly_once(tmp_path: Path, pgdb: Database,
                                                      second: Database, scp: StoreSCP,
                                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(send, "BATCH", 4)  # many small claims, so the two nodes interleave
    n = 40
    uids = queue_results(pgdb, tmp_path, n)
    senders = [Sender(node_config(tmp_path, "node-a", scp.port), pgdb),
               Sender(node_config(tmp_path, "node-b", scp.port), second)]
    sent = [0, 0]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        dest = senders[i].config.destinations[0]
        barrier.wait()
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                attempted = senders[i].run_destination_once(dest)
                if not attempted and not [d for d in deliveries(pgdb)
                                          if d.state == DeliveryState.PENDING.value]:
                    return
                sent[i] += attempted
                if not attempted:  # the rest is in the other node's hands
                    time.sleep(0.02)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert errors == []
    assert received_uids(scp) == sorted(uids), scp.log()[-2000:]  # each once, none twice
    assert sum(sent) == n and min(sent) > 0, sent  # both nodes sent, no object twice
    rows = deliveries(pgdb)
    assert {(r.state, r.attempts, r.lease_owner, r.lease_expires) for r in rows} == {
        (DeliveryState.DONE.value, 1, None, None)}


def test_delivery_whose_lease_holder_vanished_is_sent_after_expiry(
        tmp_path: Path, pgdb: Database, second: Database, scp: StoreSCP):
    (sop_uid,) = queue_results(pgdb, tmp_path, 1)
    lease = 2.0
    # node-a claims it, then dies before sending (or after sending, before committing)
    (item,) = claim_deliveries(pgdb, 10, "node-a:4242:send-pacs", lease)["pacs"]
    (row,) = deliveries(pgdb)
    assert row.lease_owner == "node-a:4242:send-pacs"
    assert row.next_attempt_at == row.lease_expires and row.state == "pending"
    node_b = Sender(node_config(tmp_path, "node-b", scp.port), second)
    dest = node_b.config.destinations[0]
    assert node_b.run_destination_once(dest) == 0  # in flight: due to no one else
    assert scp.received() == []
    time.sleep(lease + 0.2)
    assert node_b.run_destination_once(dest) == 1  # the expired lease made it due again
    assert received_uids(scp) == [sop_uid]
    (row,) = deliveries(pgdb)
    assert (row.state, row.attempts, row.lease_owner) == (DeliveryState.DONE.value, 1, None)
    # node-a's late outcome is not its to record any more
    mark_failed(pgdb, [item], "association lost", POLICY)
    mark_delivered(pgdb, item)
    (after,) = deliveries(pgdb)
    assert (after.state, after.attempts, after.last_error, after.done_at) == (
        row.state, row.attempts, row.last_error, row.done_at)


def test_a_batch_longer_than_its_lease_keeps_it_renewed(tmp_path: Path, pgdb: Database,
                                                        second: Database,
                                                        monkeypatch: pytest.MonkeyPatch):
    """A slow destination (0.3 s per object) and a lease of 1.2 s: node-a's batch of six
    takes 1.8 s and renews its leases as it goes, so node-b, claiming all along, never gets
    one, and each object is stored once."""
    slow = FaultySCP("slow", delay=0.3)
    try:
        uids = queue_results(pgdb, tmp_path, 6)
        monkeypatch.setattr(Sender, "lease_seconds", property(lambda self: 1.2))
        node_a = Sender(node_config(tmp_path, "node-a", slow.port), pgdb)
        done = threading.Event()
        errors: list[BaseException] = []

        def send() -> None:
            try:
                node_a.run_destination_once(node_a.config.destinations[0])
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=send)
        thread.start()
        taken = []
        while not done.is_set():
            taken += claim_deliveries(second, 10, "node-b:1:send-pacs", 60).get("pacs", [])
            time.sleep(0.05)
        thread.join(30)
        assert errors == [] and taken == []
        assert sorted(slow.received) == sorted(uids)
        assert {(r.state, r.attempts) for r in deliveries(pgdb)} == {
            (DeliveryState.DONE.value, 1)}
    finally:
        slow.stop()


def test_outcome_recorded_only_by_the_lease_holder(tmp_path: Path, pgdb: Database,
                                                  second: Database):
    queue_results(pgdb, tmp_path, 2)
    first = claim_deliveries(pgdb, 10, "node-a:1:send-pacs", 60)["pacs"]
    assert len(first) == 2
    assert claim_deliveries(second, 10, "node-b:1:send-pacs", 60) == {}  # both in flight
    with pgdb.session() as s:  # node-a's leases end while it still holds the items
        s.execute(update(Delivery).values(lease_expires=utcnow(), next_attempt_at=utcnow()))
    taken = claim_deliveries(second, 1, "node-b:1:send-pacs", 60)["pacs"]
    assert [d.delivery_id for d in taken] == [first[0].delivery_id]
    # node-a's renewal keeps only what it still holds; its failure is recorded for that one
    assert renew_leases(pgdb, first, 60) == [first[1]]
    mark_failed(pgdb, first, "no response", POLICY)
    mark_delivered(second, taken[0])
    a, b = deliveries(pgdb)
    assert (a.state, a.attempts, a.last_error) == (DeliveryState.DONE.value, 1, None)
    assert (b.state, b.attempts, b.last_error, b.lease_owner) == (
        DeliveryState.PENDING.value, 1, "no response", None)


def test_released_leases_are_due_at_once(tmp_path: Path, pgdb: Database, second: Database):
    queue_results(pgdb, tmp_path, 3)
    items = claim_deliveries(pgdb, 10, "node-a:1:send-pacs", 300)["pacs"]
    assert release_leases(pgdb, items[1:]) == 2  # stopping mid-batch: the rest go back
    again = claim_deliveries(second, 10, "node-b:1:send-pacs", 300)["pacs"]
    assert [d.delivery_id for d in again] == [d.delivery_id for d in items[1:]]
    assert release_leases(pgdb, items[1:]) == 0  # node-b's now: left alone


def test_restart_releases_its_dead_processes_delivery_leases_only(
        tmp_path: Path, pgdb: Database):
    queue_results(pgdb, tmp_path, 4)
    dead_pid = 2 ** 22 + 17  # above pid_max on the test machines: no such process
    for owner in (f"node-a:{dead_pid}:send-pacs", f"node-a:{os.getpid()}:send-pacs",
                  f"node-b:{dead_pid}:send-pacs", f"node-ab:{dead_pid}:send-pacs"):
        assert len(claim_deliveries(pgdb, 1, owner, 300)["pacs"]) == 1
    assert release_dead_delivery_leases(pgdb, "node-a:") == 1
    now = utcnow()
    held = {r.lease_owner for r in deliveries(pgdb) if r.next_attempt_at > now}
    assert held == {f"node-a:{os.getpid()}:send-pacs", f"node-b:{dead_pid}:send-pacs",
                    f"node-ab:{dead_pid}:send-pacs"}


# ------------------------------------------------------------------------------- jobs


def test_claim_order_expired_leases_then_reports_then_classify(pgdb: Database):
    """PostgreSQL: three index-ordered reads (expired leases, pending reports, pending
    classify jobs), no sort of the backlog."""
    ids, report_ids, got = claim_order_case(pgdb)
    assert got == [ids[0], *report_ids, ids[1]]


def test_the_claim_does_not_sort_the_backlog(pgdb: Database):
    """Every read ``queue.claim`` makes, explained with its own parameters: index-ordered,
    stopping at the batch, with no sort of the pending jobs (the one query ordered by
    report-first and id sorted them all at every claim)."""
    ids = make_jobs(pgdb, studies=500, per_study=4)
    with pgdb.session() as s:  # a history of done jobs before the backlog
        s.execute(update(Job).where(Job.id <= ids[1499]).values(state=JobState.DONE.value))
    reads: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM jobs" in statement:
            reads.append((statement, parameters))

    with pgdb.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE jobs")
    event.listen(pgdb.engine, "before_cursor_execute", record)
    try:
        claimed = queue.claim(pgdb, "w", 4, 300.0, 3)
    finally:
        event.remove(pgdb.engine, "before_cursor_execute", record)
    assert [j.job_id for j in claimed] == ids[1500:1504]
    assert len(reads) == 3  # expired leases (none), pending reports (none), classify jobs
    with pgdb.engine.connect() as conn:
        indexes = set(conn.exec_driver_sql(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'jobs'").scalars())
        for statement, parameters in reads[1:]:  # the first sorts the running jobs only
            plan = "\n".join(row[0] for row in conn.exec_driver_sql(
                "EXPLAIN " + statement, parameters))
            assert "Sort" not in plan and "Limit" in plan, plan
    assert "ix_jobs_due" in indexes


def test_dead_nodes_job_lease_on_another_host_comes_back_at_expiry(pgdb: Database,
                                                                   second: Database):
    (job_id,) = make_jobs(pgdb, studies=1, per_study=1)
    (held,) = queue.claim(pgdb, "other-host:1234:w0", 5, 1.5, 3)
    # this host's restart: "other-host" pids are not this host's to check
    assert queue.release_dead_leases(second, "this-host:") == 0
    assert queue.claim(second, "this-host:99:w0", 5, 60, 3) == []  # still leased
    time.sleep(1.7)
    (again,) = queue.claim(second, "this-host:99:w0", 5, 60, 3)
    assert (again.job_id, again.attempts) == (job_id, 2)
    assert not queue.complete(pgdb, held, "other-host:1234:w0", [0.1, 0.1, 0.8], None,
                              "1.2", {})  # the dead node's late result is refused
    assert queue.complete(second, again, "this-host:99:w0", [0.1, 0.1, 0.8], None, "1.2", {})
    assert get_job(pgdb, job_id).state == JobState.DONE.value


# ----------------------------------------------------------------------------- gauges


def families(collector: DatabaseCollector) -> dict[str, float]:
    """The collector's unlabelled gauges, and each labelled one's total."""
    out: dict[str, float] = {}
    for family in collector.collect():
        out[family.name] = sum(sample.value for sample in family.samples)
    return out


def test_database_gauges_come_from_one_node_at_a_time(pgdb: Database, second: Database,
                                                      pg_url: str):
    make_jobs(pgdb, studies=2, per_study=3)
    a, b = DatabaseCollector(pgdb), DatabaseCollector(second)
    try:
        first, other = families(a), families(b)
        assert first["cxrd_database_gauges_exporter"] == 1
        assert first["cxrd_queue_depth"] == 6 and first["cxrd_jobs"] == 6
        assert other == {"cxrd_database_gauges_exporter": 0}  # no double count
        assert families(b) == other and families(a) == first  # held from scrape to scrape
        a.close()  # the exporting node stops (or dies: the server ends its session)
        taken = families(b)
        assert taken["cxrd_database_gauges_exporter"] == 1 and taken["cxrd_queue_depth"] == 6
        assert families(a) == {"cxrd_database_gauges_exporter": 0}
    finally:
        a.close()
        b.close()
    sqlite = Database("sqlite://")
    sqlite.migrate()
    try:
        assert families(DatabaseCollector(sqlite))["cxrd_database_gauges_exporter"] == 1
    finally:
        sqlite.dispose()


def test_deployments_in_other_schemas_of_the_database_export_their_own(pgdb: Database):
    other_url = postgres_url()
    other = Database(next(other_url))
    other.migrate()
    a, b = DatabaseCollector(pgdb), DatabaseCollector(other)
    try:
        assert families(a)["cxrd_database_gauges_exporter"] == 1
        assert families(b)["cxrd_database_gauges_exporter"] == 1
    finally:
        a.close()
        b.close()
        other.dispose()
        next(other_url, None)  # drops the schema
