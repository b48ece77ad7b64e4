"""The DICOM receiver (``cxrd.receive``) in-process on a free port, driven by real peers in
separate processes: dcmtk's ``echoscu`` and ``storescu`` (plain and over TLS), and a
pynetdicom SCU that sends files byte for byte (chunked, never re-encoded), so truncated
and mislabelled data sets really reach the C-STORE handler.

What each test checks is what a sender relies on: Success only for an object that is
spooled and committed; every refusal a specific status with a reason that is logged and
recorded.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicompeers import (
    Pki,
    SentFile,
    dataset_bytes,
    echoscu,
    output,
    phantom_study,
    start_dcmtk,
    storescu,
    storescu_args,
    storescu_profile,
)
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode_file_meta
from sqlalchemy import func, select

from cxrd import reactor
from cxrd.config import Config, validate
from cxrd.db import Database, Instance, Rejection, Study
from cxrd.dicom import (
    CR,
    DX_PRESENTATION,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
)
from cxrd.domain import InstanceState, RejectReason
from cxrd.ingest import NO_DIGEST, Ingestor
from cxrd.receive import Receiver

LOG = "cxrd.receive"
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- fixtures


@dataclass
class RunningReceiver:
    receiver: Receiver
    config: Config
    db: Database

    @property
    def port(self) -> int:
        return self.receiver.port

    @property
    def spool(self) -> Path:
        return self.config.storage.spool_dir

    def instances(self) -> list[Instance]:
        with self.db.session() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)).all())

    def rejections(self) -> list[Rejection]:
        with self.db.session() as s:
            return list(s.scalars(select(Rejection).order_by(Rejection.id)).all())

    def spool_files(self) -> list[Path]:
        """Every file under the spool, temp files included."""
        return sorted(p for p in self.spool.rglob("*") if p.is_file()) \
            if self.spool.exists() else []


StartReceiver = Callable[..., RunningReceiver]


@pytest.fixture
def start_receiver(tmp_path: Path) -> Iterator[StartReceiver]:
    """Start a Receiver on a free loopback port (the kernel picks it: port 0)."""
    started: list[RunningReceiver] = []

    def start(*, allowed_callers: Sequence[str] = (), tls: dict[str, Any] | None = None,
              ingestor: Callable[[Database, Config], Ingestor] | None = None
              ) -> RunningReceiver:
        data_dir = tmp_path / f"node{len(started)}"
        node: dict[str, Any] = {"host": "127.0.0.1", "allowed_callers": list(allowed_callers)}
        if tls is not None:
            node["tls"] = tls
        config = validate({"node": node, "storage": {"data_dir": str(data_dir)}})
        config = replace(config, node=replace(config.node, port=0))
        data_dir.mkdir()
        db = Database(config.storage.database_url_resolved)
        db.migrate()
        ing = (ingestor(db, config) if ingestor is not None else
               Ingestor(db, config.storage.spool_dir, config.storage.rejected_dir))
        receiver = Receiver(config, ing)
        receiver.start()
        started.append(RunningReceiver(receiver, config, db))
        return started[-1]

    yield start
    for r in started:
        r.receiver.drain(timeout=5)
        r.db.dispose()


@pytest.fixture(scope="module")
def twenty(tmp_path_factory: pytest.TempPathFactory) -> list[SentFile]:
    return phantom_study(tmp_path_factory.mktemp("twenty"), 20, seed=20)


def count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def messages(caplog: pytest.LogCaptureFixture, action: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOG and f"action={action} " in r.getMessage() + " "]


def send_raw(port: int, path: Path, contexts: Sequence[str], monkeypatch: pytest.MonkeyPatch,
             *, aet: str = "RAWSCU") -> tuple[int, str]:
    """C-STORE the file's data set exactly as it is on disk (pynetdicom's chunked mode
    reads the bytes after the file meta and sends them undecoded, on the context its file
    meta names); returns (status, error comment)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title=aet)
    for sop_class in contexts:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRD")
    assert assoc.is_established, "the receiver did not accept the association"
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert status, "no C-STORE response"
    return int(status.Status), str(status.get("ErrorComment", ""))


