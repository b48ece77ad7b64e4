"""The STOW-RS receiver (``cxrd.dicomweb``) in-process on a free loopback port, driven over
real HTTP: dicomweb-client's ``DICOMwebClient.store_instances`` (the multipart it builds is
what a DICOMweb sender posts), and hand-made requests where a client library would refuse
to send what is wrong (a part that is not DICOM, a body cut short, another media type).

What each test checks is what a sender relies on: an instance named stored is spooled and
committed; every refusal names the instance with a reason, is logged and recorded as
C-STORE's are; a request without the token stores and records nothing.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicompeers import SentFile, free_port, make_pki, phantom_study
from dicomweb_client import DICOMwebClient
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset
from sqlalchemy import select

from cxrd.config import Config, validate
from cxrd.db import Database, Instance, Rejection
from cxrd.dicom import (
    FAILURE_SOP_CLASS_NOT_SUPPORTED,
    FAILURE_STUDY_MISMATCH,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
)
from cxrd.dicomweb import DicomwebReceiver
from cxrd.domain import RejectReason
from cxrd.ingest import Ingestor
from cxrd.space import node_space
from cxrd.stow import TlsAdapter

TOKEN = "s3cr3t-stow-token"
DICOM_JSON = "application/dicom+json"
LOG = "cxrd.dicomweb"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Running:
    receiver: DicomwebReceiver
    config: Config
    db: Database

    @property
    def url(self) -> str:
        scheme = "https" if self.config.node.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.receiver.port}"

    def instances(self) -> list[Instance]:
        with self.db.session() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)).all())

    def rejections(self) -> list[Rejection]:
        with self.db.session() as s:
            return list(s.scalars(select(Rejection).order_by(Rejection.id)).all())

    def spool_files(self) -> list[Path]:
        spool = self.config.storage.spool_dir
        return sorted(p for p in spool.rglob("*") if p.is_file()) if spool.exists() else []

    def client(self, token: str | None = TOKEN, **tls: Any) -> Stow:
        return Stow(self.url, token, **tls)


Start = Callable[..., Running]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start a STOW-RS receiver on a free loopback port with its own data folder."""
    started: list[Running] = []

    def run(*, dicomweb: dict[str, Any] | None = None, storage: dict[str, Any] | None = None,
            node: dict[str, Any] | None = None) -> Running:
        root = tmp_path / f"node{len(started)}"
        root.mkdir()
        token_file = root / "stow.token"
        token_file.write_text(TOKEN + "\n")
        config = validate({
            "node": node or {},
            "storage": {"data_dir": str(root / "data"), "min_free_mb": 0, **(storage or {})},
            "metrics": {"listen": ""},
            "dicomweb": {"listen": f"127.0.0.1:{free_port()}", "token_file": str(token_file),
                         **(dicomweb or {})}})
        config.storage.data_dir.mkdir()
        db = Database(config.storage.database_url_resolved)
        db.migrate()
        ingestor = Ingestor(db, config.storage.spool_dir, config.storage.rejected_dir,
                            space=node_space(config))
        receiver = DicomwebReceiver(config, ingestor)
        receiver.start()
        started.append(Running(receiver, config, db))
        return started[-1]

    yield run
    for r in started:
        r.receiver.drain(timeout=5)
        r.db.dispose()


class Stow:
    """dicomweb-client against the receiver; every HTTP answer is kept (``last``), and an
    error status is returned as such instead of raised."""

    def __init__(self, url: str, token: str | None, *, ca: Path | None = None,
                 cert: tuple[Path, Path] | None = None) -> None:
        self.responses: list[requests.Response] = []
        s = requests.Session()
        if ca is not None:  # as the sender does: REQUESTS_CA_BUNDLE must not win
            s.mount("https://", TlsAdapter(str(ca), None if cert is None else (
                str(cert[0]), str(cert[1]))))
        s.hooks["response"].append(lambda r, *args, **kwargs: self.responses.append(r))
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self.client = DICOMwebClient(url=url, session=s, headers=headers)
        self.client.set_http_retry_params(retry=False)  # each answer seen as it came

    def store(self, datasets: list[Dataset], study: str | None = None) -> requests.Response:
        with contextlib.suppress(requests.HTTPError):  # the answer is checked instead
            self.client.store_instances(datasets, study_instance_uid=study)
        return self.responses[-1]


