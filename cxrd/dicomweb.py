"""The STOW-RS receiver (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}`` at
the root of ``[dicomweb] listen``, with a bearer token.

A third door into the same ingest as the C-STORE receiver and the watched folders: each
instance of a request goes through ``cxrd.ingest.Ingestor.store`` (validation, the spool
and the row committed before the answer, the same refusals and rejection rows), and the
answer names each one, as PS3.18 asks, in an ``application/dicom+json`` data set: the
``ReferencedSOPSequence`` of those stored (a duplicate of an instance stored before
included) and the ``FailedSOPSequence`` of the others with their ``FailureReason``
(``cxrd.dicom.stow_failure_reason``: the C-STORE status of the same refusal, except
0x0122 for a SOP class cxrd does not store and 0xA900 for an instance of another study
than the one in the URL). No ``RetrieveURL``: cxrd serves no WADO-RS.

The HTTP status says what happened to the request as a whole: 200 every instance stored;
202 some failed; 409 none stored; 503 with ``Retry-After`` when none was stored for want
of resources (free space below ``[storage] min_free_mb``, the database or the store away:
what C-STORE answers 0xA700), a 202 carrying such a failure has ``Retry-After`` too. Before
anything is read: 401 with ``WWW-Authenticate: Bearer`` without the token (compared in
constant time; nothing is read, stored or recorded), 415 for a body that is not
``multipart/related; type="application/dicom"``, 406 for an ``Accept`` that rules out
DICOM JSON, 413 for a body larger than ``[dicomweb] max_request_mb``, 503 below
``min_free_mb``; then 400 for a body that is not a whole multipart message.

The body is parsed as it arrives (python-multipart's streaming parser), each part kept in
memory up to ``PART_IN_MEMORY`` bytes and in an unnamed temporary file in ``[storage]
data_dir`` beyond, so a request holds about one instance in memory at a time. A part
whose ``Content-Type`` is not ``application/dicom`` is refused as not DICOM.

It runs on its own thread of ``cxrd serve``'s main process (uvicorn's event loop; the
ingest of each request on a thread of its pool), beside the C-STORE receiver, so that an
instance stored here wakes the scheduler as one received by C-STORE does. The socket is
bound before the thread starts (a port in use stops the node at start-up); ``drain``
stops accepting, lets the requests in flight finish (bounded), and ends the thread. With
``[node.tls]`` it speaks HTTPS with the node's certificate and key, and checks client
certificates as the DICOM receiver does (``cxrd.receive.server_ssl_context``).
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydicom.dataset import Dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cxrd.config import Config, parse_listen
from cxrd.dicom import FAILURE_PROCESSING, STATUS_OUT_OF_RESOURCES_RANGE, stow_failure_reason
from cxrd.domain import RejectReason
from cxrd.errors import CxrdError
from cxrd.ingest import Ingestor, StoreOutcome
from cxrd.metrics import metrics
from cxrd.statuspage import accepts
from cxrd.uids import is_valid_uid

log = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
#: Media ranges of an ``Accept`` header that DICOM JSON satisfies.
_JSON_RANGES = (DICOM_JSON, "application/json", "application/*", "*/*")
#: A part's bytes stay in memory up to this size, then go to a temporary file.
PART_IN_MEMORY = 16 * 1024 * 1024
#: What ``Retry-After`` asks of a client refused for want of resources.
RETRY_AFTER_SECONDS = 60
#: The server's thread gets this long to start serving the bound socket.
START_SECONDS = 30.0
#: A drain waits this long for the requests in flight.
DRAIN_SECONDS = 30.0
#: At most this many connections at once; more are answered 503 by uvicorn.
MAX_CONNECTIONS = 64
ROUTE_STUDIES = "/studies"
ROUTE_STUDY = "/studies/{study}"


class TokenUnavailable(CxrdError):
    """The bearer token cannot be read: the file is missing, unreadable or empty."""


def read_token(path: Path) -> str:
    """The token ``[dicomweb] token_file`` holds (its trailing newline ignored); raises
    TokenUnavailable naming the file and why, never the token."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise TokenUnavailable(f"[dicomweb] token_file {path} cannot be read: {why}") from exc
    token = text.rstrip("\r\n")
    if not token:
        raise TokenUnavailable(f"[dicomweb] token_file {path} is empty")
    if not token.isprintable() or any(c.isspace() for c in token):
        raise TokenUnavailable(f"[dicomweb] token_file {path}: the token contains white "
                               "space or control characters")
    return token


