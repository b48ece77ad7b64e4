"""The DICOM receiver: C-ECHO and C-STORE SCP (pynetdicom), with an allow-list and TLS.

A C-STORE is answered Success only after ``cxrd.ingest`` has spooled the bytes (as sent,
never decoded or re-encoded) and committed the row. Every failure becomes a specific
status with a reason that is logged and recorded; the handler never raises. Inference
never runs here.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import replace
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.transport import ThreadedAssociationServer

from cxrd import reactor
from cxrd.config import Config, TlsConfig
from cxrd.dicom import (
    ACCEPTED_SOP_CLASSES,
    RECEIVE_TRANSFER_SYNTAXES,
    REJECT_PERMANENT,
    REJECT_REASON_CALLING_AE_NOT_RECOGNISED,
    REJECT_REASON_NO_REASON_GIVEN,
    REJECT_SOURCE_SERVICE_USER,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    VERIFICATION,
    store_status,
)
from cxrd.domain import RejectReason
from cxrd.ingest import Ingestor, part10

log = logging.getLogger(__name__)

#: A caller gets this long to finish the TLS handshake (in its own thread, never in the
#: accept loop, where one silent client would block every other caller).
TLS_HANDSHAKE_SECONDS = 30.0

#: The C-STORE status for an ingest refusal (one home: ``cxrd.dicom.store_status``).
status_for = store_status


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


def _peer_address(assoc: Any) -> str:
    """The caller's IP address; an IPv4-mapped IPv6 address (a dual-stack listener on
    "::") as plain IPv4, so that "AE@10.1.2.3" entries match it."""
    address = str(assoc.requestor.address)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return address


def _tls_handshake(sock: ssl.SSLSocket, address: Any) -> bool:
    """Complete the server side of the TLS handshake (bounded); False, logged, if it fails."""
    host = address[0] if isinstance(address, tuple) else str(address)
    try:
        sock.settimeout(TLS_HANDSHAKE_SECONDS)
        sock.do_handshake()
        sock.settimeout(None)
    except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
        reason = getattr(exc, "reason", None) or type(exc).__name__
        log.warning("action=tls-handshake-failed address=%s reason=%s", host, reason)
        return False
    return True


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved out of the accept loop.

    pynetdicom wraps each accepted socket with ``do_handshake_on_connect`` in
    ``get_request``, which runs in the thread that accepts connections, on a blocking
    socket: a caller that connects and sends nothing (a port scanner, a plain-TCP client
    waiting for the server to speak) would stop every other association. Here the
    handshake runs in the association's own thread, with a time limit.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not _tls_handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


class _ReusePortServer(_AssociationServer):
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
        self._node = config.node  # its allow-list is replaced on reload
        self._lock = threading.Lock()
        self.ae = AE(ae_title=config.node.ae_title)
        self.ae.maximum_pdu_size = config.node.max_pdu
        self.ae.maximum_associations = 64
        self.ae.network_timeout = 120
        self.ae.dimse_timeout = 120
        self.ae.add_supported_context(VERIFICATION)
        for sop_class in ACCEPTED_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, RECEIVE_TRANSFER_SYNTAXES)
        self.server: ThreadedAssociationServer | None = None
        self.stored = 0

    @property
    def allowed_callers(self) -> tuple[str, ...]:
        with self._lock:
            return self._node.allowed_callers

    def set_allowed_callers(self, callers: tuple[str, ...]) -> None:
        """Replace the allow-list (SIGHUP reload); applies to the next association."""
        with self._lock:
            self._node = replace(self._node, allowed_callers=tuple(callers))

    def is_allowed(self, calling_ae: str, address: str) -> bool:
        """The allow-list check of ``node.allowed_callers`` (the config's own rule)."""
        with self._lock:
            node = self._node
        return node.is_caller_allowed(calling_ae, address)

    def _refusal_reason(self, calling_ae: str) -> str:
        known = any(entry.rpartition("@")[0].strip() == calling_ae
                    for entry in self.allowed_callers if "@" in entry)
        return ("calling AE title known but not from this host" if known
                else "calling AE title not in node.allowed_callers")

    # -- handlers (never raise) ------------------------------------------------------
    def on_requested(self, event: Any) -> None:
        """Refuse (A-ASSOCIATE-RJ, permanent) before any negotiation a caller not on the
        allow-list (calling AE not recognised), and one proposing no SOP class cxrd
        supports (no reason given; recorded as a rejection). Fails closed: a caller that
        cannot be checked is refused."""
        assoc = event.assoc
        calling = address = ""
        diagnostic = REJECT_REASON_CALLING_AE_NOT_RECOGNISED
        try:
            # At EVT_REQUESTED pynetdicom has not yet copied the calling AE title to
            # assoc.requestor (that happens during negotiation): read the request itself.
            calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
            address = _peer_address(assoc)
            if not self.is_allowed(calling, address):
                reason = self._refusal_reason(calling)
            else:
                unsupported = self._unsupported_only(assoc)
                if unsupported is None:
                    return
                reason = unsupported
                diagnostic = REJECT_REASON_NO_REASON_GIVEN
                self.ingestor.reject(f"dicom:{calling}@{address}", "",
                                     RejectReason.UNSUPPORTED_SOP_CLASS, reason)
        except Exception as exc:
            reason = f"allow-list check failed: {type(exc).__name__}"
        log.warning("action=association-rejected calling_ae=%s address=%s reason=%s",
                    calling, address, reason)
        try:
            assoc.acse.send_reject(REJECT_PERMANENT, REJECT_SOURCE_SERVICE_USER, diagnostic)
            # Wait until the A-ASSOCIATE-RJ is on the wire and the peer has closed (as
            # pynetdicom does for its own refusals): returning at once would close the
            # socket first, and the caller would see an abort instead of the reason.
            assoc.kill()
        except Exception:
            log.exception("action=association-reject-error calling_ae=%s address=%s",
                          calling, address)
            assoc.abort()

    @staticmethod
    def _unsupported_only(assoc: Any) -> str | None:
        """Why an association proposes nothing cxrd can take (only SOP classes other than
        Verification and the accepted image storage classes), or None."""
        proposed = [str(cx.abstract_syntax) for cx in
                    assoc.requestor.primitive.presentation_context_definition_list]
        if any(uid == VERIFICATION or uid in ACCEPTED_SOP_CLASSES for uid in proposed):
            return None
        classes = ",".join(dict.fromkeys(proposed)) or "(none)"
        return f"no supported SOP class proposed: {classes}"[:500]

    def on_conn_open(self, event: Any) -> None:
        """Before the association's threads start: blocking loops instead of pynetdicom's
        1 ms polling (``cxrd.reactor``)."""
        try:
            reactor.make_event_driven(event.assoc)
        except Exception:  # pynetdicom's own loops still work
            log.exception("action=reactor-patch-failed")

    def on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def on_store(self, event: Any) -> int | Dataset:
        assoc = event.assoc
        source = f"dicom:{str(assoc.requestor.ae_title).strip()}@{_peer_address(assoc)}"
        try:
            request = event.request
            # Below [storage] min_free_mb: Out of Resources before anything is written.
            refused = self.ingestor.refuse_if_low(
                source, str(request.AffectedSOPInstanceUID or ""))
            if refused is not None:
                return self._status(status_for(refused.reason), refused.detail)
            data = part10(reactor.data_set_fragments(request.DataSet),
                          str(request.AffectedSOPClassUID or ""),
                          str(request.AffectedSOPInstanceUID or ""),
                          str(event.context.transfer_syntax),
                          PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)
            outcome = self.ingestor.store(
                data, source, name=str(request.AffectedSOPInstanceUID or ""),
                expected_sop_class=str(event.context.abstract_syntax),
                command_sop_class=str(request.AffectedSOPClassUID or ""))
        except Exception as exc:  # the handler must answer, whatever happened
            log.exception("action=store-error source=%s", source)
            return self._status(STATUS_OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
        if outcome.accepted:
            with self._lock:  # one thread per association
                self.stored += 1
            return STATUS_SUCCESS
        return self._status(status_for(outcome.reason), f"{outcome.reason}: {outcome.detail}")

    @staticmethod
    def _status(code: int, comment: str) -> Dataset:
        """A status data set with an Error Comment (LO: 64 characters, no backslash).

        pynetdicom takes an int or such a data set from a handler; anything else (a tuple,
        say) is answered 0xC002 whatever the code in it was.
        """
        status = Dataset()
        status.Status = code
        text = comment.encode("ascii", "replace").decode().replace("\\", "/")
        status.ErrorComment = text[:64].strip()
        return status

    # -- lifecycle ---------------------------------------------------------------------
    def handlers(self) -> list[Any]:
        return [(evt.EVT_CONN_OPEN, self.on_conn_open), (evt.EVT_REQUESTED, self.on_requested),
                (evt.EVT_C_ECHO, self.on_echo), (evt.EVT_C_STORE, self.on_store)]

    def start(self) -> None:
        node = self.config.node
        context = server_ssl_context(node.tls) if node.tls else None
        server_class = _ReusePortServer if self.reuse_port else _AssociationServer
        event_driven = reactor.enabled()  # checks pynetdicom (and logs a fallback) once
        self.server = self.ae.make_server((node.host, node.port), ssl_context=context,
                                          evt_handlers=self.handlers(),
                                          server_class=server_class)
        thread = threading.Thread(target=self.server.serve_forever, name="cxrd-receive",
                                  daemon=True)
        thread.start()
        servers = getattr(self.ae, "_servers", None)  # pynetdicom's own list, private
        if isinstance(servers, list):
            servers.append(self.server)  # so ae.shutdown() finds it
        log.info("action=receive-start ae_title=%s host=%s port=%d tls=%s max_pdu=%d "
                 "allowed_callers=%d event_driven=%s", node.ae_title, node.host, node.port,
                 node.tls is not None, node.max_pdu, len(self.allowed_callers),
                 event_driven)

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
        servers = getattr(self.ae, "_servers", None)
        if isinstance(servers, list) and server in servers:
            servers.remove(server)
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
    from cxrd.space import node_space
    from cxrd.store import open_node_store
    from cxrd.worker import settle_garbage_collector, stop_on_signals

    stop = stop_on_signals()
    if setup_logging is not None:
        setup_logging(config)
    db = Database(config.storage.database_url_resolved)
    objects = open_node_store(config)  # this process's own (an S3 client is not fork-safe)
    receiver = Receiver(config, Ingestor(db, config.storage.spool_dir,
                                         config.storage.rejected_dir,
                                         space=node_space(config), store=objects),
                        reuse_port=True)
    receiver.start()
    settle_garbage_collector()
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:
            break
    receiver.drain()
    db.dispose()
