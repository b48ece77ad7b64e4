"""Urgent-finding notifications: what a ``[[notifications]]`` endpoint is told of a study
whose SR reports a finding it is urgent for, and how (``cxrd.send`` claims, sends and
records them through the outbox, as it does a destination's deliveries).

A notification is a delivery of the study's SR to the notification's name, queued in the
transaction that records the SR (``cxrd.outbox.add_result``). Its message is built when it
is sent, from the SR's ``summary`` (the study-level finding, the operating point and the
model: ``cxrd.db.Result.summary``) and the SR's own header (the accession number, and for
HL7 the patient's ID and name, which are in the message and never in a log line).

* ``webhook``: an HTTP POST of a small JSON document (``webhook_body``), with a bearer token
  when ``token_file`` or ``token_env`` names one (``cxrd.stow.credentials``) and an
  ``Idempotency-Key`` header that is the same at every attempt. 2xx: done. No answer
  (connection refused or reset, timeout), 408, 429 or 5xx: retried with the outbox's
  backoff (the rest of the pass waits too). A redirect is not followed: ``PERMANENT:``,
  retried at the maximum backoff. Any other 4xx refuses the document: dead at once.
* ``hl7``: an HL7 v2.5.1 ORU^R01 (``hl7_message``, built and parsed back with the ``hl7``
  package) over MLLP (``<VT>message<FS><CR>``, the ``hl7.mllp`` streams), one connection
  per pass, each message answered by its ACK before the next. AA (or CA): done. AE (or CE),
  an ACK for another message, a dropped connection or no ACK within ``timeout_seconds``:
  retried. AR (or CR), the receiver rejecting the message type, version or processing ID,
  or being unable to take messages: ``PERMANENT:``, retried only at the maximum backoff
  (``[sender] max_backoff_seconds``) until the delivery is ``max_age_hours`` old, then
  dead; ``cxrd deliveries retry`` sends it again.

The messages carry a stable identity across attempts (the webhook's ``notification_id``,
the HL7 message control ID from the delivery's row), so a receiver can drop a repeat (a
node that died after the receiver answered but before the outcome was committed sends it
again after its lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import hl7
import pydicom
import requests
from hl7.mllp import HL7StreamReader, HL7StreamWriter, open_hl7_connection
from pydicom.sr.codedict import codes

from cxrd.config import NotificationConfig
from cxrd.findings import CLASS_LABELS
from cxrd.modelinfo import CLASS_NAMES
from cxrd.outbox import DueDelivery
from cxrd.stow import Credentials, body_hint

log = logging.getLogger(__name__)

#: The MSH's sending application (MSH-3).
SENDING_APPLICATION = "cxrd"
HL7_VERSION = "2.5.1"
#: MSH-18: the message is UTF-8 (patient names in any script).
HL7_CHARSET = "UNICODE UTF-8"
#: ACK codes (HL7 table 0008): original and enhanced mode.
ACK_ACCEPT = {"AA", "CA"}
ACK_ERROR = {"AE", "CE"}
ACK_REJECT = {"AR", "CR"}
#: A coding system of our own (HL7: local ones start with 99) for what has no standard code.
LOCAL_CODES = "99CXRD"
#: OBR-25 and OBX-11: P, preliminary. The SR is an unverified AI result.
RESULT_STATUS = "P"
WEBHOOK_EVENT = "cxrd.urgent-finding"
#: The SR's header elements a message needs; nothing else is read.
SR_TAGS = ["SpecificCharacterSet", "StudyInstanceUID", "SOPInstanceUID", "AccessionNumber",
           "PatientID", "IssuerOfPatientID", "PatientName", "ContentDate", "ContentTime"]


@dataclass(frozen=True)
class Notice:
    """What a notification says of one SR. The patient's ID and name are for the HL7
    message only: never logged, and left out of ``repr``."""

    notification: str
    delivery_id: int
    study_instance_uid: str
    sr_sop_instance_uid: str
    supersedes: str | None
    finding: str  # a class name: TB or NTB
    probability: float
    threshold: float
    images: int
    model_name: str
    model_version: str
    model_demo: bool
    device_uid: str
    observed_at: dt.datetime  # the SR's content date and time
    accession_number: str = field(default="", repr=False)
    patient_id: str = field(default="", repr=False)
    issuer_of_patient_id: str = field(default="", repr=False)
    patient_name: str = field(default="", repr=False)  # DICOM PN, its alphabetic group

    @property
    def notification_id(self) -> str:
        """The same at every attempt: the SR and the notification's name."""
        return f"{self.sr_sop_instance_uid}/{self.notification}"

    @property
    def control_id(self) -> str:
        """MSH-10 (at most 20 characters in v2.5.1): the delivery's row id."""
        return f"CXRD{self.delivery_id}"


