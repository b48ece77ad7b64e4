"""The status page at ``/`` of ``[metrics].listen`` (``cxrd.statuspage``), served by the
node's real metrics server on loopback over a real SQLite database: the same document as
``cxrd status --json``, every value escaped, read-only, ``/metrics`` unchanged, and a
database outage rendered as a 503 page (PostgreSQL on a port where nothing listens).
The page in a real browser, beside a running node, is in tests/acceptance."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dicompeers import free_port
from pagehelpers import BROWSER_ACCEPT, check_page_matches

from cxrd.config import load_config
from cxrd.db import Database, Instance, Job, Rejection, Result, Study, Worker
from cxrd.domain import InstanceState, JobKind, JobState, ResultKind, StudyState
from cxrd.infer import resolve_model_path
from cxrd.metrics import start_server
from cxrd.modelinfo import read_model_info
from cxrd.status import collect
from cxrd.statuspage import REFRESH_SECONDS, wants_html

BROWSER = BROWSER_ACCEPT
PROMETHEUS = ("application/openmetrics-text;version=1.0.0;q=0.5,"
              "text/plain;version=0.0.4;q=0.4,*/*;q=0.1")
HOSTILE = '<script>alert("x")</script>&<b>'


def get(port: int, path: str = "/", accept: str | None = BROWSER,
        method: str = "GET") -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if accept is not None:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def write_config(tmp_path: Path, database_url: str | None = None) -> Path:
    config = tmp_path / "cxrd.toml"
    url = f'database_url = "{database_url}"\n' if database_url else ""
    config.write_text(f'[node]\nid = "page-node-1"\n[storage]\ndata_dir = '
                      f'"{tmp_path / "data"}"\n{url}[metrics]\nlisten = ""\n')
    return config


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, Any, Database]]:
    config = load_config(write_config(tmp_path))
    db = Database(config.storage.database_url_resolved)
    db.migrate()
    port = free_port()
    server = start_server(f"127.0.0.1:{port}", db, config=config)
    yield port, config, db
    server.shutdown()
    server.server_close()
    db.dispose()


def fill(db: Database, device_uid: str, demo: bool) -> dict[str, str]:
    """A reported study of two images (TB, NORM), its SR and an SC, a skipped lateral, a
    rejection whose detail is hostile markup and a failed job; returns the UIDs."""
    study = "1.2.826.0.1.3680043.10.1.1"
    uids = {"study": study, "tb": study + ".1", "norm": study + ".2", "sr": study + ".9",
            "sc": study + ".8"}
    with db.session() as s:
        s.add(Study(study_instance_uid=study, state=StudyState.REPORTED.value,
                    sr_sop_instance_uid=uids["sr"]))
        for key, probs, state in (("tb", [0.99, 0.006, 0.004], InstanceState.DONE),
                                  ("norm", [0.01, 0.04, 0.95], InstanceState.DONE),
                                  ("lat", None, InstanceState.SKIPPED)):
            inst = Instance(sop_instance_uid=uids.get(key, study + ".3"),
                            study_instance_uid=study, series_instance_uid=study + ".100",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                            transfer_syntax_uid="1.2.840.10008.1.2.1", path="/nonexistent",
                            sha256="", size=10, source="dicom:PACS@127.0.0.1",
                            state=state.value,
                            reason="lateral-view" if probs is None else None)
            s.add(inst)
            s.flush()
            if probs is not None:
                # record: what a worker stores, patient attributes included; never read
                s.add(Job(instance_id=inst.id, study_instance_uid=study,
                          state=JobState.DONE.value, probs=json.dumps(probs),
                          model_device_uid=device_uid,
                          record=json.dumps({"header": {"00100010": {
                              "vr": "PN", "Value": [{"Alphabetic": "PAGE^SENTINEL"}]}}})))
        s.add(Job(kind=JobKind.REPORT.value, study_instance_uid=study,
                  state=JobState.DONE.value))
        s.add(Result(sop_instance_uid=uids["sc"], study_instance_uid=study,
                     kind=ResultKind.SC.value, generation=1, path="/nonexistent",
                     source_sop_instance_uid=uids["tb"]))
        s.add(Result(sop_instance_uid=uids["sr"], study_instance_uid=study,
                     kind=ResultKind.SR.value, generation=1, path="/nonexistent"))
        s.add(Rejection(source="dicom:PACS@127.0.0.1", name="1.2.3", reason="not-dicom",
                        detail=HOSTILE))
        failed = Instance(sop_instance_uid="1.2.826.0.1.3680043.10.2.1",
                          study_instance_uid="1.2.826.0.1.3680043.10.2",
                          series_instance_uid="1.2.826.0.1.3680043.10.2.100",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", path="/nonexistent",
                          sha256="", size=10, source="watch:/in",
                          state=InstanceState.FAILED.value)
        s.add(failed)
        s.flush()
        s.add(Job(instance_id=failed.id, study_instance_uid=failed.study_instance_uid,
                  state=JobState.FAILED.value, attempts=3, error="DecodeError: " + HOSTILE))
        s.add(Worker(id="host-a:12:w0", model="DEMO x 1" if demo else "x 1",
                     model_device_uid=device_uid, demo=demo, providers="CPUExecutionProvider"))
    return uids


def test_wants_html() -> None:
    assert wants_html(BROWSER)
    assert wants_html("application/xhtml+xml")
    assert wants_html("TEXT/HTML; charset=utf-8")
    assert not wants_html(PROMETHEUS)
    assert not wants_html("*/*")
    assert not wants_html(None)
    assert not wants_html("text/html;q=0")
    assert not wants_html("text/html;q=nonsense")


def test_the_page_shows_the_status_document(served: tuple[int, Any, Database]) -> None:
    port, config, db = served
    info = read_model_info(resolve_model_path(config.model.path))
    uids = fill(db, info.device_uid, info.demo)
    status, headers, html = get(port)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in headers["Content-Security-Policy"]  # no script may run
    doc = collect(config, db)
    check_page_matches(html, doc)
    assert doc["instances"] == {"done": 2, "skipped": 1, "failed": 1}
    assert doc["skipped"] == {"lateral-view": 1} and doc["rejected"] == {"not-dicom": 1}
    assert doc["healthy"] is False  # the failed job
    # refreshes by itself, without JavaScript; says which node, and that counts are shared
    assert f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' in html
    assert "<script" not in html
    assert '<span id="node-id">page-node-1</span>' in html
    assert "every node that shares it" in html
    # the demo model: the banner, and the flag on each result it made
    assert 'id="demo-banner"' in html and info.demo
    # the last results: UIDs, kinds, the SR's class and probability of each image
    results = {r["sop_instance_uid"]: r for r in doc["recent_results"]}
    assert [r["kind"] for r in doc["recent_results"]] == ["sr", "sc"]
    sr, sc = results[uids["sr"]], results[uids["sc"]]
    assert [(f["sop_instance_uid"], f["class"]) for f in sr["findings"]] == [
        (uids["tb"], "TB"), (uids["norm"], "NORM")]
    assert [(f["sop_instance_uid"], f["class"]) for f in sc["findings"]] == [(uids["tb"], "TB")]
    assert sc["findings"][0]["probability"] == pytest.approx(0.99)
    assert sr["model"] == {"display_name": info.display_name, "device_uid": info.device_uid,
                           "demo": True}
    assert 'data-class="TB">TB</strong> 0.990' in html
    assert 'data-class="NORM">NORM</strong> 0.950' in html
    # hostile text from the database is escaped, never markup; the findings record (the
    # source's header, with the patient's name) is never read
    assert HOSTILE not in html and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "PAGE^SENTINEL" not in html and "SENTINEL" not in json.dumps(doc)


def test_read_only_and_metrics_unchanged(served: tuple[int, Any, Database]) -> None:
    port, _config, _db = served
    head = get(port, method="HEAD")
    assert head[0] == 200 and head[2] == "" and int(head[1]["Content-Length"]) > 1000
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, body = get(port, method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
        assert "read-only" in body
    # /metrics is Prometheus's, whatever the Accept header; so is / for a scraper or curl
    for path, accept in (("/metrics", BROWSER), ("/metrics", PROMETHEUS), ("/", PROMETHEUS),
                         ("/", None), ("/", "*/*")):
        status, headers, body = get(port, path, accept=accept)
        assert status == 200, (path, accept)
        assert headers["Content-Type"].startswith(("text/plain", "application/openmetrics"))
        assert "cxrd_queue_depth" in body and "<html" not in body, (path, accept)
    assert get(port, "/metrics", method="POST")[0] == 405


def test_database_unavailable_is_a_503_page(tmp_path: Path) -> None:
    """PostgreSQL where nothing listens: the page says so, with no traceback and no
    connection string; /metrics still answers (its counters, without the DB gauges)."""
    dead = free_port()
    url = f"postgresql+psycopg://postgres:secret-pw@127.0.0.1:{dead}/cxrd"
    config = load_config(write_config(tmp_path, url))
    db = Database(config.storage.database_url_resolved)
    port = free_port()
    server = start_server(f"127.0.0.1:{port}", db, config=config)
    try:
        status, headers, html = get(port)
        assert status == 503 and headers["Content-Type"].startswith("text/html")
        assert "database unavailable" in html and "page-node-1" in html
        assert '<meta http-equiv="refresh"' in html
        for leak in ("Traceback", "secret-pw", str(dead), "OperationalError"):
            assert leak not in html
        status, _headers, body = get(port, "/metrics")
        assert status == 200 and "cxrd_database_gauges_exporter" in body
    finally:
        server.shutdown()
        server.server_close()
        db.dispose()
