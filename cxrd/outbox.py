"""The outbox: every delivery row's life, from the producer's transaction to done or dead.

A result row for every object written, and one delivery row per result and destination,
in the same transaction as the state change that produced the object (``add_result``).
A study's SR also gets one delivery row per ``[[notifications]]`` endpoint whose
``findings`` hold the study-level finding it reports (``notifications_for``), in the same
transaction; a notification is a delivery of the SR to the notification's name, with the
same retries, dead letter, status and metrics as a destination's.
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

Several nodes on one PostgreSQL database share the outbox: a sender claims the due
deliveries of its destination (``claim_deliveries``) with ``FOR UPDATE SKIP LOCKED`` and a
lease (``lease_owner``, ``lease_expires``) in one transaction, which also moves their
``next_attempt_at`` to the lease's end: they are in flight, due to no one else. An outcome
is recorded only by the lease's holder; a lease that expires (its node died mid-send) makes
the delivery due again. The normal path is exactly-once; a node that dies after the
destination stored an object but before its outcome was committed makes that delivery
at-least-once: it is sent again after the lease, with the same SOP Instance UID, which the
archive de-duplicates (DIMSE has no two-phase commit). On SQLite (one node, one sender
thread per destination) the claim is the plain read it always was: no lease is written.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, select, update
from sqlalchemy.orm import Session

from cxrd.actions import DELIVERIES_RETRY, log_action, record
from cxrd.config import NotificationConfig, SenderConfig
from cxrd.db import Database, Delivery, Result, utcnow
from cxrd.domain import DeliveryState, ResultKind
from cxrd.durable import pid_alive
from cxrd.metrics import metrics

log = logging.getLogger(__name__)

#: Doubling stops here: 2**60 initial backoffs exceed any cap, and a larger power would
#: overflow the float (a long outage under a small cap reaches thousands of attempts).
MAX_DOUBLINGS = 60
#: ``last_error`` keeps this many characters (the log line keeps the whole error).
MAX_ERROR_CHARS = 2000


def add_result(s: Session, *, kind: ResultKind, sop_instance_uid: str, study_instance_uid: str,
               generation: int, path: str | Path, destinations: Sequence[str] = (),
               source_sop_instance_uid: str | None = None,
               supersedes: str | None = None, summary: Mapping[str, Any] | None = None,
               notifications: Sequence[NotificationConfig] = ()) -> bool:
    """Record a written object (``path``: its store key, ``cxrd.store.result_key``) and
    queue it for each destination; idempotent by UID, so that a transaction run again
    (a report job redone after a crash writes the same SR UID) queues nothing twice.

    An SR's ``summary`` (its study-level finding, ``cxrd.db.Result.summary``) is kept on
    its row, and the SR is queued for each of ``notifications`` that ``notifications_for``
    names."""
    exists = s.scalars(select(Result.id).where(
        Result.sop_instance_uid == sop_instance_uid)).first()
    if exists is not None:
        return False
    row = Result(sop_instance_uid=sop_instance_uid, study_instance_uid=study_instance_uid,
                 kind=kind.value, generation=generation, path=str(path),
                 source_sop_instance_uid=source_sop_instance_uid, supersedes=supersedes,
                 summary=None if summary is None else json.dumps(dict(summary),
                                                                 separators=(",", ":")))
    s.add(row)
    s.flush()
    for name in destinations:
        s.add(Delivery(result_id=row.id, destination=name))
    if summary is not None:
        for name in notifications_for(s, str(summary["finding"]), supersedes, notifications):
            s.add(Delivery(result_id=row.id, destination=name))
            log.info("action=notification-queued sr_sop_instance_uid=%s "
                     "study_instance_uid=%s notification=%s finding=%s", sop_instance_uid,
                     study_instance_uid, name, summary["finding"])
    return True


def notifications_for(s: Session, finding: str, supersedes: str | None,
                      notifications: Sequence[NotificationConfig]) -> list[str]:
    """The notifications an SR reporting ``finding`` is queued for: each one whose
    ``findings`` hold it (NORM is in none), unless the SR supersedes one (``supersedes``:
    a reprocess, or a late image) that reported the same finding, whose notification was
    queued then. A superseded SR whose finding is not known (written before schema 8)
    counts as a different one: told twice rather than not at all."""
    wanted = [n.name for n in notifications if finding in n.findings]
    if not wanted or supersedes is None:
        return wanted
    previous = s.scalars(select(Result.summary).where(
        Result.sop_instance_uid == supersedes)).first()
    if previous and json.loads(previous).get("finding") == finding:
        return []
    return wanted


@dataclass(frozen=True)
class DueDelivery:
    """A pending delivery whose time has come, with its result object's store key and UID, as
    read by ``due_deliveries`` (``attempts`` counts the attempts before this one)."""

    delivery_id: int
    destination: str
    path: str  # the result's store key
    sop_instance_uid: str
    created_at: dt.datetime
    attempts: int
    #: The lease this sender holds (``claim_deliveries`` on PostgreSQL); None: no lease
    #: (SQLite, or read by ``due_deliveries``), the outcome is recorded unconditionally.
    owner: str | None = None
    #: The result's study (a STOW-RS request carries one study's results).
    study_instance_uid: str = ""
    #: An SR's study-level finding (``Result.summary``, JSON), which a notification says.
    summary: str | None = None
    #: The SR it supersedes, if any.
    supersedes: str | None = None


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


def _due_query(now: dt.datetime, destination: str | None,
               exclude: Collection[str]) -> Any:
    query = select(Delivery, Result).join(Result, Delivery.result_id == Result.id).where(
        Delivery.state == DeliveryState.PENDING.value, Delivery.next_attempt_at <= now)
    if destination is not None:
        query = query.where(Delivery.destination == destination)
    if exclude:
        query = query.where(Delivery.destination.not_in(list(exclude)))
    return query.order_by(Delivery.id)


def _grouped(rows: Sequence[Any], owner: str | None) -> dict[str, list[DueDelivery]]:
    due: dict[str, list[DueDelivery]] = defaultdict(list)
    for d, r in rows:
        due[d.destination].append(DueDelivery(d.id, d.destination, r.path,
                                              r.sop_instance_uid, d.created_at, d.attempts,
                                              owner, r.study_instance_uid, r.summary,
                                              r.supersedes))
    return due


def due_deliveries(db: Database, limit: int, *, now: dt.datetime | None = None,
                   destination: str | None = None,
                   exclude: Collection[str] = ()) -> dict[str, list[DueDelivery]]:
    """Up to ``limit`` pending deliveries due at ``now`` (default: the current time), the
    oldest rows first, grouped by destination (in the order of each one's oldest row);
    only those to ``destination`` when it is given, none to a destination in ``exclude``.
    A read: nothing is claimed (``claim_deliveries`` claims)."""
    now = utcnow() if now is None else now
    with db.session() as s:
        rows = s.execute(_due_query(now, destination, exclude).limit(limit)).all()
    return _grouped(rows, None)


def claim_deliveries(db: Database, limit: int, owner: str, lease_seconds: float, *,
                     now: dt.datetime | None = None, destination: str | None = None,
                     exclude: Collection[str] = ()) -> dict[str, list[DueDelivery]]:
    """``due_deliveries``, claimed for ``owner`` (``node-id:pid:send-DESTINATION``) for
    ``lease_seconds``.

    PostgreSQL: the rows are locked with ``FOR UPDATE SKIP LOCKED`` (a sender of another
    node claiming at the same moment takes other rows, never waits) and, in the same
    transaction, leased: ``lease_owner``, ``lease_expires`` and ``next_attempt_at`` (the
    lease's end, so that the due query and its index need nothing more: an expired lease
    is due again). Each ``DueDelivery`` carries ``owner``, and its outcome is recorded
    only while the lease is held. SQLite: one node, one sender thread per destination; the
    read alone (no write, no commit), the outcome recorded as before."""
    now = utcnow() if now is None else now
    if db.is_sqlite:
        return due_deliveries(db, limit, now=now, destination=destination, exclude=exclude)
    expires = now + dt.timedelta(seconds=lease_seconds)
    with db.session() as s:
        rows = s.execute(_due_query(now, destination, exclude).limit(limit)
                         .with_for_update(skip_locked=True, of=Delivery)).all()
        for d, r in rows:
            if d.lease_owner is not None:
                log.warning("action=delivery-lease-expired delivery_id=%d sop_instance_uid=%s "
                            "destination=%s owner=%s", d.id, r.sop_instance_uid,
                            d.destination, d.lease_owner)
            d.lease_owner, d.lease_expires, d.next_attempt_at = owner, expires, expires
    return _grouped(rows, owner)


def renew_leases(db: Database, deliveries: Sequence[DueDelivery], lease_seconds: float, *,
                 now: dt.datetime | None = None) -> list[DueDelivery]:
    """Extend the leases of ``deliveries`` still held by their owner (a long batch on a
    slow destination); returns those, in order. The others were taken over after their
    lease expired: their new owner sends them. Without a lease (SQLite), all of them."""
    held = [d for d in deliveries if d.owner is not None]
    if not held:
        return list(deliveries)
    now = utcnow() if now is None else now
    expires = now + dt.timedelta(seconds=lease_seconds)
    with db.session() as s:
        rows = s.scalars(select(Delivery).where(
            Delivery.id.in_([d.delivery_id for d in held])).with_for_update()).all()
        kept = set()
        for row in rows:
            if _holds(row, held[0].owner):
                row.lease_expires = row.next_attempt_at = expires
                kept.add(row.id)
    return [d for d in deliveries if d.owner is None or d.delivery_id in kept]


def release_leases(db: Database, deliveries: Sequence[DueDelivery], *,
                   now: dt.datetime | None = None) -> int:
    """Give back claimed deliveries not attempted (the node is stopping mid-batch): due
    at once for any sender, nothing counted. Those whose lease was lost are left to their
    new owner. Returns how many."""
    held = [d for d in deliveries if d.owner is not None]
    if not held:
        return 0
    now = utcnow() if now is None else now
    count = 0
    with db.session() as s:
        for owner in {d.owner for d in held}:
            result = s.execute(update(Delivery).where(
                Delivery.id.in_([d.delivery_id for d in held if d.owner == owner]),
                Delivery.state == DeliveryState.PENDING.value, Delivery.lease_owner == owner,
            ).values(lease_owner=None, lease_expires=None, next_attempt_at=now))
            count += int(getattr(result, "rowcount", 0) or 0)
    return count


def _holds(row: Delivery, owner: str | None) -> bool:
    """Whether ``owner`` may record the outcome of ``row``: still pending and, when a lease
    was claimed, still leased to it (even past the lease's end, if no one took it over)."""
    return row.state == DeliveryState.PENDING.value and (owner is None
                                                         or row.lease_owner == owner)


class LeaseLost(Exception):
    """Another sender holds the delivery now (the lease expired and was taken over)."""


def _leased(s: Session, delivery: DueDelivery) -> Delivery | None:
    """The delivery's row, locked when leased, its lease cleared; None if it is gone.
    Raises ``LeaseLost`` (logged) when the outcome of this attempt is not ours to record:
    another sender took the delivery over after the lease expired."""
    row = s.get(Delivery, delivery.delivery_id, with_for_update=delivery.owner is not None)
    if row is None:
        return None
    if delivery.owner is not None and not _holds(row, delivery.owner):
        log.warning("action=delivery-lease-lost delivery_id=%d sop_instance_uid=%s "
                    "destination=%s owner=%s holder=%s state=%s", row.id,
                    delivery.sop_instance_uid, row.destination, delivery.owner,
                    row.lease_owner, row.state)
        raise LeaseLost
    row.lease_owner = row.lease_expires = None
    return row


def release_dead_delivery_leases(db: Database, owner_prefix: str) -> int:
    """At start-up: deliveries leased by dead processes of this node (owners
    ``owner_prefix`` + ``pid:send-NAME``) are due again at once instead of at their lease's
    end. Their attempt was not counted (an outcome counts it). A lease whose process is
    alive (another node with the same id on this host) is left alone."""
    if db.is_sqlite:
        return 0
    now = utcnow()
    with db.session() as s:
        owners = s.scalars(select(Delivery.lease_owner).where(
            Delivery.state == DeliveryState.PENDING.value,
            Delivery.lease_owner.startswith(owner_prefix, autoescape=True)).distinct()).all()
        dead = [o for o in owners if not _pid_of(o, owner_prefix) or
                not pid_alive(_pid_of(o, owner_prefix))]
        count = 0
        if dead:
            result = s.execute(update(Delivery).where(
                Delivery.state == DeliveryState.PENDING.value, Delivery.lease_owner.in_(dead)
            ).values(lease_owner=None, lease_expires=None, next_attempt_at=now))
            count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        log.warning("action=released-delivery-leases reason=node-restart count=%d", count)
    return count


def _pid_of(owner: str | None, prefix: str) -> int:
    pid = (owner or "")[len(prefix):].split(":", 1)[0]
    return int(pid) if pid.isdigit() else 0


def mark_delivered(db: Database, delivery: DueDelivery, *, warning: str | None = None,
                   now: dt.datetime | None = None) -> None:
    """The destination stored the object: the delivery is done (this attempt counted).
    A ``warning`` (the destination stored it with a warning status: coerced, elements
    discarded) is kept as the row's ``last_error`` and logged as a warning; without one,
    ``last_error`` is cleared."""
    try:
        with db.session() as s:
            row = _leased(s, delivery)
            if row is not None:
                row.state = DeliveryState.DONE.value
                row.attempts += 1
                row.done_at = utcnow() if now is None else now
                row.last_error = None if warning is None else warning[:MAX_ERROR_CHARS]
    except LeaseLost:
        return
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
    skipped, and so are those whose lease ``delivery.owner`` no longer holds."""
    now = utcnow() if now is None else now
    with db.session() as s:
        for delivery in deliveries:
            try:
                row = _leased(s, delivery)
            except LeaseLost:
                continue
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
