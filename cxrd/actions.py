"""Operator actions: the record of each mending command an operator ran.

``cxrd deliveries retry`` and ``cxrd jobs retry`` change rows in ``cxrd.outbox`` and
``cxrd.queue``; each adds one ``operator_actions`` row (``record``) in the transaction
that made its change, so the record and the change commit together, and logs one line
after the commit (``log_action``). ``cxrd status`` shows the recent rows (``recent``).
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrd.db import OperatorAction, utcnow

log = logging.getLogger(__name__)

DELIVERIES_RETRY = "deliveries-retry"
JOBS_RETRY = "jobs-retry"


def current_actor() -> str:
    """``user@host`` of the process running the command (the uid when the user has no
    name, as in some containers)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def record(s: Session, action: str, count: int, *, actor: str, scope: str | None = None,
           detail: str | None = None) -> OperatorAction:
    """Add the action's row to the session (committed with the caller's change)."""
    row = OperatorAction(action=action, actor=actor[:256], scope=scope, count=count,
                         detail=detail, at=utcnow())
    s.add(row)
    s.flush()
    return row


def log_action(row: OperatorAction) -> None:
    """The action's log line: what, on what, how many, who and when; ``scope`` and
    ``detail`` are ``key=value`` fields themselves. No patient data: rows are counted,
    never named."""
    fields = " ".join(f for f in (row.scope or "scope=all", row.detail) if f)
    log.info("action=%s count=%d %s actor=%s at=%sZ", row.action, row.count, fields,
             row.actor, row.at.isoformat(timespec="seconds"))


def recent(s: Session, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` actions, newest first, as status shows them."""
    return [
        {
            "at": a.at.isoformat() + "Z",
            "action": a.action,
            "actor": a.actor,
            "scope": a.scope,
            "count": a.count,
            "detail": a.detail,
        }
        for a in s.scalars(select(OperatorAction).order_by(OperatorAction.id.desc())
                           .limit(limit))
    ]
