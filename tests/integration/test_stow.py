"""STOW-RS destinations (``cxrd.send`` with ``cxrd.stow``) against real HTTP peers: Orthanc
with its DICOMweb plugin (Debian's orthanc-dicomweb) and HTTP basic auth, and, for what
Orthanc does not do (bearer tokens, chosen failure reasons), an HTTP server in this process
that parses the multipart request it gets and answers a STOW-RS response. The outbox is a
real SQLite file.

Checked: one request per study; results found in Orthanc in their study; wrong credentials
reported as such (``PERMANENT:``, retried only at the maximum backoff, an
``action=stow-refused`` line); Orthanc stopped then restarted: pending with a backoff,
delivered afterwards; the bearer token sent as ``Authorization: Bearer TOKEN`` (the token
file's trailing newline ignored); each failure reason and HTTP status with its outcome;
a request of several refused as a whole sent again one instance per request; on one
PostgreSQL database, two nodes' senders deliver each result once, and a slow pass renews
its leases between requests; results read from an S3 store (moto's server); HTTPS with the
destination's CA and our client certificate.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomfactory import make_dataset, uid, write
from dicompeers import Orthanc, Pki, free_port, make_pki
from sqlalchemy import select, update

from cxrd.config import Config, validate
from cxrd.db import Database, Delivery, Result, utcnow
from cxrd.domain import DeliveryState, ResultKind
from cxrd.send import Sender
from cxrd.status import collect, render

USER, PASSWORD = "cxrd", "s3cret-pw"


def stow_config(tmp_path: Path, destinations: Sequence[dict[str, Any]], *,
                initial: float = 1.0, maximum: float = 8.0,
                dimse_timeout: float = 20.0) -> Config:
    return validate({
        "storage": {"data_dir": str(tmp_path / "data")},
        "sender": {"initial_backoff_seconds": initial, "max_backoff_seconds": maximum,
                   "dimse_timeout_seconds": dimse_timeout},
        "destinations": list(destinations),
    })


def secret_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def queue_studies(db: Database, folder: Path, per_study: Sequence[int],
                  destinations: Sequence[str]) -> dict[str, list[str]]:
    """Secondary Capture results, ``per_study[i]`` of them in study i, queued for every
    destination (interleaved across studies, as reports of several studies would be);
    returns study UID -> SOP Instance UIDs."""
    studies = {uid(): n for n in per_study}
    out: dict[str, list[str]] = {s: [] for s in studies}
    with db.session() as s:
        for i in range(max(per_study)):
            for study, n in studies.items():
                if i >= n:
                    continue
                ds = make_dataset("OT", study_uid=study, rows=32, columns=32, seed=i)
                path = write(folder / f"{ds.SOPInstanceUID}.dcm", ds)
                row = Result(sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=study,
                             kind=ResultKind.SC.value, generation=1, path=str(path))
                s.add(row)
                s.flush()
                for name in destinations:
                    s.add(Delivery(result_id=row.id, destination=name))
                out[study].append(str(ds.SOPInstanceUID))
    return out


def by_uid(db: Database) -> dict[str, Delivery]:
    with db.session() as s:
        return {r.sop_instance_uid: d for d, r in s.execute(
            select(Delivery, Result).join(Result, Delivery.result_id == Result.id)).all()}


def make_due(db: Database) -> None:
    with db.session() as s:
        s.execute(update(Delivery).values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))


def stow_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "action=stow-rs " in r.getMessage()]


def in_orthanc(orthanc: Orthanc, study: str) -> set[str]:
    found = orthanc.study_id(study)
    if found is None:
        return set()
    rows = orthanc.instances_of_study(found)
    assert {r["study_instance_uid"] for r in rows} == {study}
    return {r["sop_instance_uid"] for r in rows}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path / "orthanc", dicomweb=True, users={USER: PASSWORD})
    peer.start()
    yield peer
    peer.stop()


def orthanc_destination(tmp_path: Path, orthanc: Orthanc, password: str = PASSWORD,
                        name: str = "web") -> dict[str, Any]:
    return {"name": name, "url": orthanc.dicomweb_url, "username": USER,
            "password_file": secret_file(tmp_path, f"{name}.password", password + "\n")}


# ------------------------------------------------------------------------ with Orthanc


def test_results_reach_orthanc_by_stow_rs_one_request_per_study(
        tmp_path: Path, db: Database, orthanc: Orthanc,
        caplog: pytest.LogCaptureFixture) -> None:
    config = stow_config(tmp_path, [orthanc_destination(tmp_path, orthanc)])
    studies = queue_studies(db, tmp_path / "results", [3, 2], ["web"])
    caplog.set_level(logging.INFO)
    assert Sender(config, db).run_once() == 5
    assert {d.state for d in by_uid(db).values()} == {DeliveryState.DONE.value}
    assert all(d.attempts == 1 and d.last_error is None for d in by_uid(db).values())
    for study, uids in studies.items():
        assert in_orthanc(orthanc, study) == set(uids)
    lines = stow_lines(caplog)
    assert len(lines) == 2, lines  # one request per study
    for study, uids in studies.items():
        assert any(f"study_instance_uid={study} instances={len(uids)} http_status=200" in ln
                   for ln in lines), lines
    # what Orthanc holds is the object written, element for element
    sop = studies[next(iter(studies))][0]
    [row] = [r for r in orthanc.instances_of_study(orthanc.study_id(next(iter(studies))))
             if r["sop_instance_uid"] == sop]
    back = pydicom.dcmread(BytesIO(orthanc.instance_file(row["id"])))
    written = pydicom.dcmread(tmp_path / "results" / f"{sop}.dcm")
    assert back.PixelData == written.PixelData and back.SOPClassUID == written.SOPClassUID

    # sent again (a crash after Orthanc stored them): Orthanc de-duplicates by UID
    with db.session() as s:
        s.execute(update(Delivery).values(state=DeliveryState.PENDING.value,
                                          next_attempt_at=utcnow()))
    assert Sender(config, db).run_once() == 5
    assert {d.state for d in by_uid(db).values()} == {DeliveryState.DONE.value}
    for study, uids in studies.items():
        assert in_orthanc(orthanc, study) == set(uids)


def test_wrong_password_is_reported_and_retried_only_at_the_maximum_backoff(
        tmp_path: Path, db: Database, orthanc: Orthanc,
        caplog: pytest.LogCaptureFixture) -> None:
    config = stow_config(tmp_path, [orthanc_destination(tmp_path, orthanc, "wrong")],
                         maximum=600)
    [uids] = queue_studies(db, tmp_path / "results", [2], ["web"]).values()
    caplog.set_level(logging.INFO)
    before = utcnow()
    Sender(config, db).run_once()
    for d in by_uid(db).values():
        assert d.state == DeliveryState.PENDING.value and d.attempts == 1
        assert (d.last_error or "").startswith("PERMANENT: STOW-RS HTTP 401"), d.last_error
        assert "credentials refused" in (d.last_error or "")
        assert d.next_attempt_at >= before + dt.timedelta(seconds=590)
    refused = [r for r in caplog.records if "action=stow-refused" in r.getMessage()]
    assert refused and refused[0].levelno == logging.ERROR
    assert "http_status=401" in refused[0].getMessage()
    assert PASSWORD not in caplog.text and "wrong" not in caplog.text
    # cxrd status shows it on the destination's line
    text = render(collect(config, db))
    assert "to web: pending 2; last error: PERMANENT: STOW-RS HTTP 401" in text, text

    # the operator corrects the password file: delivered at the next attempt
    Path(config.destinations[0].password_file or "").write_text(PASSWORD)
    make_due(db)
    Sender(config, db).run_once()
    assert {d.state for d in by_uid(db).values()} == {DeliveryState.DONE.value}
    with db.session() as s:
        study_uid = s.scalars(select(Result.study_instance_uid)).first()
    assert in_orthanc(orthanc, str(study_uid)) == set(uids)


def test_orthanc_down_then_back_delivers_after_backoff(
        tmp_path: Path, db: Database, orthanc: Orthanc) -> None:
    config = stow_config(tmp_path, [orthanc_destination(tmp_path, orthanc)], initial=1,
                         maximum=8)
    orthanc.stop()
    studies = queue_studies(db, tmp_path / "results", [2, 1], ["web"])
    sender = Sender(config, db)
    before = utcnow()
    sender.run_once()
    rows = by_uid(db)
    assert {d.state for d in rows.values()} == {DeliveryState.PENDING.value}
    assert all(d.attempts == 1 for d in rows.values())
    errors = sorted(d.last_error or "" for d in rows.values())
    assert errors[0].startswith("cannot connect"), errors
    assert all("PERMANENT" not in e for e in errors)
    assert all(before + dt.timedelta(seconds=0.9) <= d.next_attempt_at
               <= utcnow() + dt.timedelta(seconds=1.1) for d in rows.values())
    assert sender.run_once() == 0  # backing off: nothing due yet

    orthanc.start()  # same storage and ports
    make_due(db)
    assert sender.run_once() == 3
    rows = by_uid(db)
    assert {d.state for d in rows.values()} == {DeliveryState.DONE.value}
    assert all(d.attempts == 2 and d.last_error is None for d in rows.values())
    for study, uids in studies.items():
        assert in_orthanc(orthanc, study) == set(uids)


def test_sender_thread_delivers_once_orthanc_is_back(
        tmp_path: Path, db: Database, orthanc: Orthanc) -> None:
    """The sender's own threads: Orthanc stopped, the deliveries back off; restarted, they
    land without anyone touching the outbox."""
    config = stow_config(tmp_path, [orthanc_destination(tmp_path, orthanc)], initial=0.3,
                         maximum=1)
    orthanc.stop()
    [(study, uids)] = queue_studies(db, tmp_path / "results", [3], ["web"]).items()
    sender = Sender(config, db)
    sender.start()
    try:
        wait = threading.Event()
        for _ in range(100):
            if all(d.attempts >= 2 for d in by_uid(db).values()):
                break
            wait.wait(0.1)
        assert all(d.attempts >= 2 and d.state == DeliveryState.PENDING.value
                   for d in by_uid(db).values())
        orthanc.start()
        for _ in range(200):
            if {d.state for d in by_uid(db).values()} == {DeliveryState.DONE.value}:
                break
            wait.wait(0.1)
        assert {d.state for d in by_uid(db).values()} == {DeliveryState.DONE.value}
    finally:
        sender.stop()
    assert in_orthanc(orthanc, study) == set(uids)


# -------------------------------------------------------- a STOW-RS server in this process


class StowServer:
    """An HTTP server on loopback that takes ``POST /dicom-web/studies``: it parses the
    multipart/related body into data sets, records them and the request's headers, and
    answers ``answer(uids) -> (HTTP status, DICOM JSON or None)``."""

    def __init__(self, answer: Callable[[list[str]], tuple[int, dict[str, Any] | None]],
                 tls: Pki | None = None) -> None:
        self.answer = answer
        self.scheme = "https" if tls else "http"
        self.requests: list[tuple[dict[str, str], list[pydicom.Dataset]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                message = BytesParser(policy=HTTP).parsebytes(
                    f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
                datasets = [pydicom.dcmread(BytesIO(part.get_payload(decode=True)))
                            for part in message.iter_parts()]
                assert all(p.get_content_type() == "application/dicom"
                           for p in message.iter_parts())
                server.requests.append((dict(self.headers), datasets))
                status, doc = server.answer([str(ds.SOPInstanceUID) for ds in datasets])
                data = json.dumps(doc).encode() if doc is not None else b""
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "https://127.0.0.1/dicom-web/studies")
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if tls is not None:  # HTTPS; callers must show a certificate that the CA signed
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/dicom-web"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stow_server() -> Iterator[Callable[..., StowServer]]:
    started: list[StowServer] = []

    def start(answer: Callable[[list[str]], tuple[int, dict[str, Any] | None]],
              tls: Pki | None = None) -> StowServer:
        started.append(StowServer(answer, tls))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def sop_item(sop_uid: str, **extra: tuple[str, Any]) -> dict[str, Any]:
    item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
            "00081155": {"vr": "UI", "Value": [sop_uid]}}
    for tag, (vr, value) in extra.items():
        item[tag] = {"vr": vr, "Value": [value]}
    return item


def stow_answer(stored: Sequence[str] = (), warned: dict[str, int] | None = None,
                failed: dict[str, int] | None = None) -> dict[str, Any]:
    refs = [sop_item(u) for u in stored]
    refs += [sop_item(u, **{"00081196": ("US", code)}) for u, code in (warned or {}).items()]
    fails = [sop_item(u, **{"00081197": ("US", code)}) for u, code in (failed or {}).items()]
    doc: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": refs}}
    doc["00081198"] = {"vr": "SQ", "Value": fails} if fails else {"vr": "SQ"}
    return doc


def test_bearer_token_from_a_file_is_sent_without_its_newline(
        tmp_path: Path, db: Database, stow_server: Callable[..., StowServer]) -> None:
    server = stow_server(lambda uids: (200, stow_answer(stored=uids)))
    token = "eyJhbGciOi.abc-123_XYZ"
    config = stow_config(tmp_path, [{"name": "web", "url": server.url,
                                     "token_file": secret_file(tmp_path, "token",
                                                               token + "\n")}])
    [uids] = queue_studies(db, tmp_path / "results", [3], ["web"]).values()
    assert Sender(config, db).run_once() == 3
    assert {d.state for d in by_uid(db).values()} == {DeliveryState.DONE.value}
    [(headers, datasets)] = server.requests
    assert headers["Authorization"] == f"Bearer {token}"
    assert "application/dicom+json" in headers["Accept"]
    assert [str(ds.SOPInstanceUID) for ds in datasets] == uids


def test_bearer_token_from_the_environment(
        tmp_path: Path, db: Database, stow_server: Callable[..., StowServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = stow_server(lambda uids: (200, stow_answer(stored=uids)))
    monkeypatch.setenv("CXRD_TEST_STOW_TOKEN", "env-token")
    config = stow_config(tmp_path, [{"name": "web", "url": server.url,
                                     "token_env": "CXRD_TEST_STOW_TOKEN"}])
    queue_studies(db, tmp_path / "results", [1], ["web"])
    Sender(config, db).run_once()
    assert server.requests[0][0]["Authorization"] == "Bearer env-token"
    # the variable gone: the destination waits at the maximum backoff, with the reason
    monkeypatch.delenv("CXRD_TEST_STOW_TOKEN")
    queue_studies(db, tmp_path / "results", [1], ["web"])
    Sender(config, db).run_once()
    pending = [d for d in by_uid(db).values() if d.state == DeliveryState.PENDING.value]
    assert len(pending) == 1 and len(server.requests) == 1
    assert (pending[0].last_error or "").startswith("PERMANENT: destinations 'web' "
                                                    "token_env: the environment variable "
                                                    "CXRD_TEST_STOW_TOKEN is not set")


def test_failure_reasons_and_warnings_per_instance(
        tmp_path: Path, db: Database, stow_server: Callable[..., StowServer]) -> None:
    uids: list[str] = []

    def answer(sent: list[str]) -> tuple[int, dict[str, Any] | None]:
        ok, warn, busy, bad, nosop, processing, unnamed = sent
        return 202, stow_answer(stored=[ok], warned={warn: 0xB000},
                                failed={busy: 0xA700, bad: 0xC000, nosop: 0x0122,
                                        processing: 0x0110})

    server = stow_server(answer)
    config = stow_config(tmp_path, [{"name": "web", "url": server.url}], maximum=600)
    [uids] = queue_studies(db, tmp_path / "results", [7], ["web"]).values()
    Sender(config, db).run_once()
    assert len(server.requests) == 1
    rows = by_uid(db)
    ok, warn, busy, bad, nosop, processing, unnamed = (rows[u] for u in uids)
    assert ok.state == DeliveryState.DONE.value and ok.last_error is None
    assert warn.state == DeliveryState.DONE.value
    assert (warn.last_error or "").startswith("stored with warning reason 0xB000 "
                                              "(coercion of data elements)"), warn.last_error
    assert busy.state == DeliveryState.PENDING.value
    assert "0xA700 (out of resources)" in (busy.last_error or "")
    assert processing.state == DeliveryState.PENDING.value
    assert "0x0110 (processing failure)" in (processing.last_error or "")
    assert bad.state == DeliveryState.DEAD.value
    assert (bad.last_error or "").startswith("refused by destination: STOW-RS failure "
                                             "reason 0xC000")
    assert nosop.state == DeliveryState.PENDING.value
    assert (nosop.last_error or "").startswith("PERMANENT: STOW-RS failure reason 0x0122 "
                                               "(SOP class not supported)")
    assert unnamed.state == DeliveryState.PENDING.value
    assert "does not name this instance" in (unnamed.last_error or "")
    assert busy.next_attempt_at < nosop.next_attempt_at  # backoff vs maximum backoff


def test_a_request_refused_as_a_whole_is_sent_again_one_instance_per_request(
        tmp_path: Path, db: Database, stow_server: Callable[..., StowServer]) -> None:
    poison: list[str] = []

    def answer(sent: list[str]) -> tuple[int, dict[str, Any] | None]:
        if poison[0] in sent:
            return 400, None
        return 200, stow_answer(stored=sent)

    server = stow_server(answer)
    config = stow_config(tmp_path, [{"name": "web", "url": server.url}])
    [uids] = queue_studies(db, tmp_path / "results", [3], ["web"]).values()
    poison.append(uids[1])
    Sender(config, db).run_once()
    assert [len(ds) for _, ds in server.requests] == [3, 1, 1, 1]
    rows = by_uid(db)
    assert rows[uids[0]].state == rows[uids[2]].state == DeliveryState.DONE.value
    assert rows[uids[1]].state == DeliveryState.DEAD.value
    assert (rows[uids[1]].last_error or "").startswith("refused by destination: STOW-RS "
                                                       "HTTP 400")
    assert all(d.attempts == 1 for d in rows.values())


@pytest.mark.parametrize(("status", "state", "error"), [
    (503, DeliveryState.PENDING, "STOW-RS HTTP 503"),
    (429, DeliveryState.PENDING, "STOW-RS HTTP 429"),
    (403, DeliveryState.PENDING, "PERMANENT: STOW-RS HTTP 403"),
    (404, DeliveryState.PENDING, "PERMANENT: STOW-RS HTTP 404"),
    (415, DeliveryState.PENDING, "PERMANENT: STOW-RS HTTP 415"),
    (413, DeliveryState.PENDING, "PERMANENT: STOW-RS HTTP 413"),
    (409, DeliveryState.DEAD, "refused by destination: STOW-RS HTTP 409"),
    (301, DeliveryState.PENDING, "PERMANENT: STOW-RS HTTP 301 Moved Permanently: the "
     "destination redirects to https://127.0.0.1/dicom-web/studies"),
    (307, DeliveryState.PENDING, "PERMANENT: STOW-RS HTTP 307"),
])
def test_http_statuses_without_a_per_instance_answer(
        tmp_path: Path, db: Database, stow_server: Callable[..., StowServer], status: int,
        state: DeliveryState, error: str) -> None:
    server = stow_server(lambda uids: (status, None))
    config = stow_config(tmp_path, [{"name": "web", "url": server.url}], maximum=600)
    queue_studies(db, tmp_path / "results", [1], ["web"])
    before = utcnow()
    Sender(config, db).run_once()
    [d] = by_uid(db).values()
    assert d.state == state.value and d.attempts == 1
    assert (d.last_error or "").startswith(error), d.last_error
    if error.startswith("PERMANENT"):
        assert d.next_attempt_at >= before + dt.timedelta(seconds=590)
    elif state == DeliveryState.PENDING:
        assert d.next_attempt_at <= utcnow() + dt.timedelta(seconds=1.1)


def test_a_hung_stow_destination_holds_back_only_its_own_deliveries(
        tmp_path: Path, db: Database, stow_server: Callable[..., StowServer]) -> None:
    """The sender runs a thread per destination, STOW-RS ones too."""
    hang = threading.Event()

    def slow(uids: list[str]) -> tuple[int, dict[str, Any] | None]:
        hang.wait(30)
        return 200, stow_answer(stored=uids)

    server = stow_server(slow)
    fast = stow_server(lambda uids: (200, stow_answer(stored=uids)))
    config = stow_config(tmp_path, [{"name": "slow", "url": server.url},
                                    {"name": "fast", "url": fast.url}], dimse_timeout=30)
    queue_studies(db, tmp_path / "results", [2], ["slow", "fast"])
    sender = Sender(config, db)
    sender.start()
    try:
        wait = threading.Event()
        for _ in range(100):
            states = {(d.destination, d.state) for d in _deliveries(db)}
            if ("fast", DeliveryState.DONE.value) in states and \
                    ("fast", DeliveryState.PENDING.value) not in states:
                break
            wait.wait(0.1)
        states = {(d.destination, d.state) for d in _deliveries(db)}
        assert states == {("fast", DeliveryState.DONE.value),
                          ("slow", DeliveryState.PENDING.value)}
    finally:
        hang.set()
        sender.stop()


def _deliveries(db: Database) -> list[Delivery]:
    with db.session() as s:
        return list(s.scalars(select(Delivery)))


# ---------------------------------------------------------------- two nodes, PostgreSQL


@pytest.fixture
def pg_pair() -> Iterator[tuple[Database, Database]]:
    """One PostgreSQL schema through two engines: two nodes' connections."""
    from pgschema import postgres_url

    for url in postgres_url():
        first, second = Database(url), Database(url)
        first.migrate()
        try:
            yield first, second
        finally:
            first.dispose()
            second.dispose()


