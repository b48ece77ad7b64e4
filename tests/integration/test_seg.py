"""The lung-field Segmentation (cxrd.seg) against a real validator (dciodvfy, dicom3tools),
read back with highdicom: the masks must come back exactly.

Sources are synthetic CR/DX images (tests/resultfactory.py); masks are drawn here. The
validator binary is part of the test environment: when it is missing the test fails
rather than skips.
"""

from __future__ import annotations

import datetime
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from resultfactory import CR, DX_PRESENTATION, dciodvfy, make_source

from cxrd import lungs, seg
from cxrd.durable import save_dataset
from cxrd.errors import InvalidUID
from cxrd.modelinfo import (
    LUNG_SEGMENTS,
    SegmentationInfo,
    demo_segmenter_path,
    read_segmentation_info,
)
from cxrd.worker import heatmap_uids, seg_uids

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _model(*, demo: bool) -> SegmentationInfo:
    if demo:  # the shipped demo segmenter's own metadata
        info = read_segmentation_info(demo_segmenter_path())
        assert info.demo
        return info
    return SegmentationInfo(name="cxrd-lungseg", version="2024.06.1",
                            device_uid=generate_uid(), training_data="montgomery,shenzhen")


def _lungs(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Two lung-shaped blobs: the patient's left lung on the image's right."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, ry, rx = rows * 0.5, rows * 0.32, cols * 0.17
    left = ((yy - cy) / ry) ** 2 + ((xx - cols * 0.72) / rx) ** 2 <= 1.0
    right = ((yy - cy) / ry) ** 2 + ((xx - cols * 0.28) / rx) ** 2 <= 1.0
    return left, right


def _build(src: Dataset, masks: tuple[np.ndarray, np.ndarray], model: SegmentationInfo,
           generation: int = 1) -> hd.seg.Segmentation:
    series_uid, sop_uid = seg_uids(str(src.SOPInstanceUID), str(src.StudyInstanceUID),
                                   generation, model)
    return seg.build_lung_seg(src, masks, model, series_instance_uid=series_uid,
                              sop_instance_uid=sop_uid, instance_number=3)


def _read_masks(path: Path, src: Dataset) -> np.ndarray:
    """(rows, cols, segments) as highdicom decodes them for the source image."""
    back = hd.seg.segread(path)
    pixels = back.get_pixels_by_source_instance([str(src.SOPInstanceUID)],
                                                segment_numbers=[1, 2])
    return np.asarray(pixels[0], dtype=bool)


@pytest.mark.parametrize("demo", [False, True])
@pytest.mark.parametrize(("sop_class", "orientation"),
                         [(CR, True), (CR, False), (DX_PRESENTATION, True)])
def test_lung_seg_validates_and_reads_back(tmp_path: Path, demo: bool, sop_class: str,
                                           orientation: bool) -> None:
    model = _model(demo=demo)
    src = make_source(610, 500, sop_class=sop_class, orientation=orientation)
    masks = _lungs(610, 500)
    path = save_dataset(_build(src, masks, model), tmp_path)
    assert dciodvfy(path) == []

    decoded = _read_masks(path, src)
    assert decoded.shape == (610, 500, 2)
    assert np.array_equal(decoded[..., 0], masks[0]) and np.array_equal(decoded[..., 1], masks[1])

    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPClassUID == SEGMENTATION_STORAGE and back.Modality == "SEG"
    assert back.SegmentationType == "BINARY" and back.BitsAllocated == 1
    assert back.NumberOfFrames == 2 and back.SegmentsOverlap == "NO"
    # the source study, a series of its own, the deterministic UIDs
    series_uid, sop_uid = seg_uids(src.SOPInstanceUID, src.StudyInstanceUID, 1, model)
    assert back.StudyInstanceUID == src.StudyInstanceUID
    assert back.SeriesInstanceUID == series_uid != src.SeriesInstanceUID
    assert back.SOPInstanceUID == sop_uid and back.InstanceNumber == 3
    assert back.SeriesNumber == seg.SEG_SERIES_NUMBER
    assert back.PatientID == src.PatientID and back.PatientName == src.PatientName
    # no Frame of Reference: the frames are aligned with the source's pixels
    assert "FrameOfReferenceUID" not in back
    assert back.Rows == src.Rows and back.Columns == src.Columns
    assert list(back.PatientOrientation or []) == (["L", "F"] if orientation else [])
    # the source reference
    (source,) = back.SourceImageSequence
    assert (source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID) == (
        src.SOPClassUID, src.SOPInstanceUID)
    (series,) = back.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    for frame in back.PerFrameFunctionalGroupsSequence:
        (derivation,) = frame.DerivationImageSequence
        assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    # the segments: left then right, SNOMED CT, category Anatomical Structure
    assert len(back.SegmentSequence) == 2
    for number, (item, want) in enumerate(zip(back.SegmentSequence, LUNG_SEGMENTS,
                                              strict=True), start=1):
        assert item.SegmentNumber == number and item.SegmentLabel == want.label
        (prop,) = item.SegmentedPropertyTypeCodeSequence
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == (want.code_value, "SCT")
        (category,) = item.SegmentedPropertyCategoryCodeSequence
        assert (category.CodeValue, category.CodingSchemeDesignator,
                category.CodeMeaning) == ("91723000", "SCT", "Anatomical Structure")
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = item.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == model.name
        assert algorithm.AlgorithmVersion == model.version
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert f"threshold={model.threshold:g}" in algorithm.AlgorithmParameters
        assert algorithm.AlgorithmParameters.startswith(seg.DEMO_PARAMETER) is demo
    assert [str(i.SegmentedPropertyTypeCodeSequence[0].CodeValue)
            for i in back.SegmentSequence] == ["44029006", "3341006"]
    # labelling and equipment
    assert back.SeriesDescription.endswith(seg.SEG_SERIES_DESCRIPTION)
    assert back.SeriesDescription.startswith("DEMO ") is demo
    assert back.ContentDescription.startswith("DEMO ") is demo
    assert back.ManufacturerModelName == model.name
    assert back.DeviceSerialNumber == model.device_uid
    assert list(back.SoftwareVersions)[0] == model.version


def test_patient_orientation_is_what_makes_it_valid(tmp_path: Path) -> None:
    """highdicom leaves Patient Orientation out of a SEG without a Frame of Reference;
    dciodvfy reports that as an error, which is why cxrd.seg copies it."""
    src = make_source(200, 160)
    built = _build(src, _lungs(200, 160), _model(demo=False))
    del built.PatientOrientation
    with pytest.raises(AssertionError, match="PatientOrientation"):
        dciodvfy(save_dataset(built, tmp_path))


@pytest.mark.parametrize("empty", ["both", "left"])
def test_empty_masks_still_make_a_valid_seg(tmp_path: Path, empty: str) -> None:
    """No lung found (a non-chest image, or one side missed): both frames are written,
    the empty ones as zeros, and the SEG validates and reads back empty there."""
    src = make_source(300, 256)
    left, right = _lungs(300, 256)
    left[:] = False
    if empty == "both":
        right[:] = False
    path = save_dataset(_build(src, (left, right), _model(demo=True)), tmp_path)
    assert dciodvfy(path) == []
    back = pydicom.dcmread(path)
    assert back.NumberOfFrames == 2 and len(back.SegmentSequence) == 2
    decoded = _read_masks(path, src)
    assert not decoded[..., 0].any()
    assert np.array_equal(decoded[..., 1], right)


def test_overlapping_masks_are_kept_as_they_are(tmp_path: Path) -> None:
    """The two channels are thresholded apart, so a pixel may be in both lungs: the SEG
    says the segments overlap and keeps each mask exactly."""
    src = make_source(240, 200)
    left, right = _lungs(240, 200)
    left[100:140, 90:110] = right[100:140, 90:110] = True
    path = save_dataset(_build(src, (left, right), _model(demo=False)), tmp_path)
    assert dciodvfy(path) == []
    assert pydicom.dcmread(path).SegmentsOverlap == "YES"
    decoded = _read_masks(path, src)
    assert np.array_equal(decoded[..., 0], left) and np.array_equal(decoded[..., 1], right)


def test_sparse_source(tmp_path: Path) -> None:
    """A source with only its Type 1 attributes and a malformed birth date still gets a
    valid SEG, with those attributes empty (cxrd.headers.header_view)."""
    src = make_source(200, 160, orientation=False)
    for keyword in ("PatientName", "PatientSex", "ReferringPhysicianName", "AccessionNumber",
                    "StudyTime", "StudyID", "Manufacturer", "SpecificCharacterSet"):
        delattr(src, keyword)
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        src.PatientBirthDate = "1901-12-31"
    del src.PixelData  # the worker hands over headers without pixels
    path = save_dataset(_build(src, _lungs(200, 160), _model(demo=False)), tmp_path)
    warnings_ = dciodvfy(path)
    assert all("needed to build DICOMDIR" in w for w in warnings_), warnings_
    back = pydicom.dcmread(path)
    assert back.PatientBirthDate in (None, "") and back.PatientName in (None, "")


def test_uids_are_a_function_of_source_generation_and_model() -> None:
    model, other = _model(demo=False), _model(demo=True)
    args = ("1.2.3.4", "1.2.3")
    assert seg_uids(*args, 1, model) == seg_uids(*args, 1, model)
    series, sop = seg_uids(*args, 1, model)
    assert seg_uids("1.2.3.5", "1.2.3", 1, model)[0] == series  # one series per study
    assert seg_uids("1.2.3.5", "1.2.3", 1, model)[1] != sop
    assert len({sop, seg_uids(*args, 2, model)[1], seg_uids(*args, 1, other)[1]}) == 3
    # never the SC's, even for a model with the same device UID
    classifier = type("M", (), {"device_uid": model.device_uid})()
    assert set(seg_uids(*args, 1, model)).isdisjoint(heatmap_uids(*args, 1, classifier))
    src = make_source(64, 64)
    first = _build(src, _lungs(64, 64), model)
    again = _build(src, _lungs(64, 64), model)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID, again.SeriesInstanceUID)


