"""IHE AI Results (AIR): what the SR, the heatmap SC and the lung SEG of one analysis say
of the model that made them, and how they name each other, read back with pydicom and
highdicom and checked with dciodvfy (dicom3tools)."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from resultfactory import DEVICE_UID_WARNINGS, dciodvfy, fake_result, make_model, make_source

from cxrd import heatmap
from cxrd import sr as report
from cxrd.dicom import SECONDARY_CAPTURE, SEGMENTATION
from cxrd.durable import save_dataset
from cxrd.findings import ImageFindings
from cxrd.modelinfo import ModelInfo, SegmentationInfo, software_versions
from cxrd.seg import LungSegEncoder
from cxrd.worker import heatmap_uids, seg_uids, sr_series_uid

GENERATION = 1


def _segmenter() -> SegmentationInfo:
    return SegmentationInfo(name="cxrd-lungseg", version="2024.06.1",
                            device_uid=str(generate_uid()), manufacturer="cxrd lab")


def _masks(rows: int, cols: int) -> list[np.ndarray]:
    left, right = np.zeros((rows, cols), bool), np.zeros((rows, cols), bool)
    left[rows // 6:rows * 5 // 6, cols // 10:cols * 4 // 10] = True
    right[rows // 6:rows * 5 // 6, cols * 6 // 10:cols * 9 // 10] = True
    return [left, right]


def _analysis(tmp_path: Path, model: ModelInfo, segmenter: SegmentationInfo
              ) -> tuple[list[Dataset], Path, list[Path], list[Path]]:
    """Two images of one study, each with its SC and SEG (UIDs as the worker makes them),
    and the study's SR: (sources, SR file, SC files, SEG files)."""
    study = str(generate_uid())
    sources = [make_source(study_uid=study), make_source(640, 520, study_uid=study)]
    encoder = LungSegEncoder(segmenter)  # the second SEG comes from the first's template
    scs, segs, related, findings = [], [], [], []
    for number, src in enumerate(sources, start=1):
        result = fake_result(src, biases=(1.0, 0.0, 0.0))
        source = str(src.SOPInstanceUID)
        sc_series, sc_uid = heatmap_uids(source, study, GENERATION, model)
        sc = heatmap.build_heatmap_sc(result, model, series_instance_uid=sc_series,
                                      sop_instance_uid=sc_uid, instance_number=number,
                                      report_series_uid=sr_series_uid(study, model))
        scs.append(save_dataset(sc, tmp_path))
        seg_series, seg_uid = seg_uids(source, study, GENERATION, segmenter)
        path = tmp_path / f"{seg_uid}.dcm"
        path.write_bytes(encoder.encode(src, _masks(int(src.Rows), int(src.Columns)),
                                        series_instance_uid=seg_series,
                                        sop_instance_uid=seg_uid, instance_number=number,
                                        report_series_uid=sr_series_uid(study, model)))
        segs.append(path)
        related += [(SECONDARY_CAPTURE, sc_series, sc_uid), (SEGMENTATION, seg_series, seg_uid)]
        findings.append(ImageFindings.of(src, result.probs, result.cam,
                                         model.operating_point.tb_threshold))
    sr = report.build_sr(findings, model, series_instance_uid=sr_series_uid(study, model),
                         related=related)
    return sources, save_dataset(sr, tmp_path), scs, segs


def _model_item(ds: Dataset, device_uid: str) -> Dataset:
    """The Contributing Equipment item that names the model (by its Device UID)."""
    (item,) = [i for i in ds.ContributingEquipmentSequence if i.get("DeviceUID") == device_uid]
    return item


def _assert_names(ds: Dataset, model: ModelInfo | SegmentationInfo) -> None:
    """General Equipment and the Contributing Equipment item name ``model`` alike."""
    item = _model_item(ds, model.device_uid)
    (purpose,) = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "109102", "DCM", "Processing Equipment")
    assert item.ContributionDescription == "AI model that created this instance"
    assert "ContributionDateTime" in item
    for holder in (ds, item):
        assert holder.Manufacturer == model.manufacturer
        assert holder.ManufacturerModelName == model.name
        assert list(holder.SoftwareVersions) == software_versions(model)
        assert holder.DeviceSerialNumber == model.device_uid
        assert holder.DeviceUID == model.device_uid


