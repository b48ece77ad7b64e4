"""Logging: one line per event, ``action=... key=value`` fields, text or JSON.

Messages at INFO and above carry UIDs, reasons and counts, never patient names, IDs or
birth dates. Under journald the text format drops the timestamp (journald adds its own).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys

import pydicom.config

from cxrd.config import Config, LogFormat

_FIELD = re.compile(r"(\w+)=(\S+)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``key=value`` pairs of the message become fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": message,
        }
        for key, value in _FIELD.findall(message):
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(config: Config | None = None, *, level: str | None = None) -> None:
    """Configure the root logger once per process (the CLI and each worker)."""
    fmt = config.logging.format if config else LogFormat.TEXT
    lvl = level or (config.logging.level if config else "INFO")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    # pynetdicom logs every PDU at INFO, with patient attributes at DEBUG; keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # pydicom checks values as it reads them and warns quoting the value itself (a birth
    # date written "1901-12-31", an over-long name), to the log and to stderr: patient
    # data. The values are kept as read either way; cxrd checks what it uses where it
    # uses it.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
