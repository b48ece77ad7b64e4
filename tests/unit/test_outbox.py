"""cxrd.outbox on in-memory SQLite, without the network: which deliveries are due, done,
retried with exponential backoff up to the cap, and dead (a permanent failure, or a next
attempt past the maximum age); the counters and log lines of each state change."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from dicomfactory import uid
from prometheus_client import REGISTRY
from sqlalchemy import select

from cxrd.config import SenderConfig
from cxrd.db import Database, Delivery
from cxrd.domain import DeliveryState, ResultKind
from cxrd.outbox import (
    MAX_ERROR_CHARS,
    DueDelivery,
    RetryPolicy,
    add_result,
    claim_deliveries,
    due_deliveries,
    mark_delivered,
    mark_failed,
)

NOW = dt.datetime(2026, 3, 1, 12, 0, 0)
SECOND = dt.timedelta(seconds=1)
#: 1, 2, 4, 8, 8, ... seconds; dead when the next attempt would be over an hour old.
POLICY = RetryPolicy(initial_backoff_seconds=1, max_backoff_seconds=8, max_age_hours=1)


def queue(db: Database, n: int, destinations: Sequence[str], *,
          created_at: dt.datetime = NOW) -> list[str]:
    """``n`` results, each queued for every destination, created (and due) at
    ``created_at``; returns their SOP Instance UIDs."""
    study = uid()
    uids = [uid() for _ in range(n)]
    with db.session() as s:
        for sop_uid in uids:
            add_result(s, kind=ResultKind.SC, sop_instance_uid=sop_uid, study_instance_uid=study,
                       generation=1, path=Path(f"/results/{sop_uid}.dcm"),
                       destinations=destinations)
        for row in s.scalars(select(Delivery).where(Delivery.attempts == 0)):
            row.created_at = row.next_attempt_at = created_at
    return uids


def rows(db: Database) -> list[Delivery]:
    with db.session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def one_due(db: Database, now: dt.datetime = NOW) -> DueDelivery:
    [(_, [delivery])] = due_deliveries(db, 100, now=now).items()
    return delivery


def counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("cxrd_deliveries_total", {"outcome": outcome}) or 0.0


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "cxrd.outbox" and r.levelno == level]


# ----------------------------------------------------------------------------------- due


def test_due_deliveries_are_pending_and_due_grouped_by_destination_oldest_first(
        memdb: Database) -> None:
    uids = queue(memdb, 4, ["b", "a"])  # rows: r0/b r0/a r1/b r1/a r2/b r2/a r3/b r3/a
    with memdb.session() as s:
        d = list(s.scalars(select(Delivery).order_by(Delivery.id)))
        d[2].state = DeliveryState.DONE.value
        d[3].state = DeliveryState.DEAD.value
        d[4].next_attempt_at = NOW + SECOND  # not yet
        d[7].next_attempt_at = NOW  # due exactly now
        d[7].attempts = 2
    due = due_deliveries(memdb, 100, now=NOW)
    assert list(due) == ["b", "a"]  # in the order of each destination's oldest row
    assert [x.sop_instance_uid for x in due["b"]] == [uids[0], uids[3]]
    assert [x.sop_instance_uid for x in due["a"]] == [uids[0], uids[2], uids[3]]
    last = due["a"][-1]
    assert last == DueDelivery(delivery_id=8, destination="a",
                               path=f"/results/{uids[3]}.dcm", sop_instance_uid=uids[3],
                               created_at=NOW, attempts=2,
                               study_instance_uid=last.study_instance_uid)
    assert last.study_instance_uid and {x.study_instance_uid for x in due["b"]} == {
        last.study_instance_uid}  # the result's study, which a STOW-RS request groups by
    assert all(x.destination == name for name, xs in due.items() for x in xs)
    assert due_deliveries(memdb, 100, now=NOW - SECOND) == {}


def test_due_deliveries_limit_counts_rows_of_all_destinations(memdb: Database) -> None:
    uids = queue(memdb, 3, ["a", "b"])
    due = due_deliveries(memdb, 3, now=NOW)
    assert {k: [x.sop_instance_uid for x in v] for k, v in due.items()} == {
        "a": [uids[0], uids[1]], "b": [uids[0]]}


# ------------------------------------------------------------------------------ delivered


def test_mark_delivered_counts_the_attempt_and_clears_the_error(
        memdb: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cxrd")
    [sop_uid] = queue(memdb, 1, ["pacs"])
    mark_failed(memdb, [one_due(memdb)], "no response", POLICY, now=NOW)
    before = counted("done")
    mark_delivered(memdb, one_due(memdb, NOW + SECOND), now=NOW + 2 * SECOND)
    [row] = rows(memdb)
    assert row.state == DeliveryState.DONE.value
    assert row.attempts == 2
    assert row.done_at == NOW + 2 * SECOND
    assert row.last_error is None
    assert counted("done") == before + 1
    assert messages(caplog, logging.INFO) == [
        f"action=delivered sop_instance_uid={sop_uid} destination=pacs attempts=2"]
    assert due_deliveries(memdb, 100, now=NOW + dt.timedelta(days=30)) == {}


# -------------------------------------------------------------------------------- backoff


def test_retry_policy_doubles_from_the_initial_backoff_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff_seconds=5, max_backoff_seconds=60, max_age_hours=168)
    assert [policy.backoff(n).total_seconds() for n in (0, 1, 2, 3, 4, 5, 6)] == \
        [5, 5, 10, 20, 40, 60, 60]
    # a week at a one-minute cap is ten thousand attempts: 2**10000 overflows a float
    assert policy.backoff(10_000) == dt.timedelta(seconds=60)
    assert policy.max_backoff == dt.timedelta(seconds=60)
    assert policy.max_age == dt.timedelta(hours=168)
    assert RetryPolicy.from_config(SenderConfig()) == RetryPolicy(
        initial_backoff_seconds=5, max_backoff_seconds=1800, max_age_hours=168)


def test_failures_back_off_exponentially_up_to_the_cap(
        memdb: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cxrd")
    [sop_uid] = queue(memdb, 1, ["pacs"])
    before = counted("retry")
    t = NOW
    for attempt, wait in enumerate([1, 2, 4, 8, 8, 8], start=1):
        mark_failed(memdb, [one_due(memdb, t)], f"cannot connect {attempt}", POLICY, now=t)
        [row] = rows(memdb)
        assert row.state == DeliveryState.PENDING.value
        assert row.attempts == attempt
        assert row.last_error == f"cannot connect {attempt}"
        assert row.next_attempt_at == t + dt.timedelta(seconds=wait)
        assert due_deliveries(memdb, 100, now=row.next_attempt_at - SECOND / 1000) == {}
        t = row.next_attempt_at
    assert counted("retry") == before + 6
    logged = messages(caplog, logging.WARNING)
    assert logged[0] == (f"action=delivery-retry delivery_id=1 sop_instance_uid={sop_uid} "
                         "destination=pacs attempts=1 retry_in_s=1 error=cannot connect 1")
    assert logged[-1].endswith("attempts=6 retry_in_s=8 error=cannot connect 6")
    assert not any("/results/" in m for m in logged)  # UIDs and reasons, not paths


def test_backoff_follows_the_rows_attempts_not_the_snapshot(memdb: Database) -> None:
    queue(memdb, 2, ["pacs"])
    first, second = due_deliveries(memdb, 100, now=NOW)["pacs"]
    with memdb.session() as s:  # failed twice elsewhere since it was read
        row = s.get(Delivery, second.delivery_id)
        assert row is not None
        row.attempts = 2
    mark_failed(memdb, [first, second], "association lost", POLICY, now=NOW)
    a, b = rows(memdb)
    assert (a.attempts, a.next_attempt_at) == (1, NOW + SECOND)
    assert (b.attempts, b.next_attempt_at) == (3, NOW + 4 * SECOND)


def test_at_max_backoff_waits_the_cap_from_the_first_failure(memdb: Database) -> None:
    queue(memdb, 1, ["pacs"])
    mark_failed(memdb, [one_due(memdb)], "PERMANENT: association rejected", POLICY,
                at_max_backoff=True, now=NOW)
    [row] = rows(memdb)
    assert row.state == DeliveryState.PENDING.value
    assert row.attempts == 1
    assert row.next_attempt_at == NOW + 8 * SECOND


# ----------------------------------------------------------------------------------- dead


def test_permanent_failure_is_dead_at_once(memdb: Database,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cxrd")
    [sop_uid] = queue(memdb, 1, ["pacs"])
    before = counted("dead")
    error = "refused by destination: status 0xA900"
    mark_failed(memdb, [one_due(memdb)], error, POLICY, permanent=True, now=NOW)
    [row] = rows(memdb)
    assert row.state == DeliveryState.DEAD.value
    assert row.attempts == 1
    assert row.last_error == error
    assert row.next_attempt_at == NOW  # untouched
    assert due_deliveries(memdb, 100, now=NOW + dt.timedelta(days=30)) == {}
    assert counted("dead") == before + 1
    assert messages(caplog, logging.ERROR) == [
        f"action=delivery-dead delivery_id=1 sop_instance_uid={sop_uid} destination=pacs "
        f"attempts=1 error={error}"]
    assert messages(caplog, logging.WARNING) == []


@pytest.mark.parametrize(("age", "at_max_backoff", "dead"), [
    (dt.timedelta(hours=1) - 8 * SECOND, True, False),  # next attempt exactly at max age
    (dt.timedelta(hours=1) - 8 * SECOND + SECOND / 1000, True, True),
    (dt.timedelta(hours=1) - SECOND, False, False),  # first backoff: 1 s
    (dt.timedelta(hours=1) - SECOND / 2, False, True),
    (dt.timedelta(hours=2), False, True),
], ids=["cap-at-max-age", "cap-past-max-age", "backoff-at-max-age", "backoff-past-max-age",
        "older-than-max-age"])
def test_dead_when_the_next_attempt_would_pass_the_maximum_age(
        memdb: Database, age: dt.timedelta, at_max_backoff: bool, dead: bool) -> None:
    queue(memdb, 1, ["pacs"], created_at=NOW - age)
    mark_failed(memdb, [one_due(memdb)], "peer unreachable", POLICY,
                at_max_backoff=at_max_backoff, now=NOW)
    [row] = rows(memdb)
    assert row.state == (DeliveryState.DEAD if dead else DeliveryState.PENDING).value
    assert row.attempts == 1
    assert row.last_error == "peer unreachable"


# ------------------------------------------------------------------------------ the rest


def test_long_error_is_cut_in_the_row_and_logged_whole(
        memdb: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cxrd")
    queue(memdb, 1, ["pacs"])
    error = "x" * (MAX_ERROR_CHARS + 500)
    mark_failed(memdb, [one_due(memdb)], error, POLICY, now=NOW)
    [row] = rows(memdb)
    assert row.last_error == error[:MAX_ERROR_CHARS]
    [logged] = messages(caplog, logging.WARNING)
    assert logged.endswith(f"error={error}")


def test_rows_gone_meanwhile_are_skipped(memdb: Database,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cxrd")
    gone = DueDelivery(delivery_id=999, destination="pacs", path="/results/x.dcm",
                       sop_instance_uid=uid(), created_at=NOW, attempts=0)
    mark_failed(memdb, [gone], "association lost", POLICY, now=NOW)
    assert messages(caplog, logging.WARNING) == messages(caplog, logging.ERROR) == []
    mark_delivered(memdb, gone, now=NOW)  # no row to update; nothing raised
    assert rows(memdb) == []


def test_claim_on_sqlite_is_the_plain_read(memdb: Database) -> None:
    """One node, one sender thread per destination: no lease written (no commit per pass),
    the outcome recorded as before."""
    queue(memdb, 2, ["pacs"])
    before = [(r.next_attempt_at, r.lease_owner, r.lease_expires) for r in rows(memdb)]
    claimed = claim_deliveries(memdb, 100, "node-a:1:send-pacs", 60, now=NOW)
    assert claimed == due_deliveries(memdb, 100, now=NOW)
    assert [d.owner for d in claimed["pacs"]] == [None, None]
    assert [(r.next_attempt_at, r.lease_owner, r.lease_expires) for r in rows(memdb)] == before
    mark_delivered(memdb, claimed["pacs"][0], now=NOW)
    assert [r.state for r in rows(memdb)] == [DeliveryState.DONE.value,
                                              DeliveryState.PENDING.value]
