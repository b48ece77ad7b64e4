"""The sender (``cxrd.send``) against real destinations: dcmtk's ``storescp`` on a free
port, and pynetdicom SCPs where a test needs a precise answer (a permanent association
rejection, a given C-STORE status). The outbox is a real SQLite file.

Checked: one association per destination and pass, exponential backoff with a cap, the
dead-letter state after ``max_age_hours``, a permanent rejection (of the association, or of
every presentation context for the object's SOP class) reported as such and retried only at
the maximum backoff, pending deliveries resumed by a new Sender on the same database (a
restart), and TLS: delivery to a ``storescp +tls`` verified with the test CA (and showing
our client certificate), and no delivery to one whose certificate another CA signed.

Destination faults (``FaultySCP``, a real pynetdicom peer on loopback): a destination that
answers after the DIMSE timeout, one that aborts after receiving the data set, and one that
answers warning statuses each get their outcome recorded, and with the sender's threads
running, neither a slow nor an aborting destination delays the deliveries to a good one.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomfactory import make_dataset, uid, write
from dicompeers import FaultySCP, Pki, StoreSCP, free_port, wait_for
from pynetdicom import AE, evt
from sqlalchemy import select, update

from cxrd.config import Config, validate
from cxrd.db import Database, Delivery, Result, utcnow
from cxrd.dicom import STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, STATUS_OUT_OF_RESOURCES
from cxrd.domain import DeliveryState, ResultKind
from cxrd.send import Sender

SC = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
CT = "1.2.840.10008.5.1.4.1.1.2"


# ------------------------------------------------------------------------------ helpers


def sender_config(tmp_path: Path, destinations: Sequence[tuple[str, int]], *,
                  initial: float = 1.0, maximum: float = 8.0,
                  max_age_hours: float = 168.0, tls: dict[str, str] | None = None,
                  dimse_timeout: float | None = None) -> Config:
    """``tls``, when given, is every destination's ``tls`` table."""
    timeouts = {} if dimse_timeout is None else {"dimse_timeout_seconds": dimse_timeout}
    return validate({
        "storage": {"data_dir": str(tmp_path / "data")},
        "sender": {"initial_backoff_seconds": initial, "max_backoff_seconds": maximum,
                   "max_age_hours": max_age_hours, **timeouts},
        "destinations": [{"name": name, "ae_title": "PACS", "host": "127.0.0.1", "port": port,
                          **({"tls": tls} if tls is not None else {})}
                         for name, port in destinations],
    })


def storescp_tls(key: Path, cert: Path, ca: Path) -> list[str]:
    """storescp options: TLS with this key and certificate; callers must show a certificate
    that ``ca`` signed (``--require-peer-cert`` is dcmtk's default)."""
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


def destination_tls(pki: Pki) -> dict[str, str]:
    """A destination's ``tls`` table: verify the peer with the test CA; show our client
    certificate."""
    return {"ca": str(pki.ca), "certificate": str(pki.client_cert),
            "key": str(pki.client_key)}


def queue_results(db: Database, folder: Path, n: int, destinations: Sequence[str], *,
                  created_at: dt.datetime | None = None) -> list[str]:
    """``n`` heatmap-like Secondary Capture files, each queued for every destination, as
    ``cxrd.outbox.add_result`` queues them; returns their SOP Instance UIDs."""
    study = uid()
    uids = []
    with db.session() as s:
        for i in range(n):
            ds = make_dataset("OT", study_uid=study, rows=32, columns=32, seed=i)
            path = write(folder / f"{ds.SOPInstanceUID}.dcm", ds)
            row = Result(sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=study,
                         kind=ResultKind.SC.value, generation=1, path=str(path))
            s.add(row)
            s.flush()
            for name in destinations:
                delivery = Delivery(result_id=row.id, destination=name)
                if created_at is not None:
                    delivery.created_at = delivery.next_attempt_at = created_at
                s.add(delivery)
            uids.append(str(ds.SOPInstanceUID))
    return uids


def deliveries(db: Database) -> list[Delivery]:
    with db.session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)).all())


