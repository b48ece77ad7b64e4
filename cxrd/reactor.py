"""Event-driven reactors for pynetdicom's acceptor associations.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms
whenever it found nothing to do, and the association thread sleeps 1 ms before every
check for a received message. Each instance therefore waits for up to three of those
sleeps (request seen, request served, response sent), and every idle association wakes
its two threads 1,000 times a second each; on a small, busy machine that polling took
about 15% of a core for four idle associations and competed for the interpreter lock
with the threads doing the work.

It also reads the socket with one ``recv_into`` per PDU instead of one ``recv`` per 4096
bytes.

``make_event_driven`` (called from an ``EVT_CONN_OPEN`` handler, after pynetdicom has
built the association and before its threads start) replaces both loops with copies that
block instead: the DUL thread in ``select`` on its socket and a wake-up pipe (written when
a primitive is queued for it to send), the association thread on an event set whenever a
message, a release or an abort is queued for it. Both still wake every
``WAKE_SECONDS`` to check their timers, so nothing waits longer than pynetdicom's own
checks would, give or take that interval.

The loops are copies of pynetdicom 3.0's ``DULServiceProvider.run_reactor`` and
``Association._run_reactor`` with only the sleeps replaced, and they use pynetdicom's
private attributes: other versions keep pynetdicom's own loops (``SUPPORTED``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import threading
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ

log = logging.getLogger(__name__)

#: The pynetdicom versions whose loops are copied here.
SUPPORTED = pynetdicom.__version__.startswith("3.0.")
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


def make_event_driven(assoc: Any) -> bool:
    """Switch an acceptor association, not yet started, to the blocking loops; False
    (nothing changed) when pynetdicom is not a supported version."""
    if not SUPPORTED or assoc.dul.is_alive():
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

    if dul.socket is not None:
        dul.socket.recv = lambda nr_bytes: _recv(dul.socket, nr_bytes)
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
