"""Reading the status page (``cxrd.statuspage``) in tests: its numbers by ``data-key``,
the status document's key paths, so a page can be set beside ``cxrd status --json``."""

from __future__ import annotations

import urllib.request
from html.parser import HTMLParser
from typing import Any

#: What a browser sends (Chromium's, shortened): the page, not the Prometheus exposition.
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def status_page(port: int) -> str:
    """The status page a browser gets from a node's ``[metrics] listen`` port on loopback."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/",
                                 headers={"Accept": BROWSER_ACCEPT})
    with urllib.request.urlopen(req, timeout=30) as r:
        return str(r.read().decode())


class Keys(HTMLParser):
    """The page's numbers by their ``data-key`` (the status document's key path), the
    results' SOP Instance UIDs in order, and the id of the node that served it."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self.results: list[str] = []
        self.node_id = ""
        self._open: str | None = None
        self._in_node_id = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("data-key"):
            self._open = a["data-key"]
            self.values[self._open] = ""
        if a.get("data-result"):
            self.results.append(str(a["data-result"]))
        self._in_node_id = a.get("id") == "node-id"

    def handle_endtag(self, tag: str) -> None:
        self._open = None
        self._in_node_id = False

    def handle_data(self, data: str) -> None:
        if self._in_node_id:
            self.node_id += data.strip()
        if self._open is not None:
            self.values[self._open] += data.strip()


def page_keys(html: str) -> Keys:
    parser = Keys()
    parser.feed(html)
    return parser


def expected_keys(doc: dict[str, Any]) -> dict[str, str]:
    """The numbers the page must show, from the status document, by the same key paths."""
    want = {"queue_depth": str(doc["queue_depth"]),
            "jobs_failed_unresolved": str(doc["jobs_failed_unresolved"]),
            "reports.current": str(doc["reports"]["current"]),
            "reports.superseded": str(doc["reports"]["superseded"]),
            "workers.count": str(len(doc["workers"])),
            "disk.refused": str(doc["disk"]["refused"]),
            "healthy": "healthy" if doc["healthy"] else "UNHEALTHY"}
    for key in ("studies", "instances", "jobs", "report_jobs", "results", "skipped", "rejected"):
        for name, n in doc[key].items():
            want[f"{key}.{name}"] = str(n)
    for name, n in doc["deliveries"]["by_state"].items():
        want[f"deliveries.by_state.{name}"] = str(n)
    for dest, entry in doc["deliveries"]["by_destination"].items():
        for name, n in entry["by_state"].items():
            want[f"deliveries.by_destination.{dest}.{name}"] = str(n)
    return want


def check_page_matches(html: str, doc: dict[str, Any]) -> Keys:
    """Every count of ``doc`` is on the page under its key, and nothing more is."""
    keys = page_keys(html)
    shown = {k: (v.split(":")[0] if k == "healthy" else v) for k, v in keys.values.items()}
    assert shown == expected_keys(doc)
    assert keys.results == [r["sop_instance_uid"] for r in doc["recent_results"]]
    return keys
