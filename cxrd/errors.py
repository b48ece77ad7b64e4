"""The exceptions cxrd raises. Each docstring is the default message."""

from __future__ import annotations

from collections.abc import Sequence


class CxrdError(Exception):
    """cxrd failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(CxrdError):
    """The configuration is invalid."""

    def __init__(self, message: str | None = None, problems: Sequence[str] = ()) -> None:
        # Every problem found, one sentence each, so `cxrd check-config` can list them all.
        self.problems: list[str] = list(problems)
        if message is None and self.problems:
            message = "\n".join([(self.__doc__ or "").strip(), *self.problems])
        super().__init__(message)


class ModelError(CxrdError):
    """The model file is missing, unreadable or does not follow the model-file contract."""


class DecodeError(CxrdError):
    """The image could not be decoded."""


class UnsupportedImage(CxrdError):
    """The image cannot be classified (photometric interpretation or pixel layout)."""


class InvalidUID(CxrdError):
    """A UID is not a valid DICOM UID (digits and dots, at most 64 characters)."""


class StoreError(CxrdError):
    """The object store failed (``cxrd.store``)."""


class StoreUnavailable(StoreError):
    """The object store cannot be reached or is overloaded now; the same request may
    succeed later (a timeout, a 5xx, throttling, an endpoint that is down, a full disk,
    a shared mount that went away). Callers wait and retry; the image is not failed."""


class StoreFailed(StoreError):
    """The object store refused the request, and asking again will not help until an
    operator acts (no such bucket, access denied, no or wrong credentials)."""


class ObjectMissing(StoreError, KeyError):
    """No object is stored under this key."""

    def __str__(self) -> str:  # KeyError's own quotes its argument
        return str(self.args[0]) if self.args else (self.__doc__ or "").strip()


class InvalidKey(StoreError, ValueError):
    """A store key is not a relative POSIX path of allowed parts."""