def test_two_nodes_deliver_each_result_exactly_once_by_stow_rs(
        tmp_path: Path, pg_pair: tuple[Database, Database],
        stow_server: Callable[..., StowServer], monkeypatch: pytest.MonkeyPatch) -> None:
    from cxrd import send

    monkeypatch.setattr(send, "BATCH", 3)  # many small claims, so the two nodes interleave
    server = stow_server(lambda uids: (200, stow_answer(stored=uids)))
    pgdb, other = pg_pair
    studies = queue_studies(pgdb, tmp_path / "results", [7, 6, 5, 4], ["web"])
    senders = [Sender(validate({"node": {"id": f"node-{n}"},
                                "storage": {"data_dir": str(tmp_path / n)},
                                "destinations": [{"name": "web", "url": server.url}]}), db)
               for n, db in (("a", pgdb), ("b", other))]
    sent = [0, 0]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()
        try:
            for _ in range(200):
                attempted = senders[i].run_destination_once(senders[i].config.destinations[0])
                sent[i] += attempted
                if not attempted and all(d.state != DeliveryState.PENDING.value
                                         for d in _deliveries(pgdb)):
                    return
                if not attempted:
                    threading.Event().wait(0.02)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    posted = [str(ds.SOPInstanceUID) for _, datasets in server.requests for ds in datasets]
    assert sorted(posted) == sorted(u for uids in studies.values() for u in uids)  # each once
    assert min(sent) > 0, sent  # both nodes sent
    for _, datasets in server.requests:  # a request carries one study
        assert len({str(ds.StudyInstanceUID) for ds in datasets}) == 1
    assert {(d.state, d.attempts, d.lease_owner) for d in _deliveries(pgdb)} == {
        (DeliveryState.DONE.value, 1, None)}