def test_sr_sc_and_seg_name_their_model_alike(tmp_path: Path) -> None:
    model, segmenter = make_model(demo=True), _segmenter()
    _, sr_path, scs, segs = _analysis(tmp_path, model, segmenter)
    sr = hd.sr.srread(sr_path)
    _assert_names(sr, model)
    for path in scs:
        _assert_names(pydicom.dcmread(path), model)
    for path in segs:
        _assert_names(pydicom.dcmread(path), segmenter)
        # the segmenter's algorithm (Segment Sequence) is the same model
        segment = pydicom.dcmread(path).SegmentSequence[0]
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
            segmenter.name, segmenter.version)

    # The device observer (TID 1004) is the equipment the SR's header names.
    (observer,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    device = observer.observer_identifying_attributes
    item = _model_item(sr, model.device_uid)
    assert device.uid == item.DeviceUID
    assert device.name == model.name
    assert device.manufacturer_name == item.Manufacturer
    assert device.model_name == item.ManufacturerModelName
    assert device.serial_number == item.DeviceSerialNumber
    # ... and the algorithm (TID 4019) of every finding group is that model, that version.
    texts: dict[str, set[str]] = {"111001": set(), "111003": set()}
    todo = list(sr.ContentSequence)
    while todo:
        node = todo.pop()
        todo += node.get("ContentSequence", [])
        code = node.ConceptNameCodeSequence[0].CodeValue
        if code in texts:
            texts[code].add(node.TextValue)
    assert texts == {"111001": {item.ManufacturerModelName},
                     "111003": {item.SoftwareVersions[0]}}


def test_the_sr_lists_the_scs_and_segs_and_each_names_the_sr_series(tmp_path: Path) -> None:
    model, segmenter = make_model(demo=False), _segmenter()
    sources, sr_path, scs, segs = _analysis(tmp_path, model, segmenter)
    sr = hd.sr.srread(sr_path)
    evidence = {(str(series), str(sop_class), str(uid))
                for _, series, uid, sop_class in _evidence(sr)}
    expected = {(str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID))
                for ds in [*sources, *(pydicom.dcmread(p) for p in (*scs, *segs))]}
    assert evidence == expected
    for path in (*scs, *segs):  # the second SEG from the first one's template
        (related,) = pydicom.dcmread(path).RelatedSeriesSequence
        assert related.StudyInstanceUID == sr.StudyInstanceUID
        assert related.SeriesInstanceUID == sr.SeriesInstanceUID
        assert list(related.PurposeOfReferenceCodeSequence) == []
    for path in (sr_path, *scs, *segs):
        assert dciodvfy(path) == [], path


def _evidence(sr: hd.sr.Comprehensive3DSR) -> list[tuple[str, str, str, str]]:
    """(study, series, instance, SOP class) of each instance in Current Requested
    Procedure Evidence."""
    out = []
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            for ref in series.ReferencedSOPSequence:
                out.append((study.StudyInstanceUID, series.SeriesInstanceUID,
                            ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID))
    return out


@pytest.mark.parametrize("kind", ["sr", "sc", "seg"])
def test_dciodvfy_warns_only_of_the_model_items_device_uid(tmp_path: Path, kind: str) -> None:
    """The warnings ``resultfactory.dciodvfy`` leaves out are the Device UID of the model's
    Contributing Equipment item (dicom3tools 2022 lists Device UID in General Equipment,
    not there), and nothing else: without it, dciodvfy has nothing to say."""
    model, segmenter = make_model(demo=False), _segmenter()
    _, sr_path, scs, segs = _analysis(tmp_path, model, segmenter)
    path = {"sr": sr_path, "sc": scs[0], "seg": segs[0]}[kind]
    assert dciodvfy(path, all_warnings=True) == list(DEVICE_UID_WARNINGS)
    ds = pydicom.dcmread(path)
    device_uid = segmenter.device_uid if kind == "seg" else model.device_uid
    del _model_item(ds, device_uid).DeviceUID
    assert "DeviceUID" in ds  # General Equipment keeps it, without a warning
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, enforce_file_format=True)
    assert dciodvfy(bare, all_warnings=True) == []