def make_due(db: Database) -> None:
    with db.session() as s:
        s.execute(update(Delivery).values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))


def received_uids(scp: StoreSCP) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in scp.received())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def start(name: str, **kwargs: Any) -> StoreSCP:
        started.append(StoreSCP(tmp_path / name, **kwargs))
        return started[-1]

    yield start
    for scp in started:
        scp.stop()


class PynetdicomSCP:
    """A Storage SCP in this process that counts connections and answers each C-STORE
    with ``status_for(sop_instance_uid)``; ``require_calling_aet`` makes it refuse us, and
    ``sop_classes`` are the only storage SOP classes it accepts."""

    def __init__(self, *, require_calling_aet: Sequence[str] = (),
                 status_for: Callable[[str], int] = lambda _uid: 0x0000,
                 sop_classes: Sequence[str] = (SC,)) -> None:
        self.connections = 0
        self.stored: list[str] = []
        self._lock = threading.Lock()
        self.status_for = status_for
        self.ae = AE(ae_title="PACS")
        self.ae.require_calling_aet = list(require_calling_aet)
        for sop_class in sop_classes:
            self.ae.add_supported_context(sop_class)
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False,
            evt_handlers=[(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_C_STORE, self._on_store)])
        self.port = int(self.server.server_address[1])

    def _on_open(self, event: Any) -> None:
        with self._lock:
            self.connections += 1

    def _on_store(self, event: Any) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.stored.append(sop_uid)
        return self.status_for(sop_uid)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def faulty_scp() -> Iterator[Callable[..., FaultySCP]]:
    started: list[FaultySCP] = []

    def start(fault: str, **kwargs: Any) -> FaultySCP:
        started.append(FaultySCP(fault, **kwargs))
        return started[-1]

    yield start
    for scp in started:
        scp.stop()


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., PynetdicomSCP]]:
    started: list[PynetdicomSCP] = []

    def start(**kwargs: Any) -> PynetdicomSCP:
        started.append(PynetdicomSCP(**kwargs))
        return started[-1]

    yield start
    for scp in started:
        scp.stop()


# -------------------------------------------------------------------------------- tests


def test_objects_for_one_destination_share_one_association(tmp_path: Path, db: Database,
                                                           storescp: Callable[..., StoreSCP]
                                                           ) -> None:
    a, b = storescp("a"), storescp("b")
    config = sender_config(tmp_path, [("a", a.port), ("b", b.port)])
    uids = queue_results(db, tmp_path / "results", 5, ["a", "b"])
    sender = Sender(config, db)
    assert sender.run_once() == 10
    for scp in (a, b):
        assert scp.associations() == 1, scp.log()
        assert received_uids(scp) == sorted(uids)
    rows = deliveries(db)
    assert {r.state for r in rows} == {DeliveryState.DONE.value}
    assert all(r.attempts == 1 and r.last_error is None and r.done_at for r in rows)
    assert sender.run_once() == 0  # nothing left to send
    assert a.associations() == b.associations() == 1


def test_backoff_grows_exponentially_and_caps(tmp_path: Path, db: Database) -> None:
    config = sender_config(tmp_path, [("pacs", free_port())], initial=1, maximum=8)
    queue_results(db, tmp_path / "results", 1, ["pacs"])
    sender = Sender(config, db)
    delays = []
    for _ in range(6):
        make_due(db)
        before = utcnow()
        assert sender.run_once() == 1
        took = (utcnow() - before).total_seconds()
        [row] = deliveries(db)
        delays.append(((row.next_attempt_at - before).total_seconds(), took))
        assert row.state == DeliveryState.PENDING.value
        assert row.last_error and "PERMANENT" not in row.last_error
        assert sender.run_once() == 0, "retried before its backoff was over"
    for (delay, took), expected in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert expected <= delay <= expected + took + 0.1, delays
    assert deliveries(db)[0].attempts == 6


