"""Logging: one line per event, ``action=... key=value`` fields, text or JSON.

Call sites log a template and its arguments as usual (``log.info("action=stored
sop_instance_uid=%s reason=%s", uid, reason)``); this module is the one place that turns
them into fields (``event``):

* text: ``key=value``, the value in double quotes (JSON escapes) when it holds a space or
  a quote or is empty, so that every value reads back whole; fields passed with
  ``extra=`` follow the message the same way;
* JSON (python-json-logger): one object per line with ``ts``, ``level``, ``logger``,
  ``msg`` and every field, typed (``%d`` an integer, ``%.3f`` a number, a ``bool`` or
  ``None`` passed to ``%s`` as such), whole, plus the ``extra=`` fields and ``exc_info``.

Messages at INFO and above carry UIDs, reasons and counts, never patient names, IDs or
birth dates. Under journald the text format drops the timestamp (journald adds its own).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import pydicom.config
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from cxrd.config import Config, LogFormat

#: A printf conversion of a ``%`` template (``%%`` included, so that positions count).
_SPEC = re.compile(r"%(\(\w+\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])")
#: ``key=`` right before a conversion: the conversion is that field's whole value.
_KEY_BEFORE = re.compile(r"(?:^|\s)(\w+)=$")
#: A literal field of the template (``action=stored``).
_LITERAL = re.compile(r"(?:^|(?<=\s))(\w+)=([^\s%\"]+)(?=\s|$)")
#: A field of an already rendered message (the fallback): quoted or up to the next space.
_RENDERED = re.compile(r"(?:^|(?<=\s))(\w+)=(\"(?:[^\"\\]|\\.)*\"|\S*)")
_NEEDS_QUOTES = re.compile(r"[\s\"]")
#: What a LogRecord always has: everything else on a record came with ``extra=``.
_RECORD_ATTRS = frozenset([*RESERVED_ATTRS, "taskName"])
#: The JSON object's own keys; a field of the same name is written with a ``field_``
#: prefix rather than lost.
_BASE_KEYS = ("ts", "level", "logger", "msg")


def quote(value: str) -> str:
    """A field value as text logs write it: as it is, or double-quoted with JSON escapes
    when it holds white space or a quote, or is empty."""
    if value and not _NEEDS_QUOTES.search(value):
        return value
    return json.dumps(value, ensure_ascii=False)


def _typed(arg: Any, conversion: str, text: str) -> Any:
    """The JSON value of one argument: its number or bool where the conversion keeps one,
    else the text that the conversion wrote."""
    if isinstance(arg, bool):
        return arg if conversion in "sdi" else text
    if arg is None and conversion == "s":
        return None
    if isinstance(arg, int) and conversion in "sdiu":
        return int(arg)
    if isinstance(arg, int | float) and conversion in "eEfFgG":
        return float(text)  # as rounded by the template
    if isinstance(arg, float) and conversion == "s":
        return arg
    return text


def event(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """The record's message, field values quoted as text logs write them, and its fields
    (``key=value`` pairs of the message, typed). A template this cannot follow (mapping
    arguments, ``*`` widths) is rendered as logging does and its fields read back from the
    text."""
    msg, args = record.msg, record.args
    if (not isinstance(msg, str) or isinstance(args, Mapping)
            or any(m.group(1) or m.group(2) == "*" or m.group(3) == "*"
                   for m in _SPEC.finditer(msg))):
        text = record.getMessage()
        return text, {k: v[1:-1] if v.startswith('"') else v
                      for k, v in _RENDERED.findall(text)}
    values = tuple(args or ())
    specs = [m for m in _SPEC.finditer(msg) if m.group(4) != "%"]
    if len(specs) != len(values):
        text = record.getMessage()  # raises as logging would: the handler reports it
        return text, {}
    fields: dict[str, Any] = {}
    out: list[str] = []
    pos = 0
    index = 0
    for m in _SPEC.finditer(msg):
        out.append(msg[pos:m.start()])
        pos = m.end()
        if m.group(4) == "%":
            out.append("%")
            continue
        arg = values[index]
        index += 1
        text = m.group(0) % (arg,)
        key = _KEY_BEFORE.search(msg, 0, m.start())
        whole = m.end() == len(msg) or msg[m.end()].isspace()
        if key and whole:
            fields[key.group(1)] = _typed(arg, m.group(4), text)
            out.append(quote(text))
        else:
            out.append(text)
    out.append(msg[pos:])
    for key, value in _LITERAL.findall(msg):
        fields.setdefault(key, value)
    ordered = {k: fields[k] for k in sorted(fields, key=lambda k: msg.find(f"{k}="))}
    return "".join(out), ordered


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call passed with ``extra=``."""
    return {k: v for k, v in record.__dict__.items()
            if k not in _RECORD_ATTRS and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``action=... key=value``: values with spaces quoted, ``extra=`` fields appended."""

    def format(self, record: logging.LogRecord) -> str:
        message, _ = event(record)
        more = extras(record)
        if more:
            message += "".join(f" {k}={quote(str(v))}" for k, v in more.items())
        line = logging.makeLogRecord(record.__dict__)
        line.msg, line.args = message, None
        return super().format(line)


class JsonFormatter(_JsonFormatter):
    """One JSON object per line (python-json-logger): ``ts``, ``level``, ``logger``,
    ``msg``, then the message's fields typed and whole, the ``extra=`` fields and the
    exception (``exc_info``)."""

    def __init__(self) -> None:
        super().__init__(fmt=(), reserved_attrs=sorted(_RECORD_ATTRS))

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        message, fields = event(record)
        log_data["ts"] = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["msg"] = message
        more: dict[str, Any] = {}
        super().add_fields(more, record, message_dict)  # extra= fields, exc_info
        for source in (fields, more):
            for key, value in source.items():
                log_data[f"field_{key}" if key in _BASE_KEYS else key] = value


def setup_logging(config: Config | None = None, *, level: str | None = None) -> None:
    """Configure the root logger once per process (the CLI and each worker)."""
    fmt = config.logging.format if config else LogFormat.TEXT
    lvl = level or (config.logging.level if config else "INFO")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(TextFormatter("%(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    # pynetdicom logs every PDU at INFO, with patient attributes at DEBUG; keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # boto3 (an S3 store) logs where it found credentials at INFO, in every process; the
    # store's own errors say what matters.
    for name in ("boto3", "botocore", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # dicomweb-client logs each STOW-RS request at INFO; the sender's action=stow-rs line
    # says more (destination, study, instances, HTTP status).
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    # pydicom checks values as it reads them and warns quoting the value itself (a birth
    # date written "1901-12-31", an over-long name), to the log and to stderr: patient
    # data. The values are kept as read either way; cxrd checks what it uses where it
    # uses it.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