def test_a_slow_stow_pass_renews_its_leases(
        tmp_path: Path, pg_pair: tuple[Database, Database],
        stow_server: Callable[..., StowServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """Six studies, one request each, 0.3 s per request against a 1.2 s lease: node-a
    renews its leases between requests, so node-b, claiming all along, never gets one."""
    from cxrd.outbox import claim_deliveries

    def slow(uids: list[str]) -> tuple[int, dict[str, Any] | None]:
        threading.Event().wait(0.3)
        return 200, stow_answer(stored=uids)

    server = stow_server(slow)
    pgdb, other = pg_pair
    queue_studies(pgdb, tmp_path / "results", [1] * 6, ["web"])
    monkeypatch.setattr(Sender, "lease_seconds", property(lambda self: 1.2))
    node_a = Sender(validate({"node": {"id": "node-a"},
                              "storage": {"data_dir": str(tmp_path / "a")},
                              "destinations": [{"name": "web", "url": server.url}]}), pgdb)
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            node_a.run_destination_once(node_a.config.destinations[0])
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    taken = []
    while not done.is_set():
        taken += claim_deliveries(other, 10, "node-b:1:send-web", 60).get("web", [])
        threading.Event().wait(0.05)
    thread.join(30)
    assert errors == [] and taken == []
    assert len(server.requests) == 6
    assert {(d.state, d.attempts) for d in _deliveries(pgdb)} == {(DeliveryState.DONE.value, 1)}



def test_https_destination_verified_with_its_ca_and_shown_our_certificate(
        tmp_path: Path, db: Database, stow_server: Callable[..., StowServer]) -> None:
    """An HTTPS STOW-RS server that requires a client certificate its CA signed: delivered
    with the destination's ``tls`` (ca, certificate, key); not without our certificate, nor
    when the CA we trust did not sign the server's (TLS errors, transient)."""
    pki = make_pki(tmp_path / "pki")
    server = stow_server(lambda uids: (200, stow_answer(stored=uids)), tls=pki)
    ours = {"certificate": str(pki.client_cert), "key": str(pki.client_key)}
    config = stow_config(tmp_path, [
        {"name": "good", "url": server.url, "tls": {"ca": str(pki.ca), **ours}},
        {"name": "anonymous", "url": server.url, "tls": {"ca": str(pki.ca)}},
        {"name": "rogue", "url": server.url, "tls": {"ca": str(pki.rogue_ca), **ours}}])
    [uids] = queue_studies(db, tmp_path / "results", [2],
                           ["good", "anonymous", "rogue"]).values()
    Sender(config, db).run_once()
    assert [sorted(str(ds.SOPInstanceUID) for ds in datasets)
            for _, datasets in server.requests] == [sorted(uids)]
    for d in _deliveries(db):
        if d.destination == "good":
            assert d.state == DeliveryState.DONE.value, d.last_error
        else:
            assert d.state == DeliveryState.PENDING.value, d.destination
            assert (d.last_error or "").startswith(("cannot connect", "not sent")), d.last_error
    rogue = [d.last_error or "" for d in _deliveries(db) if d.destination == "rogue"]
    assert any(e.startswith("cannot connect (TLS): ") and "CERTIFICATE_VERIFY_FAILED" in e
               for e in rogue), rogue


def test_a_busy_destination_gets_one_request_per_pass(
        tmp_path: Path, db: Database, stow_server: Callable[..., StowServer]) -> None:
    server = stow_server(lambda uids: (503, None))
    config = stow_config(tmp_path, [{"name": "web", "url": server.url}])
    queue_studies(db, tmp_path / "results", [1, 1, 1], ["web"])
    Sender(config, db).run_once()
    assert len(server.requests) == 1  # not one per study: the rest waits for the backoff
    errors = sorted(d.last_error or "" for d in _deliveries(db))
    assert {d.state for d in _deliveries(db)} == {DeliveryState.PENDING.value}
    assert errors[0].startswith("STOW-RS HTTP 503")
    assert errors[1:] == ["not sent: an earlier STOW-RS request was answered HTTP 503"] * 2


def test_results_in_an_s3_store_reach_orthanc_by_stow_rs(
        tmp_path: Path, db: Database, orthanc: Orthanc,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``[storage] store = "s3://..."`` (moto's S3 server) the sender reads each result
    from the bucket; Orthanc holds the objects as written."""
    from s3peer import new_bucket, start_moto, stop, use_fake_aws

    from cxrd.store import open_node_store, result_key

    use_fake_aws(monkeypatch, tmp_path)
    proc, endpoint = start_moto()
    try:
        config = validate({
            "storage": {"data_dir": str(tmp_path / "data"),
                        "store": f"s3://{new_bucket(endpoint)}/site",
                        "s3_endpoint_url": endpoint},
            "destinations": [orthanc_destination(tmp_path, orthanc)]})
        objects = open_node_store(config)
        study = uid()
        written = {}
        with db.session() as s:
            for i in range(2):
                ds = make_dataset("OT", study_uid=study, rows=32, columns=32, seed=i)
                data = write(tmp_path / "w" / f"{i}.dcm", ds).read_bytes()
                key = result_key(str(ds.SOPInstanceUID))
                objects.put(key, data)
                row = Result(sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=study,
                             kind=ResultKind.SC.value, generation=1, path=key)
                s.add(row)
                s.flush()
                s.add(Delivery(result_id=row.id, destination="web"))
                written[str(ds.SOPInstanceUID)] = pydicom.dcmread(BytesIO(data))
        assert Sender(config, db, objects).run_once() == 2
        assert {d.state for d in _deliveries(db)} == {DeliveryState.DONE.value}
        for row in orthanc.instances_of_study(orthanc.study_id(study) or ""):
            back = pydicom.dcmread(BytesIO(orthanc.instance_file(row["id"])))
            assert back.PixelData == written[row["sop_instance_uid"]].PixelData
        assert in_orthanc(orthanc, study) == set(written)
    finally:
        stop(proc)
