"""The worker with the real lung-field segmenter (and the real classifier) on small chest,
hand and knee phantoms: the SEG it writes per classified image (read back with highdicom,
validated by dciodvfy), its result and delivery rows, the lung-field gate, and the
``[results] segmentation`` and ``[model] segmenter`` switches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from resultfactory import dciodvfy
from sqlalchemy import select

from cxrd.admit import admit_stable_studies, requeue_study
from cxrd.config import load_config
from cxrd.db import Database, Delivery, Instance, Job, Result, Study
from cxrd.dicom import SEGMENTATION
from cxrd.domain import InstanceState, ResultKind, SkipReason, StudyState
from cxrd.errors import ModelError
from cxrd.findings import ImageFindings, allowed_area
from cxrd.infer import Classifier, Segmenter
from cxrd.ingest import Ingestor
from cxrd.lungs import probs_to_masks
from cxrd.modelinfo import demo_model_path, demo_segmenter_path
from cxrd.preflight import check_segmenter
from cxrd.preprocess import gray8_to_model_input
from cxrd.status import collect, render
from cxrd.worker import WorkerLoop, lung_fields, prepare, segmenter_input
from training.phantoms import (
    Phantom,
    make_non_chest,
    make_phantom,
    random_patient_study,
    to_dataset,
)

#: Small images keep decoding, both models and the SEG fast on a 2-core machine.
ROWS, COLS = 400, 330


@pytest.fixture(scope="module")
def models() -> tuple[Classifier, Segmenter]:
    return (Classifier(None, ["CPUExecutionProvider"], 1, max_batch=2),
            Segmenter(None, ["CPUExecutionProvider"], 1, max_batch=2))


Node = tuple[WorkerLoop, Ingestor, Database]


def _node(tmp_path: Path, models: tuple[Classifier, Segmenter], extra: str = "",
          *, inject: bool = True) -> Iterator[Node]:
    config_file = tmp_path / "cxrd.toml"
    config_file.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[workers]\nbatch_size = 2\n'
        + extra
        + '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
          'port = 11112\n')
    config = load_config(config_file, env={})
    db = Database(config.storage.database_url_resolved)
    db.migrate()
    clf, seg = models
    loop = WorkerLoop(config, "test:1:w0", db, classifier=clf,
                      segmenter=seg if inject else None)
    yield loop, Ingestor(db, config.storage.spool_dir, config.storage.rejected_dir), db
    db.dispose()


@pytest.fixture
def node(tmp_path: Path, models: tuple[Classifier, Segmenter]) -> Iterator[Node]:
    yield from _node(tmp_path, models)


def _chest(seed: int) -> Phantom:
    return make_phantom(np.random.default_rng(seed), ("TB", "NORM")[seed % 2], ROWS, COLS)


def _hand_or_knee_as_chest(seed: int, part: str) -> Phantom:
    """A hand or knee radiograph whose header says CHEST PA: admission accepts it."""
    rng = np.random.default_rng(seed)
    while (ph := make_non_chest(rng, ROWS, COLS)).body_part != part:
        pass
    return replace(ph, body_part="CHEST", view="PA")


def _store(ingestor: Ingestor, phantoms: list[Phantom]) -> str:
    study = random_patient_study(np.random.default_rng(len(phantoms)))
    study = replace(study, study_instance_uid=str(generate_uid()))
    series = str(generate_uid())
    for i, ph in enumerate(phantoms, start=1):
        ds = to_dataset(ph, study, instance_number=i, series_instance_uid=series)
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert ingestor.store(buf.getvalue(), "test").accepted
    return study.study_instance_uid


def _drain(loop: WorkerLoop) -> None:
    while loop.run_once():
        pass


def _results(db: Database, study: str, kind: ResultKind) -> list[Result]:
    with db.session() as s:
        return list(s.scalars(select(Result).where(Result.study_instance_uid == study,
                                                   Result.kind == kind.value)
                              .order_by(Result.id)))


def _instances(db: Database, study: str) -> list[Instance]:
    with db.session() as s:
        return list(s.scalars(select(Instance).where(Instance.study_instance_uid == study)
                              .order_by(Instance.id)))


def test_the_worker_writes_a_lung_seg_per_classified_image(node: Node) -> None:
    loop, ingestor, db = node
    study = _store(ingestor, [_chest(1), _chest(2), _chest(3)])
    assert admit_stable_studies(db, 0) == 1
    _drain(loop)
    instances = _instances(db, study)
    assert [i.state for i in instances] == [InstanceState.DONE.value] * 3
    segs = _results(db, study, ResultKind.SEG)
    assert len(segs) == 3 and len(_results(db, study, ResultKind.SC)) == 3
    assert loop.segmenter is not None and loop.segmentation is not None
    for inst, row in zip(instances, segs, strict=True):
        assert row.source_sop_instance_uid == inst.sop_instance_uid and row.generation == 1
        assert dciodvfy(loop.objects.local_path(row.path)) == []
        seg = hd.seg.segread(loop.objects.local_path(row.path))
        assert seg.SOPClassUID == SEGMENTATION and seg.SOPInstanceUID == row.sop_instance_uid
        assert seg.StudyInstanceUID == study
        src = pydicom.dcmread(loop.objects.local_path(inst.path))
        # the masks are exactly those of the worker's segmenter output on that image
        prep = prepare(loop.objects.local_path(inst.path), loop.model)
        (probs,) = loop._segment([prep])
        expected = probs_to_masks(probs, int(src.Rows), int(src.Columns),
                                  loop.segmentation.threshold)
        back = seg.get_pixels_by_source_instance([inst.sop_instance_uid],
                                                 segment_numbers=[1, 2])
        back = np.asarray(back[0], dtype=bool)
        assert back.shape == (ROWS, COLS, 2)
        for channel in range(2):
            assert np.array_equal(back[..., channel], expected[channel])
            assert 0.05 < expected[channel].mean() < 0.25  # a lung, not nothing or all
        # the lung grid the findings are restricted to: both channels OR-ed
        assert prep.lung_grid is not None and prep.lung_grid.shape == probs.shape[:2]
        assert np.array_equal(prep.lung_grid, lung_fields(probs, loop.segmentation))
        # the recorded region (the SR's, the SC's outline) is the lung-restricted one
        class_probs, cams = loop.classifier.run(prep.model_input[None])
        expected_findings = ImageFindings.of(
            prep.dataset, class_probs[0], cams[0], loop.model.operating_point.tb_threshold,
            lungs=prep.lung_grid, margin=loop.config.results.lung_margin)
        with db.session() as s:
            record = s.scalars(select(Job.record).where(Job.instance_id == inst.id)).one()
        region = json.loads(record)["region"]
        if expected_findings.region is None:
            assert region is None
        else:
            assert region == pytest.approx(list(expected_findings.region))
            allowed = allowed_area(prep.lung_grid, ROWS, COLS, loop.config.results.lung_margin)
            assert allowed is not None
            x0, y0, x1, y1 = (int(v) for v in region)
            assert allowed[y0:y1, x0:x1].any()  # the region lies on the allowed area
    with db.session() as s:
        # one delivery per result and destination, queued with the job's completion
        kinds = s.execute(select(Result.kind, Delivery.destination)
                          .join(Delivery, Delivery.result_id == Result.id)
                          .where(Result.study_instance_uid == study)).all()
        timings = [j.timings for j in s.scalars(select(Job).where(Job.kind == "classify"))]
    assert sorted(kinds) == sorted([("sc", "pacs")] * 3 + [("seg", "pacs")] * 3
                                   + [("sr", "pacs")])
    assert all('"segment"' in t and '"seg"' in t for t in timings)


def test_the_sr_lists_the_scs_and_segs_the_worker_wrote_and_each_names_its_series(
        node: Node) -> None:
    """IHE AIR: the report job, which runs after the classify jobs, lists as evidence the
    very SCs and SEGs they wrote (their UIDs are known in advance, not looked up); each SC
    and SEG names the SR's series, which the classify job knew before any SR existed."""
    loop, ingestor, db = node
    study = _store(ingestor, [_chest(1), _chest(2)])
    assert admit_stable_studies(db, 0) == 1
    _drain(loop)
    (sr_row,) = _results(db, study, ResultKind.SR)
    sr = hd.sr.srread(loop.objects.local_path(sr_row.path))
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    written = [r for kind in (ResultKind.SC, ResultKind.SEG) for r in _results(db, study, kind)]
    assert len(written) == 4
    sources = {i.sop_instance_uid for i in _instances(db, study)}
    assert evidence == sources | {r.sop_instance_uid for r in written}
    assert loop.segmentation is not None
    for row in written:
        ds = pydicom.dcmread(loop.objects.local_path(row.path), stop_before_pixels=True)
        model = loop.model if row.kind == ResultKind.SC.value else loop.segmentation
        (item,) = [i for i in ds.ContributingEquipmentSequence
                   if i.get("DeviceUID") == model.device_uid]
        assert item.ManufacturerModelName == ds.ManufacturerModelName == model.name
        (related,) = ds.RelatedSeriesSequence
        assert related.SeriesInstanceUID == sr.SeriesInstanceUID
    assert _model_device_uid(sr) == loop.model.device_uid


