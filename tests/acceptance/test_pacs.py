"""``cxrd serve`` between real DICOM peers: a real Orthanc as the PACS, dcmtk's
``storescu`` as a modality.

The round trip a site relies on: the PACS sends a study, cxrd classifies it and sends the
SR, the heatmap SCs and the lung-field SEGs back into the same study. Then the PACS goes
down: results of the next study (sent by a modality, compressed three ways) wait in the
outbox with the reason shown by ``cxrd status``, and reach the PACS once it is back, with
nothing dead.
"""

from __future__ import annotations

import tomllib
import urllib.error
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from dicompeers import (
    Orthanc,
    SentFile,
    http_error_text,
    output,
    phantom_study,
    storescu,
    storescu_profile,
)
from nodehelpers import IMAGE_SIZE, DbView, NodeDirs, Nodes, status_json, wait_until, write_config
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
from sqlalchemy import select

from cxrd.db import Delivery, Instance, Result
from cxrd.domain import DeliveryState, InstanceState, ResultKind

pytestmark = pytest.mark.slow

SC = "1.2.840.10008.5.1.4.1.1.7"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPRESSED = (JPEG2000Lossless, JPEGLSLossless, RLELossless)
TIMEOUT = 90.0


def pacs_node(root: Path, orthanc: Orthanc) -> NodeDirs:
    """A node that takes studies from Orthanc and storescu and sends results to Orthanc,
    retrying fast (0.5 s doubling to 2 s)."""
    root.mkdir(parents=True, exist_ok=True)
    dirs = write_config(root, extra=f"""
[sender]
initial_backoff_seconds = 0.5
max_backoff_seconds = 2

[[destinations]]
name = "pacs"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
""")
    dirs.config.write_text(dirs.config.read_text().replace(
        "[node]\n", f'[node]\nallowed_callers = ["{orthanc.aet}", "STORESCU@127.0.0.1"]\n', 1))
    return dirs


def node_port(dirs: NodeDirs) -> int:
    return int(tomllib.loads(dirs.config.read_text())["node"]["port"])


def results_in_pacs(orthanc: Orthanc, study_instance_uid: str, images: int
                    ) -> list[dict[str, str]] | None:
    """The study's instances once its SR and one SC and one SEG per image are in
    Orthanc."""
    study = orthanc.study_id(study_instance_uid)
    if study is None:
        return None
    rows = orthanc.instances_of_study(study)
    srs = [r for r in rows if r["sop_class_uid"] == SR_3D]
    scs = [r for r in rows if r["sop_class_uid"] == SC]
    segs = [r for r in rows if r["sop_class_uid"] == SEG]
    return rows if len(srs) == 1 and len(scs) == len(segs) == images else None


def check_results(rows: list[dict[str, str]], study: list[SentFile]) -> None:
    study_uid = study[0].study_instance_uid
    assert {r["study_instance_uid"] for r in rows} == {study_uid}
    by_class: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_class.setdefault(r["sop_class_uid"], []).append(r)
    assert [r["modality"] for r in by_class[SR_3D]] == ["SR"]
    assert {r["modality"] for r in by_class[SC]} <= {"OT", "SC"}
    assert len(by_class[SC]) == len(study)
    assert [r["modality"] for r in by_class[SEG]] == ["SEG"] * len(study)


def check_segs(orthanc: Orthanc, rows: list[dict[str, str]], study: list[SentFile],
               results: dict[str, Result], data_dir: Path) -> None:
    """Each SEG the PACS holds reads back with highdicom, references one image of the
    study (each image once), and is the object cxrd wrote, pixel for pixel (its store key
    ``results/<uid>.dcm`` is a file under ``data_dir``, the default results folder)."""
    sources = []
    for row in rows:
        if row["sop_class_uid"] != SEG:
            continue
        back = hd.seg.Segmentation.from_dataset(
            pydicom.dcmread(BytesIO(orthanc.instance_file(row["id"]))))
        (source,) = [uid for _, _, uid in back.get_source_image_uids()]
        sources.append(source)
        assert back.get_segment_numbers() == [1, 2]
        written = pydicom.dcmread(data_dir / results[row["sop_instance_uid"]].path)
        assert written.SOPClassUID == SEG and back.PixelData == written.PixelData
    assert sorted(sources) == sorted(f.sop_instance_uid for f in study)


def deliveries(db: DbView) -> dict[str, Any]:
    with db.session() as s:
        rows = s.execute(select(Delivery, Result).join(Result, Delivery.result_id == Result.id)
                         ).all()
    return {r.sop_instance_uid: d for d, r in rows}


def processed(db: DbView, study: list[SentFile]) -> bool:
    """Every image is classified and has its SC, and the study has its SR."""
    uids = [f.sop_instance_uid for f in study]
    with db.session() as s:
        states = list(s.scalars(select(Instance.state).where(
            Instance.sop_instance_uid.in_(uids))))
        results = list(s.scalars(select(Result).where(
            Result.study_instance_uid == study[0].study_instance_uid)))
    scs = {r.source_sop_instance_uid for r in results if r.kind == ResultKind.SC.value}
    segs = {r.source_sop_instance_uid for r in results if r.kind == ResultKind.SEG.value}
    return (states == [InstanceState.DONE.value] * len(uids) and scs == segs == set(uids)
            and any(r.kind == ResultKind.SR.value for r in results))