# -------------------------------------------------------------------------- echo, store


def test_echoscu_succeeds(start_receiver: StartReceiver) -> None:
    node = start_receiver()
    done = echoscu(node.port)
    assert done.returncode == 0, output(done)
    assert "Received Echo Response (Success)" in done.stderr


def test_idle_associations_do_not_poll(start_receiver: StartReceiver) -> None:
    """pynetdicom's own loops wake both threads of an association every millisecond
    (about 50 ms of CPU a second per idle association on the 2-core development VM); the
    receiver's (cxrd.reactor) block until the peer sends, waking 20 times a second
    (about 5 ms). With the reactor switched off (CXRD_REACTOR=0, the second CI run) the
    association keeps pynetdicom's own loops and answers as promptly."""
    node = start_receiver()
    ae = AE(ae_title="IDLE")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRD")
    assert assoc.is_established
    try:
        [server] = [a for a in node.receiver.ae.active_associations if a.is_acceptor]
        replaced = "run" in vars(server.dul) and "_run_reactor" in vars(server)
        assert replaced == reactor.enabled()
        assert ("receive_primitive" in vars(server.dimse)) == reactor.enabled()
        if not reactor.enabled():
            t = time.monotonic()
            assert assoc.send_c_echo().Status == STATUS_SUCCESS
            assert time.monotonic() - t < 0.5
            return
        clocks = [time.pthread_getcpuclockid(t.ident) for t in (server, server.dul)]

        def cpu() -> float:
            return sum(time.clock_gettime(c) for c in clocks)

        before = cpu()
        time.sleep(1.0)
        idle = cpu() - before
        assert idle < 0.025, f"an idle association used {idle * 1000:.1f} ms of CPU in 1 s"
        t = time.monotonic()
        assert assoc.send_c_echo().Status == STATUS_SUCCESS
        assert time.monotonic() - t < 0.5
    finally:
        assoc.release()
    assert not assoc.is_established


#: A receiver in a process of its own (the reactor's choice is made once per process):
#: ``missing`` deletes a private name the reactor uses from pynetdicom's real class before
#: the receiver starts (and puts it back before the echo: pynetdicom's own loop needs it
#: too); ``off`` runs with CXRD_REACTOR=0; ``on`` changes nothing. Prints what the
#: receiver logged and whether each association was switched to the reactor's loops.
REACTOR_PROBE = """
import json, logging, sys
from pathlib import Path
from dataclasses import replace
from pynetdicom.dul import DULServiceProvider
from dicompeers import echoscu
from cxrd import reactor
from cxrd.config import validate
from cxrd.db import Database
from cxrd.ingest import Ingestor
from cxrd.receive import Receiver

mode, data_dir = sys.argv[1], Path(sys.argv[2])
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(f"{record.levelname} {record.getMessage()}")
logging.getLogger("cxrd").addHandler(Keep())
logging.getLogger("cxrd").setLevel(logging.INFO)
saved = DULServiceProvider._process_recv_primitive
if mode == "missing":
    del DULServiceProvider._process_recv_primitive
config = validate({"node": {"host": "127.0.0.1"}, "storage": {"data_dir": str(data_dir)}})
config = replace(config, node=replace(config.node, port=0))
data_dir.mkdir()
db = Database(config.storage.database_url_resolved)
db.migrate()
receiver = Receiver(config, Ingestor(db, config.storage.spool_dir, config.storage.rejected_dir))
receiver.start()
DULServiceProvider._process_recv_primitive = saved
switched = []
make = reactor.make_event_driven
reactor.make_event_driven = lambda assoc: switched.append(make(assoc)) or switched[-1]
echoes = [echoscu(receiver.port).returncode for _ in range(2)]
receiver.drain(timeout=5)
print(json.dumps({"lines": lines, "switched": switched, "echoes": echoes}))
"""