def read(files: list[SentFile]) -> list[Dataset]:
    return [pydicom.dcmread(f.path) for f in files]


def answer(response: requests.Response) -> Dataset:
    assert response.headers["Content-Type"] == DICOM_JSON, response.text
    return Dataset.from_json(response.json())


def referenced(ds: Dataset) -> list[str]:
    return [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", [])]


def failed(ds: Dataset) -> dict[str, int]:
    return {str(i.ReferencedSOPInstanceUID): int(i.FailureReason)
            for i in ds.get("FailedSOPSequence", [])}


def multipart(parts: list[tuple[str | None, bytes]], boundary: str = "cxrd-test-boundary",
              close: bool = True) -> bytes:
    """A multipart/related body; a part's media type None leaves out its Content-Type."""
    out = b""
    for media, data in parts:
        out += f"--{boundary}\r\n".encode()
        if media is not None:
            out += f"Content-Type: {media}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def post(r: Running, body: bytes, *, content_type: str | None = None,
         token: str | None = TOKEN, path: str = "/studies",
         headers: dict[str, str] | None = None) -> requests.Response:
    sent = {"Content-Type": content_type or
            'multipart/related; type="application/dicom"; boundary=cxrd-test-boundary'}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return requests.post(r.url + path, data=body, headers={**sent, **(headers or {})},
                         timeout=30)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[SentFile]:
    return phantom_study(tmp_path_factory.mktemp("study"), 3, seed=31)


@pytest.fixture(scope="module")
def other_study(tmp_path_factory: pytest.TempPathFactory) -> list[SentFile]:
    return phantom_study(tmp_path_factory.mktemp("other"), 1, seed=32)


# -------------------------------------------------------------------------------- tests


def test_dicomweb_client_stores_a_study_durably_and_a_resend_is_a_duplicate(
        start: Start, study: list[SentFile], caplog: pytest.LogCaptureFixture) -> None:
    r = start()
    before = sample("cxrd_dicomweb_instances_total", route="/studies", outcome="stored")
    caplog.set_level(logging.INFO, logger=LOG)
    response = r.client().store(read(study))
    assert response.status_code == 200, response.text
    ds = answer(response)
    assert referenced(ds) == [f.sop_instance_uid for f in study]
    assert [str(i.ReferencedSOPClassUID) for i in ds.ReferencedSOPSequence] == [
        f.sop_class_uid for f in study]
    assert "FailedSOPSequence" not in ds and "RetrieveURL" not in ds
    rows = r.instances()
    assert [i.sop_instance_uid for i in rows] == [f.sop_instance_uid for f in study]
    assert {i.source for i in rows} == {"dicomweb:127.0.0.1"}
    assert {i.study_instance_uid for i in rows} == {study[0].study_instance_uid}
    # the spooled file is the instance as posted (dicomweb-client writes the file read)
    for row, f in zip(rows, study, strict=True):
        spooled = r.config.storage.data_dir / row.path
        assert pydicom.dcmread(spooled).SOPInstanceUID == f.sop_instance_uid
        assert spooled.read_bytes() == f.path.read_bytes()
    assert sample("cxrd_dicomweb_instances_total", route="/studies",
                  outcome="stored") == before + 3
    line = next(rec.getMessage() for rec in caplog.records
                if "action=stow-rs-request" in rec.getMessage())
    assert "status=200 instances=3 stored=3 duplicates=0 failed=0" in line
    assert "route=/studies " in line

    # the same study again, to its study resource: stored before, so 200, nothing doubled
    again = r.client().store(read(study), study=study[0].study_instance_uid)
    assert again.status_code == 200, again.text
    assert referenced(answer(again)) == [f.sop_instance_uid for f in study]
    assert len(r.instances()) == 3 and len(r.spool_files()) == 3
    assert not r.rejections()


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
def test_without_the_token_nothing_is_stored_or_recorded(
        start: Start, study: list[SentFile], token: str | None) -> None:
    r = start()
    response = r.client(token=token).store(read(study))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert not r.instances() and not r.rejections() and not r.spool_files()


