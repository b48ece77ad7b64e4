"""The status page in a real browser: Debian's Chromium, headless, loads ``/`` of a running
``cxrd serve``'s ``[metrics] listen`` after images came in over DICOM (storescu) and the
watched folder and the results went to a real destination (dcmtk's storescp). The page's
numbers are those of ``cxrd status --json``, its last results are the node's results by
UID, no patient data is on it, and its screenshot shows the DEMO banner.

A missing ``chromium`` fails the test (``scripts/test`` installs it), as a missing DICOM
peer does."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicompeers import StoreSCP, storescu, tool
from nodehelpers import (
    DONE_TIMEOUT,
    PHI_BIRTH_DATE,
    PHI_BIRTH_DATE_MALFORMED,
    PHI_ID,
    PHI_NAME,
    DbView,
    free_port,
    make_phantom_set,
    phi_study,
    settled,
    status_json,
    wait_until,
    write_config,
)
from pagehelpers import check_page_matches
from PIL import Image
from sqlalchemy import select

from cxrd.db import Delivery
from cxrd.domain import DeliveryState

BROWSER_TIMEOUT = 120.0
#: The DEMO banner's background (cxrd/templates/status.html, ``.demo``).
DEMO_YELLOW = (0xFF, 0xD4, 0x00)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Debian's Chromium, headless, with a profile of its own under ``tmp_path``."""
    return subprocess.run(
        [tool("chromium"), "--headless=new", "--no-sandbox", "--disable-gpu",
         "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=BROWSER_TIMEOUT, stdin=subprocess.DEVNULL,
        check=False)


def delivered(db: DbView) -> bool:
    with db.session() as s:
        states = list(s.scalars(select(Delivery.state)))
    return bool(states) and all(st == DeliveryState.DONE.value for st in states)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # writing the PHI fixture
def test_status_page_in_chromium(tmp_path: Path, nodes: Any, db_of: Any) -> None:
    scp = StoreSCP(tmp_path / "scp")
    try:
        _run(tmp_path, scp, nodes, db_of)
    finally:
        scp.stop()


def _run(tmp_path: Path, scp: StoreSCP, nodes: Any, db_of: Any) -> None:
    phi = phi_study(tmp_path / "phi")  # frontal images of patients named with sentinels
    mixed = make_phantom_set(tmp_path / "mixed", 2, seed=1)  # a frontal and a lateral
    assert sorted(f.view for f in mixed.files) == ["AP", "LL"]
    metrics_port = free_port()
    (tmp_path / "node").mkdir()
    dirs = write_config(tmp_path / "node", extra=f"""
[sender]
initial_backoff_seconds = 0.5
max_backoff_seconds = 2

[[destinations]]
name = "archive"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {scp.port}
""")
    dirs.config.write_text(dirs.config.read_text().replace(
        'listen = ""', f'listen = "127.0.0.1:{metrics_port}"'))
    db = db_of(dirs)
    node = nodes.start(dirs)
    port = int(next(ln for ln in dirs.config.read_text().splitlines()
                    if ln.startswith("port = ")).split("=")[1])
    sent = storescu(port, [phi.folder / f.path for f in phi.files])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    mixed.drop(dirs.incoming)
    # a file named after the patient, as exports often are: rejected (not DICOM)
    (dirs.incoming / f"{PHI_NAME.replace('^', '_')}_{PHI_ID}.txt").write_text("not DICOM\n")
    wait_until(lambda: settled(dirs, db), DONE_TIMEOUT, "the studies to be reported")
    wait_until(lambda: delivered(db), DONE_TIMEOUT, "the results to reach storescp")

    url = f"http://127.0.0.1:{metrics_port}/"
    dumped = chromium(tmp_path, "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    html = dumped.stdout
    doc = status_json(dirs)
    keys = check_page_matches(html, doc)

    # what came in: 5 images, one lateral skipped, the text file rejected; all sent
    assert doc["instances"] == {"done": 4, "skipped": 1}
    assert doc["skipped"] == {"lateral-view": 1} and doc["rejected"] == {"not-dicom": 1}
    assert doc["deliveries"]["by_state"] == {"done": sum(doc["results"].values())}
    assert keys.values["deliveries.by_destination.archive.done"] == str(
        sum(doc["results"].values()))
    assert doc["workers"] and keys.values["workers.count"] == str(len(doc["workers"]))
    for w in doc["workers"]:
        assert f'data-worker="{w["id"]}"' in html
    # the demo model: a banner, and the flag on the results and the workers
    assert doc["model"]["demo"] and 'id="demo-banner"' in html
    assert doc["node"]["id"] in html and "every node that shares it" in html
    assert '<meta http-equiv="refresh"' in html

    # the last results are the node's own files and what storescp received, by UID
    on_disk = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
               for p in dirs.results.glob("*.dcm")}
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                for p in scp.received()}
    assert keys.results and set(keys.results) <= on_disk and set(keys.results) <= received
    studies = {f.study_instance_uid for f in (*phi.files, *mixed.files)}
    assert {r["study_instance_uid"] for r in doc["recent_results"]} <= studies
    assert {r["kind"] for r in doc["recent_results"]} == {"sr", "sc", "seg"}
    sr = next(r for r in doc["recent_results"] if r["kind"] == "sr")
    assert sr["findings"] and all(f["class"] in ("TB", "NTB", "NORM") for f in sr["findings"])
    assert sr["model"]["demo"] is True
    for f in sr["findings"]:
        assert f'data-class="{f["class"]}">{f["class"]}</strong> {f["probability"]:.3f}' in html

    # no patient data: not from the images, not from the rejected file's name
    for phi_text in (PHI_NAME, "PHITEST", "SENTINEL", PHI_ID, PHI_BIRTH_DATE,
                     PHI_BIRTH_DATE_MALFORMED):
        assert phi_text not in html, phi_text

    # the screenshot: a full page at 1280x1600, with the yellow DEMO banner on it
    png = tmp_path / "status.png"
    shot = chromium(tmp_path, f"--screenshot={png}", "--window-size=1280,1600",
                    "--hide-scrollbars", url)
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    with Image.open(png) as im:
        assert im.size == (1280, 1600)
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # text and tables, not a blank page
    top = np.asarray(rgb.crop((0, 0, 1280, 400)))
    assert int(np.all(top == DEMO_YELLOW, axis=-1).sum()) > 5000, "no DEMO banner"
    assert node.stop() == 0