@pytest.mark.parametrize("mode", ["missing", "off", "on"])
def test_reactor_falls_back_to_pynetdicom_loops(mode: str, tmp_path: Path) -> None:
    """The reactor checks pynetdicom's private names before the receiver listens: one
    missing, or the switch off, and every association keeps pynetdicom's own loops (and
    is served); the reason is logged once."""
    env = {k: v for k, v in os.environ.items() if k != reactor.SWITCH}
    if mode == "off":
        env[reactor.SWITCH] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    done = subprocess.run([sys.executable, "-c", REACTOR_PROBE, mode, str(tmp_path / "node")],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.splitlines()[-1])
    assert probe["echoes"] == [0, 0]
    fallbacks = [ln for ln in probe["lines"] if "action=reactor-" in ln]
    [start] = [ln for ln in probe["lines"] if "action=receive-start" in ln]
    if mode == "on":
        assert probe["switched"] == [True, True]
        assert not fallbacks and "event_driven=True" in start
        return
    assert probe["switched"] == [False, False]
    assert "event_driven=False" in start
    assert len(fallbacks) == 1, probe["lines"]
    if mode == "missing":
        assert fallbacks[0].startswith("WARNING action=reactor-fallback")
        assert "missing=DULServiceProvider._process_recv_primitive" in fallbacks[0]
    else:
        assert fallbacks[0].startswith("INFO action=reactor-off")
        assert "CXRD_REACTOR=0" in fallbacks[0]


def test_twenty_files_on_one_association_are_recorded_byte_for_byte(
        start_receiver: StartReceiver, twenty: list[SentFile]) -> None:
    node = start_receiver()
    done = storescu(node.port, [f.path for f in twenty])
    assert done.returncode == 0, output(done)
    assert done.stderr.count("Requesting Association") == 1, output(done)
    assert done.stderr.count("Received Store Response (Success)") == 20, output(done)

    by_uid = {i.sop_instance_uid: i for i in node.instances()}
    assert set(by_uid) == {f.sop_instance_uid for f in twenty}
    for f in twenty:
        inst = by_uid[f.sop_instance_uid]
        assert inst.state == InstanceState.RECEIVED.value
        assert inst.source == "dicom:STORESCU@127.0.0.1"
        assert inst.transfer_syntax_uid == ExplicitVRLittleEndian
        spooled = node.spool.parent / inst.path
        assert spooled.parent.parent == node.spool
        # the data set is spooled exactly as sent (the file meta is the receiver's own)
        assert dataset_bytes(spooled) == dataset_bytes(f.path), f.path.name
        assert inst.sha256 == NO_DIGEST  # computed only if the UID comes again
    assert count(node.db, Study) == 1
    assert len(node.spool_files()) == 20, "temp files or strays in the spool"
    assert not node.rejections()


