"""Urgent-finding notifications without the network: the study-level finding, which SR is
queued for which notification (``cxrd.outbox.add_result``), the webhook's JSON document
and the HL7 ORU^R01 read back with the ``hl7`` package, what an ACK or an HTTP status
means, the ``[[notifications]]`` configuration and schema 8."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Any

import hl7
import pytest
import requests
from dicomfactory import make_dataset, part10_bytes, uid
from sqlalchemy import select

from cxrd.config import NotificationConfig, NotificationKind, validate
from cxrd.db import SCHEMA_VERSION, Database, Delivery, Result
from cxrd.domain import ResultKind
from cxrd.errors import ConfigError
from cxrd.findings import NORM, NTB, TB, study_finding
from cxrd.notify import (
    Notice,
    NoticeError,
    ack_outcome,
    hl7_message,
    http_outcome,
    read_notice,
    webhook_body,
)
from cxrd.outbox import DueDelivery, add_result

WEBHOOK = NotificationConfig(name="worklist", kind=NotificationKind.WEBHOOK,
                             url="http://ris.example/hooks/cxrd")
BOTH = NotificationConfig(name="ris", kind=NotificationKind.HL7, host="127.0.0.1", port=2575,
                          findings=("TB", "NTB"), receiving_application="RIS",
                          receiving_facility="RAD^DEPT", sending_facility="HOSP")
SUMMARY = {"finding": "TB", "probability": 0.91, "threshold": 0.5, "images": 2,
           "model": {"name": "cxrd-demo", "version": "1.2", "demo": True,
                     "device_uid": "2.25.123"}}


# ----------------------------------------------------------------------- study finding


def test_study_finding_is_tb_when_any_image_crosses_the_operating_point() -> None:
    # P(TB) 0.4 is below 0.5 yet TB is the likelier class: the threshold decides, not argmax
    assert study_finding([[0.4, 0.3, 0.3], [0.05, 0.05, 0.9]], 0.5) == (NTB, pytest.approx(0.3))
    assert study_finding([[0.55, 0.4, 0.05], [0.7, 0.2, 0.1]], 0.5) == (TB, pytest.approx(0.7))
    assert study_finding([[0.3, 0.1, 0.6]], 0.25)[0] == TB  # a low operating point
    assert study_finding([[0.1, 0.2, 0.7], [0.1, 0.1, 0.8]], 0.5) == (NORM, pytest.approx(0.7))
    with pytest.raises(ValueError):
        study_finding([], 0.5)


# ------------------------------------------------------------------ queueing (outbox)


def _sr(db: Database, finding: str | None, *, supersedes: str | None = None,
        notifications: tuple[NotificationConfig, ...] = (WEBHOOK, BOTH)) -> str:
    sop = uid()
    with db.session() as s:
        add_result(s, kind=ResultKind.SR, sop_instance_uid=sop, study_instance_uid="1.2",
                   generation=1, path=f"results/{sop}.dcm", destinations=["pacs"],
                   supersedes=supersedes,
                   summary=None if finding is None else {**SUMMARY, "finding": finding},
                   notifications=notifications)
    return sop


def _queued(db: Database, sop: str) -> list[str]:
    with db.session() as s:
        return sorted(s.scalars(select(Delivery.destination).join(
            Result, Delivery.result_id == Result.id).where(Result.sop_instance_uid == sop)))


def test_an_sr_is_queued_for_each_notification_urgent_for_its_finding(memdb: Database) -> None:
    assert _queued(memdb, _sr(memdb, "TB")) == ["pacs", "ris", "worklist"]
    assert _queued(memdb, _sr(memdb, "NTB")) == ["pacs", "ris"]  # worklist: TB only
    assert _queued(memdb, _sr(memdb, "NORM")) == ["pacs"]
    assert _queued(memdb, _sr(memdb, None)) == ["pacs"]  # no summary: no SR finding


def test_the_same_sr_again_queues_nothing_twice(memdb: Database) -> None:
    sop = uid()
    for _ in range(2):  # a completing transaction run again
        with memdb.session() as s:
            add_result(s, kind=ResultKind.SR, sop_instance_uid=sop, study_instance_uid="1.2",
                       generation=1, path="results/x.dcm", summary=SUMMARY,
                       notifications=(WEBHOOK, BOTH))
    assert _queued(memdb, sop) == ["ris", "worklist"]


def test_a_superseding_sr_notifies_only_when_its_finding_changed(memdb: Database) -> None:
    first = _sr(memdb, "NTB")
    assert _queued(memdb, first) == ["pacs", "ris"]
    same = _sr(memdb, "NTB", supersedes=first)
    assert _queued(memdb, same) == ["pacs"]  # told already
    worse = _sr(memdb, "TB", supersedes=same)
    assert _queued(memdb, worse) == ["pacs", "ris", "worklist"]
    better = _sr(memdb, "NORM", supersedes=worse)
    assert _queued(memdb, better) == ["pacs"]
    again = _sr(memdb, "TB", supersedes=better)
    assert _queued(memdb, again) == ["pacs", "ris", "worklist"]
    # a superseded SR from before schema 8 (no summary): told rather than not at all
    old = _sr(memdb, None)
    assert _queued(memdb, _sr(memdb, "TB", supersedes=old)) == ["pacs", "ris", "worklist"]


# ----------------------------------------------------------------------------- messages


def _notice(**changes: Any) -> Notice:
    base: dict[str, Any] = dict(
        notification="ris", delivery_id=42, study_instance_uid="1.2.3",
        sr_sop_instance_uid="1.2.3.9", supersedes=None, finding="TB", probability=0.91,
        threshold=0.5, images=2, model_name="cxrd-demo", model_version="1.2",
        model_demo=True, device_uid="2.25.123",
        observed_at=dt.datetime(2026, 12, 6, 15, 4, 5), accession_number="ACC|7^X",
        patient_id="PID-9", issuer_of_patient_id="HOSP", patient_name="Müller^Anna^B^Dr^MD")
    base.update(changes)
    return Notice(**base)


def test_read_notice_takes_the_finding_from_the_summary_and_the_ids_from_the_sr() -> None:
    study = uid()
    ds = make_dataset("OT", study_uid=study, rows=4, columns=4, AccessionNumber="A-77",
                      PatientID="P-1", PatientName="Doe^Jane", IssuerOfPatientID="HOSP")
    delivery = DueDelivery(5, "ris", "results/x.dcm", "1.2.3.9", dt.datetime(2026, 1, 1), 0,
                           study_instance_uid=study, summary=json.dumps(SUMMARY),
                           supersedes="1.2.3.8")
    notice = read_notice(delivery, part10_bytes(ds))
    assert (notice.finding, notice.probability, notice.threshold) == ("TB", 0.91, 0.5)
    assert (notice.model_name, notice.model_version, notice.model_demo) == ("cxrd-demo", "1.2",
                                                                            True)
    assert (notice.accession_number, notice.patient_id, notice.patient_name,
            notice.issuer_of_patient_id) == ("A-77", "P-1", "Doe^Jane", "HOSP")
    assert notice.supersedes == "1.2.3.8" and notice.control_id == "CXRD5"
    assert "P-1" not in repr(notice) and "Doe" not in repr(notice)  # never in a log line
    with pytest.raises(NoticeError):
        read_notice(DueDelivery(5, "ris", "k", "1.2", dt.datetime(2026, 1, 1), 0),
                    part10_bytes(ds))


def test_webhook_body_has_the_contract_fields_and_no_patient_data() -> None:
    body = webhook_body(_notice(supersedes="1.2.3.8"))
    assert json.loads(json.dumps(body)) == body
    assert body["study_instance_uid"] == "1.2.3" and body["accession_number"] == "ACC|7^X"
    assert (body["finding"], body["probability"], body["threshold"]) == ("TB", 0.91, 0.5)
    assert body["model"] == {"name": "cxrd-demo", "version": "1.2", "demo": True,
                             "device_uid": "2.25.123"}
    assert body["sr_sop_instance_uid"] == "1.2.3.9"
    assert body["supersedes_sr_sop_instance_uid"] == "1.2.3.8"
    assert body["notification_id"] == "1.2.3.9/ris"
    text = json.dumps(body)
    assert "PID-9" not in text and "Müller" not in text


def test_hl7_oru_r01_reads_back_with_the_hl7_package() -> None:
    message = hl7_message(_notice(), BOTH, now=dt.datetime(2026, 12, 6, 16, 0, 0))
    parsed = hl7.parse(str(message))  # the text sent, parsed again
    msh = parsed.segment("MSH")
    assert str(msh(3)) == "cxrd" and str(msh(4)) == "HOSP" and str(msh(5)) == "RIS"
    assert parsed.unescape(str(msh(6))) == "RAD^DEPT"
    assert str(msh(7)) == "20261206160000+0000"
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(10)) == "CXRD42"
    assert str(msh(11)) == "P" and str(msh(12)) == "2.5.1" and str(msh(18)) == "UNICODE UTF-8"
    pid = parsed.segment("PID")
    assert str(pid(3)(1)(1)) == "PID-9" and str(pid(3)(1)(4)) == "HOSP"
    # DICOM family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix
    assert [str(pid(5)(1)(i)) for i in range(1, 6)] == ["Müller", "Anna", "B", "MD", "Dr"]
    obr = parsed.segment("OBR")
    assert parsed.unescape(str(obr(2))) == parsed.unescape(str(obr(3))) == "ACC|7^X"
    assert str(obr(4)) == "399208008^Plain chest X-ray^SCT"
    assert str(obr(7)) == "20261206150405" and str(obr(25)) == "P"
    obx = {str(o(3)(1)(2)): o for o in parsed.segments("OBX")}
    assert [str(o(1)) for o in parsed.segments("OBX")] == ["1", "2", "3", "4", "5", "6"]
    finding = obx["Finding"]
    assert str(finding(2)) == "CWE" and str(finding(5)) == "56717001^Tuberculosis^SCT"
    assert str(finding(8)) == "A" and str(finding(11)) == "P"
    probability = obx["Probability"]
    assert str(probability(2)) == "NM" and float(str(probability(5))) == 0.91
    assert str(probability(6)) == "1^no units^UCUM"
    assert str(obx["Study Instance UID"](5)) == "1.2.3"
    assert str(obx["AI report SR SOP Instance UID"](5)) == "1.2.3.9"
    assert str(obx["Algorithm Name"](5)) == "cxrd-demo"
    assert str(obx["Algorithm Version"](5)) == "1.2"
    notes = [str(n(3)) for n in parsed.segments("NTE")]
    assert notes[0].startswith("DEMO model") and "P(TB) >= 0.5" in notes[1]


def test_hl7_ntb_finding_and_a_superseding_report() -> None:
    parsed = hl7_message(_notice(finding="NTB", model_demo=False, supersedes="1.2.3.8"), BOTH)
    [finding] = [o for o in parsed.segments("OBX") if str(o(3)(1)(2)) == "Finding"]
    assert str(finding(5)) == "263654008^Abnormal^SCT"
    notes = [str(n(3)) for n in parsed.segments("NTE")]
    assert not any("DEMO" in n for n in notes) and "1.2.3.8" in notes[-1]


def test_ack_codes() -> None:
    message = hl7_message(_notice(), BOTH)
    assert ack_outcome(message.create_ack("AA"), "CXRD42").delivered
    assert ack_outcome(message.create_ack("CA"), "CXRD42").delivered
    ae = ack_outcome(message.create_ack("AE"), "CXRD42")
    assert not ae.delivered and not ae.permanent and not ae.at_max_backoff
    ar = ack_outcome(message.create_ack("AR"), "CXRD42")
    assert ar.at_max_backoff and ar.error.startswith("PERMANENT:") and not ar.permanent
    other = ack_outcome(message.create_ack("AA"), "CXRD41")  # another message's ACK
    assert not other.delivered and "CXRD42" in other.error
    # the coded error is kept; the free texts, which may quote patient data, are not
    answer = hl7.parse("MSH|^~\\&|RIS||cxrd||20261206||ACK^R01^ACK|9|P|2.5.1\r"
                       "MSA|AE|CXRD42|unknown patient PID-9\r"
                       "ERR|||204^Unknown key identifier^HL70357||E||||patient PID-9")
    coded = ack_outcome(answer, "CXRD42")
    assert coded.error == "HL7 ACK AE: 204^Unknown key identifier^HL70357 (application error)"
    assert "PID-9" not in coded.error
    short = ack_outcome(hl7.parse("MSH|^~\\&|RIS||cxrd||20261206||ACK|9|P|2.5.1\rMSA|AA"),
                        "CXRD42")
    assert not short.delivered


def _response(status: int, body: bytes = b"", **headers: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body
    response.headers.update(headers)
    return response


def test_http_statuses() -> None:
    assert http_outcome(_response(200)).delivered and http_outcome(_response(204)).delivered
    for status in (408, 429, 500, 503):
        outcome = http_outcome(_response(status))
        assert not outcome.delivered and not outcome.permanent and outcome.hold, status
    for status in (400, 401, 404, 422):
        outcome = http_outcome(_response(status, b"bad field", **{"Content-Type": "text/plain"}))
        assert outcome.permanent, status
    assert "bad field" in http_outcome(_response(400, b"bad field")).error
    moved = http_outcome(_response(302, Location="http://elsewhere/"))
    assert moved.at_max_backoff and not moved.permanent


# ------------------------------------------------------------------------ configuration


def _problems(entries: list[dict[str, Any]], **extra: Any) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate({"notifications": entries, **extra})
    return err.value.problems


def test_notifications_config_reads_both_kinds(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0k\n")
    config = validate({"notifications": [
        {"name": "worklist", "kind": "webhook", "url": "https://ris.example/hooks/cxrd",
         "token_file": str(token), "timeout_seconds": 5},
        {"name": "ris", "kind": "hl7", "host": "ris.example", "port": 2575,
         "findings": ["TB", "NTB"], "receiving_application": "RIS"}]})
    web, ris = config.notifications
    assert (web.kind, web.findings, web.token_file, web.timeout_seconds) == (
        NotificationKind.WEBHOOK, ("TB",), token, 5.0)
    assert (ris.kind, ris.port, ris.findings, ris.receiving_application) == (
        NotificationKind.HL7, 2575, ("TB", "NTB"), "RIS")
    assert config.endpoint_names == ("worklist", "ris")


def test_notifications_config_errors_are_one_line_each() -> None:
    assert _problems([{"name": "a", "kind": "webhok", "url": "http://x"}]) == [
        'notifications[0].kind: "webhok" is not allowed; expected "webhook" or "hl7"; did '
        'you mean "webhook"?']
    [missing_kind] = _problems([{"name": "a", "url": "http://x"}])
    assert missing_kind.startswith("notifications[0].kind: missing")
    [url] = _problems([{"name": "a", "kind": "webhook"}])
    assert url.startswith("notifications[0].url: missing")
    assert [p.split(":")[0] for p in _problems([{"name": "a", "kind": "hl7"}])] == [
        "notifications[0].host", "notifications[0].port"]
    [bad_url] = _problems([{"name": "a", "kind": "webhook", "url": "ftp://x"}])
    assert "http:// or https://" in bad_url
    [norm] = _problems([{"name": "a", "kind": "webhook", "url": "http://x",
                         "findings": ["NORM"]}])
    assert "never urgent" in norm
    [other_kind] = _problems([{"name": "a", "kind": "hl7", "host": "h", "port": 1,
                               "url": "http://x"}])
    assert other_kind == ('notifications[0].url: applies only to kind "webhook"; '
                          'notifications[0] is kind "hl7"')
    [inline] = _problems([{"name": "a", "kind": "webhook", "url": "http://x",
                           "token": "s3cret"}])
    assert "s3cret" not in inline and "token_file or token_env" in inline
    [shared] = _problems([{"name": "pacs", "kind": "webhook", "url": "http://x"}],
                         destinations=[{"name": "pacs", "ae_title": "PACS",
                                        "host": "127.0.0.1", "port": 104}])
    assert "share one namespace" in shared
    [twice] = _problems([{"name": "a", "kind": "webhook", "url": "http://x"},
                         {"name": "a", "kind": "hl7", "host": "h", "port": 1}])
    assert twice.startswith("notifications[1].name")
    [no_sr] = _problems([{"name": "a", "kind": "webhook", "url": "http://x"}],
                        results={"structured_report": False})
    assert "structured_report" in no_sr


# ------------------------------------------------------------------------------ schema 8


def test_v8_adds_results_summary_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v7.sqlite"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    db.dispose()
    conn = sqlite3.connect(path)
    conn.executescript("""
        ALTER TABLE results DROP COLUMN summary;
        DELETE FROM schema_version WHERE version >= 8;
        INSERT INTO results (id, sop_instance_uid, study_instance_uid, kind, generation, path,
            created_at) VALUES (1, '1.2.3', '1.2', 'sr', 1, 'results/1.2.3.dcm',
            '2026-01-01 00:00:00');
    """)
    conn.commit()
    conn.close()
    db = Database(f"sqlite:///{path}")
    assert db.schema_version() == 7
    assert db.migrate() == SCHEMA_VERSION == 8
    with db.session() as s:
        row = s.get(Result, 1)
        assert row is not None and row.summary is None
        row.summary = json.dumps(SUMMARY)
    assert db.migrate() == SCHEMA_VERSION
    db.dispose()


def test_check_config_reads_a_webhook_token_it_names(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cxrd.preflight import check_destinations

    monkeypatch.delenv("CXRD_TEST_HOOK_TOKEN", raising=False)
    config = validate({"notifications": [{"name": "worklist", "kind": "webhook",
                                          "url": "http://x", "token_env":
                                          "CXRD_TEST_HOOK_TOKEN"}]})
    [problem] = check_destinations(config)
    assert problem.check == "notifications"
    assert problem.cause == ("notifications 'worklist' token_env: the environment variable "
                             "CXRD_TEST_HOOK_TOKEN is not set or empty")
    monkeypatch.setenv("CXRD_TEST_HOOK_TOKEN", "t0k")
    assert check_destinations(config) == []