def test_orthanc_round_trip_and_outage(tmp_path: Path, nodes: Nodes,
                                       db_of: Any) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")
    dirs = pacs_node(tmp_path / "node", orthanc)
    orthanc.modalities["cxrd"] = ("CXRD", "127.0.0.1", node_port(dirs))
    orthanc.start()
    try:
        node = nodes.start(dirs)
        db = db_of(dirs)

        # 1. The PACS holds a study and sends it to cxrd.
        first = phantom_study(tmp_path / "first", 3, seed=1, size=IMAGE_SIZE)
        answers = [orthanc.upload(f.path) for f in first]
        [orthanc_study] = {a["ParentStudy"] for a in answers}
        try:
            orthanc.post("/modalities/cxrd/store",
                         {"Resources": [orthanc_study], "Synchronous": True})
        except urllib.error.HTTPError as exc:
            pytest.fail(f"Orthanc could not send the study to cxrd: {http_error_text(exc)}\n"
                        f"{orthanc.log()[-3000:]}\n{node.log()[-3000:]}")

        # ... and gets the SR, the heatmaps and the lung SEGs back, in the same study.
        rows = wait_until(lambda: results_in_pacs(orthanc, first[0].study_instance_uid, 3),
                          TIMEOUT, "the SR, 3 SCs and 3 SEGs in Orthanc")
        assert orthanc.study_id(first[0].study_instance_uid) == orthanc_study
        assert len(rows) == 3 + 1 + 3 + 3  # the images, the SR, the heatmaps, the SEGs
        check_results([r for r in rows if r["sop_class_uid"] in (SR_3D, SC, SEG)], first)
        check_segs(orthanc, rows, first, {r.sop_instance_uid: r for r in _results(db, first)},
                   db.path.parent)
        assert {i.source for i in _instances(db)} == {"dicom:ORTHANC@127.0.0.1"}

        # 2. The PACS goes down; a modality sends a study compressed three ways.
        orthanc.stop()
        second = phantom_study(tmp_path / "second", 3, seed=2, size=IMAGE_SIZE,
                               modality="DX", transfer_syntaxes=list(COMPRESSED))
        done = storescu(node_port(dirs), [f.path for f in second],
                        options=storescu_profile(tmp_path, list(COMPRESSED)))
        assert done.returncode == 0, output(done)
        assert done.stderr.count("Received Store Response (Success)") == 3, output(done)
        received = {i.sop_instance_uid: i for i in _instances(db)}
        for f in second:
            assert received[f.sop_instance_uid].transfer_syntax_uid == f.transfer_syntax_uid

        # decoded and classified; its results wait, with the reason shown by status
        wait_until(lambda: processed(db, second), TIMEOUT,
                   "the compressed study to be classified")
        second_results = {r.sop_instance_uid for r in _results(db, second)}
        assert len(second_results) == 7  # 3 SCs, 3 SEGs, the SR

        def waiting() -> dict[str, Any] | None:
            doc = status_json(dirs)
            errors = {e["sop_instance_uid"]: e for e in doc["deliveries"]["pending_with_errors"]}
            return doc if second_results <= set(errors) else None

        doc = wait_until(waiting, TIMEOUT, "the new results to fail delivery")
        assert doc["deliveries"]["by_state"].get(DeliveryState.PENDING.value) == 7
        assert not doc["deliveries"]["by_state"].get(DeliveryState.DEAD.value)
        for entry in doc["deliveries"]["pending_with_errors"]:
            assert entry["destination"] == "pacs" and entry["attempts"] >= 1
            assert entry["last_error"] and "PERMANENT" not in entry["last_error"]

        # 3. The PACS is back (same storage): everything is delivered, nothing dead.
        orthanc.start()
        rows = wait_until(lambda: results_in_pacs(orthanc, second[0].study_instance_uid, 3),
                          TIMEOUT, "the second study's SR, SCs and SEGs in Orthanc")
        check_results(rows, second)
        check_segs(orthanc, rows, second,
                   {r.sop_instance_uid: r for r in _results(db, second)}, db.path.parent)
        assert results_in_pacs(orthanc, first[0].study_instance_uid, 3), "first study lost"

        def delivered() -> dict[str, Any] | None:
            doc = status_json(dirs)
            by_state = doc["deliveries"]["by_state"]
            return doc if set(by_state) == {DeliveryState.DONE.value} else None

        doc = wait_until(delivered, TIMEOUT, "status to show every delivery done")
        assert doc["deliveries"]["by_state"] == {DeliveryState.DONE.value: 14}
        assert not doc["deliveries"]["pending_with_errors"]
        assert not doc["deliveries"]["recent_dead"]
        assert doc["healthy"] is True
        retried = [d for uid, d in deliveries(db).items() if uid in second_results]
        assert all(d.attempts >= 2 and d.last_error is None for d in retried)

        assert node.stop() == 0
    finally:
        orthanc.stop()


def _instances(db: DbView) -> list[Instance]:
    with db.session() as s:
        return list(s.scalars(select(Instance)))


def _results(db: DbView, study: list[SentFile]) -> list[Result]:
    with db.session() as s:
        return list(s.scalars(select(Result).where(
            Result.study_instance_uid == study[0].study_instance_uid)))