def test_four_storescu_in_parallel_lose_nothing(start_receiver: StartReceiver,
                                                tmp_path: Path) -> None:
    node = start_receiver()
    studies = [phantom_study(tmp_path / f"study{i}", 10, seed=100 + i, size=(160, 128))
               for i in range(4)]
    procs = [start_dcmtk("storescu", *storescu_args(node.port, [f.path for f in files],
                                                    aet=f"MODALITY{i}"))
             for i, files in enumerate(studies)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
        assert out.count("Received Store Response (Success)") == 10, out

    instances = node.instances()
    sent = {f.sop_instance_uid: (i, f) for i, files in enumerate(studies) for f in files}
    assert sorted(i.sop_instance_uid for i in instances) == sorted(sent)
    for inst in instances:
        caller, f = sent[inst.sop_instance_uid]
        assert inst.source == f"dicom:MODALITY{caller}@127.0.0.1"
        assert inst.study_instance_uid == f.study_instance_uid
        assert dataset_bytes(node.spool.parent / inst.path) == dataset_bytes(f.path)
    assert count(node.db, Study) == 4
    assert len(node.spool_files()) == 40
    assert not node.rejections()


def test_duplicate_is_success_and_recorded_once(start_receiver: StartReceiver,
                                               twenty: list[SentFile],
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cxrd")
    node = start_receiver()
    for _ in range(2):
        done = storescu(node.port, [twenty[0].path])
        assert done.returncode == 0, output(done)
        assert "Received Store Response (Success)" in done.stderr, output(done)
    assert [i.sop_instance_uid for i in node.instances()] == [twenty[0].sop_instance_uid]
    assert len(node.spool_files()) == 1
    assert not node.rejections()
    assert any("action=duplicate" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- allow-list


def test_unknown_calling_ae_is_rejected_at_association(start_receiver: StartReceiver,
                                                       twenty: list[SentFile],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    node = start_receiver(allowed_callers=["PACS", "MODALITY1@127.0.0.1"])
    done = echoscu(node.port, aet="STRANGER")
    assert done.returncode != 0, output(done)
    # a real A-ASSOCIATE-RJ with its reason, not a dropped connection
    assert "Association Rejected" in done.stderr, output(done)
    assert "Calling AE Title Not Recognized" in done.stderr, output(done)
    assert "Rejected Permanent" in done.stderr, output(done)
    [line] = messages(caplog, "association-rejected")
    assert "calling_ae=STRANGER" in line and "address=127.0.0.1" in line
    assert "reason=calling AE title not in node.allowed_callers" in line

    done = storescu(node.port, [twenty[0].path], aet="STRANGER")
    assert done.returncode != 0, output(done)
    assert not node.instances() and not node.spool_files()


def test_known_calling_ae_from_another_host_is_rejected(start_receiver: StartReceiver,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    node = start_receiver(allowed_callers=["MODALITY1@10.9.9.9"])
    done = echoscu(node.port, aet="MODALITY1")
    assert done.returncode != 0, output(done)
    assert "Calling AE Title Not Recognized" in done.stderr, output(done)
    [line] = messages(caplog, "association-rejected")
    assert "calling_ae=MODALITY1" in line and "address=127.0.0.1" in line
    assert "reason=calling AE title known but not from this host" in line


def test_known_calling_aes_are_accepted(start_receiver: StartReceiver, twenty: list[SentFile],
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    node = start_receiver(allowed_callers=["PACS", "MODALITY1@127.0.0.1", "MODALITY1@10.9.9.9"])
    for aet in ("PACS", "MODALITY1"):
        done = echoscu(node.port, aet=aet)
        assert done.returncode == 0, output(done)
    done = storescu(node.port, [twenty[0].path], aet="MODALITY1")
    assert done.returncode == 0, output(done)
    assert [i.source for i in node.instances()] == ["dicom:MODALITY1@127.0.0.1"]
    assert not messages(caplog, "association-rejected")


def test_allow_list_reload_applies_to_the_next_association(start_receiver: StartReceiver
                                                           ) -> None:
    node = start_receiver(allowed_callers=["PACS"])
    assert echoscu(node.port, aet="NEWCOMER").returncode != 0
    node.receiver.set_allowed_callers(("PACS", "NEWCOMER@127.0.0.1"))
    done = echoscu(node.port, aet="NEWCOMER")
    assert done.returncode == 0, output(done)


# ----------------------------------------------------------------------------- statuses


def test_truncated_data_set_is_cannot_understand(start_receiver: StartReceiver,
                                                 twenty: list[SentFile], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_receiver()
    whole = twenty[1].path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[:-5000])  # the pixel data ends 5000 bytes early
    status, comment = send_raw(node.port, cut, [CR], monkeypatch)
    assert status == STATUS_CANNOT_UNDERSTAND, comment
    assert comment.startswith(RejectReason.TRUNCATED.value)
    [rejection] = node.rejections()
    assert rejection.reason == RejectReason.TRUNCATED.value
    assert rejection.name == twenty[1].sop_instance_uid
    assert rejection.source == "dicom:RAWSCU@127.0.0.1"
    assert not node.instances() and not node.spool_files()

    # the whole file, on the same kind of association, is fine
    status, comment = send_raw(node.port, twenty[1].path, [CR], monkeypatch)
    assert status == STATUS_SUCCESS, comment
    spooled = node.spool.parent / node.instances()[0].path
    assert dataset_bytes(spooled) == dataset_bytes(twenty[1].path)


def test_data_set_of_another_sop_class_is_refused(start_receiver: StartReceiver,
                                                  twenty: list[SentFile], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_receiver()
    meta = pydicom.dcmread(twenty[2].path, stop_before_pixels=True).file_meta
    assert meta.MediaStorageSOPClassUID == CR
    meta.MediaStorageSOPClassUID = DX_PRESENTATION  # so it is sent on the DX context
    mislabelled = tmp_path / "cr-as-dx.dcm"
    mislabelled.write_bytes(b"\0" * 128 + b"DICM" + encode_file_meta(meta)
                            + dataset_bytes(twenty[2].path))

    status, comment = send_raw(node.port, mislabelled, [DX_PRESENTATION], monkeypatch)
    assert status == STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, comment
    [rejection] = node.rejections()
    assert rejection.reason == RejectReason.SOP_CLASS_MISMATCH.value
    assert CR in rejection.detail and DX_PRESENTATION in rejection.detail
    assert not node.instances() and not node.spool_files()


def test_database_down_is_out_of_resources_and_nothing_is_acknowledged(
        start_receiver: StartReceiver, twenty: list[SentFile], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cxrd")
    broken: list[Database] = []

    def unreachable(db: Database, config: Config) -> Ingestor:
        # a database that cannot be opened at all (its folder does not exist)
        broken.append(Database(f"sqlite:///{tmp_path / 'gone' / 'cxrd.sqlite3'}"))
        return Ingestor(broken[0], config.storage.spool_dir, config.storage.rejected_dir)

    node = start_receiver(ingestor=unreachable)
    try:
        status, comment = send_raw(node.port, twenty[3].path, [CR], monkeypatch)
    finally:
        broken[0].dispose()
    assert status == STATUS_OUT_OF_RESOURCES, comment
    assert not node.spool_files(), "something was spooled although nothing was recorded"
    assert not node.instances()
    assert any(r.levelno >= logging.ERROR and r.name.startswith("cxrd")
               for r in caplog.records), "the failure was not logged"


def test_failed_commit_is_out_of_resources_then_a_retry_succeeds(
        start_receiver: StartReceiver, twenty: list[SentFile],
        monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_receiver()
    with node.db.engine.begin() as conn:  # every instance insert fails, as on a full disk
        conn.exec_driver_sql("CREATE TRIGGER no_room BEFORE INSERT ON instances "
                             "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    status, comment = send_raw(node.port, twenty[4].path, [CR], monkeypatch)
    assert status == STATUS_OUT_OF_RESOURCES, comment
    [rejection] = node.rejections()
    assert rejection.reason == RejectReason.STORAGE_FAILED.value
    assert "disk is full" in rejection.detail
    assert not node.instances()
    assert not node.spool_files(), "the spool keeps a file nobody recorded (or a temp file)"

    with node.db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER no_room")
    status, comment = send_raw(node.port, twenty[4].path, [CR], monkeypatch)
    assert status == STATUS_SUCCESS, comment
    assert [i.sop_instance_uid for i in node.instances()] == [twenty[4].sop_instance_uid]
    assert len(node.spool_files()) == 1


# ------------------------------------------------------------------- compressed syntaxes


COMPRESSED = {JPEG2000Lossless: "-xv", JPEGLSLossless: "-xt", RLELossless: "-xr"}


def test_compressed_syntaxes_are_received_as_sent(start_receiver: StartReceiver,
                                                  tmp_path: Path) -> None:
    node = start_receiver()
    files = phantom_study(tmp_path / "compressed", 3, seed=7, size=(200, 160),
                          transfer_syntaxes=list(COMPRESSED))
    for f in files:
        # -R: propose only what storescu needs, so the compressed syntax is the one chosen
        done = storescu(node.port, [f.path], options=[COMPRESSED[f.transfer_syntax_uid], "-R"])
        assert done.returncode == 0, output(done)
        assert "Received Store Response (Success)" in done.stderr, output(done)
    by_uid = {i.sop_instance_uid: i for i in node.instances()}
    for f in files:
        inst = by_uid[f.sop_instance_uid]
        assert inst.transfer_syntax_uid == f.transfer_syntax_uid
        spooled = node.spool.parent / inst.path
        assert dataset_bytes(spooled) == dataset_bytes(f.path)
        # it decodes (the pylibjpeg plugins) to the same pixels
        assert (pydicom.dcmread(spooled).pixel_array
                == pydicom.dcmread(f.path).pixel_array).all()


def test_three_compressed_syntaxes_on_one_association(start_receiver: StartReceiver,
                                                      tmp_path: Path) -> None:
    node = start_receiver()
    files = phantom_study(tmp_path / "compressed", 3, seed=8, size=(200, 160), modality="DX",
                          transfer_syntaxes=list(COMPRESSED))
    done = storescu(node.port, [f.path for f in files],
                    options=storescu_profile(tmp_path, list(COMPRESSED)))
    assert done.returncode == 0, output(done)
    assert done.stderr.count("Requesting Association") == 1, output(done)
    assert done.stderr.count("Received Store Response (Success)") == 3, output(done)
    # each sent in its own syntax (nothing decompressed on the way)
    received = {i.sop_instance_uid: i.transfer_syntax_uid for i in node.instances()}
    assert received == {f.sop_instance_uid: f.transfer_syntax_uid for f in files}


# ---------------------------------------------------------------------------------- TLS


def tls_node(start_receiver: StartReceiver, pki: Pki) -> RunningReceiver:
    return start_receiver(tls={"certificate": str(pki.server_cert), "key": str(pki.server_key),
                               "ca": str(pki.ca), "require_client_cert": True})


def client_tls(pki: Pki, *, rogue: bool = False) -> list[str | Path]:
    key, cert = (pki.rogue_key, pki.rogue_cert) if rogue else (pki.client_key, pki.client_cert)
    return ["+tls", key, cert, "+cf", pki.ca]


def test_tls_with_a_client_certificate(start_receiver: StartReceiver, pki: Pki,
                                       twenty: list[SentFile]) -> None:
    node = tls_node(start_receiver, pki)
    done = echoscu(node.port, options=client_tls(pki))
    assert done.returncode == 0, output(done)
    done = storescu(node.port, [f.path for f in twenty[:3]], options=client_tls(pki))
    assert done.returncode == 0, output(done)
    assert done.stderr.count("Received Store Response (Success)") == 3, output(done)
    assert len(node.instances()) == 3


def test_tls_without_a_valid_client_certificate_fails(start_receiver: StartReceiver, pki: Pki,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    node = tls_node(start_receiver, pki)
    anonymous = echoscu(node.port, options=["+tla", "+cf", pki.ca])
    assert anonymous.returncode != 0, output(anonymous)
    rogue = echoscu(node.port, options=client_tls(pki, rogue=True))
    assert rogue.returncode != 0, output(rogue)
    lines = messages(caplog, "tls-handshake-failed")
    assert any("reason=PEER_DID_NOT_RETURN_A_CERTIFICATE" in ln for ln in lines), lines
    assert any("reason=CERTIFICATE_VERIFY_FAILED" in ln for ln in lines), lines
    # and the node's own certificate is what a caller checks: another CA refuses it
    wrong_ca = echoscu(node.port, options=["+tls", pki.client_key, pki.client_cert,
                                           "+cf", pki.rogue_ca])
    assert wrong_ca.returncode != 0, output(wrong_ca)


def test_plain_tcp_to_the_tls_port_fails(start_receiver: StartReceiver, pki: Pki,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    node = tls_node(start_receiver, pki)
    done = echoscu(node.port)
    assert done.returncode != 0, output(done)
    assert "Association Accepted" not in done.stderr
    assert any("address=127.0.0.1" in ln for ln in messages(caplog, "tls-handshake-failed"))


def test_a_silent_connection_does_not_block_other_tls_callers(start_receiver: StartReceiver,
                                                              pki: Pki) -> None:
    node = tls_node(start_receiver, pki)
    # connects and never speaks (a port scanner, a plain-TCP client waiting for the server)
    with socket.create_connection(("127.0.0.1", node.port)) as silent:
        results: list[int] = []
        caller = threading.Thread(target=lambda: results.append(
            echoscu(node.port, options=client_tls(pki)).returncode), daemon=True)
        caller.start()
        caller.join(20)
        assert not caller.is_alive(), "a silent connection blocks every other caller"
        assert results == [0]
        silent.close()
