"""The status page: ``cxrd status`` as a read-only HTML page at ``/`` of ``[metrics].listen``,
for the PACS administrator's browser.

What it shows is ``cxrd.status.collect``'s document, the one ``cxrd status --json``
prints, rendered on the server (Jinja2, every value escaped; no JavaScript), and it
refreshes itself with ``<meta http-equiv="refresh">``. It decides:

- who gets the page: a ``GET`` or ``HEAD`` of ``/`` whose ``Accept`` names ``text/html`` (or
  ``application/xhtml+xml``), as a browser's does. Anything else at ``/`` (curl, a scraper
  pointed at ``/``) keeps getting the Prometheus exposition, as every path did before, and
  ``/metrics`` is Prometheus's only. Another method at ``/`` for a browser: 405;
- what a failure looks like: the database unreachable renders a short page saying so with
  503 (and the page refreshes until it is back), any other error a short 500 page; never a
  traceback. Each request runs on its own thread of the metrics server, so a slow
  database delays the page, never a scrape.

Every node with ``[metrics] listen`` serves it; the counts come from the database, so with
several nodes on one PostgreSQL database they are the cluster's, and the page says which
node served it (``[node] id``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

#: Seconds between the page's own reloads (``<meta http-equiv="refresh">``).
REFRESH_SECONDS = 15
HTML_TYPES = ("text/html", "application/xhtml+xml")
READ_METHODS = ("GET", "HEAD")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
App = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def accepts(accept: str | None, media_ranges: Collection[str]) -> bool:
    """Whether an ``Accept`` header lists one of ``media_ranges`` (compared without case)
    with a quality above 0; the HTTP servers' one reading of ``Accept`` (this page's,
    ``cxrd.dicomweb``'s)."""
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() not in media_ranges:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


def wants_html(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for HTML (``text/html`` with a quality above 0)."""
    return accepts(accept, HTML_TYPES)


def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True)
    env.filters["counts"] = lambda d: sorted((d or {}).items())
    env.filters["prob"] = lambda p: "" if p is None else f"{p:.3f}"
    env.filters["size"] = _size
    return env


def _size(n: int | None) -> str:
    from cxrd.status import _size as size

    return "unknown" if n is None else size(n)


_env: Any = None


def _template(name: str) -> Any:
    global _env  # one Jinja2 environment per process, built on the first page
    if _env is None:
        _env = _environment()
    return _env.get_template(name)


def render(doc: dict[str, Any], *, refresh: int = REFRESH_SECONDS,
           now: dt.datetime | None = None) -> str:
    """The page for ``collect``'s document."""
    from cxrd.db import utcnow

    stamp = (now or utcnow()).replace(microsecond=0).isoformat() + "Z"
    return str(_template("status.html").render(doc=doc, refresh=refresh, generated_at=stamp))


def render_error(title: str, message: str, node_id: str, *,
                 refresh: int = REFRESH_SECONDS) -> str:
    """A short page for a status that cannot be shown (no traceback, no error text that
    could carry a connection string)."""
    from cxrd.db import utcnow

    stamp = utcnow().replace(microsecond=0).isoformat() + "Z"
    return str(_template("error.html").render(title=title, message=message, node_id=node_id,
                                              refresh=refresh, generated_at=stamp))


def page(config: Any, db: Any) -> tuple[str, str]:
    """The HTTP status line and the page: 200 and the status, 503 when the database
    cannot be read, 500 for anything else."""
    from cxrd.status import collect

    node_id = config.node.id
    try:
        return "200 OK", render(collect(config, db))
    except SQLAlchemyError as exc:
        log.warning("action=status-page-db-error error=%s", type(exc).__name__)
        return "503 Service Unavailable", render_error(
            "database unavailable",
            "The database cannot be read now, so the queue, the workers and the deliveries "
            "cannot be shown. The node keeps what it has received on disk; this page "
            "tries again by itself.", node_id)
    except Exception as exc:  # the page must not take the endpoint down
        log.warning("action=status-page-error error=%s", type(exc).__name__)
        return "500 Internal Server Error", render_error(
            "status unavailable",
            f"The status could not be collected ({type(exc).__name__}); see the node's log.",
            node_id)


def wrap(metrics_app: App, config: Any, db: Any) -> App:
    """The metrics server's WSGI application: the status page at ``/`` for a browser,
    ``metrics_app`` (prometheus-client's) for everything else."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") != "/" or not wants_html(environ.get("HTTP_ACCEPT")):
            return metrics_app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in READ_METHODS:
            body = f"{method} not allowed: the status page is read-only\n".encode()
            start_response("405 Method Not Allowed", [
                ("Allow", ", ".join(READ_METHODS)), ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body)))])
            return [body]
        status, text = page(config, db)
        body = text.encode()
        start_response(status, [
            ("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
            # Read-only and self-contained: no scripts, no frames, nothing from elsewhere.
            ("Content-Security-Policy",
             "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
             "frame-ancestors 'none'")])
        return [] if method == "HEAD" else [body]

    return app