def test_delivery_older_than_max_age_becomes_dead(tmp_path: Path, db: Database) -> None:
    config = sender_config(tmp_path, [("pacs", free_port())], max_age_hours=1)
    [old] = queue_results(db, tmp_path / "old", 1, ["pacs"],
                          created_at=utcnow() - dt.timedelta(hours=2))
    [young] = queue_results(db, tmp_path / "young", 1, ["pacs"])
    Sender(config, db).run_once()
    with db.session() as s:
        state = {r.sop_instance_uid: (d.state, d.last_error) for d, r in s.execute(
            select(Delivery, Result).join(Result, Delivery.result_id == Result.id))}
    assert state[old][0] == DeliveryState.DEAD.value
    assert state[young][0] == DeliveryState.PENDING.value
    assert state[old][1] and state[young][1]  # both say why


def assert_permanent_and_not_hammered(sender: Sender, scp: PynetdicomSCP, db: Database,
                                      n: int) -> list[Delivery]:
    """One pass reaches the peer once and leaves every delivery pending with a PERMANENT
    error, due again only at the maximum backoff (30 s); then the sender's own loop, for a
    while, makes no new association attempt at all (a transient failure with a 0.1 s
    initial backoff would be retried several times meanwhile). Returns the rows."""
    before = utcnow()
    assert sender.run_once() == n
    assert scp.connections == 1
    rows = deliveries(db)
    for row in rows:
        assert row.state == DeliveryState.PENDING.value
        assert row.last_error is not None and row.last_error.startswith("PERMANENT"), \
            row.last_error
        assert 30 <= (row.next_attempt_at - before).total_seconds() <= 32
    sender.start()
    time.sleep(2.5)
    sender.stop()
    assert scp.connections == 1
    assert not scp.stored
    return rows


def test_permanent_rejection_is_reported_and_not_hammered(
        tmp_path: Path, db: Database, pynetdicom_scp: Callable[..., PynetdicomSCP]) -> None:
    scp = pynetdicom_scp(require_calling_aet=["SOMEONE_ELSE"])
    config = sender_config(tmp_path, [("pacs", scp.port)], initial=0.1, maximum=30)
    queue_results(db, tmp_path / "results", 3, ["pacs"])
    sender = Sender(config, db)
    assert_permanent_and_not_hammered(sender, scp, db, 3)


@pytest.mark.parametrize("sop_classes", [(COMPREHENSIVE_SR,), (CT,)],
                         ids=["another-class-accepted", "no-context-accepted"])
def test_sop_class_not_accepted_is_permanent_and_not_hammered(
        tmp_path: Path, db: Database, pynetdicom_scp: Callable[..., PynetdicomSCP],
        sop_classes: tuple[str, ...]) -> None:
    # the association is accepted, but not the Secondary Capture context: either another of
    # the contexts we propose is (the association is established), or none is (pynetdicom
    # aborts it). The PACS will not store SC on the next try either.
    scp = pynetdicom_scp(sop_classes=sop_classes)
    config = sender_config(tmp_path, [("pacs", scp.port)], initial=0.1, maximum=30)
    queue_results(db, tmp_path / "results", 2, ["pacs"])
    sender = Sender(config, db)
    for row in assert_permanent_and_not_hammered(sender, scp, db, 2):
        assert row.attempts == 1
        assert row.last_error is not None and "presentation context" in row.last_error
        assert SC in row.last_error


def test_refused_object_is_dead_at_once_out_of_resources_is_retried(
        tmp_path: Path, db: Database, pynetdicom_scp: Callable[..., PynetdicomSCP]) -> None:
    refused: list[str] = []
    full: list[str] = []

    def status_for(sop_uid: str) -> int:
        if sop_uid in refused:
            return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
        return STATUS_OUT_OF_RESOURCES if sop_uid in full else 0x0000

    scp = pynetdicom_scp(status_for=status_for)
    config = sender_config(tmp_path, [("pacs", scp.port)])
    uids = queue_results(db, tmp_path / "results", 3, ["pacs"])
    refused.append(uids[0])
    full.append(uids[1])
    Sender(config, db).run_once()
    assert scp.connections == 1
    state = {uid: row for uid, row in zip(uids, deliveries(db), strict=True)}
    assert state[uids[0]].state == DeliveryState.DEAD.value
    assert "0xA900" in (state[uids[0]].last_error or "")
    assert state[uids[1]].state == DeliveryState.PENDING.value
    assert "0xA700" in (state[uids[1]].last_error or "")
    assert state[uids[2]].state == DeliveryState.DONE.value


