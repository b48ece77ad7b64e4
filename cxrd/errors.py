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