def test_build_lung_seg_rejects_bad_input() -> None:
    model = _model(demo=False)
    src = make_source(64, 48)
    good = _lungs(64, 48)
    uids = {"series_instance_uid": generate_uid(), "sop_instance_uid": generate_uid(),
            "instance_number": 1}
    for masks, match in (((good[0],), "needs 2 masks"),
                         ((good[0], good[1][:-1]), "Rows x Columns"),
                         ((good[0], good[1].astype(np.uint8)), "boolean")):
        with pytest.raises(ValueError, match=match):
            seg.build_lung_seg(src, masks, model, **uids)
    with pytest.raises(InvalidUID):
        seg.build_lung_seg(src, good, model, **{**uids, "sop_instance_uid": "1.02"})
    multi = make_source(64, 48)
    multi.NumberOfFrames = 2
    with pytest.raises(ValueError, match="single-frame"):
        seg.build_lung_seg(multi, good, model, **uids)


def test_a_source_with_pixel_spacing_gives_a_seg_highdicom_reads_back(tmp_path: Path) -> None:
    """highdicom copies a CR's Pixel Spacing into a Pixel Measures item without Slice
    Thickness, which its own reader refuses; the SEG leaves the item out (its frames are
    the source's pixels)."""
    model = _model(demo=True)
    src = make_source(610, 500, sop_class=CR, orientation=True)
    src.PixelSpacing = [0.143, 0.143]
    masks = _lungs(610, 500)
    path = save_dataset(_build(src, masks, model), tmp_path)
    assert dciodvfy(path) == []
    decoded = _read_masks(path, src)
    assert np.array_equal(decoded[..., 0], masks[0])
    assert np.array_equal(decoded[..., 1], masks[1])


