"""The outbox: every delivery row's life, from the producer's transaction to done or dead.

A result row for every object written, and one delivery row per result and destination,
in the same transaction as the state change that produced the object (``add_result``).
Then the delivery's state changes: which deliveries are due (``due_deliveries``), done
(``mark_delivered``; a warning status the destination answered stays in ``last_error``),
and, after a failure, retried with exponential backoff or dead (``mark_failed`` under a
``RetryPolicy``): a backoff from ``initial_backoff_seconds``, doubling, capped at
``max_backoff_seconds``; dead at once when the failure is permanent, or when the next
attempt would come after the delivery is ``max_age_hours`` old. Each of
these changes counts in ``cxrd_deliveries_total`` and logs one line with the delivery's
UIDs, destination, attempts and the error, never patient data. An operator sends dead
deliveries again with ``cxrd deliveries retry`` (``retry_dead``), which is recorded as an
operator action.

``cxrd.send`` owns the network side: it sends the due deliveries and says how each one
failed (transient, permanent, or to be retried only at the maximum backoff).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import ColumnElement, and_, exists, select, update
from sqlalchemy.orm import Session

from cxrd.actions import DELIVERIES_RETRY, log_action, record
from cxrd.config import SenderConfig
from cxrd.db import Database, Delivery, Result, utcnow
from cxrd.domain import DeliveryState, ResultKind
from cxrd.metrics import metrics

log = logging.getLogger(__name__)

#: Doubling stops here: 2**60 initial backoffs exceed any cap, and a larger power would
#: overflow the float (a long outage under a small cap reaches thousands of attempts).
MAX_DOUBLINGS = 60
#: ``last_error`` keeps this many characters (the log line keeps the whole error).
MAX_ERROR_CHARS = 2000


def add_result(s: Session, *, kind: ResultKind, sop_instance_uid: str, study_instance_uid: str,
               generation: int, path: Path, destinations: Sequence[str] = (),
               source_sop_instance_uid: str | None = None,
               supersedes: str | None = None) -> bool:
    """Record a written object and queue it for each destination; idempotent by UID."""
    exists = s.scalars(select(Result.id).where(
        Result.sop_instance_uid == sop_instance_uid)).first()
    if exists is not None:
        return False
    row = Result(sop_instance_uid=sop_instance_uid, study_instance_uid=study_instance_uid,
                 kind=kind.value, generation=generation, path=str(path),
                 source_sop_instance_uid=source_sop_instance_uid, supersedes=supersedes)
    s.add(row)
    s.flush()
    for name in destinations:
        s.add(Delivery(result_id=row.id, destination=name))
    return True


@dataclass(frozen=True)
class DueDelivery:
    """A pending delivery whose time has come, with its result object's file and UID, as
    read by ``due_deliveries`` (``attempts`` counts the attempts before this one)."""

    delivery_id: int
    destination: str
    path: str
    sop_instance_uid: str
    created_at: dt.datetime
    attempts: int


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed delivery is tried again, and when it is given up (``[sender]``)."""

    initial_backoff_seconds: float
    max_backoff_seconds: float
    max_age_hours: float

    @classmethod
    def from_config(cls, sender: SenderConfig) -> RetryPolicy:
        return cls(initial_backoff_seconds=sender.initial_backoff_seconds,
                   max_backoff_seconds=sender.max_backoff_seconds,
                   max_age_hours=sender.max_age_hours)

    def backoff(self, attempts: int) -> dt.timedelta:
        """The wait after the ``attempts``-th failure: initial, doubling, capped."""
        doublings = min(max(attempts - 1, 0), MAX_DOUBLINGS)
        seconds = min(self.initial_backoff_seconds * 2.0 ** doublings,
                      self.max_backoff_seconds)
        return dt.timedelta(seconds=seconds)

    @property
    def max_backoff(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.max_backoff_seconds)

    @property
    def max_age(self) -> dt.timedelta:
        return dt.timedelta(hours=self.max_age_hours)


def due_deliveries(db: Database, limit: int, *, now: dt.datetime | None = None,
                   destination: str | None = None,
                   exclude: Collection[str] = ()) -> dict[str, list[DueDelivery]]:
    """Up to ``limit`` pending deliveries due at ``now`` (default: the current time), the
    oldest rows first, grouped by destination (in the order of each one's oldest row);
    only those to ``destination`` when it is given, none to a destination in ``exclude``."""
    now = utcnow() if now is None else now
    query = select(Delivery, Result).join(Result, Delivery.result_id == Result.id).where(
        Delivery.state == DeliveryState.PENDING.value, Delivery.next_attempt_at <= now)
    if destination is not None:
        query = query.where(Delivery.destination == destination)
    if exclude:
        query = query.where(Delivery.destination.not_in(list(exclude)))
    with db.session() as s:
        rows = s.execute(query.order_by(Delivery.id).limit(limit)).all()
    due: dict[str, list[DueDelivery]] = defaultdict(list)
    for d, r in rows:
        due[d.destination].append(DueDelivery(d.id, d.destination, r.path,
                                              r.sop_instance_uid, d.created_at, d.attempts))
    return due


