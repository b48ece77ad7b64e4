"""The sender: the network side of the outbox, C-STORE of due deliveries (STOW-RS for a
destination with a ``url``: ``cxrd.stow`` says how, and what its answers mean).

It owns associations, TLS, presentation contexts and DIMSE statuses, and decides what kind
of failure an attempt met; ``cxrd.outbox`` owns the delivery rows: which are due, and each
outcome recorded (done, retried after its backoff, or dead). Each destination has a sender
thread of its own, so a destination that is slow, hangs or aborts holds only its own
deliveries back; a supervisor thread starts them (and one for a destination added by a
reload). Due deliveries for one destination share one association. A warning status
(0xB000 coercion, 0xB006 elements discarded, 0xB007 data set does not match the SOP class,
any 0xBxxx) means the destination stored the object: the delivery is done, with the
warning kept in its ``last_error`` and logged. A transient failure (peer down, no answer
within ``[sender] dimse_timeout_seconds``, an A-ABORT or a closed connection before the
answer, out of resources) is retried with exponential backoff until the delivery is
``max_age_hours`` old. A refusal of the object itself (data set does not match, cannot
understand) is permanent: dead at once. An association rejected permanently (wrong AE
title, for instance), or one on which the destination accepted no presentation context for
the object's SOP class (it does not store that class, and will not on the next try either),
is reported with a ``PERMANENT:`` error and retried only at the maximum backoff, never
hammered. Everything is in the database, so a restart resumes every pending delivery.

Urgent-finding notifications (``[[notifications]]``: a webhook, or HL7 v2 over MLLP) are
deliveries too, of a study's SR to the notification's name: each has a sender thread of
its own, the same claims, leases, backoff and dead letter, and ``cxrd.notify`` says how
each is sent and what its answer means.

Several nodes on one PostgreSQL database each run these threads: a pass claims its
destination's due deliveries with a lease (``cxrd.outbox.claim_deliveries``; owner
``node-id:pid:send-NAME``) long enough for the association and one C-STORE at the DIMSE
timeout twice over (``delivery_lease_seconds``), renewed before an object whenever half of
it has gone, so a slow batch keeps its deliveries and a dead node's come back.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT

from cxrd import notify, stow
from cxrd.config import (
    Config,
    DestinationConfig,
    NotificationConfig,
    NotificationKind,
    TlsConfig,
)
from cxrd.db import Database, unavailable
from cxrd.dicom import (
    REJECT_PERMANENT,
    SECONDARY_CAPTURE,
    SEGMENTATION,
    SEND_COMPRESSED_SC_SYNTAX,
    SEND_TRANSFER_SYNTAXES,
    SR_SOP_CLASSES,
    STATUS_OUT_OF_RESOURCES_RANGE,
    STATUS_STORED,
    STATUS_WARNING_MEANINGS,
    stored_with_warning,
)
from cxrd.metrics import observe_stages
from cxrd.outbox import (
    DueDelivery,
    RetryPolicy,
    claim_deliveries,
    mark_delivered,
    mark_failed,
    release_leases,
    renew_leases,
)
from cxrd.store import NodeStore, open_node_store

log = logging.getLogger(__name__)

#: Due deliveries read per pass (all destinations together).
BATCH = 100
POLL_SECONDS = 1.0
#: A destination that does not answer the TCP handshake (host off, packets dropped) would
#: otherwise hold the sender for the kernel's connect timeout, about two minutes.
CONNECT_TIMEOUT_SECONDS = 10.0
#: The result objects' SOP classes: every SR IOD, the heatmap Secondary Capture and the
#: lung-field Segmentation.
RESULT_SOP_CLASSES: tuple[str, ...] = (*SR_SOP_CLASSES.values(), SECONDARY_CAPTURE,
                                       SEGMENTATION)
#: Stands for the status of a C-STORE that got no response (timeout, abort).
NO_RESPONSE = -1
#: A C-STORE that got no answer within this share of the DIMSE timeout ended because of it.
TIMEOUT_SHARE = 0.95
#: How long to wait for pynetdicom to take note of an abort that ended a C-STORE.
ABORT_NOTICE_SECONDS = 1.0
#: Where deliveries go: a destination (C-STORE, STOW-RS) or a notification.
Endpoint = DestinationConfig | NotificationConfig
#: The ACSE timeout (association request and release) is this, or the DIMSE timeout if
#: shorter; the idle network timeout never comes before the DIMSE timeout.
ACSE_TIMEOUT_SECONDS = 30.0
NETWORK_TIMEOUT_SECONDS = 60.0


def delivery_lease_seconds(dimse_timeout: float) -> float:
    """How long a claimed delivery stays leased (PostgreSQL): the association (TCP connect,
    ACSE) and one C-STORE at the DIMSE timeout, twice over. The lease is renewed before an
    object once half of it has gone, so it never ends while its sender is alive and within
    its timeouts; a node that died holds its deliveries this long (default 5 min 20 s)."""
    return 2 * (CONNECT_TIMEOUT_SECONDS + min(ACSE_TIMEOUT_SECONDS, dimse_timeout)
                + dimse_timeout)


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


def no_response_error(elapsed: float, timeout: float, aborts: Sequence[Any]) -> str:
    """Why a C-STORE got no response: ``aborts`` are the A-ABORT and A-P-ABORT primitives
    received on the association; ``elapsed`` the seconds the C-STORE waited."""
    peer = [p for p in aborts if isinstance(p, A_ABORT)]
    if peer:
        source = getattr(peer[-1], "abort_source", None)
        return ("destination aborted the association (A-ABORT, source "
                f"{source}) before answering the C-STORE")
    if elapsed >= timeout * TIMEOUT_SHARE:
        return (f"no response to C-STORE within {timeout:g} s ([sender] "
                "dimse_timeout_seconds): destination too slow or hung; association aborted")
    if aborts:
        return "connection closed by the destination (A-P-ABORT) before it answered the C-STORE"
    return "no response to C-STORE (association ended)"


def warning_text(code: int, status: Any) -> str:
    """A stored-with-warning status as ``last_error`` keeps it."""
    meaning = STATUS_WARNING_MEANINGS.get(code, "warning")
    comment = str(getattr(status, "ErrorComment", "") or "")
    text = f"stored with warning status 0x{code:04X} ({meaning})"
    return f"{text}: {comment}" if comment else text


class Sender:
    """Sends due deliveries; ``run_once`` is one pass over every destination in turn (tests,
    one-shot), ``start`` runs a thread for each destination."""

    def __init__(self, config: Config, db: Database, objects: NodeStore | None = None) -> None:
        self.config = config
        self.db = db
        #: Where the result objects are (``[storage] store``); the node passes its own.
        self.objects = objects if objects is not None else open_node_store(config)
        self.destinations = {d.name: d for d in config.destinations}
        self.notifications = {n.name: n for n in config.notifications}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._threads: dict[str, threading.Thread] = {}

    def set_destinations(self, destinations: Sequence[DestinationConfig]) -> None:
        """SIGHUP reload: takes effect at the next pass (a new destination gets its thread
        within a second; the thread of one removed ends after its pass)."""
        self.destinations = {d.name: d for d in destinations}

    def set_notifications(self, notifications: Sequence[NotificationConfig]) -> None:
        """SIGHUP reload of ``[[notifications]]``, as ``set_destinations``."""
        self.notifications = {n.name: n for n in notifications}

    def _endpoint(self, name: str) -> Endpoint | None:
        return self.destinations.get(name) or self.notifications.get(name)

    def _endpoints(self) -> list[Endpoint]:
        return [*self.destinations.values(), *self.notifications.values()]

    # -- outbox ----------------------------------------------------------------------
    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy.from_config(self.config.sender)

    def backoff(self, attempts: int) -> dt.timedelta:
        """The wait after the ``attempts``-th failure: initial, doubling, capped."""
        return self.retry_policy.backoff(attempts)

    @property
    def lease_seconds(self) -> float:
        return delivery_lease_seconds(self.config.sender.dimse_timeout_seconds)

    def lease_of(self, dest: Endpoint) -> float:
        """How long a delivery to ``dest`` stays claimed: ``lease_seconds`` for a
        destination; for a notification its connection and answer timeouts, twice over
        (renewed, as for a destination, once half has gone)."""
        if isinstance(dest, NotificationConfig):
            return 2 * (dest.connect_timeout_seconds + dest.timeout_seconds)
        return self.lease_seconds

    def owner(self, destination: str) -> str:
        """The lease owner of this node's sender thread for ``destination``."""
        return f"{self.config.node.id}:{os.getpid()}:send-{destination}"[:128]

    def _fail(self, items: Sequence[DueDelivery], error: str, *, permanent: bool = False,
              at_max_backoff: bool = False) -> None:
        mark_failed(self.db, items, error, self.retry_policy, permanent=permanent,
                    at_max_backoff=at_max_backoff)

    def run_once(self) -> int:
        """Send what is due to every destination, one after the other; returns the number
        of deliveries attempted."""
        self._fail_unconfigured()
        attempted = 0
        for dest in self._endpoints():
            if self._stop.is_set():
                break
            attempted += self.run_destination_once(dest)
        return attempted

    def run_destination_once(self, dest: Endpoint) -> int:
        """Send what is due to ``dest`` (up to ``BATCH``, on one association); returns the
        number of deliveries attempted."""
        claimed_at = time.monotonic()
        items = claim_deliveries(self.db, BATCH, self.owner(dest.name), self.lease_of(dest),
                                 destination=dest.name).get(dest.name, [])
        if items and self._stop.is_set():
            release_leases(self.db, items)
        elif items:
            self._send(dest, items, claimed_at)
            return len(items)
        return 0

    def _fail_unconfigured(self) -> None:
        """Deliveries to a destination no longer configured wait at the maximum backoff
        (a reload may bring it back)."""
        for name, items in claim_deliveries(self.db, BATCH, self.owner(""), self.lease_seconds,
                                            exclude=[e.name for e in self._endpoints()]
                                            ).items():
            self._fail(items, f"destination {name!r} is no longer configured",
                       permanent=False, at_max_backoff=True)

    def _send(self, dest: Endpoint, items: list[DueDelivery],
              claimed_at: float | None = None) -> None:
        """C-STORE ``items`` to ``dest`` on one association, each outcome recorded
        (STOW-RS for a destination with a ``url``: ``_send_stow``; a notification:
        ``_send_notifications``). ``claimed_at`` (``time.monotonic``): when their leases
        began, so that the first renewal counts the association's set-up too."""
        if isinstance(dest, NotificationConfig):
            self._send_notifications(dest, items, claimed_at)
            return
        if dest.is_stow:
            self._send_stow(dest, items, claimed_at)
            return
        timeout = self.config.sender.dimse_timeout_seconds
        ae = AE(ae_title=self.config.sender.calling_ae)
        ae.connection_timeout = CONNECT_TIMEOUT_SECONDS
        ae.acse_timeout = min(ACSE_TIMEOUT_SECONDS, timeout)
        ae.dimse_timeout = timeout
        ae.network_timeout = max(NETWORK_TIMEOUT_SECONDS, timeout)
        for sop_class in RESULT_SOP_CLASSES:
            ae.add_requested_context(sop_class, SEND_TRANSFER_SYNTAXES)
        ae.add_requested_context(SECONDARY_CAPTURE, [SEND_COMPRESSED_SC_SYNTAX])
        aborts: list[Any] = []  # A-ABORT / A-P-ABORT primitives received

        def on_acse_recv(event: Any) -> None:
            if isinstance(event.primitive, (A_ABORT, A_P_ABORT)):
                aborts.append(event.primitive)

        kwargs: dict[str, Any] = {"ae_title": dest.ae_title,
                                  "max_pdu": self.config.node.max_pdu,
                                  "evt_handlers": [(evt.EVT_ACSE_RECV, on_acse_recv)]}
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
        lost = "association lost"
        renewed = time.monotonic() if claimed_at is None else claimed_at
        try:
            i = 0
            while i < len(items):
                item = items[i]
                if self._stop.is_set() or not assoc.is_established:
                    if not assoc.is_established:
                        self._fail(items[i:], f"not sent: {lost}")
                    else:  # stopping: what was not attempted is due again for any node
                        release_leases(self.db, items[i:])
                    return
                if time.monotonic() - renewed > self.lease_seconds / 2:
                    items[i:] = renew_leases(self.db, items[i:], self.lease_seconds)
                    renewed = time.monotonic()
                    if i >= len(items):
                        return
                    item = items[i]
                i += 1
                try:
                    path, temporary = self._file_of(item)
                except Exception as exc:  # StoreUnavailable: backed off like any failure
                    self._fail([item], f"cannot read the result: {type(exc).__name__}: {exc}")
                    continue
                try:
                    lost = self._send_one(assoc, accepted, item, path, timeout, aborts, lost)
                finally:
                    if temporary:
                        path.unlink(missing_ok=True)
        finally:
            if assoc.is_established:
                assoc.release()

    # -- STOW-RS -------------------------------------------------------------------------
    def _credentials(self, dest: DestinationConfig | NotificationConfig,
                     items: Sequence[DueDelivery], action: str, what: str
                     ) -> stow.Credentials | None:
        """``dest``'s secrets, read afresh for each pass (``stow.credentials``); None when
        they cannot be read: logged as ``action=<action>-credentials-unavailable`` and
        ``items`` failed PERMANENT at the maximum backoff, so that a mended secret
        delivers them."""
        try:
            return stow.credentials(dest)
        except stow.SecretUnavailable as exc:
            log.error("action=%s-credentials-unavailable %s=%s error=%s", action, what,
                      dest.name, exc)
            self._fail(items, f"PERMANENT: {exc}", at_max_backoff=True)
            return None

    def _send_stow(self, dest: DestinationConfig, items: list[DueDelivery],
                   claimed_at: float | None = None) -> None:
        """STOW-RS ``items`` to ``dest`` (``cxrd.stow``): one request per study (its due
        results, oldest first, up to ``stow.MAX_REQUEST_BYTES``), each instance's outcome
        recorded from the answer. A request that got no answer, or 429 or 5xx, fails its
        instances and those not yet sent (the destination is down or busy: no request
        each); instances of a
        request refused as a whole are sent again one per request. Leases are renewed
        before a request once half has gone, as for C-STORE."""
        timeout = self.config.sender.dimse_timeout_seconds
        creds = self._credentials(dest, items, "stow", "destination")
        if creds is None:
            return
        client = stow.StowClient(dest, creds, connect_timeout=CONNECT_TIMEOUT_SECONDS,
                                 read_timeout=timeout)
        renewed = time.monotonic() if claimed_at is None else claimed_at
        queue = list(items)
        alone: list[DueDelivery] = []  # refused within a request of several: one by one
        try:
            while queue or alone:
                if self._stop.is_set():  # what was not attempted is due again for any node
                    release_leases(self.db, alone + queue)
                    return
                if time.monotonic() - renewed > self.lease_seconds / 2:
                    kept = {d.delivery_id for d in renew_leases(self.db, alone + queue,
                                                                self.lease_seconds)}
                    alone = [d for d in alone if d.delivery_id in kept]
                    queue = [d for d in queue if d.delivery_id in kept]
                    renewed = time.monotonic()
                    continue
                if alone:
                    batch, datasets, _ = self._stow_batch(alone[:1])
                    alone = alone[1:]
                else:
                    batch, datasets, taken = self._stow_batch(queue)
                    queue = [d for d in queue if d.delivery_id not in taken]
                if not batch:
                    continue
                t0 = time.perf_counter()
                try:
                    response = client.store(datasets)
                except Exception as exc:  # no answer: connection, timeout, TLS
                    reason = stow.no_response_error(exc, timeout)
                    self._fail(batch, reason)
                    if alone or queue:
                        self._fail(alone + queue, f"not sent: an earlier STOW-RS request "
                                   f"got no answer ({reason})")
                    return
                elapsed = time.perf_counter() - t0
                observe_stages({"send": elapsed})
                log.info("action=stow-rs destination=%s study_instance_uid=%s instances=%d "
                         "http_status=%d elapsed_s=%.3f", dest.name,
                         batch[0].study_instance_uid, len(batch), response.status_code,
                         elapsed)
                stow.refusal_logged(dest, response)
                outcomes = stow.verdicts(response, [d.sop_instance_uid for d in batch])
                for item in batch:
                    verdict = outcomes[item.sop_instance_uid]
                    if verdict.delivered:
                        mark_delivered(self.db, item, warning=verdict.warning)
                    elif verdict.split:
                        alone.append(item)
                    else:
                        self._fail([item], verdict.error, permanent=verdict.permanent,
                                   at_max_backoff=verdict.at_max_backoff)
                if stow.busy(response) and (alone or queue):
                    self._fail(alone + queue, "not sent: an earlier STOW-RS request was "
                               f"answered HTTP {response.status_code}")
                    return
        finally:
            client.close()

    # -- notifications -----------------------------------------------------------------
    def _send_notifications(self, dest: NotificationConfig, items: list[DueDelivery],
                            claimed_at: float | None = None) -> None:
        """Notify ``dest`` of each of ``items`` (SRs with an urgent finding), one message
        at a time (``cxrd.notify``), each outcome recorded. An endpoint that does not
        answer, or is busy (429, 5xx), fails the rest of the pass as well: they wait for
        their next attempt. Leases are renewed before a message once half has gone."""
        lease = self.lease_of(dest)
        client: notify.WebhookClient | notify.MllpClient
        if dest.kind is NotificationKind.WEBHOOK:
            creds = self._credentials(dest, items, "notify", "notification")
            if creds is None:
                return
            client = notify.WebhookClient(dest, creds)
        else:
            client = notify.MllpClient(dest)
        renewed = time.monotonic() if claimed_at is None else claimed_at
        queue = list(items)
        try:
            while queue:
                if self._stop.is_set():  # what was not attempted is due again for any node
                    release_leases(self.db, queue)
                    return
                if time.monotonic() - renewed > lease / 2:
                    queue = renew_leases(self.db, queue, lease)
                    renewed = time.monotonic()
                    continue
                item = queue.pop(0)
                try:
                    data = self._bytes_of(item)
                except Exception as exc:  # StoreUnavailable: backed off like any failure
                    self._fail([item], f"cannot read the result: {type(exc).__name__}: {exc}")
                    continue
                try:
                    notice = notify.read_notice(item, data)
                except Exception as exc:  # not a notified SR, or an SR that does not parse
                    self._fail([item], f"cannot notify: {type(exc).__name__}: {exc}",
                               permanent=True)
                    continue
                t0 = time.perf_counter()
                if isinstance(client, notify.WebhookClient):
                    outcome = client.send(notice)
                else:
                    outcome = client.send(notify.hl7_message(notice, dest), notice.control_id)
                elapsed = time.perf_counter() - t0
                observe_stages({"send": elapsed})
                log.info("action=notify notification=%s kind=%s study_instance_uid=%s "
                         "sr_sop_instance_uid=%s finding=%s answer=%s elapsed_s=%.3f",
                         dest.name, dest.kind.value, notice.study_instance_uid,
                         notice.sr_sop_instance_uid, notice.finding, outcome.answer.replace(
                             " ", "-"), elapsed)
                if outcome.delivered:
                    mark_delivered(self.db, item)
                    continue
                self._fail([item], outcome.error, permanent=outcome.permanent,
                           at_max_backoff=outcome.at_max_backoff)
                if outcome.hold and queue:
                    self._fail(queue, f"not sent: an earlier notification failed "
                               f"({outcome.error})")
                    return
        finally:
            client.close()

    def _stow_batch(self, queue: Sequence[DueDelivery]
                    ) -> tuple[list[DueDelivery], list[Any], set[int]]:
        """The next STOW-RS request: the first item's study's items in ``queue``, in order,
        read from the store, up to ``stow.MAX_REQUEST_BYTES`` (always one), with their data
        sets; an item whose result cannot be read is failed (backed off, as for C-STORE)
        and left out. Also the delivery ids taken from ``queue`` (sent or failed)."""
        batch: list[DueDelivery] = []
        datasets: list[Any] = []
        taken: set[int] = set()
        size = 0
        study = None
        for item in queue:
            if study is not None and item.study_instance_uid != study:
                continue
            try:
                data = self._bytes_of(item)
            except Exception as exc:  # StoreUnavailable: backed off like any failure
                self._fail([item], f"cannot read the result: {type(exc).__name__}: {exc}")
                taken.add(item.delivery_id)
                continue
            if batch and size + len(data) > stow.MAX_REQUEST_BYTES:
                break
            taken.add(item.delivery_id)
            try:
                dataset = stow.read_dataset(data)
            except Exception as exc:
                self._fail([item], f"cannot read the result file: {type(exc).__name__}: "
                                   f"{exc}")
                continue
            study = item.study_instance_uid
            batch.append(item)
            datasets.append(dataset)
            size += len(data)
        return batch, datasets, taken

    def _bytes_of(self, item: DueDelivery) -> bytes:
        """The result's bytes, from the store (a local file, or an S3 object)."""
        local = self.objects.local_path(item.path)
        return local.read_bytes() if local is not None else self.objects.get(item.path)

    def _file_of(self, item: DueDelivery) -> tuple[Path, bool]:
        """The result's file: the store's own (a local store), or the object fetched into
        a temp file, removed after the send (True). pynetdicom sends a file's data set as
        it is, never decoding and encoding it again."""
        local = self.objects.local_path(item.path)
        if local is not None:
            return local, False
        data = self.objects.get(item.path)
        fd, name = tempfile.mkstemp(prefix=".cxrd-send-", suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except BaseException:
            os.unlink(name)
            raise
        return Path(name), True

    def _send_one(self, assoc: Association, accepted: set[tuple[str, str]], item: DueDelivery,
                  path: Path, timeout: float, aborts: list[Any], lost: str) -> str:
        """C-STORE one result from ``path`` and record its outcome; returns what to say of
        the objects left when the association ended on this one (``lost``)."""
        try:
            sop_class, syntax = syntaxes_of(str(path))
        except Exception as exc:
            self._fail([item], f"cannot read the result file: {type(exc).__name__}: "
                               f"{exc}")
            return lost
        if not any(a == sop_class for a, _ in accepted):
            self._fail([item], "PERMANENT: no presentation context accepted for SOP "
                       f"class {sop_class}; check the destination's SOP classes for "
                       "this node", at_max_backoff=True)
            return lost
        uncompressed = syntax in SEND_TRANSFER_SYNTAXES
        if not uncompressed and (sop_class, syntax) not in accepted:
            self._fail([item], "PERMANENT: the destination does not accept SOP class "
                       f"{sop_class} in transfer syntax {syntax}; accept JPEG "
                       "Baseline there, or set [results] heatmap_compression = "
                       '"none"', at_max_backoff=True)
            return lost
        t0 = time.perf_counter()
        try:
            status = assoc.send_c_store(str(path))
        except Exception as exc:
            self._fail([item], f"send failed: {type(exc).__name__}: {exc}")
            return lost
        elapsed = time.perf_counter() - t0
        observe_stages({"send": elapsed})
        code = int(getattr(status, "Status", NO_RESPONSE)) if status else NO_RESPONSE
        if code == STATUS_STORED[0]:
            mark_delivered(self.db, item)
        elif code in STATUS_STORED or stored_with_warning(code):
            mark_delivered(self.db, item, warning=warning_text(code, status))
        elif code == NO_RESPONSE:
            wait_for_end(assoc)
            reason = no_response_error(elapsed, timeout, aborts)
            lost = f"the association ended on an earlier object ({reason})"
            self._fail([item], reason)
        elif code in STATUS_OUT_OF_RESOURCES_RANGE:
            self._fail([item], f"destination out of resources (0x{code:04X})")
        else:
            comment = getattr(status, "ErrorComment", "")
            self._fail([item], f"refused by destination: status 0x{code:04X} "
                               f"{comment}".strip(), permanent=True)
        return lost

    # -- threads -----------------------------------------------------------------------
    def start(self) -> None:
        """The supervisor thread (``cxrd-send``), which starts a thread for each destination
        (``cxrd-send-NAME``) and waits out deliveries to destinations no longer
        configured."""
        if not self.destinations and not self.notifications:
            return
        self._thread = threading.Thread(target=self._supervise, name="cxrd-send",
                                        daemon=True)
        self._thread.start()
        log.info("action=send-start destinations=%s notifications=%s",
                 ",".join(self.destinations), ",".join(self.notifications))

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                for name in [e.name for e in self._endpoints()]:
                    thread = self._threads.get(name)
                    if thread is None or not thread.is_alive():
                        thread = threading.Thread(target=self._run, args=(name,),
                                                  name=f"cxrd-send-{name}", daemon=True)
                        self._threads[name] = thread
                        thread.start()
                self._fail_unconfigured()
            except Exception as exc:
                if unavailable(exc):  # the destinations' threads say so; wait for it
                    log.debug("action=send-error reason=database-unavailable")
                else:
                    log.exception("action=send-error")
            self._stop.wait(POLL_SECONDS)

    def _run(self, name: str) -> None:
        """One destination's loop: a pass whenever something is due; ends when the
        destination is no longer configured."""
        while not self._stop.is_set():
            dest = self._endpoint(name)
            if dest is None:
                return
            try:
                sent = self.run_destination_once(dest)
            except Exception as exc:
                if unavailable(exc):  # deliveries stay pending; the next pass tries again
                    log.warning("action=send-error destination=%s reason=database-unavailable "
                                "error_type=%s", name, type(exc).__name__)
                else:
                    log.exception("action=send-error destination=%s", name)
                sent = 0
            if not sent:
                self._stop.wait(POLL_SECONDS)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the objects in flight, release the associations; the rest stays queued.
        A destination still busy after ``timeout`` (all threads together) is left to its
        daemon thread: what it has not recorded stays pending and is sent again at the next
        start."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in [t for t in (self._thread, *self._threads.values()) if t is not None]:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("action=send-stop-timeout thread=%s timeout_s=%g", thread.name,
                            timeout)


def wait_for_end(assoc: Association) -> None:
    """A C-STORE that got no response ended with an abort (the peer's, or ours at the DIMSE
    timeout): give pynetdicom's reactor a moment to take note of it, so the abort primitive
    is recorded and the association no longer counts as established."""
    deadline = time.monotonic() + ABORT_NOTICE_SECONDS
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.01)
