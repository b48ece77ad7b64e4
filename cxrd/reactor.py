"""Event-driven reactors for pynetdicom's acceptor associations.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms
whenever it found nothing to do, and the association thread sleeps 1 ms before every
check for a received message. Each instance therefore waits for up to three of those
sleeps (request seen, request served, response sent), and every idle association wakes
its two threads 1,000 times a second each; on a small, busy machine that polling took
about 15% of a core for four idle associations and competed for the interpreter lock
with the threads doing the work.

It also reads the socket with one ``recv_into`` per PDU instead of one ``recv`` per 4096
bytes; decodes a P-DATA-TF PDU into views of the bytes received (``_decode_p_data``)
where pynetdicom copies them four times; and keeps a message's data set fragments as they
come (``_Fragments``), where pynetdicom writes each to a growing ``BytesIO``, for the
receiver to join once behind the Part 10 header (``data_set_fragments``). A 10 MB image is
then copied once in this process instead of seven times and more, under the interpreter
lock that the associations share, and each copy into memory the process had not used
before cost it page faults.

``make_event_driven`` (called from an ``EVT_CONN_OPEN`` handler, after pynetdicom has
built the association and before its threads start) replaces both loops with copies that
block instead: the DUL thread in ``select`` on its socket and a wake-up pipe (written when
a primitive is queued for it to send), the association thread on an event set whenever a
message, a release or an abort is queued for it. Both still wake every
``WAKE_SECONDS`` to check their timers, so nothing waits longer than pynetdicom's own
checks would, give or take that interval.

The loops are copies of pynetdicom 3.0's ``DULServiceProvider.run_reactor`` and
``Association._run_reactor`` with only the sleeps replaced (the same in 3.0.0 to 3.0.4),
and they use pynetdicom's private attributes. So ``enabled()``, called once before the
receiver listens, keeps pynetdicom's own loops, logging why, when:

* ``CXRD_REACTOR=0`` is set (``SWITCH``): an operator's way out, and the CI's second run
  of the receive tests;
* pynetdicom is not one of ``TESTED_VERSIONS`` (pyproject.toml pins the same range);
* any name in ``PYNETDICOM_NAMES`` is missing from pynetdicom's real classes, checked on
  a throwaway acceptor association (a WARNING ``action=reactor-fallback`` names them).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import select
import ssl
import struct
import threading
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem

log = logging.getLogger(__name__)

#: The pynetdicom versions whose loops are copied here and that the receive tests ran
#: with; pyproject.toml allows exactly these.
TESTED_VERSIONS = ("3.0.0", "3.0.1", "3.0.2", "3.0.3", "3.0.4")
#: ``CXRD_REACTOR=0`` (or off, false, no) keeps pynetdicom's own loops.
SWITCH = "CXRD_REACTOR"
_OFF = ("0", "off", "false", "no")
#: Every attribute of pynetdicom's objects that ``make_event_driven`` and the loops below
#: read, call or replace, by the class that has it (on the instance: some are set in
#: ``__init__``).
PYNETDICOM_NAMES: dict[str, tuple[str, ...]] = {
    "Association": (
        "_dul_ready", "_is_paused", "_kill", "_reactor_checkpoint", "_run_reactor",
        "_serve_request", "abort", "acse", "dimse", "dul", "is_aborted", "is_established",
        "is_released", "kill", "network_timeout_response", "release"),
    "DULServiceProvider": (
        "_decode_pdu", "_idle_timer", "_is_transport_event", "_kill_thread",
        "_process_recv_primitive", "artim_timer", "assoc", "event_queue",
        "idle_timer_expired", "is_alive",
        "receive_pdu", "run", "socket", "state_machine", "stop_dul", "to_provider_queue",
        "to_user_queue"),
    "StateMachine": ("current_state", "do_action"),
    "DIMSEServiceProvider": ("get_msg", "message", "msg_queue", "receive_primitive"),
    "DIMSEMessage": ("data_set",),
    "P_DATA_TF": ("presentation_data_value_items",),
    "PresentationDataValueItem": ("presentation_context_id", "presentation_data_value"),
    "ACSE": ("is_aborted", "is_release_requested", "send_release"),
    "AssociationSocket": ("recv", "socket"),
}
#: Longest block: how late a timer (ARTIM, network timeout) or a kill may be noticed.
WAKE_SECONDS = 0.05


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake()`` after every ``put``."""

    def __init__(self, wake: Any) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _Fragments(io.BytesIO):
    """A message's data set as pynetdicom receives it: it writes each P-DATA fragment
    (about ``max_pdu`` bytes) to the message's ``BytesIO``, which grows an eighth at a
    time and is copied as it grows. Here the fragments are kept as they come (views of the
    PDUs received, ``_decode_p_data``), and the receiver takes them as they are
    (``data_set_fragments``) to join them once, behind the Part 10 header. Anything else
    that reads the data set (any attribute but ``write``) gets them joined first."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[Any] | None = []

    def __getattribute__(self, name: str) -> Any:
        if name not in _FRAGMENTS_OWN:
            object.__getattribute__(self, "_join")()
        return super().__getattribute__(name)

    def write(self, data: Any) -> int:
        if self._parts is None:
            return super().write(data)
        self._parts.append(data)
        return len(data)

    def _join(self) -> None:
        if self._parts is not None:
            parts, self._parts = self._parts, None
            super().__init__(b"".join(parts))  # the BytesIO shares these bytes


_FRAGMENTS_OWN = frozenset({"write", "_parts", "_join"})


def data_set_fragments(data_set: io.BytesIO) -> list[Any]:
    """The bytes of a received data set, as the fragments they came in where the reactor
    kept them (not copied), else in one piece."""
    if isinstance(data_set, _Fragments):
        parts = object.__getattribute__(data_set, "_parts")
        if parts is not None:
            return list(parts)
    return [data_set.getvalue()]


def _message() -> DIMSEMessage:
    """A DIMSE message to decode into, its data set kept as ``_Fragments``."""
    message = DIMSEMessage()
    message.data_set = _Fragments()
    return message


#: The PDU type of P-DATA-TF (PS3.8 9.3.5), and its PDV items' length field.
_P_DATA_TF = 0x04
_ITEM_LENGTH = struct.Struct(">L")


def _decode_p_data(dul: Any, bytestream: bytearray, decode_pdu: Any) -> tuple[Any, str]:
    """``DULServiceProvider._decode_pdu`` for a P-DATA-TF PDU (any other goes to
    pynetdicom's, ``decode_pdu``): its presentation data values are views of
    ``bytestream`` (the PDU as received, which nothing else holds), where pynetdicom
    copies the PDU into bytes, slices off its header, then each value, and then the
    value's first byte (``DIMSEMessage.decode_msg``). The same PDU object and events
    (``EVT_DATA_RECV`` gets bytes, copied only when a handler is bound); a malformed one
    raises, which pynetdicom turns into Evt19."""
    if bytestream[0] != _P_DATA_TF:
        return decode_pdu(bytestream)
    assoc = dul.assoc
    if assoc.get_handlers(evt.EVT_DATA_RECV):
        evt.trigger(assoc, evt.EVT_DATA_RECV, {"data": bytes(bytestream)})
    view = memoryview(bytestream)
    items = []
    offset, end = 6, len(bytestream)
    while offset < end:
        if end - offset < 5:
            raise ValueError("P-DATA-TF PDU ends inside a PDV item header")
        (length,) = _ITEM_LENGTH.unpack_from(bytestream, offset)
        if length < 2 or offset + 4 + length > end:  # a context ID and a control header
            raise ValueError(f"P-DATA-TF PDV item length {length} does not fit the PDU")
        item = PresentationDataValueItem()
        item.presentation_context_id = bytestream[offset + 4]
        item.presentation_data_value = view[offset + 5:offset + 4 + length]  # type: ignore[assignment]
        items.append(item)
        offset += 4 + length
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = items
    evt.trigger(assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
    return pdu, "Evt10"


class _Pipe:
    """A non-blocking self-pipe: ``set`` from any thread wakes a ``select`` on ``fd``."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._closed = False
        # set() may come from any thread, close() from the DUL thread: without the lock a
        # write could reach a closed descriptor number that a new file has been given.
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(OSError):  # full: it will wake anyway
                os.write(self._w, b"\0")

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.fd, self._w):
                with contextlib.suppress(OSError):
                    os.close(fd)