def mark_delivered(db: Database, delivery: DueDelivery, *, warning: str | None = None,
                   now: dt.datetime | None = None) -> None:
    """The destination stored the object: the delivery is done (this attempt counted).
    A ``warning`` (the destination stored it with a warning status: coerced, elements
    discarded) is kept as the row's ``last_error`` and logged as a warning; without one,
    ``last_error`` is cleared."""
    with db.session() as s:
        row = s.get(Delivery, delivery.delivery_id)
        if row is not None:
            row.state = DeliveryState.DONE.value
            row.attempts += 1
            row.done_at = utcnow() if now is None else now
            row.last_error = None if warning is None else warning[:MAX_ERROR_CHARS]
    metrics().deliveries.labels("done").inc()
    if warning is None:
        log.info("action=delivered sop_instance_uid=%s destination=%s attempts=%d",
                 delivery.sop_instance_uid, delivery.destination, delivery.attempts + 1)
    else:
        log.warning("action=delivered-with-warning delivery_id=%d sop_instance_uid=%s "
                    "destination=%s attempts=%d warning=%s", delivery.delivery_id,
                    delivery.sop_instance_uid, delivery.destination, delivery.attempts + 1,
                    warning)


def mark_failed(db: Database, deliveries: Sequence[DueDelivery], error: str,
                policy: RetryPolicy, *, permanent: bool = False,
                at_max_backoff: bool = False, now: dt.datetime | None = None) -> None:
    """An attempt at each of ``deliveries`` failed with ``error``: count it and record the
    error, then retry the delivery after its backoff (the maximum backoff if
    ``at_max_backoff``), or make it dead if the failure is ``permanent`` or the next attempt
    would come after the delivery is ``policy.max_age`` old. Rows gone meanwhile are
    skipped."""
    now = utcnow() if now is None else now
    with db.session() as s:
        for delivery in deliveries:
            row = s.get(Delivery, delivery.delivery_id)
            if row is None:
                continue
            row.attempts += 1
            row.last_error = error[:MAX_ERROR_CHARS]
            wait = policy.max_backoff if at_max_backoff else policy.backoff(row.attempts)
            if permanent or now + wait - row.created_at > policy.max_age:
                row.state = DeliveryState.DEAD.value
                metrics().deliveries.labels("dead").inc()
                log.error("action=delivery-dead delivery_id=%d sop_instance_uid=%s "
                          "destination=%s attempts=%d error=%s", row.id,
                          delivery.sop_instance_uid, row.destination, row.attempts, error)
            else:
                row.next_attempt_at = now + wait
                metrics().deliveries.labels("retry").inc()
                log.warning("action=delivery-retry delivery_id=%d sop_instance_uid=%s "
                            "destination=%s attempts=%d retry_in_s=%.0f error=%s", row.id,
                            delivery.sop_instance_uid, row.destination, row.attempts,
                            wait.total_seconds(), error)


def result_may_go() -> ColumnElement[bool]:
    """The one rule for removing a result's file (a condition on ``Result``; retention,
    ``cxrd.retention``, adds its age): no delivery of it is pending, i.e. it is delivered
    to every destination it was queued for, or its delivery there is dead (a dead one is
    no longer tried; ``cxrd deliveries retry`` skips those whose file is gone). A result
    queued for no destination may go as well. Not one already removed."""
    return and_(Result.purged_at.is_(None),
                ~exists().where(Delivery.result_id == Result.id,
                                Delivery.state == DeliveryState.PENDING.value))


def retry_dead(db: Database, *, actor: str, destination: str | None = None,
               now: dt.datetime | None = None) -> int:
    """``cxrd deliveries retry``: every dead delivery (or those to ``destination``) back
    to pending, due now, with its attempts reset and its age counted from now, so the
    sender of the running node sends it again at its next pass with the whole retry policy
    ahead of it (if it fails again it backs off, and is dead again after
    ``max_age_hours``). ``last_error`` is kept until the next attempt. The operator action
    is recorded in the same transaction and logged; returns how many were re-queued."""
    now = utcnow() if now is None else now
    with db.session() as s:
        query = update(Delivery).where(
            Delivery.state == DeliveryState.DEAD.value,
            # A result purged by retention cannot be sent again.
            Delivery.result_id.in_(select(Result.id).where(Result.purged_at.is_(None))))
        if destination is not None:
            query = query.where(Delivery.destination == destination)
        result = s.execute(query.values(state=DeliveryState.PENDING.value, attempts=0,
                                        next_attempt_at=now, created_at=now, done_at=None))
        count = int(getattr(result, "rowcount", 0) or 0)
        action = record(s, DELIVERIES_RETRY, count, actor=actor,
                        scope=None if destination is None else f"destination={destination}")
    log_action(action)
    return count