def _model_device_uid(sr: hd.sr.Comprehensive3DSR) -> str:
    (observer,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    return str(observer.observer_identifying_attributes.uid)


def test_a_reprocess_writes_a_new_seg_and_keeps_the_first(node: Node) -> None:
    loop, ingestor, db = node
    study = _store(ingestor, [_chest(4)])
    admit_stable_studies(db, 0)
    _drain(loop)
    assert requeue_study(db, study) == 1
    _drain(loop)
    segs = _results(db, study, ResultKind.SEG)
    assert [r.generation for r in segs] == [1, 2]
    assert segs[0].sop_instance_uid != segs[1].sop_instance_uid
    assert all(loop.objects.local_path(r.path).exists() for r in segs)
    first, second = (pydicom.dcmread(loop.objects.local_path(r.path)) for r in segs)
    assert first.SeriesInstanceUID != second.SeriesInstanceUID


def test_hand_and_knee_with_a_chest_header_are_skipped_for_no_lung_fields(
        node: Node) -> None:
    loop, ingestor, db = node
    study = _store(ingestor, [_hand_or_knee_as_chest(5, "HAND"),
                              _hand_or_knee_as_chest(6, "KNEE"), _chest(7)])
    assert admit_stable_studies(db, 0) == 1
    # admission, which reads the header only, queued all three
    assert [i.state for i in _instances(db, study)] == [InstanceState.QUEUED.value] * 3
    _drain(loop)
    hand, knee, chest = _instances(db, study)
    for inst in (hand, knee):
        assert (inst.state, inst.reason) == (InstanceState.SKIPPED.value,
                                             SkipReason.NO_LUNG_FIELDS.value)
        assert "min_lung_fraction" in (inst.detail or "")
    assert chest.state == InstanceState.DONE.value
    sources = {r.source_sop_instance_uid for r in _results(db, study, ResultKind.SEG)}
    assert sources == {chest.sop_instance_uid}  # none for the skipped images
    doc = collect(loop.config, db)
    assert doc["skipped"] == {SkipReason.NO_LUNG_FIELDS.value: 2}
    assert "no-lung-fields 2" in render(doc)
    assert doc["segmenter"]["demo"] is True and "DEMO" in doc["segmenter"]["display_name"]
    with db.session() as s:
        assert s.scalars(select(Study)).one().state == StudyState.REPORTED.value


def test_segmentation_false_writes_no_seg_but_still_gates(
        tmp_path: Path, models: tuple[Classifier, Segmenter]) -> None:
    for loop, ingestor, db in _node(tmp_path, models, "[results]\nsegmentation = false\n"):
        study = _store(ingestor, [_chest(8), _hand_or_knee_as_chest(9, "HAND")])
        admit_stable_studies(db, 0)
        _drain(loop)
        chest, hand = _instances(db, study)
        assert chest.state == InstanceState.DONE.value
        assert hand.reason == SkipReason.NO_LUNG_FIELDS.value
        assert _results(db, study, ResultKind.SEG) == []
        assert len(_results(db, study, ResultKind.SC)) == 1
        assert not list(loop.results_dir.glob("*.dcm")) or all(
            pydicom.dcmread(p, stop_before_pixels=True).Modality != "SEG"
            for p in loop.results_dir.glob("*.dcm"))


def test_segmenter_off_runs_without_it(tmp_path: Path,
                                       models: tuple[Classifier, Segmenter]) -> None:
    for loop, ingestor, db in _node(tmp_path, models, '[model]\nsegmenter = "off"\n',
                                    inject=False):
        assert loop.segmenter is None and loop.segmentation is None
        study = _store(ingestor, [_chest(10), _hand_or_knee_as_chest(11, "KNEE")])
        admit_stable_studies(db, 0)
        _drain(loop)
        # no gate: the knee is classified as the header says, and no SEG is written
        assert [i.state for i in _instances(db, study)] == [InstanceState.DONE.value] * 2
        assert _results(db, study, ResultKind.SEG) == []
        assert len(_results(db, study, ResultKind.SC)) == 2
        doc = collect(loop.config, db)
        assert doc["segmenter"] is None and "segmenter: off" in render(doc)


def test_the_segmenter_session_refuses_a_classifier_file_and_the_other_way_round(
        tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"not a segmentation model.*\[model\] segmenter|"
                                         r"\[model\] segmenter.*not a segmentation model"):
        Segmenter(demo_model_path(), ["CPUExecutionProvider"], 1)
    with pytest.raises(ModelError, match="segmentation model, not a classifier"):
        Classifier(demo_segmenter_path(), ["CPUExecutionProvider"], 1)
    # check-config and `cxrd serve` say so before any worker starts
    config_file = tmp_path / "cxrd.toml"
    config_file.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
                           f'[model]\nsegmenter = "{demo_model_path()}"\n')
    problem = check_segmenter(load_config(config_file, env={}))
    assert problem is not None and "not a segmentation model" in problem.cause
    assert '"off"' in problem.fix
    config_file.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    assert check_segmenter(load_config(config_file, env={})) is None