def missing_names() -> list[str]:
    """``Class.name`` for each name of ``PYNETDICOM_NAMES`` that pynetdicom's objects lack,
    looked up on a throwaway acceptor association (never started) and its parts."""
    import socket

    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.transport import AssociationSocket

    assoc = Association(AE(), mode="acceptor")
    left, right = socket.socketpair()
    try:
        objects: dict[str, Any] = {
            "Association": assoc, "DULServiceProvider": assoc.dul,
            "StateMachine": getattr(assoc.dul, "state_machine", None),
            "DIMSEServiceProvider": assoc.dimse, "DIMSEMessage": DIMSEMessage(),
            "P_DATA_TF": P_DATA_TF(), "PresentationDataValueItem": PresentationDataValueItem(),
            "ACSE": assoc.acse,
            "AssociationSocket": AssociationSocket(assoc, client_socket=left)}
    finally:
        left.close()
        right.close()
    return [f"{cls}.{name}" for cls, names in PYNETDICOM_NAMES.items()
            for name in names if not hasattr(objects[cls], name)]


_choice: bool | None = None
_choice_lock = threading.Lock()


def enabled() -> bool:
    """Whether ``make_event_driven`` switches associations to the blocking loops: decided
    (and a fallback logged) once per process, by the receiver before it listens."""
    global _choice
    with _choice_lock:
        if _choice is None:
            _choice = _decide()
        return _choice