def test_other_schemes_are_refused(start: Start, study: list[SentFile]) -> None:
    r = start()
    body = multipart([("application/dicom", study[0].path.read_bytes())])
    for header in (f"Basic {TOKEN}", TOKEN, f"Bearer{TOKEN}"):
        response = post(r, body, token=None, headers={"Authorization": header})
        assert response.status_code == 401, header
    # the scheme's name is case-insensitive (RFC 7235)
    assert post(r, body, token=None,
                headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert len(r.instances()) == 1


def test_a_rotated_token_applies_without_a_restart(start: Start,
                                                   study: list[SentFile]) -> None:
    r = start()
    assert r.config.dicomweb.token_file is not None
    r.config.dicomweb.token_file.write_text("the-new-token\n")
    assert r.client().store(read(study[:1])).status_code == 401
    assert r.client(token="the-new-token").store(read(study[:1])).status_code == 200


def test_a_part_that_is_not_dicom_is_named_failed_and_recorded_as_c_store_would(
        start: Start, study: list[SentFile]) -> None:
    r = start()
    body = multipart([("application/dicom", study[0].path.read_bytes()),
                      ("application/dicom", b"this is not DICOM at all" * 20),
                      ("text/plain", study[1].path.read_bytes()),
                      (None, study[2].path.read_bytes())])  # the type parameter's media type
    response = post(r, body)
    assert response.status_code == 202, response.text
    ds = answer(response)
    assert referenced(ds) == [study[0].sop_instance_uid, study[2].sop_instance_uid]
    reasons = [int(i.FailureReason) for i in ds.FailedSOPSequence]
    assert reasons == [STATUS_CANNOT_UNDERSTAND, STATUS_CANNOT_UNDERSTAND]
    assert "Retry-After" not in response.headers
    assert [i.sop_instance_uid for i in r.instances()] == [study[0].sop_instance_uid,
                                                           study[2].sop_instance_uid]
    rejections = r.rejections()
    assert [(x.name, x.reason) for x in rejections] == [
        ("part-2", RejectReason.NOT_DICOM.value), ("part-3", RejectReason.NOT_DICOM.value)]
    assert all(x.source == "dicomweb:127.0.0.1" for x in rejections)
    assert "text/plain" in rejections[1].detail


def test_every_instance_refused_is_409(start: Start, study: list[SentFile]) -> None:
    r = start()
    ct = pydicom.dcmread(study[0].path)
    ct.SOPClassUID = CT_IMAGE
    ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    response = r.client().store([ct])
    assert response.status_code == 409, response.text
    assert failed(answer(response)) == {study[0].sop_instance_uid:
                                        FAILURE_SOP_CLASS_NOT_SUPPORTED}
    assert not r.instances()
    assert [x.reason for x in r.rejections()] == [RejectReason.UNSUPPORTED_SOP_CLASS.value]


def test_an_instance_of_another_study_is_refused_at_a_study_resource(
        start: Start, study: list[SentFile], other_study: list[SentFile]) -> None:
    r = start()
    target = study[0].study_instance_uid
    response = r.client().store(read(study[:1] + other_study), study=target)
    assert response.status_code == 202, response.text
    ds = answer(response)
    assert referenced(ds) == [study[0].sop_instance_uid]
    assert failed(ds) == {other_study[0].sop_instance_uid: FAILURE_STUDY_MISMATCH}
    assert [i.sop_instance_uid for i in r.instances()] == [study[0].sop_instance_uid]
    [rejection] = r.rejections()
    assert rejection.reason == RejectReason.STUDY_MISMATCH.value
    assert rejection.name == other_study[0].sop_instance_uid
    assert target in rejection.detail
    # only others: 409, and the counter by route
    before = sample("cxrd_dicomweb_instances_total", route="/studies/{study}",
                    outcome="study-mismatch")
    assert r.client().store(read(other_study), study=target).status_code == 409
    assert sample("cxrd_dicomweb_instances_total", route="/studies/{study}",
                  outcome="study-mismatch") == before + 1
    assert post(r, multipart([("application/dicom", study[0].path.read_bytes())]),
                path="/studies/not-a-uid").status_code == 400


@pytest.mark.parametrize("content_type", [
    "application/dicom",
    'multipart/related; type="application/dicom+json"; boundary=cxrd-test-boundary',
    "multipart/form-data; boundary=cxrd-test-boundary",
    "multipart/related; boundary=cxrd-test-boundary",
    "",
])
def test_another_media_type_is_415(start: Start, study: list[SentFile],
                                   content_type: str) -> None:
    r = start()
    body = multipart([("application/dicom", study[0].path.read_bytes())])
    response = requests.post(r.url + "/studies", data=body, timeout=30, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": content_type})
    assert response.status_code == 415
    assert not r.instances() and not r.rejections()


def test_unquoted_type_and_accept_negotiation(start: Start, study: list[SentFile]) -> None:
    r = start()
    body = multipart([("application/dicom", study[0].path.read_bytes())])
    unquoted = "multipart/related; type=application/dicom; boundary=cxrd-test-boundary"
    assert post(r, body, content_type=unquoted).status_code == 200
    assert post(r, body, headers={"Accept": "application/dicom+xml"}).status_code == 406
    ok = post(r, body, headers={"Accept": "application/dicom+xml, application/json;q=0.5"})
    assert ok.status_code == 200 and ok.headers["Content-Type"] == DICOM_JSON


@pytest.mark.parametrize("body", [
    multipart([("application/dicom", b"x" * 100)], close=False),
    b"no boundary anywhere in this body",
    b"--cxrd-test-boundary--\r\n",
])
def test_a_body_that_is_not_a_whole_multipart_message_is_400(
        start: Start, body: bytes) -> None:
    r = start()
    response = post(r, body)
    assert response.status_code == 400, response.text
    assert not r.instances() and not r.rejections()


def test_a_body_over_max_request_mb_is_413(start: Start, study: list[SentFile]) -> None:
    r = start(dicomweb={"max_request_mb": 1})
    # declared too large: answered before the body is read
    conn = http.client.HTTPConnection("127.0.0.1", r.receiver.port, timeout=30)
    conn.putrequest("POST", "/studies")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Type",
                   'multipart/related; type="application/dicom"; boundary=cxrd-test-boundary')
    conn.putheader("Content-Length", str(2 * 1024 * 1024))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    conn.close()
    # chunked (no length): counted as it arrives
    big = multipart([("application/dicom", b"\0" * (1024 * 1024 + 10))])

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 256 * 1024):
            yield big[i:i + 256 * 1024]

    response2 = requests.post(r.url + "/studies", data=chunks(), timeout=30, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type":
        'multipart/related; type="application/dicom"; boundary=cxrd-test-boundary'})
    assert response2.status_code == 413
    assert not r.instances() and not r.rejections()
    # under the limit the same receiver stores
    assert post(r, multipart([("application/dicom",
                               study[0].path.read_bytes())])).status_code == 200