def test_on_the_cpu_the_segmenter_runs_a_batch_image_by_image(
        models: tuple[Classifier, Segmenter]) -> None:
    _, seg = models
    assert seg.image_by_image and seg.buckets == (1,)
    size = seg.input_size
    x = np.random.default_rng(5).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    out = seg.run(x)
    assert out.shape == (3, size // 2, size // 2, 2)  # the U-Net's output: half its input
    (whole,) = seg.session.run(None, {"input_image": x})  # the whole batch in one run
    assert np.allclose(out, whole, atol=1e-5)


@pytest.mark.parametrize(("rows", "cols"), [(ROWS, COLS), (2500, 2048)])
def test_a_segmenter_of_the_classifiers_size_and_contract_takes_its_input(
        tmp_path: Path, models: tuple[Classifier, Segmenter], rows: int, cols: int) -> None:
    """Same size, same contract: the segmenter's input is the classifier's array, which is
    what its own preprocessing would make (at 2500 x 2048 too, where the contract
    box-averages first); otherwise it is made under the segmenter's own size."""
    clf, seg = models
    ph = make_phantom(np.random.default_rng(5), "TB", rows, cols)
    path = tmp_path / "chest.dcm"
    to_dataset(ph, random_patient_study(np.random.default_rng(5))).save_as(
        path, enforce_file_format=True)
    prep = prepare(path, clf.info)
    alike = replace(seg.info, input_size=clf.info.input_size,
                    preprocessing=clf.info.preprocessing)
    assert segmenter_input(prep, clf.info, alike) is prep.model_input
    assert np.array_equal(prep.model_input, gray8_to_model_input(
        prep.display, alike.input_size, alike.preprocessing))
    if seg.info.input_size != clf.info.input_size:
        own = segmenter_input(prep, clf.info, seg.info)
        assert own.shape == (seg.info.input_size, seg.info.input_size, 3)
        assert np.array_equal(own, gray8_to_model_input(
            prep.display, seg.info.input_size, seg.info.preprocessing))
