"""The sender: the network side of the outbox, C-STORE of due deliveries.

It owns associations, TLS, presentation contexts and DIMSE statuses, and decides what kind
of failure an attempt met; ``cxrd.outbox`` owns the delivery rows: which are due, and each
outcome recorded (done, retried after its backoff, or dead). Due deliveries for one
destination share one association. A transient failure (peer down, timeout, no response,
out of resources) is retried with exponential backoff until the delivery is
``max_age_hours`` old. A refusal of the object itself (data set does not match, cannot
understand) is permanent: dead at once. An association rejected permanently (wrong AE
title, for instance), or one on which the destination accepted no presentation context for
the object's SOP class (it does not store that class, and will not on the next try either),
is reported with a ``PERMANENT:`` error and retried only at the maximum backoff, never
hammered. Everything is in the database, so a restart resumes every pending delivery.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE

from cxrd.config import Config, DestinationConfig, TlsConfig
from cxrd.db import Database, unavailable
from cxrd.dicom import (
    REJECT_PERMANENT,
    SECONDARY_CAPTURE,
    SEND_COMPRESSED_SC_SYNTAX,
    SEND_TRANSFER_SYNTAXES,
    SR_SOP_CLASSES,
    STATUS_OUT_OF_RESOURCES_RANGE,
    STATUS_STORED,
)
from cxrd.metrics import observe_stages
from cxrd.outbox import DueDelivery, RetryPolicy, due_deliveries, mark_delivered, mark_failed

log = logging.getLogger(__name__)

#: Due deliveries read per pass (all destinations together).
BATCH = 100
POLL_SECONDS = 1.0
#: A destination that does not answer the TCP handshake (host off, packets dropped) would
#: otherwise hold the sender for the kernel's connect timeout, about two minutes.
CONNECT_TIMEOUT_SECONDS = 10.0
#: The result objects' SOP classes: every SR IOD, and the heatmap Secondary Capture.
RESULT_SOP_CLASSES: tuple[str, ...] = (*SR_SOP_CLASSES.values(), SECONDARY_CAPTURE)
#: Stands for the status of a C-STORE that got no response (timeout, abort).
NO_RESPONSE = -1


def client_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """TLS to a destination: verify it against ``ca``; present our certificate if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(tls.ca) if tls.ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # PACS certificates rarely name the host; the CA pins it
    if tls.certificate and tls.key:
        context.load_cert_chain(str(tls.certificate), str(tls.key))
    return context


def record_connect_errors(context: ssl.SSLContext) -> list[OSError]:
    """The errors of connections made with ``context`` (TCP connect and TLS handshake):
    pynetdicom only logs them, and its association then says no more than that it is not
    established."""
    errors: list[OSError] = []

    class RecordingSSLSocket(ssl.SSLSocket):
        def connect(self, address: Any) -> None:
            try:
                super().connect(address)
            except OSError as exc:
                errors.append(exc)
                raise

    context.sslsocket_class = RecordingSSLSocket
    return errors


def sop_class_of(path: str) -> str:
    """The SOP Class UID in a result file's meta information (the header only is read)."""
    return syntaxes_of(path)[0]


def syntaxes_of(path: str) -> tuple[str, str]:
    """(SOP Class UID, Transfer Syntax UID) from a result file's meta information."""
    meta = read_file_meta_info(path)
    return (str(meta.get("MediaStorageSOPClassUID", "")),
            str(meta.get("TransferSyntaxUID", "")))