def test_below_min_free_mb_it_answers_503_retry_after(start: Start,
                                                      study: list[SentFile]) -> None:
    r = start(storage={"min_free_mb": 2**40})  # more than any disk has
    response = r.client().store(read(study))
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert not r.instances() and not r.spool_files()
    assert [x.reason for x in r.rejections()] == [RejectReason.DISK_LOW.value]
    assert sample("cxrd_instances_refused_total", reason="disk-low", source="dicomweb") >= 1


def test_storage_failing_answers_out_of_resources_and_retry(
        start: Start, study: list[SentFile]) -> None:
    r = start()
    spool = r.config.storage.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    study_folder = spool / study[0].study_instance_uid
    study_folder.write_text("a file where the study's folder must go")  # a real OSError
    response = r.client().store(read(study))
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    assert set(failed(answer(response)).values()) == {STATUS_OUT_OF_RESOURCES}
    assert not r.instances()
    assert {x.reason for x in r.rejections()} == {RejectReason.STORAGE_FAILED.value}


def test_https_with_the_node_certificate(start: Start, study: list[SentFile],
                                         tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    r = start(node={"tls": {"certificate": str(pki.server_cert), "key": str(pki.server_key)}})
    response = r.client(ca=pki.ca).store(read(study[:1]))
    assert response.status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        r.client(ca=pki.rogue_ca).store(read(study[:1]))
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(f"http://127.0.0.1:{r.receiver.port}/studies", timeout=10)
    assert len(r.instances()) == 1


def test_drain_finishes_the_request_in_flight_and_accepts_no_other(
        start: Start, study: list[SentFile]) -> None:
    r = start()
    body = multipart([("application/dicom", f.path.read_bytes()) for f in study])
    sock = socket.create_connection(("127.0.0.1", r.receiver.port), timeout=30)
    sock.sendall(
        b"POST /studies HTTP/1.1\r\nHost: cxrd\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
        b'Content-Type: multipart/related; type="application/dicom"; '
        b"boundary=cxrd-test-boundary\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
    time.sleep(0.5)  # the request is in flight
    drained = threading.Thread(target=r.receiver.drain, kwargs={"timeout": 20})
    drained.start()
    time.sleep(0.5)
    with pytest.raises(OSError):  # no new connection while draining
        socket.create_connection(("127.0.0.1", r.receiver.port), timeout=2).close()
    sock.sendall(body[1000:])
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    drained.join(30)
    assert not drained.is_alive()
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(json.loads(payload)["00081199"]["Value"]) == 3
    assert len(r.instances()) == 3


def test_a_port_in_use_fails_at_start(tmp_path: Path, start: Start) -> None:
    r = start()
    other = DicomwebReceiver(r.config, Ingestor(r.db, r.config.storage.spool_dir,
                                             r.config.storage.rejected_dir))
    with pytest.raises(OSError):
        other.start()


def test_tls_context_is_the_receivers(start: Start, tmp_path: Path) -> None:
    """A client certificate is asked for as by the DICOM receiver (``require_client_cert``)."""
    pki = make_pki(tmp_path / "pki")
    r = start(node={"tls": {"certificate": str(pki.server_cert), "key": str(pki.server_key),
                            "ca": str(pki.ca), "require_client_cert": True}})
    context = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises((ssl.SSLError, ConnectionError)), socket.create_connection(
            ("127.0.0.1", r.receiver.port), timeout=10) as raw, context.wrap_socket(
            raw, server_hostname="localhost") as tls:
        tls.sendall(b"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        if not tls.recv(1024):
            raise ConnectionError("closed without an answer")
    response = r.client(ca=pki.ca, cert=(pki.client_cert, pki.client_key)).store([])
    assert response.status_code == 400  # an empty multipart: through TLS, to the app


def test_a_token_file_gone_while_running_refuses_everyone_with_503(
        start: Start, study: list[SentFile]) -> None:
    r = start()
    assert r.config.dicomweb.token_file is not None
    r.config.dicomweb.token_file.unlink()
    response = r.client().store(read(study[:1]))
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
    assert not r.instances() and not r.rejections()


def test_no_patient_data_in_the_log(start: Start, study: list[SentFile],
                                    caplog: pytest.LogCaptureFixture) -> None:
    r = start()
    ds = pydicom.dcmread(study[0].path)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "PHI^SENTINEL", "PID-SENTINEL", "19011231"
    caplog.set_level(logging.DEBUG)
    assert r.client().store([ds], study=study[0].study_instance_uid).status_code == 200
    other = pydicom.dcmread(study[1].path)
    other.PatientName, other.StudyInstanceUID = "PHI^SENTINEL", "1.2.3.4"
    assert r.client().store([other], study=study[0].study_instance_uid).status_code == 409
    text = "\n".join(rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO)
    assert "action=stow-rs-request" in text
    for sentinel in ("SENTINEL", "19011231", TOKEN):
        assert sentinel not in text