class NoticeError(ValueError):
    """The delivery's result is not an SR with a study-level finding: nothing to say."""


def read_notice(delivery: DueDelivery, sr: bytes) -> Notice:
    """The notice of ``delivery`` (a notification's delivery of an SR) from its result's
    ``summary`` and the SR's header (``sr``: the SR object's bytes). Raises
    ``NoticeError`` when there is no summary (a result that is not a notified SR)."""
    if not delivery.summary:
        raise NoticeError(f"result {delivery.sop_instance_uid} has no study-level finding "
                          "(not an SR written since schema 8): nothing to notify")
    summary = json.loads(delivery.summary)
    model = summary.get("model") or {}
    ds = pydicom.dcmread(BytesIO(sr), stop_before_pixels=True, specific_tags=SR_TAGS)
    name = ds.get("PatientName")
    return Notice(
        notification=delivery.destination, delivery_id=delivery.delivery_id,
        study_instance_uid=delivery.study_instance_uid or str(ds.get("StudyInstanceUID", "")),
        sr_sop_instance_uid=delivery.sop_instance_uid, supersedes=delivery.supersedes,
        finding=str(summary["finding"]), probability=float(summary["probability"]),
        threshold=float(summary["threshold"]), images=int(summary.get("images", 0)),
        model_name=str(model.get("name", "")), model_version=str(model.get("version", "")),
        model_demo=bool(model.get("demo", False)), device_uid=str(model.get("device_uid", "")),
        observed_at=_content_datetime(ds),
        accession_number=str(ds.get("AccessionNumber", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or ""),
        patient_name=str(name.components[0]) if name else "")


def _content_datetime(ds: Any) -> dt.datetime:
    text = f"{ds.get('ContentDate', '')}{str(ds.get('ContentTime', '')).split('.')[0]}"
    try:
        return dt.datetime.strptime(text[:14].ljust(14, "0"), "%Y%m%d%H%M%S")
    except ValueError:
        return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# ------------------------------------------------------------------------------ webhook


def webhook_body(notice: Notice) -> dict[str, Any]:
    """The JSON document a webhook is posted: no patient data (the accession number and
    the study UID identify the study)."""
    return {
        "event": WEBHOOK_EVENT,
        "notification": notice.notification,
        "notification_id": notice.notification_id,
        "study_instance_uid": notice.study_instance_uid,
        "accession_number": notice.accession_number,
        "finding": notice.finding,
        "finding_label": CLASS_LABELS[CLASS_NAMES.index(notice.finding)],
        "probability": notice.probability,
        "threshold": notice.threshold,
        "images": notice.images,
        "model": {"name": notice.model_name, "version": notice.model_version,
                  "demo": notice.model_demo, "device_uid": notice.device_uid},
        "sr_sop_instance_uid": notice.sr_sop_instance_uid,
        "supersedes_sr_sop_instance_uid": notice.supersedes,
        "observed_at": notice.observed_at.isoformat(),
    }


@dataclass(frozen=True)
class Outcome:
    """One attempt's outcome: delivered, or failed with ``error``, transient,
    ``permanent`` (dead) or ``at_max_backoff``; ``hold``: the endpoint is down or busy, so
    the rest of the pass waits for the next attempt. ``answer`` says what came back (an
    HTTP status, an ACK code), for the log."""

    delivered: bool = False
    error: str = ""
    permanent: bool = False
    at_max_backoff: bool = False
    hold: bool = False
    answer: str = "none"


#: HTTP statuses that are worth another attempt.
HTTP_TRANSIENT = {408, 429}


def http_outcome(response: requests.Response) -> Outcome:
    """What a webhook's answer means."""
    status = response.status_code
    answer = f"HTTP {status}"
    text = f"webhook answered {answer} {response.reason or ''}".strip()
    if 200 <= status < 300:
        return Outcome(delivered=True, answer=answer)
    if 300 <= status < 400:
        where = response.headers.get("Location", "elsewhere")
        return Outcome(error=f"PERMANENT: {text}: it redirects to {where}; set the "
                             "notification's url there", at_max_backoff=True, answer=answer)
    if status in HTTP_TRANSIENT or status >= 500:
        return Outcome(error=text + body_hint(response), hold=True, answer=answer)
    return Outcome(error=f"refused by the webhook: {text}{body_hint(response)}",
                   permanent=True, answer=answer)


class WebhookClient:
    """Posts notices to one webhook, for one pass (one HTTP session)."""

    def __init__(self, endpoint: NotificationConfig, creds: Credentials) -> None:
        self.endpoint = endpoint
        self.session = requests.Session()
        self.session.max_redirects = 0
        self.headers = {"Accept": "application/json"}
        if creds.token is not None:
            self.headers["Authorization"] = f"Bearer {creds.token}"

    def send(self, notice: Notice) -> Outcome:
        e = self.endpoint
        try:
            response = self.session.post(
                e.url, json=webhook_body(notice), allow_redirects=False,
                headers={**self.headers, "Idempotency-Key": notice.notification_id},
                timeout=(e.connect_timeout_seconds, e.timeout_seconds))
        except requests.Timeout as exc:
            what = ("no answer to the TCP connection" if isinstance(
                exc, requests.ConnectTimeout) else
                f"no response within {e.timeout_seconds:g} s (timeout_seconds)")
            return Outcome(error=f"webhook: {what}", hold=True)
        except requests.RequestException as exc:
            return Outcome(error=f"webhook: cannot connect: {_first_line(exc)}", hold=True)
        return http_outcome(response)

    def close(self) -> None:
        self.session.close()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


# ---------------------------------------------------------------------------------- HL7


def _escape(value: str) -> str:
    """A value as HL7 v2 text: its delimiters escaped (``\\F\\``, ``\\S\\``, ...), line
    breaks as spaces."""
    out = []
    for c in value:
        if c in _HL7_ESCAPES:
            out.append(_HL7_ESCAPES[c])
        elif c in "\r\n" or not c.isprintable():
            out.append(" ")
        else:
            out.append(c)
    return "".join(out)


_HL7_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}