def test_restart_resumes_pending_deliveries(tmp_path: Path,
                                            storescp: Callable[..., StoreSCP]) -> None:
    url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    port = free_port()
    config = sender_config(tmp_path, [("pacs", port)], initial=0.2, maximum=1)
    first = Database(url)
    first.migrate()
    uids = queue_results(first, tmp_path / "results", 4, ["pacs"])
    Sender(config, first).run_once()  # the destination is down
    assert {r.state for r in deliveries(first)} == {DeliveryState.PENDING.value}
    first.dispose()  # the node stops (or dies)

    scp = storescp("pacs", port=port)  # the destination comes back
    second = Database(url)
    try:
        sender = Sender(config, second)
        sender.start()
        try:
            wait_for(lambda: {r.state for r in deliveries(second)}
                     == {DeliveryState.DONE.value}, 15, "the pending deliveries to be sent")
        finally:
            sender.stop()
        assert received_uids(scp) == sorted(uids)
        assert scp.associations() == 1
    finally:
        second.dispose()


def test_backoff_stays_capped_through_a_long_outage(tmp_path: Path, memdb: Database) -> None:
    # a week at a one-minute cap is ten thousand attempts: 2**10000 overflows a float
    sender = Sender(sender_config(tmp_path, [("pacs", 104)], initial=5, maximum=60), memdb)
    assert [sender.backoff(n).total_seconds() for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]
    assert sender.backoff(10_000) == dt.timedelta(seconds=60)


def test_tls_delivery_to_storescp_verified_with_our_ca(
        tmp_path: Path, db: Database, storescp: Callable[..., StoreSCP], pki: Pki) -> None:
    scp = storescp("pacs", options=storescp_tls(pki.server_key, pki.server_cert, pki.ca))
    config = sender_config(tmp_path, [("pacs", scp.port)], tls=destination_tls(pki))
    uids = queue_results(db, tmp_path / "results", 3, ["pacs"])
    assert Sender(config, db).run_once() == 3
    assert received_uids(scp) == sorted(uids), scp.log()
    assert scp.associations() == 1, scp.log()
    rows = deliveries(db)
    assert {r.state for r in rows} == {DeliveryState.DONE.value}
    assert all(r.attempts == 1 and r.last_error is None and r.done_at for r in rows)


def test_tls_destination_signed_by_another_ca_gets_nothing(
        tmp_path: Path, db: Database, storescp: Callable[..., StoreSCP], pki: Pki) -> None:
    # an impostor: its certificate is from another CA (it would accept our client one)
    scp = storescp("impostor", options=storescp_tls(pki.rogue_server_key,
                                                    pki.rogue_server_cert, pki.ca))
    config = sender_config(tmp_path, [("pacs", scp.port)], tls=destination_tls(pki))
    queue_results(db, tmp_path / "results", 2, ["pacs"])
    assert Sender(config, db).run_once() == 2
    for row in deliveries(db):
        assert row.state == DeliveryState.PENDING.value
        assert row.done_at is None and row.attempts == 1
        assert row.last_error is not None
        assert "TLS" in row.last_error and "certificate verify failed" in row.last_error, \
            row.last_error
    assert scp.received() == []
    assert scp.associations() == 0, scp.log()  # the handshake failed before any DICOM
    assert scp.proc.poll() is None, scp.log()  # refused by us, not crashed


def queue_jpeg_sc(db: Database, folder: Path, destination: str) -> str:
    """One Secondary Capture stored as JPEG Baseline (``heatmap_compression``), queued."""
    import io

    import numpy as np
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = make_dataset("OT", rows=32, columns=32)
    buf = io.BytesIO()
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = (
        3, "YBR_FULL_422", 0)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    with db.session() as s:
        row = Result(sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=ds.StudyInstanceUID,
                     kind=ResultKind.SC.value, generation=1, path=str(path))
        s.add(row)
        s.flush()
        s.add(Delivery(result_id=row.id, destination=destination))
    return str(ds.SOPInstanceUID)


