"""STOW-RS: the DICOMweb side of the sender, for a destination with a ``url``.

``cxrd.send`` claims, batches and records as for C-STORE (the same outbox: leases, backoff,
dead letter, status, metrics); this module owns what is particular to DICOMweb: the HTTP
session (``dicomweb-client``, its own retries off: the outbox backs off), the credentials
read from the file or environment variable the configuration names, and what an answer
means for each instance it carried.

The answer of ``POST {url}/studies`` (PS3.18 10.5): 200 stored everything; 202 and 409
list per instance the ``ReferencedSOPSequence`` (stored; a ``WarningReason`` is kept as the
delivery's warning) and the ``FailedSOPSequence`` with a ``FailureReason`` (PS3.18 Table
10.5.3-1, the C-STORE statuses of PS3.4 B.2.3): 0xA7xx out of resources and 0x0110
processing failure are transient; 0x0122 SOP class and 0xC122 transfer syntax not
supported, and 0x0124 not authorised, are the destination's configuration (``PERMANENT:``,
retried only at the maximum backoff, as an association rejected permanently); any other
reason (0xA9xx does not match the SOP class, 0xCxxx cannot understand) refuses the object
itself: dead at once.

Without a per-instance answer the HTTP status decides: a connection refused or reset, no
answer within ``[sender] dimse_timeout_seconds``, 408, 429 or 5xx are transient; 401 and
403 (credentials), 404 and 405 (the url), 406 and 415 (the media types), 413 (request
size) and a redirect (3xx, never followed: requests would turn the POST into a GET) are
the destination's configuration (``PERMANENT:`` at the maximum backoff, logged as
``action=stow-refused``); 400 or 409 for a request of several instances is sent again one
instance per request, and for one instance refuses it (dead).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter

from cxrd.config import DestinationConfig, NotificationConfig
from cxrd.dicom import STATUS_WARNING_MEANINGS

log = logging.getLogger(__name__)

#: A STOW-RS request carries at most this many bytes of DICOM objects (one study's due
#: results, oldest first); the rest go in the next request.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
#: dicomweb-client uses chunked transfer encoding above its chunk size, which not every
#: server takes (Orthanc's DICOMweb plugin, for one): every request is sent whole, with
#: its Content-Length.
CHUNK_SIZE = 2 * MAX_REQUEST_BYTES
#: Failure reasons (PS3.18 Table 10.5.3-1) that are transient.
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = range(0xA700, 0xA800)
#: Failure reasons that say the destination is configured not to take the object (as a
#: refused presentation context): retried at the maximum backoff, never dead at once.
DESTINATION_REFUSALS = {0x0122: "SOP class not supported",
                        0xC122: "transfer syntax not supported",
                        0x0124: "not authorized"}
#: HTTP statuses that are the destination's configuration, whatever the objects.
HTTP_CONFIGURATION = {401: "credentials refused: check the destination's token or user "
                           "and password",
                      403: "forbidden: this user may not store on the destination",
                      404: "not found: check the destination's url (the DICOMweb base, "
                           "without /studies)",
                      405: "method not allowed: check the destination's url (the DICOMweb "
                           "base, without /studies)",
                      406: "not acceptable: the destination answers no DICOM JSON",
                      413: "request too large for the destination: raise its upload limit",
                      415: "unsupported media type: the destination does not take "
                           "multipart/related application/dicom"}
HTTP_TRANSIENT = {408, 429}
#: Refusals of the whole request's content: a request of several instances is sent again
#: one instance per request, so that only the culprit is refused.
HTTP_CONTENT = {400, 409}

ACCEPT = "application/dicom+json"


class SecretUnavailable(Exception):
    """A credential the configuration names cannot be read (file gone, empty, variable not
    set); the message names the key and the file or variable, never the secret."""


@dataclass(frozen=True)
class Credentials:
    """What authenticates the requests: a bearer token, or a basic-auth pair, or nothing."""

    token: str | None = None
    basic: tuple[str, str] | None = None


@dataclass(frozen=True)
class Verdict:
    """One instance's outcome: delivered (``warning`` kept if any), or failed with
    ``error``, transient, ``permanent`` (dead) or ``at_max_backoff``; ``split``: send it
    again alone in this pass (a refusal of a request of several)."""

    delivered: bool = False
    warning: str | None = None
    error: str = ""
    permanent: bool = False
    at_max_backoff: bool = False
    split: bool = False


#: What holds credentials: a STOW-RS destination, or a webhook notification (a bearer
#: token only).
Authenticated = DestinationConfig | NotificationConfig


def _secret_file(dest: Authenticated, key: str) -> str:
    path = getattr(dest, key)
    try:
        text: str = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretUnavailable(f"{dest.section} {dest.name!r} {key} {path} cannot be read: "
                                f"{getattr(exc, 'strerror', None) or type(exc).__name__}"
                                ) from exc
    secret = text.rstrip("\r\n")
    if not secret:
        raise SecretUnavailable(f"{dest.section} {dest.name!r} {key} {path} is empty")
    return _checked(dest, key, secret)


def _checked(dest: Authenticated, key: str, secret: str) -> str:
    """A secret that can go in an HTTP header: no line break or control character (a
    token with one would fail every request the same way)."""
    if not secret.isprintable() or (key.startswith("token") and any(c.isspace()
                                                                    for c in secret)):
        raise SecretUnavailable(f"{dest.section} {dest.name!r} {key}: the secret contains "
                                "white space or control characters")
    return secret


def _secret_env(dest: Authenticated, key: str) -> str:
    name = getattr(dest, key)
    secret = os.environ.get(name, "")
    if not secret:
        raise SecretUnavailable(f"{dest.section} {dest.name!r} {key}: the environment "
                                f"variable {name} is not set or empty")
    return _checked(dest, key, secret)


def credentials(dest: Authenticated) -> Credentials:
    """Read the destination's (or the webhook's) secret now (at each pass: a rotated token
    file is read again); raises ``SecretUnavailable``. A token file's trailing newline is
    ignored."""
    if dest.token_file is not None:
        return Credentials(token=_secret_file(dest, "token_file"))
    if dest.token_env:
        return Credentials(token=_secret_env(dest, "token_env"))
    if isinstance(dest, DestinationConfig) and dest.username:
        password = (_secret_file(dest, "password_file") if dest.password_file is not None
                    else _secret_env(dest, "password_env"))
        return Credentials(basic=(dest.username, password))
    return Credentials()


class TlsAdapter(HTTPAdapter):
    """The destination's ``tls``: its CA (else the system trust store) and our client
    certificate, for every request. Set on the session instead, a CA would lose to
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` in the environment (requests prefers
    them to a session's ``verify``), and the destination would be checked against the
    wrong CAs."""

    def __init__(self, ca: str | None, cert: tuple[str, str] | None) -> None:
        super().__init__()
        self.ca = ca
        self.cert = cert

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        if self.ca is not None:
            kwargs["verify"] = self.ca
        if self.cert is not None:
            kwargs["cert"] = self.cert
        return super().send(request, *args, **kwargs)


class StowClient:
    """A DICOMweb client for one destination and pass (``dicomweb-client``, its retries
    off), which hands back every answer, whatever its HTTP status and media type."""

    def __init__(self, dest: DestinationConfig, creds: Credentials, *,
                 connect_timeout: float, read_timeout: float) -> None:
        self.session = requests.Session()
        # requests would follow a 301/302 by a GET of /studies (a search, answered 200):
        # a redirect is answered as such instead (``http_verdict``).
        self.session.max_redirects = 0
        if creds.basic is not None:
            self.session.auth = creds.basic
        if dest.tls is not None:
            cert = None
            if dest.tls.certificate is not None and dest.tls.key is not None:
                cert = (str(dest.tls.certificate), str(dest.tls.key))
            self.session.mount("https://", TlsAdapter(
                None if dest.tls.ca is None else str(dest.tls.ca), cert))
        headers = {"Accept": ACCEPT}
        if creds.token is not None:
            headers["Authorization"] = f"Bearer {creds.token}"
        self.responses: list[requests.Response] = []
        self.client = DICOMwebClient(url=dest.url, session=self.session, headers=headers,
                                     callback=self._keep, chunk_size=CHUNK_SIZE,
                                     timeout=(connect_timeout, read_timeout))
        self.client.set_http_retry_params(retry=False)

    def _keep(self, response: requests.Response, *args: Any,
              **kwargs: Any) -> requests.Response:
        self.responses.append(response)
        return response

    def store(self, datasets: Sequence[Dataset]) -> requests.Response:
        """POST the data sets to ``url/studies`` in one STOW-RS request; returns the
        response, whatever its HTTP status. Raises ``requests.RequestException`` when there
        is none (connection refused or reset, timeout, TLS)."""
        self.responses.clear()
        try:
            self.client.store_instances(list(datasets))
        except (requests.HTTPError, requests.TooManyRedirects) as exc:
            if exc.response is not None:
                return exc.response
            raise
        except requests.RequestException:
            raise
        except Exception:  # dicomweb-client's parse of an odd answer; ours follows
            if not self.responses:
                raise
        if not self.responses:
            raise requests.ConnectionError("no response")
        return self.responses[-1]

    def close(self) -> None:
        self.session.close()


def read_dataset(data: bytes) -> Dataset:
    """A result file's data set for dicomweb-client, which encodes it again: pydicom
    leaves the elements undecoded and writes them back as read (pixel data included)."""
    return pydicom.dcmread(BytesIO(data))


def no_response_error(exc: Exception, read_timeout: float) -> str:
    """Why a request got no answer, in the words ``last_error`` keeps."""
    if isinstance(exc, requests.exceptions.SSLError):
        return f"cannot connect (TLS): {_first_line(exc)}"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"cannot connect: no answer to the TCP connection ({_first_line(exc)})"
    if isinstance(exc, requests.Timeout):
        return (f"no response to STOW-RS within {read_timeout:g} s ([sender] "
                "dimse_timeout_seconds): destination too slow or hung")
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect: {_first_line(exc)}"
    return f"STOW-RS request failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def answer_dataset(response: requests.Response) -> Dataset | None:
    """The DICOM JSON answer of a STOW-RS request (Orthanc sends it without a Content-Type
    on 409), or None when the body is empty or not DICOM JSON."""
    if not response.content:
        return None
    try:
        doc = json.loads(response.content)
        return Dataset.from_json(doc) if isinstance(doc, dict) else None
    except (ValueError, TypeError, KeyError):
        return None


def _reason(item: Dataset, keyword: str) -> int | None:
    value = item.get(keyword)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def failure_verdict(code: int | None, http_status: int) -> Verdict:
    """What a ``FailedSOPSequence`` item's ``FailureReason`` means for its delivery."""
    shown = "no reason" if code is None else f"0x{code:04X}"
    if code is not None and (code in OUT_OF_RESOURCES or code == PROCESSING_FAILURE):
        meaning = "out of resources" if code in OUT_OF_RESOURCES else "processing failure"
        return Verdict(error=f"STOW-RS failure reason {shown} ({meaning}), HTTP "
                             f"{http_status}")
    if code is not None and code in DESTINATION_REFUSALS:
        return Verdict(error=f"PERMANENT: STOW-RS failure reason {shown} "
                             f"({DESTINATION_REFUSALS[code]}), HTTP {http_status}; check "
                             "the destination's configuration for this node",
                       at_max_backoff=True)
    return Verdict(error=f"refused by destination: STOW-RS failure reason {shown}, HTTP "
                         f"{http_status}", permanent=True)


def http_verdict(response: requests.Response, batch: int) -> Verdict:
    """The outcome of an instance the answer does not name, by the HTTP status of a request
    of ``batch`` instances."""
    status = response.status_code
    text = f"HTTP {status} {response.reason or ''}".strip()
    if 200 <= status < 300 and status != 202:
        return Verdict(delivered=True)
    if 300 <= status < 400:
        where = response.headers.get("Location", "elsewhere")
        return Verdict(error=f"PERMANENT: STOW-RS {text}: the destination redirects to "
                             f"{where}; set its url to the DICOMweb base there",
                       at_max_backoff=True)
    if status in HTTP_CONFIGURATION:
        return Verdict(error=f"PERMANENT: STOW-RS {text}: {HTTP_CONFIGURATION[status]}",
                       at_max_backoff=True)
    if status in HTTP_CONTENT or (400 <= status < 500 and status not in HTTP_TRANSIENT):
        if batch > 1:
            return Verdict(error=f"STOW-RS {text} for a request of {batch}", split=True)
        return Verdict(error=f"refused by destination: STOW-RS {text}{body_hint(response)}",
                       permanent=True)
    if status == 202:
        return Verdict(error="STOW-RS HTTP 202: the answer does not name this instance")
    return Verdict(error=f"STOW-RS {text}{body_hint(response)}")


def body_hint(response: requests.Response) -> str:
    """": " and the first 200 bytes of a textual (or untyped) answer's body, words joined
    by single spaces, for an error line; "" for none or a binary one."""
    ctype = response.headers.get("Content-Type", "")
    if response.content and ("text" in ctype or "json" in ctype or not ctype):
        body = response.content[:200].decode("utf-8", "replace").split()
        return ": " + " ".join(body) if body else ""
    return ""


def verdicts(response: requests.Response, uids: Sequence[str]) -> dict[str, Verdict]:
    """Each instance's outcome (by SOP Instance UID) from the answer to a request that
    carried ``uids``."""
    answer = answer_dataset(response)
    failed: dict[str, int | None] = {}
    stored: dict[str, int | None] = {}
    if answer is not None:
        for item in answer.get("FailedSOPSequence", None) or []:
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = _reason(item,
                                                                             "FailureReason")
        for item in answer.get("ReferencedSOPSequence", None) or []:
            stored[str(item.get("ReferencedSOPInstanceUID", ""))] = _reason(item,
                                                                             "WarningReason")
    out = {}
    for uid in uids:
        if uid in failed:
            out[uid] = failure_verdict(failed[uid], response.status_code)
        elif uid in stored:  # Orthanc lists what it stored under a 409 too
            code = stored[uid]
            warning = None
            if code is not None:
                meaning = STATUS_WARNING_MEANINGS.get(code, "warning")
                warning = f"stored with warning reason 0x{code:04X} ({meaning}) (STOW-RS)"
            out[uid] = Verdict(delivered=True, warning=warning)
        else:
            out[uid] = http_verdict(response, len(uids))
    return out


def busy(response: requests.Response) -> bool:
    """Whether the destination asks for time (429, 5xx): the rest of the pass waits for
    the next attempt rather than meet the same answer request by request."""
    return response.status_code == 429 or response.status_code >= 500


def refusal_logged(dest: DestinationConfig, response: requests.Response) -> None:
    """An answer that says the destination's configuration keeps every object out (401,
    403, 404, ...): one line for the operator, with what to check."""
    status = response.status_code
    location = response.headers.get("Location", "")
    if status in HTTP_CONFIGURATION or 300 <= status < 400:
        log.error("action=stow-refused destination=%s url=%s http_status=%d error=%s",
                  dest.name, dest.url, status,
                  HTTP_CONFIGURATION.get(status, f"redirected to {location}"))