def _components(*values: str) -> str:
    return "^".join(_escape(v) for v in values).rstrip("^")


def _coded(code: Any) -> str:
    """A pydicom ``Code`` as an HL7 CWE (identifier^text^coding system)."""
    return _components(code.value, code.meaning, code.scheme_designator)


def _segment(name: str, fields: dict[int, str]) -> str:
    """A segment from its fields by number (already escaped); missing ones are empty."""
    last = max(fields)
    return "|".join([name, *(fields.get(i, "") for i in range(1, last + 1))])


def _ts(moment: dt.datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S")


def hl7_message(notice: Notice, endpoint: NotificationConfig, *,
                now: dt.datetime | None = None) -> hl7.Message:
    """The ORU^R01 (HL7 v2.5.1) of ``notice``: MSH (sending application cxrd, the
    endpoint's receiving application and facility, control ID from the delivery), PID
    (the patient's ID with its issuer, and name: what the RIS matches on), OBR (the
    accession number as placer and filler order number, plain chest X-ray as the
    service), OBX: the finding (CWE, flagged abnormal), its probability (NM), the study
    and SR UIDs, the algorithm's name and version (ST), and NTE: the model, the operating
    point, and the DEMO warning for a demo model."""
    from cxrd.sr import CHEST_RADIOGRAPH, CLASS_FINDINGS, PROBABILITY

    now = dt.datetime.now(dt.UTC) if now is None else now
    observed = _ts(notice.observed_at)
    msh = ("MSH|^~\\&|" + "|".join([
        SENDING_APPLICATION, _escape(endpoint.sending_facility),
        _escape(endpoint.receiving_application), _escape(endpoint.receiving_facility),
        _ts(now) + "+0000", "", "ORU^R01^ORU_R01", notice.control_id, "P", HL7_VERSION,
        "", "", "", "", "", HL7_CHARSET]))
    pid = _segment("PID", {1: "1", 3: _components(notice.patient_id, "", "",
                                                  notice.issuer_of_patient_id),
                           5: _xpn(notice.patient_name)})
    accession = _escape(notice.accession_number)
    obr = _segment("OBR", {1: "1", 2: accession, 3: accession, 4: _coded(CHEST_RADIOGRAPH),
                           7: observed, 22: observed, 24: "RAD", 25: RESULT_STATUS})
    finding = CLASS_FINDINGS[CLASS_NAMES.index(notice.finding)]
    ai = _coded(codes.DCM.ArtificialIntelligence)
    observations: list[tuple[str, str, str, str, str]] = [
        # (value type, identifier, value, units, abnormal flag)
        ("CWE", _coded(codes.DCM.Finding), _coded(finding), "", "A"),
        ("NM", _coded(PROBABILITY), repr(notice.probability),
         _components("1", "no units", "UCUM"), ""),
        ("ST", _coded(codes.DCM.StudyInstanceUID), notice.study_instance_uid, "", ""),
        ("ST", _components("SR", "AI report SR SOP Instance UID", LOCAL_CODES),
         notice.sr_sop_instance_uid, "", ""),
        ("ST", _coded(codes.DCM.AlgorithmName), _escape(notice.model_name), "", ""),
        ("ST", _coded(codes.DCM.AlgorithmVersion), _escape(notice.model_version), "", ""),
    ]
    obx = [_segment("OBX", {1: str(i), 2: kind, 3: ident, 5: value, 6: units, 8: flag,
                            11: RESULT_STATUS, 14: observed, 17: ai})
           for i, (kind, ident, value, units, flag) in enumerate(observations, start=1)]
    notes = [f"AI result, not verified: {notice.model_name} {notice.model_version}, TB "
             f"operating point P(TB) >= {notice.threshold:g}, {notice.images} image(s)"]
    if notice.model_demo:
        notes.insert(0, "DEMO model trained on synthetic phantoms: not for clinical use")
    if notice.supersedes:
        notes.append(f"Supersedes the AI report {notice.supersedes}")
    nte = [_segment("NTE", {1: str(i), 2: "L", 3: _escape(text)})
           for i, text in enumerate(notes, start=1)]
    return hl7.parse("\r".join([msh, pid, obr, *obx, *nte]))


def _xpn(name: str) -> str:
    """A DICOM person name's alphabetic group (family^given^middle^prefix^suffix) as an HL7
    XPN (family^given^middle^suffix^prefix)."""
    parts = (name.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return _components(family, given, middle, suffix, prefix)


def ack_outcome(ack: hl7.Message, control_id: str) -> Outcome:
    """What an HL7 ACK means for the message ``control_id``."""
    try:
        msa = ack.segment("MSA")
    except KeyError:
        return Outcome(error="HL7 answer without an MSA segment (not an ACK)", answer="no MSA")
    try:
        code, answered = str(msa(1)).strip().upper(), str(msa(2)).strip()
    except IndexError:
        return Outcome(error="HL7 ACK without an acknowledgment code and message control ID",
                       answer="short MSA")
    # Only the coded error (ERR-3, HL7 table 0357): the free texts (MSA-3, ERR-8) may quote
    # the message's patient data, and the error is logged.
    try:
        detail = str(ack.segment("ERR")(3)).strip()
    except (KeyError, IndexError):
        detail = ""
    answer = f"ACK {code}"
    if answered != control_id:
        return Outcome(error=f"HL7 ACK for message {answered!r}, not {control_id!r}",
                       answer=answer)
    if code in ACK_ACCEPT:
        return Outcome(delivered=True, answer=answer)
    text = f"HL7 ACK {code}" + (f": {detail}" if detail else "")
    if code in ACK_ERROR:
        return Outcome(error=f"{text} (application error)", answer=answer)
    if code in ACK_REJECT:
        return Outcome(error=f"PERMANENT: {text} (rejected: check the receiver's "
                             "configuration for cxrd's messages)", at_max_backoff=True,
                       answer=answer)
    return Outcome(error=f"HL7 ACK with an unknown code {code!r}", answer=answer)


class MllpClient:
    """Sends HL7 messages to one MLLP listener, for one pass: one connection, opened at
    the first message (again after one is lost), each message answered before the next.
    The ``hl7.mllp`` streams run on an event loop of its own, in the sender's thread."""

    def __init__(self, endpoint: NotificationConfig) -> None:
        self.endpoint = endpoint
        self._loop = asyncio.new_event_loop()
        self._reader: HL7StreamReader | None = None
        self._writer: HL7StreamWriter | None = None

    def send(self, message: hl7.Message, control_id: str) -> Outcome:
        e = self.endpoint
        try:
            ack = self._loop.run_until_complete(self._exchange(message))
        except TimeoutError:
            self._drop()
            return Outcome(error=f"HL7: no ACK within {e.timeout_seconds:g} s "
                                 "(timeout_seconds), or no connection", hold=True)
        except asyncio.IncompleteReadError:
            self._drop()
            return Outcome(error="HL7: the receiver closed the connection before the ACK",
                           hold=True)
        except OSError as exc:
            self._drop()
            return Outcome(error=f"HL7: cannot connect to {e.host}:{e.port}: "
                                 f"{exc.strerror or type(exc).__name__}", hold=True)
        except Exception as exc:  # a block that is not MLLP, an answer that is not HL7
            self._drop()
            return Outcome(error=f"HL7: unreadable answer: {type(exc).__name__}: "
                                 f"{_first_line(exc)}", hold=True)
        return ack_outcome(ack, control_id)

    async def _exchange(self, message: hl7.Message) -> hl7.Message:
        e = self.endpoint
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.wait_for(
                open_hl7_connection(e.host, e.port, encoding="utf-8",
                                    encoding_errors="replace"), e.connect_timeout_seconds)
        assert self._reader is not None
        self._writer.writemessage(message)
        await asyncio.wait_for(self._writer.drain(), e.timeout_seconds)
        ack: hl7.Message = await asyncio.wait_for(self._reader.readmessage(),
                                                  e.timeout_seconds)
        return ack

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._writer.wait_closed())
        self._reader = self._writer = None

    def close(self) -> None:
        self._drop()
        self._loop.close()
