"""Log lines as data (``cxrd.logs``): JSON lines that parse with every field whole and
typed, ``extra=`` fields and exceptions kept; text lines whose values with spaces are
quoted so that they read back whole."""

from __future__ import annotations

import io
import json
import logging
import shlex
from collections.abc import Iterator

import pytest

from cxrd.config import validate
from cxrd.logs import JsonFormatter, TextFormatter, setup_logging

MODEL = "DEMO cxrd-demo-phantom 1.1.0"


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    """A logger of its own writing to a buffer; the formatter is set by each test."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("cxrd.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, out, handler
    logger.removeHandler(handler)
    logger.propagate = True


def _emit(logger: logging.Logger) -> None:
    logger.info("action=node-start ae_title=%s schema=%d model=%s demo=%s workers=%d",
                "CXRD", 7, MODEL, True, 2)
    logger.info("action=classified sop_instance_uid=%s p_tb=%.3f reason=%s",
                "1.2.3.4", 0.123456, 'said "no" twice', extra={"destination": "main pacs"})
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        logger.exception("action=store-error source=%s", "dicom:A B@127.0.0.1")


def test_json_lines_parse_with_whole_typed_fields(logged) -> None:
    logger, out, handler = logged
    handler.setFormatter(JsonFormatter())
    _emit(logger)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # one line per record, the traceback included
    start, classified, error = (json.loads(ln) for ln in lines)

    assert start["level"] == "INFO" and start["logger"] == "cxrd.test-logs"
    assert start["action"] == "node-start"
    assert start["model"] == MODEL  # not cut at the first space
    assert start["schema"] == 7 and start["workers"] == 2 and start["demo"] is True
    assert start["ae_title"] == "CXRD"

    assert classified["p_tb"] == 0.123
    assert classified["reason"] == 'said "no" twice'
    assert classified["destination"] == "main pacs"  # passed with extra=

    assert error["level"] == "ERROR" and error["source"] == "dicom:A B@127.0.0.1"
    assert "ZeroDivisionError: division by zero" in error["exc_info"]
    assert "Traceback" in error["exc_info"]


def test_json_keeps_extra_fields_of_a_plain_message(logged) -> None:
    logger, out, handler = logged
    handler.setFormatter(JsonFormatter())
    logger.debug("built SR", extra={"action": "build_sr", "images": 3,
                                    "study_instance_uid": "1.2.3"})
    record = json.loads(out.getvalue())
    assert record["msg"] == "built SR"
    assert record["action"] == "build_sr" and record["images"] == 3
    assert record["study_instance_uid"] == "1.2.3"


def test_text_quotes_values_with_spaces(logged) -> None:
    logger, out, handler = logged
    handler.setFormatter(TextFormatter("%(levelname)s %(name)s %(message)s"))
    _emit(logger)
    lines = out.getvalue().splitlines()
    start = lines[0]
    assert f'model="{MODEL}"' in start
    assert "ae_title=CXRD schema=7" in start  # plain values stay as they are
    fields = dict(tok.split("=", 1) for tok in shlex.split(start)[2:])
    assert fields["model"] == MODEL and fields["action"] == "node-start"

    classified = lines[1]
    assert 'reason="said \\"no\\" twice"' in classified
    assert 'destination="main pacs"' in classified  # extra= follows the message
    assert lines[2].endswith('source="dicom:A B@127.0.0.1"')
    assert "ZeroDivisionError: division by zero" in out.getvalue()


def test_setup_logging_json_writes_json_to_stderr(capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging(validate({"logging": {"format": "json", "level": "INFO"}}))
        logging.getLogger("cxrd.test-logs").info("action=demo-model model=%s", MODEL)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["model"] == MODEL