# ------------------------------------------------------------------ the template encoder

#: Set from the clock by highdicom and by the encoder, so they differ between two builds;
#: the Dimension Organization UID is a fresh one per highdicom build.
_UNSTABLE = {"InstanceCreationTime", "InstanceCreationDate", "ContentTime", "ContentDate",
             "ContributionDateTime", "DimensionOrganizationUID"}


def _differences(a: Dataset, b: Dataset, path: str = "") -> list[str]:
    """Every element of ``a`` or ``b`` (recursively) that the other lacks or holds with
    another value, but those set from the clock."""
    out: list[str] = []
    for tag in sorted(set(a.keys()) | set(b.keys())):  # noqa: SIM118
        name = f"{path}{pydicom.datadict.keyword_for_tag(tag) or tag}"
        if pydicom.datadict.keyword_for_tag(tag) in _UNSTABLE:
            continue
        if tag not in a or tag not in b:
            out.append(f"{name}: only in {'the encoder' if tag in a else 'highdicom'}")
            continue
        ea, eb = a[tag], b[tag]
        if ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{name}: {len(ea.value)} items, not {len(eb.value)}")
            for i, (ia, ib) in enumerate(zip(ea.value, eb.value, strict=False)):
                out.extend(_differences(ia, ib, f"{name}[{i}]."))
        elif ea.VR != eb.VR or ea.value != eb.value:
            out.append(f"{name}: {ea.VR} {str(ea.value)[:60]!r} != {eb.VR} "
                       f"{str(eb.value)[:60]!r}")
    return out


