"""``cxrd serve`` with a STOW-RS destination: a real Orthanc with its DICOMweb plugin
(Debian's orthanc-dicomweb) and HTTP basic auth, the password read from a file.

A study that Orthanc holds reaches cxrd (dropped into its watched folder), and the SR, the
heatmap SCs and the lung-field SEGs are found in Orthanc in the same study. Then Orthanc is
stopped: the next study's results wait in the outbox with the reason shown by ``cxrd
status``, nothing dead; once Orthanc is started again (same storage) they are delivered.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from dicompeers import Orthanc, SentFile, phantom_study
from nodehelpers import IMAGE_SIZE, DbView, Nodes, status_json, wait_until, write_config
from test_pacs import check_results, processed, results_in_pacs

from cxrd.domain import DeliveryState

pytestmark = pytest.mark.slow

TIMEOUT = 90.0
USER, PASSWORD = "cxrd", "stow-pw"


def drop(study: list[SentFile], incoming: Path) -> None:
    incoming.mkdir(parents=True, exist_ok=True)
    for f in study:
        shutil.copyfile(f.path, incoming / f.path.name)


def test_results_by_stow_rs_into_orthanc_and_after_an_outage(
        tmp_path: Path, nodes: Nodes, db_of: Any) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True, users={USER: PASSWORD})
    password = tmp_path / "pacs.password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    (tmp_path / "node").mkdir()
    dirs = write_config(tmp_path / "node", extra=f"""
[sender]
initial_backoff_seconds = 0.5
max_backoff_seconds = 2

[[destinations]]
name = "pacs"
url = "{orthanc.dicomweb_url}"
username = "{USER}"
password_file = "{password}"
""")
    orthanc.start()
    try:
        node = nodes.start(dirs)
        db: DbView = db_of(dirs)

        # 1. A study Orthanc holds reaches cxrd; its results land in the same study.
        first = phantom_study(tmp_path / "first", 2, seed=11, size=IMAGE_SIZE)
        answers = [orthanc.upload(f.path) for f in first]
        [orthanc_study] = {a["ParentStudy"] for a in answers}
        drop(first, dirs.incoming)
        rows = wait_until(lambda: results_in_pacs(orthanc, first[0].study_instance_uid, 2),
                          TIMEOUT, "the SR, 2 SCs and 2 SEGs in Orthanc by STOW-RS")
        assert orthanc.study_id(first[0].study_instance_uid) == orthanc_study
        assert len(rows) == 2 + 1 + 2 + 2  # the images, the SR, the heatmaps, the SEGs
        check_results([r for r in rows if r["id"] not in {a["ID"] for a in answers}], first)
        assert "action=stow-rs destination=pacs" in node.log()

        # 2. Orthanc stops; the next study's results wait, with the reason in status.
        orthanc.stop()
        second = phantom_study(tmp_path / "second", 2, seed=12, size=IMAGE_SIZE,
                               modality="DX")
        drop(second, dirs.incoming)
        wait_until(lambda: processed(db, second), TIMEOUT, "the second study classified")

        def waiting() -> dict[str, Any] | None:
            doc = status_json(dirs)
            errors = doc["deliveries"]["pending_with_errors"]
            return doc if len(errors) == 5 else None

        doc = wait_until(waiting, TIMEOUT, "the second study's results to fail delivery")
        assert not doc["deliveries"]["by_state"].get(DeliveryState.DEAD.value)
        for entry in doc["deliveries"]["pending_with_errors"]:
            assert entry["destination"] == "pacs" and entry["attempts"] >= 1
            assert entry["last_error"].startswith(("cannot connect", "not sent")), entry
            assert "PERMANENT" not in entry["last_error"]

        # 3. Orthanc is back (same storage): delivered, nothing dead.
        orthanc.start()
        rows = wait_until(lambda: results_in_pacs(orthanc, second[0].study_instance_uid, 2),
                          TIMEOUT, "the second study's results in Orthanc")
        check_results(rows, second)

        def delivered() -> dict[str, Any] | None:
            doc = status_json(dirs)
            return doc if set(doc["deliveries"]["by_state"]) == {
                DeliveryState.DONE.value} else None

        doc = wait_until(delivered, TIMEOUT, "status to show every delivery done")
        assert doc["deliveries"]["by_state"] == {DeliveryState.DONE.value: 10}
        assert doc["healthy"] is True
        assert PASSWORD not in node.log()
        assert node.stop() == 0
    finally:
        orthanc.stop()