class Sender:
    """Sends due deliveries; ``run_once`` is one pass, ``start`` runs passes in a thread."""

    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.db = db
        self.destinations = {d.name: d for d in config.destinations}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_destinations(self, destinations: Sequence[DestinationConfig]) -> None:
        """SIGHUP reload: takes effect at the next pass."""
        self.destinations = {d.name: d for d in destinations}

    # -- outbox ----------------------------------------------------------------------
    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy.from_config(self.config.sender)

    def backoff(self, attempts: int) -> dt.timedelta:
        """The wait after the ``attempts``-th failure: initial, doubling, capped."""
        return self.retry_policy.backoff(attempts)

    def _fail(self, items: Sequence[DueDelivery], error: str, *, permanent: bool = False,
              at_max_backoff: bool = False) -> None:
        mark_failed(self.db, items, error, self.retry_policy, permanent=permanent,
                    at_max_backoff=at_max_backoff)

    def run_once(self) -> int:
        """Send what is due; returns the number of deliveries attempted."""
        attempted = 0
        for name, items in due_deliveries(self.db, BATCH).items():
            if self._stop.is_set():
                break
            dest = self.destinations.get(name)
            if dest is None:
                self._fail(items, f"destination {name!r} is no longer configured",
                           permanent=False, at_max_backoff=True)
                continue
            attempted += len(items)
            self._send(dest, items)
        return attempted

    def _send(self, dest: DestinationConfig, items: list[DueDelivery]) -> None:
        ae = AE(ae_title=self.config.sender.calling_ae)
        ae.connection_timeout = CONNECT_TIMEOUT_SECONDS
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.network_timeout = 60
        for sop_class in RESULT_SOP_CLASSES:
            ae.add_requested_context(sop_class, SEND_TRANSFER_SYNTAXES)
        ae.add_requested_context(SECONDARY_CAPTURE, [SEND_COMPRESSED_SC_SYNTAX])
        kwargs: dict[str, Any] = {"ae_title": dest.ae_title,
                                  "max_pdu": self.config.node.max_pdu}
        connect_errors: list[OSError] = []
        if dest.tls is not None:
            context = client_ssl_context(dest.tls)
            connect_errors = record_connect_errors(context)
            kwargs["tls_args"] = (context, None)
        try:
            assoc = ae.associate(dest.host, dest.port, **kwargs)
        except Exception as exc:  # TLS and socket errors surface here
            self._fail(items, f"cannot connect: {type(exc).__name__}: {exc}")
            return
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            result = getattr(rj, "result", None)
            text = (f"association rejected (result {result}, source "
                    f"{getattr(rj, 'result_source', None)}, reason "
                    f"{getattr(rj, 'diagnostic', None)})")
            if result == REJECT_PERMANENT:
                self._fail(items, "PERMANENT: " + text + "; check the destination's AE "
                           "configuration for this node", at_max_backoff=True)
            else:
                self._fail(items, text)
            return
        if not assoc.is_established:
            if connect_errors:
                error = connect_errors[-1]
                self._fail(items, f"cannot connect (TLS): {type(error).__name__}: {error}")
            elif assoc.rejected_contexts and not assoc.accepted_contexts:
                # accepted with every presentation context refused: pynetdicom aborts it
                refused = ", ".join(sorted({str(cx.abstract_syntax)
                                            for cx in assoc.rejected_contexts}))
                self._fail(items, "PERMANENT: association accepted without any presentation "
                           f"context (refused: {refused}); check the destination's SOP "
                           "classes for this node", at_max_backoff=True)
            else:
                self._fail(items, "association not established (peer unreachable or aborted)")
            return
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts}
        try:
            for i, item in enumerate(items):
                if self._stop.is_set() or not assoc.is_established:
                    if not assoc.is_established:
                        self._fail(items[i:], "association lost")
                    return
                try:
                    sop_class, syntax = syntaxes_of(item.path)
                except Exception as exc:
                    self._fail([item], f"cannot read the result file: {type(exc).__name__}: "
                                       f"{exc}")
                    continue
                if not any(a == sop_class for a, _ in accepted):
                    self._fail([item], "PERMANENT: no presentation context accepted for SOP "
                               f"class {sop_class}; check the destination's SOP classes for "
                               "this node", at_max_backoff=True)
                    continue
                uncompressed = syntax in SEND_TRANSFER_SYNTAXES
                if not uncompressed and (sop_class, syntax) not in accepted:
                    self._fail([item], "PERMANENT: the destination does not accept SOP class "
                               f"{sop_class} in transfer syntax {syntax}; accept JPEG "
                               "Baseline there, or set [results] heatmap_compression = "
                               '"none"', at_max_backoff=True)
                    continue
                t0 = time.perf_counter()
                try:
                    status = assoc.send_c_store(item.path)
                except Exception as exc:
                    self._fail([item], f"send failed: {type(exc).__name__}: {exc}")
                    continue
                observe_stages({"send": time.perf_counter() - t0})
                code = int(getattr(status, "Status", NO_RESPONSE)) if status else NO_RESPONSE
                if code in STATUS_STORED:  # success or warning
                    mark_delivered(self.db, item)
                elif code == NO_RESPONSE:
                    self._fail([item], "no response to C-STORE (timeout or abort)")
                elif code in STATUS_OUT_OF_RESOURCES_RANGE:
                    self._fail([item], f"destination out of resources (0x{code:04X})")
                else:
                    comment = getattr(status, "ErrorComment", "")
                    self._fail([item], f"refused by destination: status 0x{code:04X} "
                                       f"{comment}".strip(), permanent=True)
        finally:
            if assoc.is_established:
                assoc.release()

    # -- thread ------------------------------------------------------------------------
    def start(self) -> None:
        if not self.destinations:
            return
        self._thread = threading.Thread(target=self._run, name="cxrd-send", daemon=True)
        self._thread.start()
        log.info("action=send-start destinations=%s", ",".join(self.destinations))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.run_once()
            except Exception as exc:
                if unavailable(exc):  # deliveries stay pending; the next pass tries again
                    log.warning("action=send-error reason=database-unavailable error_type=%s",
                                type(exc).__name__)
                else:
                    log.exception("action=send-error")
                sent = 0
            if not sent:
                self._stop.wait(POLL_SECONDS)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the object in flight, release the association; the rest stays queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