def _variants() -> list[tuple[str, Dataset]]:
    """One source of each kind the encoder tells apart, two of each (the first builds the
    template, the second is encoded from it)."""
    out: list[tuple[str, Dataset]] = []
    for _ in range(2):
        out.append(("cr", make_source(300, 200)))
        out.append(("dx", make_source(300, 200, sop_class=DX_PRESENTATION)))
        out.append(("no orientation or spacing", make_source(300, 200, orientation=False)))
        out.append(("other size", make_source(280, 240)))
        utf8 = make_source(300, 200)
        utf8.SpecificCharacterSet = "ISO_IR 192"
        utf8.PatientName = "Ünal^Çağrı"
        out.append(("utf-8", utf8))
        sparse = make_source(300, 200)
        for keyword in ("PatientBirthDate", "PatientSex", "PatientAge", "StudyDescription",
                        "IssuerOfPatientID", "AccessionNumber", "SpecificCharacterSet"):
            delattr(sparse, keyword)
        sparse.PatientName = "Muller^Anna"  # the default repertoire
        out.append(("sparse patient module", sparse))
        lossy = make_source(300, 200)
        lossy.LossyImageCompression = "01"
        lossy.LossyImageCompressionRatio = 12.5
        lossy.LossyImageCompressionMethod = "ISO_10918_1"
        out.append(("lossy", lossy))
    # the second of each kind: another patient, study and series, acquired at another time
    for _, src in out[len(out) // 2:]:
        src.PatientName, src.PatientID = "Other^Patient", "MRN-9"
        if "PatientBirthDate" in src:
            src.PatientBirthDate = "19700101"
        src.StudyDate, src.StudyTime, src.StudyID = "20250101", "101010", "99"
        src.InstanceNumber = 7
        src.AcquisitionDateTime = "20250101101500.123"
    for _, src in out[:len(out) // 2]:
        src.AcquisitionDateTime = "20240102101010"
    # the same kind from other equipment: another template, never the first's equipment
    other = make_source(300, 200)
    other.AcquisitionDateTime = "20240103080000"
    other.Manufacturer, other.StationName = "Other Vendor", "ROOM-2"
    out.append(("other equipment", other))
    return out


def _set_clock(ds: Dataset, now: datetime.datetime) -> None:
    for keyword in ("ContentDate", "InstanceCreationDate"):
        setattr(ds, keyword, now.strftime("%Y%m%d"))
    for keyword in ("ContentTime", "InstanceCreationTime"):
        setattr(ds, keyword, now.strftime("%H%M%S.%f"))
    for item in ds.get("ContributingEquipmentSequence") or []:
        purpose = item.PurposeOfReferenceCodeSequence[0].CodeValue
        if "ContributionDateTime" in item and purpose != "109101":  # not the acquisition's
            item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S.%f")


def _same_dimension_organization(ds: Dataset, like: Dataset) -> None:
    """highdicom draws a new Dimension Organization UID for each SEG it builds; the
    encoder keeps its template's (one organization, shared by the SEGs of a kind)."""
    uid = like.DimensionOrganizationSequence[0].DimensionOrganizationUID
    for item in [*ds.DimensionOrganizationSequence, *ds.DimensionIndexSequence]:
        item.DimensionOrganizationUID = uid


def test_the_encoder_makes_what_highdicom_makes_for_each_kind_of_source(tmp_path) -> None:
    model = _model(demo=True)
    encoder = seg.LungSegEncoder(model)
    left, right = _lungs(300, 200)
    for kind, src in _variants():
        rows, cols = int(src.Rows), int(src.Columns)
        masks = (left, right) if (rows, cols) == (300, 200) else _lungs(rows, cols)
        for overlapping in (False, True):
            if overlapping:  # a pixel in both lungs: another template (Segments Overlap)
                masks = (masks[0], masks[1] | masks[0])
            series_uid, sop_uid = seg_uids(str(src.SOPInstanceUID),
                                           str(src.StudyInstanceUID), 1, model)
            kwargs = dict(series_instance_uid=series_uid, sop_instance_uid=sop_uid,
                          instance_number=int(src.InstanceNumber))
            if overlapping:  # naming the SR's series (another template), of its own study
                kwargs["report_series_uid"] = str(generate_uid())
            now = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901)
            ours = encoder.encode(src, masks, now=now, **kwargs)
            reference = seg.build_lung_seg(src, masks, model, **kwargs)
            _set_clock(reference, now)  # highdicom's clock, as the encoder was told
            _same_dimension_organization(reference, dcmread(BytesIO(ours)))
            written = BytesIO()
            dcmwrite(written, reference, enforce_file_format=True)
            assert ours == written.getvalue(), (  # byte for byte
                kind, _differences(dcmread(BytesIO(ours)), dcmread(written)))
            path = tmp_path / f"{sop_uid}.dcm"
            path.write_bytes(ours)
            assert dciodvfy(path) == [], kind
            back = hd.seg.segread(path).get_pixels_by_source_instance(
                [str(src.SOPInstanceUID)], segment_numbers=[1, 2])
            for channel in range(2):
                assert np.array_equal(np.asarray(back[0][..., channel], dtype=bool),
                                      masks[channel]), kind
    # each kind was built once by highdicom, then encoded from its template (and the one
    # from other equipment once more)
    assert len(encoder._templates) == 8 * 2


def test_a_seg_names_its_own_sources_acquisition_equipment_and_time() -> None:
    """SEGs encoded from one template each name their own source's acquisition: its
    equipment and its Acquisition DateTime, not the first source's nor the SEG's clock."""
    model = _model(demo=True)
    encoder = seg.LungSegEncoder(model)
    masks = _lungs(300, 200)
    sources = [make_source(300, 200) for _ in range(3)]
    for i, src in enumerate(sources):
        src.AcquisitionDateTime = f"2024010{i + 1}101010"
    sources[2].StationName = "ROOM-2"
    for src in sources:
        out = encoder.build(src, masks, series_instance_uid=generate_uid(),
                            sop_instance_uid=generate_uid(), instance_number=1)
        (acquisition,) = [item for item in out.ContributingEquipmentSequence
                          if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"]
        assert acquisition.ContributionDateTime == src.AcquisitionDateTime
        assert acquisition.get("StationName") == src.get("StationName")
        assert acquisition.Manufacturer == src.Manufacturer
    assert len(encoder._templates) == 2  # the station named another template


def test_the_encoders_copies_do_not_leak_into_each_other() -> None:
    model = _model(demo=True)
    encoder = seg.LungSegEncoder(model)
    masks = _lungs(300, 200)
    first, second = make_source(300, 200), make_source(300, 200)
    second.PatientName = "Second^Patient"
    a = encoder.build(first, masks, series_instance_uid=generate_uid(),
                      sop_instance_uid=generate_uid(), instance_number=1)
    b = encoder.build(second, masks, series_instance_uid=generate_uid(),
                      sop_instance_uid=generate_uid(), instance_number=2)
    c = encoder.build(first, masks, series_instance_uid=generate_uid(),
                      sop_instance_uid=generate_uid(), instance_number=3)
    assert (a.PatientName, b.PatientName, c.PatientName) == (
        first.PatientName, "Second^Patient", first.PatientName)
    refs = [x.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
            .ReferencedSOPInstanceUID for x in (a, b, c)]
    assert refs == [first.SOPInstanceUID, second.SOPInstanceUID, first.SOPInstanceUID]
    assert len({a.SOPInstanceUID, b.SOPInstanceUID, c.SOPInstanceUID}) == 3


@pytest.mark.parametrize(("rows", "cols"), [(2500, 2048), (300, 264), (37, 48), (301, 301),
                                            (260, 100)])
def test_frames_packed_from_the_grid_are_the_frames_of_the_full_masks(rows: int,
                                                                       cols: int) -> None:
    """The worker's masks (LungMasks) are packed from their grid; the bytes, and the overlap
    that picks the template, must be what packing the image-size masks gives, for widths
    that fill whole bytes and (the fallback) for those that do not."""
    rng = np.random.default_rng(rows * cols)
    probs = rng.random((12, 12, 2)).astype(np.float32)
    probs[..., 1] = 1 - probs[..., 0]  # apart at 0.5 ...
    for threshold in (0.5, 0.3):  # ... and overlapping at 0.3
        masks = lungs.lung_masks(probs, rows, cols, threshold)
        full = masks.full()
        assert seg._frames(masks) == seg._frames(full)
        assert seg._frames(masks)[1] is (threshold < 0.5)
