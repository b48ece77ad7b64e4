"""The outbox: a result row for every object written, and one delivery row per result and
destination, in the same transaction as the state change that produced the object.

``cxrd.send`` claims the delivery rows and sends them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrd.db import Delivery, Result
from cxrd.domain import ResultKind


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
