"""DICOM UIDs: validation (so that no UID ever becomes a path) and derived UIDs."""

from __future__ import annotations

import re

from pydicom.uid import generate_uid

from cxrd.errors import InvalidUID

# PS3.5 9.1: digits and dots, components without leading zeros, at most 64 characters.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(uid: object) -> bool:
    return isinstance(uid, str) and 0 < len(uid) <= 64 and _UID.fullmatch(uid) is not None


def validate_uid(uid: object, what: str = "UID") -> str:
    """Return ``uid`` if it is a valid DICOM UID, else raise InvalidUID naming ``what``."""
    if not is_valid_uid(uid):
        raise InvalidUID(f"{what} {str(uid)[:80]!r} is not a valid DICOM UID "
                         "(digits and dots, no leading zeros, at most 64 characters).")
    return str(uid)


def derived_uid(*parts: object) -> str:
    """A UID that is a pure function of ``parts``.

    Results get such UIDs so that redoing a step after a crash rewrites the same object
    (same file name, same SOP Instance UID) instead of making a duplicate.
    """
    return str(generate_uid(entropy_srcs=["cxrd", *(str(p) for p in parts)]))


def new_uid() -> str:
    """A random UID (2.25 form) for what has no identity of its own (SR tracking items)."""
    import highdicom as hd

    return str(hd.UID())