def _decide() -> bool:
    switch = os.environ.get(SWITCH, "").strip()
    if switch.lower() in _OFF:
        log.info("action=reactor-off reason=%s", f"{SWITCH}={switch}: pynetdicom's own loops")
        return False
    version = pynetdicom.__version__
    if version not in TESTED_VERSIONS:
        log.warning("action=reactor-fallback reason=%s pynetdicom=%s tested=%s",
                    "pynetdicom version not tested: its own loops are used", version,
                    ",".join(TESTED_VERSIONS))
        return False
    try:
        missing = missing_names()
    except Exception as exc:  # pynetdicom's objects are not built as they were
        missing = [f"{type(exc).__name__}: {exc}"]
    if missing:
        log.warning("action=reactor-fallback reason=%s pynetdicom=%s missing=%s",
                    "pynetdicom lacks names the reactor uses: its own loops are used",
                    version, ",".join(missing))
        return False
    return True


def make_event_driven(assoc: Any) -> bool:
    """Switch an acceptor association, not yet started, to the blocking loops; False
    (nothing changed) when they are not ``enabled()``."""
    if not enabled() or assoc.dul.is_alive():
        return False
    dul = assoc.dul
    pipe = _Pipe()
    assoc_wake = threading.Event()
    # empty until the threads start: safe to replace
    dul.to_provider_queue = _WakingQueue(pipe.set)
    dul.to_user_queue = _WakingQueue(assoc_wake.set)
    assoc.dimse.msg_queue = _WakingQueue(assoc_wake.set)

    original_stop_dul = dul.stop_dul

    def stop_dul() -> bool:
        # pynetdicom sets the kill flag and then polls until the thread has gone: set it
        # first and wake the thread, so that it notices at once.
        if dul.state_machine.current_state == "Sta1":
            dul._kill_thread = True
            pipe.set()
        return bool(original_stop_dul())

    original_kill = assoc.kill

    def kill() -> None:
        assoc_wake.set()
        original_kill()

    def run_dul() -> None:
        try:
            _dul_reactor(dul, pipe)
        finally:
            assoc_wake.set()  # the association thread checks dul.is_alive()
            pipe.close()

    dimse = assoc.dimse
    original_receive_primitive = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        if dimse.message is None:  # the first P-DATA of a message
            dimse.message = _message()
        original_receive_primitive(primitive)

    if dul.socket is not None:
        dul.socket.recv = lambda nr_bytes: _recv(dul.socket, nr_bytes)
    decode_pdu = dul._decode_pdu
    dul._decode_pdu = lambda bytestream: _decode_p_data(dul, bytestream, decode_pdu)
    dimse.receive_primitive = receive_primitive
    dul.stop_dul = stop_dul
    dul.run = run_dul  # Thread.run: the thread's target was bound at construction
    assoc.kill = kill
    assoc._run_reactor = lambda: _association_reactor(assoc, assoc_wake)
    return True


