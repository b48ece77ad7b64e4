"""The DICOM receiver: C-ECHO and C-STORE SCP (pynetdicom), with an allow-list and TLS.

A C-STORE is answered Success only after ``cxrd.ingest`` has spooled the bytes (as sent,
never decoded or re-encoded) and committed the row. Every failure becomes a specific
status with a reason that is logged and recorded; the handler never raises. Inference
never runs here.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from cxrd.config import Config, TlsConfig
from cxrd.domain import RejectReason
from cxrd.ingest import ACCEPTED_SOP_CLASSES, Ingestor

log = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

# DIMSE status codes (PS3.4 Annex B.2.3, PS3.7 Annex C)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ: result rejected-permanent, source service-user, reason
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03

#: Every transfer syntax that pydicom + the pylibjpeg plugins decode (dicom-output.md §5).
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
]

_STATUS_FOR_REASON = {
    RejectReason.STORAGE_FAILED: STATUS_OUT_OF_RESOURCES,
    RejectReason.SOP_CLASS_MISMATCH: STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    RejectReason.UNSUPPORTED_SOP_CLASS: STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
}


def status_for(reason: RejectReason | None) -> int:
    """The C-STORE status for a refusal: resources, SOP class, or cannot understand."""
    if reason is None:
        return STATUS_SUCCESS
    return _STATUS_FOR_REASON.get(reason, STATUS_CANNOT_UNDERSTAND)


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """TLS for the receiver; client certificates are verified against ``tls.ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.key))
    if tls.ca is not None:
        context.load_verify_locations(str(tls.ca))
        context.verify_mode = (ssl.CERT_REQUIRED if tls.require_client_cert
                               else ssl.CERT_OPTIONAL)
    return context


class _ReusePortServer(ThreadedAssociationServer):
    """Several receiver processes can share the port (SO_REUSEPORT); the kernel spreads
    incoming connections across them, which gets around the interpreter lock."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class Receiver:
    """The SCP. ``start()`` listens in background threads; ``drain()`` stops taking new
    associations and lets the ones in flight finish (bounded)."""

    def __init__(self, config: Config, ingestor: Ingestor, *, reuse_port: bool = False) -> None:
        self.config = config
        self.ingestor = ingestor
        self.reuse_port = reuse_port
        self.allowed_callers = config.node.allowed_callers
        self._lock = threading.Lock()
        self.ae = AE(ae_title=config.node.ae_title)
        self.ae.maximum_pdu_size = config.node.max_pdu
        self.ae.maximum_associations = 64
        self.ae.network_timeout = 120
        self.ae.dimse_timeout = 120
        self.ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for sop_class in ACCEPTED_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self.server: ThreadedAssociationServer | None = None
        self.stored = 0

    def set_allowed_callers(self, callers: tuple[str, ...]) -> None:
        """Replace the allow-list (SIGHUP reload); applies to the next association."""
        with self._lock:
            self.allowed_callers = callers

    def is_allowed(self, calling_ae: str, address: str) -> bool:
        with self._lock:
            callers = self.allowed_callers
        if not callers:
            return True
        for entry in callers:
            ae_title, _, host = entry.partition("@")
            if ae_title.strip() == calling_ae and (not host or host == address):
                return True
        return False

    # -- handlers (never raise) ------------------------------------------------------
    def on_requested(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        address = str(assoc.requestor.address)
        if self.is_allowed(calling, address):
            return
        known_ae = any(e.partition("@")[0].strip() == calling for e in self.allowed_callers)
        reason = "calling AE title known but not from this host" if known_ae else (
            "calling AE title not in node.allowed_callers")
        log.warning("action=association-rejected calling_ae=%s address=%s reason=%s",
                    calling, address, reason)
        assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER,
                               REASON_CALLING_AE_NOT_RECOGNISED)

    def on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def on_store(self, event: Any) -> int | tuple[int, Dataset]:
        assoc = event.assoc
        source = f"dicom:{str(assoc.requestor.ae_title).strip()}@{assoc.requestor.address}"
        try:
            data = event.encoded_dataset(include_meta=True)
            outcome = self.ingestor.store(
                data, source, name=str(event.request.AffectedSOPInstanceUID or ""),
                expected_sop_class=str(event.context.abstract_syntax))
        except Exception as exc:  # the handler must answer, whatever happened
            log.exception("action=store-error source=%s", source)
            return self._status(STATUS_OUT_OF_RESOURCES, f"internal error: {exc}")
        if outcome.accepted:
            self.stored += 1
            return STATUS_SUCCESS
        return self._status(status_for(outcome.reason), f"{outcome.reason}: {outcome.detail}")

    @staticmethod
    def _status(code: int, comment: str) -> tuple[int, Dataset]:
        status = Dataset()
        status.Status = code
        status.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
        return code, status

    # -- lifecycle ---------------------------------------------------------------------
    def handlers(self) -> list[Any]:
        return [(evt.EVT_REQUESTED, self.on_requested), (evt.EVT_C_ECHO, self.on_echo),
                (evt.EVT_C_STORE, self.on_store)]

    def start(self) -> None:
        node = self.config.node
        context = server_ssl_context(node.tls) if node.tls else None
        server_class = _ReusePortServer if self.reuse_port else ThreadedAssociationServer
        self.server = self.ae.make_server((node.host, node.port), ssl_context=context,
                                          evt_handlers=self.handlers(),
                                          server_class=server_class)
        thread = threading.Thread(target=self.server.serve_forever, name="cxrd-receive",
                                  daemon=True)
        thread.start()
        self.ae._servers.append(self.server)  # so ae.shutdown() finds it
        log.info("action=receive-start ae_title=%s host=%s port=%d tls=%s max_pdu=%d "
                 "allowed_callers=%d", node.ae_title, node.host, node.port,
                 node.tls is not None, node.max_pdu, len(self.allowed_callers))

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def drain(self, timeout: float = 30.0) -> None:
        """Stop listening, let associations in flight finish, then abort stragglers."""
        server = self.server
        if server is None:
            return
        # BaseServer.shutdown stops serve_forever: no new associations are accepted.
        # (AssociationServer.shutdown would also abort the ones in flight.)
        socketserver.BaseServer.shutdown(server)
        server.server_close()
        if server in self.ae._servers:
            self.ae._servers.remove(server)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = [a for a in self.ae.active_associations if a.is_acceptor]
            if not active:
                break
            time.sleep(0.1)
        for assoc in self.ae.active_associations:
            log.warning("action=association-aborted reason=drain-timeout calling_ae=%s",
                        str(assoc.requestor.ae_title).strip())
            assoc.abort()
        self.server = None
        log.info("action=receive-stop stored=%d", self.stored)


def receiver_main(config: Config, index: int, parent_pid: int,
                  setup_logging: Any = None) -> None:
    """An extra receiver process sharing the port (``[node].receivers`` > 1); stops on
    SIGTERM, finishing the associations in flight."""
    import os

    from cxrd.db import Database
    from cxrd.worker import stop_on_signals

    stop = stop_on_signals()
    if setup_logging is not None:
        setup_logging(config)
    db = Database(config.storage.database_url_resolved)
    receiver = Receiver(config, Ingestor(db, config.storage.spool_dir,
                                         config.storage.rejected_dir), reuse_port=True)
    receiver.start()
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:
            break
    receiver.drain()
    db.dispose()