def test_a_jpeg_sc_goes_in_its_own_context_or_is_refused_permanently(
        tmp_path: Path, db: Database, storescp: Callable[..., StoreSCP]) -> None:
    """A JPEG Baseline heatmap SC is proposed in a context of its own: a destination that
    accepts JPEG Baseline stores it as it is; one that accepts SC uncompressed only gets
    nothing, and the delivery is reported as a permanent refusal that says what to change
    (retried only at the maximum backoff, like every permanent refusal)."""
    takes_all = storescp("all", options=["+xa"])  # dcmtk: accept all transfer syntaxes
    plain = storescp("plain")
    config = sender_config(tmp_path, [("all", takes_all.port), ("plain", plain.port)])
    sent = queue_jpeg_sc(db, tmp_path / "results", "all")
    queue_jpeg_sc(db, tmp_path / "results2", "plain")
    Sender(config, db).run_once()
    (received,) = takes_all.received()
    back = pydicom.dcmread(received)
    assert str(back.SOPInstanceUID) == sent
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert plain.received() == []
    by_dest = {r.destination: r for r in deliveries(db)}
    assert by_dest["all"].state == DeliveryState.DONE.value
    refused = by_dest["plain"]
    assert refused.state == DeliveryState.PENDING.value and refused.attempts == 1
    assert (refused.last_error or "").startswith("PERMANENT")
    assert "heatmap_compression" in (refused.last_error or "")
    assert refused.next_attempt_at - utcnow() > dt.timedelta(seconds=5)  # the 8 s cap


# ------------------------------------------------------------------- destination faults


def test_warning_statuses_are_delivered_with_the_warning_recorded(
        tmp_path: Path, db: Database, pynetdicom_scp: Callable[..., PynetdicomSCP],
        caplog: pytest.LogCaptureFixture) -> None:
    # A warning means stored (PS3.4 B.2.3): done, not retried, with the warning kept.
    warnings = [0xB000, 0xB006, 0xB007, 0xB00F]  # the last: a warning PS3.4 does not name
    status: dict[str, int] = {}
    scp = pynetdicom_scp(status_for=lambda sop_uid: status.get(sop_uid, 0x0000))
    config = sender_config(tmp_path, [("pacs", scp.port)])
    uids = queue_results(db, tmp_path / "results", 5, ["pacs"])
    status.update(zip(uids, warnings, strict=False))
    with caplog.at_level("INFO", logger="cxrd"):
        assert Sender(config, db).run_once() == 5
    rows = dict(zip(uids, deliveries(db), strict=True))
    assert {r.state for r in rows.values()} == {DeliveryState.DONE.value}
    assert all(r.attempts == 1 for r in rows.values())
    for sop_uid, code in zip(uids, warnings, strict=False):
        error = rows[sop_uid].last_error or ""
        assert error.startswith(f"stored with warning status 0x{code:04X}"), error
        [line] = [r.getMessage() for r in caplog.records
                  if "action=delivered-with-warning" in r.getMessage()
                  and sop_uid in r.getMessage()]
        assert f"0x{code:04X}" in line and "destination=pacs" in line
    assert "coercion" in (rows[uids[0]].last_error or "")
    assert rows[uids[4]].last_error is None  # plain success
    assert Sender(config, db).run_once() == 0  # nothing is sent twice
    assert sorted(scp.stored) == sorted(uids)