def _recv(assoc_socket: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` reading into one buffer as much as the kernel holds,
    where pynetdicom reads 4096 bytes a call (2,500 Python-level reads per 10 MB image).
    The same contract: blocks until ``nr_bytes`` have come, returns what came before the
    peer closed, raises what the socket raises (its timeout included)."""
    sock = assoc_socket.socket
    buffer = bytearray(nr_bytes)
    nr_read = 0
    with memoryview(buffer) as view:
        while nr_read < nr_bytes:
            n = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not n:
                break
            nr_read += n
    if nr_read < nr_bytes:
        del buffer[nr_read:]
    return buffer


def _wait_for_transport(dul: Any, pipe: _Pipe) -> None:
    """Block until the peer sends, a primitive is queued, or WAKE_SECONDS pass."""
    sock = getattr(dul.socket, "socket", None) if dul.socket is not None else None
    fds: list[Any] = [pipe.fd]
    if sock is not None:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select would not see them
        fds.append(sock)
    with contextlib.suppress(OSError, ValueError):  # closed meanwhile: the loop sees it
        select.select(fds, [], [], WAKE_SECONDS)
    pipe.drain()


def _dul_reactor(self: Any, pipe: _Pipe) -> None:
    """pynetdicom 3.0's ``DULServiceProvider.run_reactor``, the sleep replaced."""
    self._idle_timer.start()
    sleep = False

    while True:
        # Let the assoc reactor off the leash
        if not self.assoc._dul_ready.is_set():
            self.assoc._dul_ready.set()
            sleep = True

        if sleep:
            _wait_for_transport(self, pipe)

        if self._kill_thread:
            break

        # Check the ARTIM timer first so its event is placed on the queue
        #   ahead of any other events this loop
        if self.artim_timer.expired:
            self.event_queue.put("Evt18")

        # Check the connection for incoming data
        try:
            # We can either encode and send a primitive **OR**
            #   receive and decode a PDU per loop of the reactor
            if self._process_recv_primitive():  # encode (sent by state machine)
                pass
            elif self._is_transport_event():  # receive and decode PDU
                self._idle_timer.restart()
        except Exception as exc:
            log.error("Exception in DUL.run(), aborting association")
            log.exception(exc)
            # Bypass the state machine and send an A-ABORT (as pynetdicom does)
            abort_pdu = A_ABORT_RQ()
            abort_pdu.source = 0x02
            abort_pdu.reason_diagnostic = 0x00
            self.socket.send(abort_pdu.encode())
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            # Hard shutdown of the Association and DUL reactors
            self.assoc._kill = True
            self._kill_thread = True
            return

        # Check the event queue to see if there is anything to do
        try:
            event = self.event_queue.get(block=False)
        # If the queue is empty, return to the start of the loop
        except queue.Empty:
            sleep = True
            continue

        self.state_machine.do_action(event)
        sleep = False


def _association_reactor(self: Any, wake: threading.Event) -> None:
    """pynetdicom 3.0's ``Association._run_reactor``, the sleep replaced."""
    self._is_paused = False
    while not self._kill:
        # Sleep only when nothing is queued for this thread: one message is served per
        # round, and a second one queued meanwhile has already used up its wake-up.
        if not (self.dimse.msg_queue.qsize() or self.dul.to_user_queue.qsize()):
            wake.wait(WAKE_SECONDS)
        wake.clear()  # before the checks: anything queued after them wakes the next wait

        # A race condition may occur if the Acceptor uses the send_*()
        #   methods as the received DIMSE message may be taken off the
        #   queue before the send_*() method gets to it, so we allow
        #   the reactor to be paused
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        # Check with the DIMSE provider to see if a completely decoded
        #   message is available
        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)

        # Check for release request from the peer
        if self.is_established and self.acse.is_release_requested():
            # Send A-RELEASE response
            self.acse.send_release(is_response=True)
            log.debug("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        # Check for abort from either locally or the peer
        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            log.debug(log_msg)
            # Ensure that EVT_ASCE_RECV fires for subscribers
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        # Check if the DULServiceProvider thread is still running
        if not self.dul.is_alive():
            self.kill()
            return

        # Check if network_timeout has expired
        if self.dul.idle_timer_expired():
            log.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()

            self.kill()
            return
