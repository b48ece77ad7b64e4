"""``cxrd serve`` with two ``[[notifications]]``, a webhook (an HTTP server on loopback)
and an HL7 receiver over MLLP (``notifypeers``), and the DEMO model: a study the model
finds TB-positive makes exactly one webhook POST and one ORU^R01; a study it finds normal
makes none. The patient's ID reaches the HL7 receiver and no log line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicompeers import SentFile, phantom_study
from nodehelpers import DONE_TIMEOUT, IMAGE_SIZE, DbView, Nodes, wait_until, write_config
from notifypeers import HookServer, MllpServer

from cxrd.db import Delivery, Study
from cxrd.domain import DeliveryState, StudyState
from cxrd.findings import NORM, TB, decide_class
from cxrd.infer import Classifier
from cxrd.modelinfo import demo_model_path
from cxrd.worker import prepare

pytestmark = pytest.mark.slow


def pick_studies(folder: Path) -> tuple[list[SentFile], list[SentFile]]:
    """A one-image phantom study the DEMO model reports TB (P(TB) at or above its operating
    point) and one it reports NORM, found by running the model on candidates here (the
    phantom generator draws each label's look at random)."""
    clf = Classifier(demo_model_path(), ["CPUExecutionProvider"], 1)
    threshold = clf.info.operating_point.tb_threshold
    found: dict[int, list[SentFile]] = {}
    for seed in range(40):
        for label, k in (("TB", TB), ("NORM", NORM)):
            if k in found:
                continue
            study = phantom_study(folder / f"{label}-{seed}", 1, seed=seed, size=IMAGE_SIZE,
                                  label_cycle=(label,))
            probs, _ = clf.run(prepare(study[0].path, clf.info).model_input[None])
            if decide_class(probs[0], threshold) == k:
                found[k] = study
        if len(found) == 2:
            return found[TB], found[NORM]
    pytest.fail("the DEMO model reported no phantom of 40 as TB and one as NORM")


def drop(study: list[SentFile], incoming: Path) -> None:
    incoming.mkdir(parents=True, exist_ok=True)
    for f in study:
        (incoming / f.path.name).write_bytes(f.path.read_bytes())


def test_a_tb_study_notifies_once_by_webhook_and_hl7_and_a_normal_one_not(
        tmp_path: Path, nodes: Nodes, db_of: Any) -> None:
    tb, norm = pick_studies(tmp_path / "candidates")
    hook, ris = HookServer([200]), MllpServer(["AA"])
    try:
        (tmp_path / "node").mkdir()
        dirs = write_config(tmp_path / "node", extra=f"""
[sender]
initial_backoff_seconds = 0.5
max_backoff_seconds = 2

[[notifications]]
name = "worklist"
kind = "webhook"
url = "{hook.url}"

[[notifications]]
name = "ris"
kind = "hl7"
host = "127.0.0.1"
port = {ris.port}
receiving_application = "RIS"
""")
        node = nodes.start(dirs)
        db: DbView = db_of(dirs)

        drop(tb, dirs.incoming)
        wait_until(lambda: len(hook.requests) >= 1 and len(ris.accepted) >= 1, DONE_TIMEOUT,
                   "the TB study's webhook POST and HL7 message")
        [body] = hook.bodies()
        source = pydicom.dcmread(tb[0].path, stop_before_pixels=True)
        assert body["study_instance_uid"] == tb[0].study_instance_uid
        assert body["accession_number"] == str(source.AccessionNumber)
        assert body["finding"] == "TB" and body["probability"] >= body["threshold"]
        assert body["model"]["demo"] is True
        [message] = ris.accepted
        assert str(message.segment("PID")(3)).split("^")[0] == str(source.PatientID)
        assert tb[0].study_instance_uid in str(message)

        drop(norm, dirs.incoming)
        wait_until(lambda: db.count(Study, Study.study_instance_uid == norm[0].study_instance_uid,
                                    Study.state == StudyState.REPORTED.value) == 1,
                   DONE_TIMEOUT, "the NORM study reported")
        time.sleep(3)  # several sender passes
        assert len(hook.requests) == 1 and len(ris.received) == 1
        assert db.states(Delivery.state) == {DeliveryState.DONE.value: 2}
        assert node.stop() == 0
        log = node.log()
        assert "action=notify notification=worklist" in log
        assert "action=notify notification=ris kind=hl7" in log
        assert str(source.PatientID) not in log  # in the HL7 message only
    finally:
        hook.stop()
        ris.stop()