def test_destination_slower_than_the_dimse_timeout_is_retried(
        tmp_path: Path, db: Database, faulty_scp: Callable[..., FaultySCP],
        caplog: pytest.LogCaptureFixture) -> None:
    slow = faulty_scp("slow", delay=6)
    config = sender_config(tmp_path, [("slow", slow.port)], initial=30, maximum=60,
                           dimse_timeout=1.5)
    uids = queue_results(db, tmp_path / "results", 3, ["slow"])
    started = time.monotonic()
    with caplog.at_level("INFO", logger="cxrd"):
        assert Sender(config, db).run_once() == 3
    took = time.monotonic() - started
    assert 1.4 < took < 4, took  # one DIMSE timeout, not one per object nor the delay
    assert slow.received == uids[:1]  # the association was aborted at the timeout
    rows = deliveries(db)
    assert {r.state for r in rows} == {DeliveryState.PENDING.value}
    assert all(r.attempts == 1 for r in rows)
    first = rows[0].last_error or ""
    assert "no response to C-STORE within 1.5 s" in first, first
    assert "dimse_timeout_seconds" in first
    for row in rows[1:]:
        assert (row.last_error or "").startswith("not sent: the association ended on an "
                                                 "earlier object (no response"), row.last_error
    lines = [r.getMessage() for r in caplog.records if "action=delivery-retry" in r.getMessage()]
    assert all(any(u in ln and "destination=slow" in ln for ln in lines) for u in uids), lines


def test_destination_aborting_mid_association_is_retried(
        tmp_path: Path, db: Database, faulty_scp: Callable[..., FaultySCP]) -> None:
    aborting = faulty_scp("abort")
    config = sender_config(tmp_path, [("aborts", aborting.port)], initial=30, maximum=60,
                           dimse_timeout=20)
    uids = queue_results(db, tmp_path / "results", 2, ["aborts"])
    started = time.monotonic()
    assert Sender(config, db).run_once() == 2
    assert time.monotonic() - started < 10  # the abort is seen at once, not at the timeout
    assert aborting.received == uids[:1]
    rows = deliveries(db)
    assert {r.state for r in rows} == {DeliveryState.PENDING.value}
    assert all(r.attempts == 1 for r in rows)
    assert (rows[0].last_error or "").startswith(
        "destination aborted the association (A-ABORT"), rows[0].last_error
    assert "not sent: the association ended on an earlier object (destination aborted" in (
        rows[1].last_error or "")


def test_slow_and_aborting_destinations_do_not_hold_up_a_good_one(
        tmp_path: Path, db: Database, faulty_scp: Callable[..., FaultySCP],
        storescp: Callable[..., StoreSCP]) -> None:
    # Each result is queued for the slow destination first: a single sender thread that
    # went through the destinations in turn would reach the good one only after the slow
    # one's DIMSE timeout.
    slow, aborting, good = faulty_scp("slow", delay=30), faulty_scp("abort"), storescp("good")
    config = sender_config(tmp_path, [("slow", slow.port), ("aborts", aborting.port),
                                      ("good", good.port)],
                           initial=0.5, maximum=1, dimse_timeout=10)
    uids = queue_results(db, tmp_path / "results", 4, ["slow", "aborts", "good"])
    sender = Sender(config, db)
    started = time.monotonic()
    sender.start()
    try:
        wait_for(lambda: len(good.received()) == 4, 20, "the good destination's deliveries")
        took = time.monotonic() - started
        assert took < 5, f"the good destination waited {took:.1f} s"
        assert received_uids(good) == sorted(uids)
        # later uids queued meanwhile flow as well, while the slow one still hangs
        more = queue_results(db, tmp_path / "results", 2, ["slow", "aborts", "good"])
        wait_for(lambda: len(good.received()) == 6, 5, "the later deliveries")
        assert time.monotonic() - started < 10  # still inside the slow one's timeout
        assert received_uids(good) == sorted(uids + more)
        assert slow.received == uids[:1]  # its first object, still unanswered
        wait_for(lambda: aborting.associations >= 2, 10, "the aborting destination's retry")
    finally:
        sender.stop(timeout=15)
    by_dest: dict[str, set[str]] = {}
    for row in deliveries(db):
        by_dest.setdefault(row.destination, set()).add(row.state)
    assert by_dest["good"] == {DeliveryState.DONE.value}
    assert by_dest["aborts"] == {DeliveryState.PENDING.value}
    assert by_dest["slow"] == {DeliveryState.PENDING.value}