class BearerToken:
    """The token callers must present, read from its file again when the file changes (a
    rotated token needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._token = ""

    def current(self) -> str:
        """The token now; raises TokenUnavailable."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise TokenUnavailable(f"[dicomweb] token_file {self.path} cannot be read: "
                                   f"{exc.strerror or type(exc).__name__}") from exc
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if seen != self._seen:
                self._token = read_token(self.path)
                self._seen = seen
            return self._token

    def matches(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (``Bearer``, any case);
        compared in constant time."""
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return hmac.compare_digest(given.strip().encode(), self.current().encode())


def accepts_json(accept: str | None) -> bool:
    """Whether an ``Accept`` header allows a DICOM JSON answer (none: anything goes)."""
    return not accept or not accept.strip() or accepts(accept, _JSON_RANGES)


class BadRequest(Exception):
    """The body is not a whole multipart/related message (answered 400)."""


class TooLarge(Exception):
    """The body is larger than ``[dicomweb] max_request_mb`` (answered 413)."""


@dataclass
class _Part:
    """One body part: its media type and its bytes (in a spooled temporary file)."""

    content_type: str
    data: IO[bytes]
    size: int = 0


@dataclass
class _Collector:
    """python-multipart's callbacks: the parts of one body, as they arrive."""

    default_type: str
    spill_dir: Path
    parts: list[_Part] = field(default_factory=list)
    done: bool = False
    _field: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _headers: dict[str, str] = field(default_factory=dict)

    def callbacks(self) -> Any:  # python-multipart's MultipartCallbacks
        return {"on_part_begin": self.part_begin, "on_part_data": self.part_data,
                "on_header_field": self.header_field, "on_header_value": self.header_value,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_done,
                "on_end": self.end}

    def part_begin(self) -> None:
        self._headers = {}

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def headers_done(self) -> None:
        media = parse_options_header(self._headers.get("content-type", ""))[0]
        self.parts.append(_Part(media.decode("latin-1") or self.default_type,
                                tempfile.SpooledTemporaryFile(  # noqa: SIM115 -- close()
                                    max_size=PART_IN_MEMORY, mode="w+b",
                                    dir=str(self.spill_dir))))

    def part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.data.write(data[start:end])
        part.size += end - start

    def end(self) -> None:
        self.done = True

    def close(self) -> None:
        for part in self.parts:
            part.data.close()


@dataclass(frozen=True)
class _Answer:
    """What one request did: the outcome of each part, in order."""

    outcomes: list[StoreOutcome]

    @property
    def stored(self) -> list[StoreOutcome]:
        return [o for o in self.outcomes if o.accepted]

    @property
    def failed(self) -> list[StoreOutcome]:
        return [o for o in self.outcomes if not o.accepted]

    def failure_reason(self, outcome: StoreOutcome) -> int:
        return (stow_failure_reason(outcome.reason) if outcome.reason is not None
                else FAILURE_PROCESSING)

    def out_of_resources(self, outcome: StoreOutcome) -> bool:
        return self.failure_reason(outcome) in STATUS_OUT_OF_RESOURCES_RANGE

    @property
    def status(self) -> int:
        if not self.failed:
            return 200
        if self.stored:
            return 202
        if all(self.out_of_resources(o) for o in self.failed):
            return 503
        return 409

    @property
    def retry(self) -> bool:
        """Whether the client should send the failed ones again later."""
        return any(self.out_of_resources(o) for o in self.failed)

    def dataset(self) -> Dataset:
        """The Store Instances Response (PS3.18 10.5.3): the instances stored and those
        not, with the reason."""
        ds = Dataset()
        if self.stored:
            ds.ReferencedSOPSequence = [_reference(o) for o in self.stored]
        if self.failed:
            items = []
            for outcome in self.failed:
                item = _reference(outcome)
                item.FailureReason = self.failure_reason(outcome)
                items.append(item)
            ds.FailedSOPSequence = items
        return ds


def _reference(outcome: StoreOutcome) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    return item


def _route_label(study: str | None) -> str:
    return ROUTE_STUDY if study is not None else ROUTE_STUDIES


class StowApp:
    """The ASGI application: its two routes, with the ingest and the token they need."""

    def __init__(self, config: Config, ingestor: Ingestor) -> None:
        assert config.dicomweb.token_file is not None, "validated by cxrd.config"
        self.config = config
        self.ingestor = ingestor
        self.token = BearerToken(config.dicomweb.token_file)
        self.max_bytes = config.dicomweb.max_request_bytes
        self.spill_dir = config.storage.data_dir
        self.stored = 0
        self._lock = threading.Lock()
        self.app = Starlette(routes=[
            Route(ROUTE_STUDIES, self.post_studies, methods=["POST"]),
            Route(ROUTE_STUDY, self.post_study, methods=["POST"]),
        ])

    async def post_studies(self, request: Request) -> Response:
        return await self._post(request, None)

    async def post_study(self, request: Request) -> Response:
        return await self._post(request, str(request.path_params["study"]))

    async def _post(self, request: Request, study: str | None) -> Response:
        started = time.monotonic()
        address = request.client.host if request.client is not None else ""
        route = _route_label(study)
        response, answer, size = await self._handle(request, study, address)
        metrics().dicomweb_requests.labels(route, str(response.status_code)).inc()
        outcomes = answer.outcomes if answer is not None else []
        for outcome in outcomes:
            label = ("duplicate" if outcome.duplicate else "stored") if outcome.accepted else (
                str(outcome.reason.value) if outcome.reason else "error")
            metrics().dicomweb_instances.labels(route, label).inc()
        level = logging.WARNING if response.status_code == 401 else logging.INFO
        log.log(level, "action=stow-rs-request route=%s address=%s study_instance_uid=%s "
                "status=%d instances=%d stored=%d duplicates=%d failed=%d bytes=%d "
                "seconds=%.3f%s", route, address, study or "", response.status_code,
                len(outcomes), sum(o.accepted and not o.duplicate for o in outcomes),
                sum(o.duplicate for o in outcomes), sum(not o.accepted for o in outcomes),
                size, time.monotonic() - started,
                "" if answer is not None else f" reason={_reason(response)}")
        return response

    async def _handle(self, request: Request, study: str | None, address: str
                      ) -> tuple[Response, _Answer | None, int]:
        """The response, the instances' outcomes (None: refused as a whole), the bytes
        read."""
        try:
            allowed = self.token.matches(request.headers.get("authorization"))
        except TokenUnavailable as exc:
            log.error("action=stow-rs-token-unavailable error=%s", exc)
            return _plain(503, "the node cannot check credentials now; retry later",
                          retry=True), None, 0
        if not allowed:
            error = ', error="invalid_token"' if request.headers.get("authorization") else ""
            return _plain(401, "a bearer token is required", headers={
                "WWW-Authenticate": f'Bearer realm="cxrd"{error}'}), None, 0
        if study is not None and not is_valid_uid(study):
            return _plain(400, "the URL's study is not a valid UID"), None, 0
        media, options = parse_options_header(request.headers.get("content-type", ""))
        kind = options.get(b"type", b"").decode("latin-1").strip().lower()
        boundary = options.get(b"boundary", b"")
        if media != b"multipart/related" or kind != DICOM:
            return _plain(415, 'expected Content-Type: multipart/related; '
                          'type="application/dicom"'), None, 0
        if not accepts_json(request.headers.get("accept")):
            return _plain(406, f"the answer is {DICOM_JSON}"), None, 0
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return self._too_large(), None, 0
        if not boundary:
            return _plain(400, "the Content-Type names no boundary"), None, 0
        source = f"dicomweb:{address}"
        refused = await run_in_threadpool(self.ingestor.refuse_if_low, source, "",
                                          via="dicomweb")
        if refused is not None:
            return _plain(503, "out of resources (free space); retry later",
                          retry=True), None, 0
        collector = _Collector(DICOM, self.spill_dir)
        size = 0
        try:
            size = await self._read(request, boundary, collector)
            answer = await run_in_threadpool(self._ingest, collector, source, study)
        except TooLarge:
            return self._too_large(), None, size
        except BadRequest as exc:
            return _plain(400, f"not a multipart/related message: {exc}"), None, size
        except ClientDisconnect:
            return _plain(400, "the client went away before the body was whole"), None, size
        finally:
            collector.close()
        body = answer.dataset().to_json_dict()
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if answer.retry else {}
        return JSONResponse(body, status_code=answer.status, headers=headers,
                            media_type=DICOM_JSON), answer, size

    def _too_large(self) -> Response:
        return _plain(413, f"the body exceeds [dicomweb] max_request_mb "
                      f"({self.config.dicomweb.max_request_mb} MB)")

    async def _read(self, request: Request, boundary: bytes, collector: _Collector) -> int:
        """Parse the body as it arrives; the bytes read. BadRequest, TooLarge."""
        try:
            parser = MultipartParser(boundary, collector.callbacks())
        except Exception as exc:  # a boundary python-multipart refuses (too long)
            raise BadRequest(str(exc)) from exc
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise TooLarge()
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise BadRequest(str(exc)) from exc
        if not collector.done:
            raise BadRequest("the closing boundary is missing")
        if not collector.parts:
            raise BadRequest("no parts")
        return size

    def _ingest(self, collector: _Collector, source: str, study: str | None) -> _Answer:
        """Each part through the ingest, in order (a thread of the pool: it blocks)."""
        outcomes = []
        for number, part in enumerate(collector.parts, start=1):
            name = f"part-{number}"
            if part.content_type != DICOM:
                outcomes.append(self.ingestor.reject(
                    source, name, RejectReason.NOT_DICOM,
                    f"part {number} is {part.content_type[:64]}, not {DICOM}"))
                continue
            part.data.seek(0)
            data = part.data.read()
            try:
                outcome = self.ingestor.store(data, source, name=name,
                                              expected_study_uid=study)
            except Exception as exc:  # the answer names every part, whatever happened
                log.exception("action=stow-rs-store-error source=%s part=%d", source, number)
                outcome = StoreOutcome(False, detail=f"internal error: {type(exc).__name__}")
            outcomes.append(outcome)
        with self._lock:
            self.stored += sum(o.accepted for o in outcomes)
        return _Answer(outcomes)


def _plain(status: int, text: str, *, retry: bool = False,
           headers: dict[str, str] | None = None) -> Response:
    extra = dict(headers or {})
    if retry:
        extra["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return PlainTextResponse(text + "\n", status_code=status, headers=extra)


def _reason(response: Response) -> str:
    body = bytes(response.body).decode("utf-8", "replace").strip()
    return '"' + body.replace('"', "'")[:200] + '"'


def bind(listen: str) -> socket.socket:
    """A listening socket on ``host:port`` (OSError when it cannot be bound)."""
    host, port = parse_listen(listen)
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


class DicomwebReceiver:
    """The STOW-RS server: ``start()`` binds and serves on a thread; ``drain()`` stops."""

    def __init__(self, config: Config, ingestor: Ingestor) -> None:
        self.config = config
        self.stow = StowApp(config, ingestor)
        self.server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def start(self) -> None:
        """Bind ``[dicomweb] listen`` (an OSError here stops the node) and serve."""
        import uvicorn

        from cxrd.receive import server_ssl_context

        cfg = self.config
        self.stow.token.current()  # the preflight checked it; read it before listening
        tls = cfg.node.tls
        context = server_ssl_context(tls) if tls is not None else None
        self._socket = bind(cfg.dicomweb.listen)
        # uvicorn's own lines (start-up, shutdown) are not cxrd's: only its warnings show.
        logging.getLogger("uvicorn").setLevel(logging.WARNING)
        server_config = uvicorn.Config(
            self.stow.app, log_config=None, access_log=False, lifespan="off",
            loop="asyncio", http="h11", server_header=False, proxy_headers=False,
            limit_concurrency=MAX_CONNECTIONS, timeout_graceful_shutdown=int(DRAIN_SECONDS),
            ssl_context_factory=(lambda _config, _default: context) if context else None)
        self.server = uvicorn.Server(server_config)
        sock = self._socket
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                        name="cxrd-dicomweb", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self.server.started:  # serving, or the node must not go on without it
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.drain(timeout=0)
                raise RuntimeError("the STOW-RS server did not start ([dicomweb] listen "
                                   f"{cfg.dicomweb.listen})")
            time.sleep(0.01)
        log.info("action=dicomweb-start listen=%s port=%d tls=%s max_request_mb=%d",
                 cfg.dicomweb.listen, self.port, context is not None,
                 cfg.dicomweb.max_request_mb)

    @property
    def port(self) -> int:
        assert self._socket is not None
        return int(self._socket.getsockname()[1])

    def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Stop accepting, let the requests in flight finish (up to ``timeout``), stop."""
        server, thread = self.server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        if timeout <= 0:
            server.force_exit = True
        thread.join(timeout + 5)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)
        if self._socket is not None:
            self._socket.close()
        self.server = self._thread = None
        log.info("action=dicomweb-stop stored=%d", self.stow.stored)
