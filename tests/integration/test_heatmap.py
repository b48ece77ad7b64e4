"""The heatmap Secondary Capture against a real validator (dciodvfy, dicom3tools).

Sources are synthetic CR/DX images built here; results are faked with a CAM whose peak is
known. The validator binary is part of the test environment: when it is missing the test
fails rather than skips.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from resultfactory import (
    CR,
    DX_PRESENTATION,
    TB_THRESHOLD,
    dciodvfy,
    fake_result,
    make_model,
    make_source,
)

import cxrd
from cxrd import heatmap
from cxrd.durable import save_dataset
from cxrd.preprocess import CAM_CELL_SHIFT, dataset_to_gray8
from cxrd.srencode import part10_bytes

# --------------------------------------------------------------------------- SC


@pytest.mark.parametrize("demo", [False, True])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_heatmap_sc(tmp_path: Path, demo: bool, photometric: str) -> None:
    model = make_model(demo=demo)
    sop_class = CR if photometric == "MONOCHROME2" else DX_PRESENTATION
    ds = make_source(1300, 1100, sop_class=sop_class, photometric=photometric)
    peak = (5, 1)
    result = fake_result(ds, peak=peak)
    rows, cols = result.display.shape
    assert max(rows, cols) <= heatmap.DISPLAY_MAX_SIDE

    sc = heatmap.build_heatmap_sc(result, model, series_instance_uid=generate_uid())
    path = save_dataset(sc, tmp_path)
    assert dciodvfy(path) == []

    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.StudyInstanceUID == ds.StudyInstanceUID
    assert back.SeriesInstanceUID != ds.SeriesInstanceUID
    assert back.PatientID == ds.PatientID and back.PatientName == ds.PatientName
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert back.BitsAllocated == 8
    assert list(back.ImageType) == ["DERIVED", "SECONDARY"]
    assert back.BodyPartExamined == "CHEST"
    assert back.DerivationDescription
    (source,) = back.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert source.ReferencedSOPClassUID == ds.SOPClassUID
    assert "not for diagnostic use" in back.SeriesDescription
    assert ("DEMO" in back.SeriesDescription) is demo

    pixels = back.pixel_array
    assert pixels.shape[1] == cols and pixels.shape[0] > rows  # legend band below
    image = pixels[:rows].astype(np.int32)
    redness = image[..., 0] - image[..., 1] - image[..., 2]
    hot_r, hot_c = np.unravel_index(int(np.argmax(redness)), redness.shape)
    cell_h, cell_w = rows / 7, cols / 7  # the hot cell at its receptive field's centre
    assert abs(hot_r - (peak[0] + 0.5 + CAM_CELL_SHIFT) * cell_h) <= cell_h / 4
    assert abs(hot_c - (peak[1] + 0.5 + CAM_CELL_SHIFT) * cell_w) <= cell_w / 4
    # Away from the hot spot the radiograph stays grey; the legend band is grey text.
    assert redness[5, cols - 5] <= 0
    band = pixels[rows:]
    assert np.all(band[..., 0] == band[..., 1]) and band.max() == 255


def test_heatmap_sc_downscales_an_oversized_display() -> None:
    ds = make_source(2500, 2048)
    result = fake_result(ds)
    big = heatmap.ImageResult(ds, dataset_to_gray8(ds), result.probs, result.cam)
    sc = heatmap.build_heatmap_sc(big, make_model(demo=True), series_instance_uid=generate_uid())
    assert sc.Columns == round(2048 * heatmap.DISPLAY_MAX_SIDE / 2500)
    assert 0 < sc.Rows - heatmap.DISPLAY_MAX_SIDE < 300  # display plus the legend band


def test_sparse_source(tmp_path: Path) -> None:
    """A source with only its Type 1 attributes (CR Patient Orientation Type 2, empty here;
    patient and study attributes Type 2, missing) and a malformed birth date: the SC still
    validates, with those attributes empty; dciodvfy only notes what a DICOMDIR wants."""
    ds = make_source()
    for keyword in ("PatientName", "PatientSex", "ReferringPhysicianName", "AccessionNumber",
                    "StudyTime", "StudyID", "Manufacturer", "BodyPartExamined",
                    "SpecificCharacterSet", "ImagerPixelSpacing"):
        delattr(ds, keyword)
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        ds.PatientBirthDate = "1901-12-31"  # seen in the wild; not a DICOM DA
    ds.PatientOrientation = ""
    result = fake_result(ds)
    del ds.PixelData  # the worker hands over headers without pixels
    path = save_dataset(
        heatmap.build_heatmap_sc(result, make_model(demo=False),
                                 series_instance_uid=generate_uid()), tmp_path)
    warnings_ = dciodvfy(path)
    assert all("needed to build DICOMDIR" in w for w in warnings_), warnings_
    back = pydicom.dcmread(path)
    assert back.BodyPartExamined == "CHEST"
    assert back.PatientOrientation in (None, "")
    assert back.PatientBirthDate in (None, "") and back.PatientName in (None, "")
    assert "PatientName" in back and "StudyTime" in back  # Type 2: present, empty
    # no source Manufacturer: the model is the only contributing equipment
    (equipment,) = back.ContributingEquipmentSequence
    assert equipment.ManufacturerModelName == "cxrd-mnv2-035"


def test_contributing_equipment_names_the_source_and_the_model() -> None:
    ds = make_source()
    model = make_model(demo=False)
    sc = heatmap.build_heatmap_sc(fake_result(ds), model, series_instance_uid=generate_uid())
    acquisition, processing = sc.ContributingEquipmentSequence
    assert acquisition.Manufacturer == "ACME Radiography"
    assert acquisition.InstitutionName == "General Hospital"
    assert acquisition.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
    assert processing.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert processing.ManufacturerModelName == "cxrd-mnv2-035"
    assert processing.DeviceUID == model.device_uid == sc.DeviceUID == sc.DeviceSerialNumber
    assert list(sc.SoftwareVersions) == ["2024.05.1", f"cxrd {cxrd.__version__}"]
    assert sc.Manufacturer == "cxrd" and sc.ManufacturerModelName == "cxrd-mnv2-035"
    assert sc.Modality == "OT" and sc.ConversionType == "WSD"


# --------------------------------------------------------------------------- the overlay


def coloured(pixels: np.ndarray) -> np.ndarray:
    """Where an RGB image is not grey."""
    return (pixels[..., 0] != pixels[..., 1]) | (pixels[..., 1] != pixels[..., 2])


@pytest.mark.parametrize("demo", [False, True])
def test_normal_result_has_no_colour(tmp_path: Path, demo: bool) -> None:
    """NORM: the radiograph and the legend, no overlay however hot the NORM map is."""
    model = make_model(demo=demo)
    ds = make_source(1300, 1100)
    result = fake_result(ds, biases=(0.0, 0.0, 1.5))
    assert result.probs.argmax() == 2 and result.probs[0] < TB_THRESHOLD
    sc = heatmap.build_heatmap_sc(result, model, series_instance_uid=generate_uid())
    path = save_dataset(sc, tmp_path)
    assert dciodvfy(path) == []
    back = pydicom.dcmread(path)
    pixels = back.pixel_array
    rows = heatmap.display_size(1300, 1100)[0]
    assert not coloured(pixels[:rows]).any()
    # the grey is the radiograph, not a blank
    assert np.array_equal(pixels[:rows, :, 0], heatmap.downscale_for_display(result.display))
    assert "no colour overlay" in back.DerivationDescription
    assert "not for diagnostic use" in back.SeriesDescription
    assert ("DEMO" in back.SeriesDescription) is demo


@pytest.mark.parametrize(("biases", "peak"), [((1.0, 0.0, 0.0), (2, 5)),  # TB
                                              ((-1.0, 1.0, 0.0), (5, 1))])  # NTB
def test_tb_and_ntb_colour_only_the_hot_region(biases: tuple[float, float, float],
                                               peak: tuple[int, int]) -> None:
    """Colour only where the shown class's map is at or above half-way: a bounded blob,
    inside the box the SR draws (findings.hottest_region) at the same level."""
    from cxrd.findings import decide_class, hottest_region

    model = make_model(demo=False)
    ds = make_source(1300, 1100)
    hot_cell = fake_result(ds, biases=biases, peak=peak)
    # A gentle slope under the hot cell, as real maps have: well below half-way.
    slope = np.linspace(0.0, 1.5, 7, dtype=np.float32)[None, :, None]
    result = heatmap.ImageResult(ds, hot_cell.display, hot_cell.probs, hot_cell.cam + slope)
    k = decide_class(result.probs, TB_THRESHOLD)
    assert k == (0 if biases[0] > 0 else 1)
    pixels = heatmap.render_heatmap(result, model)
    rows, cols = heatmap.display_size(1300, 1100)
    hot = coloured(pixels[:rows])
    assert not coloured(pixels[rows:]).any()  # the legend is grey
    assert 0 < hot.mean() < 0.1, hot.mean()  # some pixels coloured, most grey
    # Inside the SR's region, scaled to the display (its grid is 1/16 of a cell).
    x0, y0, x1, y1 = hottest_region(result.cam, k, 1300, 1100)
    sx, sy = cols / 1100, rows / 1300
    hit_r, hit_c = np.flatnonzero(hot.any(axis=1)), np.flatnonzero(hot.any(axis=0))
    tol_x, tol_y = cols / 7 / 16 + 1, rows / 7 / 16 + 1
    assert hit_c[0] >= x0 * sx - tol_x and hit_c[-1] + 1 <= x1 * sx + tol_x
    assert hit_r[0] >= y0 * sy - tol_y and hit_r[-1] + 1 <= y1 * sy + tol_y
    # The peak is red and strongest; the edge of the blob is faint.
    r, c = np.unravel_index(int(np.argmax(pixels[:rows, :, 0].astype(int)
                                          - pixels[:rows, :, 1])), hot.shape)
    assert hot[r, c] and pixels[r, c, 0] > pixels[r, c, 1] + 60



def outline_at(pixels: np.ndarray, box: tuple[float, float, float, float],
               source: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The SC's pixels on the edge of ``box`` (source coordinates) scaled to its display,
    and those one pixel outside it (where the image has them)."""
    rows, cols = heatmap.display_size(*source)
    sy, sx = rows / source[0], cols / source[1]
    x0, y0, x1, y1 = box
    left, top = int(np.floor(x0 * sx)), int(np.floor(y0 * sy))
    right, bottom = min(int(np.ceil(x1 * sx)) - 1, cols - 1), min(int(np.ceil(y1 * sy)) - 1,
                                                                   rows - 1)
    edge = np.concatenate([pixels[top, left:right + 1], pixels[bottom, left:right + 1],
                           pixels[top:bottom + 1, left], pixels[top:bottom + 1, right]])
    outside = []
    if top > 0:
        outside.append(pixels[top - 1, max(left - 1, 0):right + 2])
    if bottom < rows - 1:
        outside.append(pixels[bottom + 1, max(left - 1, 0):right + 2])
    if left > 0:
        outside.append(pixels[max(top - 1, 0):bottom + 2, left - 1])
    if right < cols - 1:
        outside.append(pixels[max(top - 1, 0):bottom + 2, right + 1])
    return edge, np.concatenate(outside)


def test_the_sc_outlines_the_region_the_sr_reports(tmp_path: Path) -> None:
    """TB and NTB: the SR's region (here lung-restricted, away from the hottest blob) is
    outlined white inside black, grey so that the colour is still only the map, on the
    radiograph and on the colour alike; without a region given the SC outlines what the
    SR reports without lungs; NORM has none."""
    import highdicom as hd

    from cxrd.findings import ImageFindings, hottest_region
    from cxrd.sr import build_sr

    model = make_model(demo=False)
    ds = make_source(1300, 1100)
    base = fake_result(ds)
    cam = np.zeros((7, 7, 3), np.float32)
    cam[0, 0] = 5.0  # on a shoulder
    cam[3, 2] = 3.0  # over a lung field
    yy, xx = (np.mgrid[0:128, 0:128] + 0.5) / 128
    lungs = ((((xx - 0.31) / 0.17) ** 2 + ((yy - 0.52) / 0.33) ** 2 < 1)
             | (((xx - 0.69) / 0.17) ** 2 + ((yy - 0.52) / 0.33) ** 2 < 1))
    probs = np.array([0.9, 0.05, 0.05], np.float32)
    found = ImageFindings.of(ds, probs, cam, TB_THRESHOLD, lungs)
    assert found.region is not None and found.region != hottest_region(cam, 0, 1300, 1100)
    sr_path = save_dataset(build_sr([found], model), tmp_path)
    (roi,) = hd.sr.srread(sr_path).content.get_planar_roi_measurement_groups()
    points = np.asarray(roi.roi.value, dtype=np.float64)
    sr_box = (points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max())

    result = heatmap.ImageResult(ds, base.display, probs, cam, region=found.region)
    sc = heatmap.build_heatmap_sc(result, model, series_instance_uid=generate_uid())
    assert dciodvfy(save_dataset(sc, tmp_path)) == []
    assert "region outlined" in sc.DerivationDescription
    pixels = sc.pixel_array
    edge, outside = outline_at(pixels, sr_box, (1300, 1100))
    assert np.all(edge == 255), edge
    assert np.all(outside == 0), outside
    # the outline holds the lung blob's colour; the hottest blob, outside, stays coloured
    rows, cols = heatmap.display_size(1300, 1100)
    hot = coloured(pixels[:rows])
    assert hot[:rows // 5, :cols // 5].any()
    sy, sx = rows / 1300, cols / 1100
    inside = hot[int(sr_box[1] * sy) + 2:int(sr_box[3] * sy) - 2,
                 int(sr_box[0] * sx) + 2:int(sr_box[2] * sx) - 2]
    assert inside.any() and not hot[:int(sr_box[1] * sy) - 2, :cols // 2].all()

    # No region given: the unrestricted region, as the SR reports it without lungs.
    plain = heatmap.render_heatmap(heatmap.ImageResult(ds, base.display, probs, cam), model)
    edge, outside = outline_at(plain, hottest_region(cam, 0, 1300, 1100), (1300, 1100))
    assert np.all(edge == 255) and np.all(outside == 0)
    assert not np.array_equal(plain, pixels)

    # NORM: no outline, even with a region at hand.
    normal = np.array([0.05, 0.05, 0.9], np.float32)
    norm = heatmap.render_heatmap(
        heatmap.ImageResult(ds, base.display, normal, cam, region=found.region), model)
    assert np.array_equal(norm[:rows, :, 0], heatmap.downscale_for_display(base.display))

    with pytest.raises(ValueError, match="ImageResult.region must be"):
        heatmap.ImageResult(ds, base.display, probs, cam, region=(10.0, 5.0, 2.0, 8.0))

def test_flat_map_shows_no_colour() -> None:
    ds = make_source()
    result = fake_result(ds)
    flat = heatmap.ImageResult(ds, result.display, result.probs,
                               np.ones_like(result.cam))
    pixels = heatmap.render_heatmap(flat, make_model(demo=False))
    assert not coloured(pixels).any()


# --------------------------------------------------------------------------- size


@pytest.mark.parametrize("max_side", [256, 700, 1024, 2048])
def test_long_side_follows_max_side(max_side: int) -> None:
    ds = make_source(2500, 2048)
    result = fake_result(ds)
    full = heatmap.ImageResult(ds, dataset_to_gray8(ds), result.probs, result.cam)
    sc = heatmap.build_heatmap_sc(full, make_model(demo=True), max_side=max_side,
                                  series_instance_uid=generate_uid())
    assert sc.Columns == round(2048 * max_side / 2500)
    assert max_side < sc.Rows < max_side + 350  # the image, then the legend band (6 lines)
    pixels = sc.pixel_array
    assert pixels[max_side - 1].any() and not coloured(pixels[max_side:]).any()


def test_small_source_is_not_enlarged() -> None:
    ds = make_source(600, 500)
    sc = heatmap.build_heatmap_sc(fake_result(ds), make_model(demo=False), max_side=4096,
                                  series_instance_uid=generate_uid())
    assert sc.Columns == 500 and 600 < sc.Rows < 900


def test_compressions_are_the_config_values() -> None:
    from cxrd.config import HeatmapCompression

    assert tuple(c.value for c in HeatmapCompression) == heatmap.COMPRESSIONS


def test_build_heatmap_sc_rejects_bad_options() -> None:
    result = fake_result(make_source())
    model = make_model(demo=False)
    with pytest.raises(ValueError, match="compression must be one of none, jpeg-baseline"):
        heatmap.build_heatmap_sc(result, model, series_instance_uid=generate_uid(),
                                 compression="jpeg")
    with pytest.raises(ValueError, match="max_side"):
        heatmap.build_heatmap_sc(result, model, series_instance_uid=generate_uid(),
                                 max_side=0)


# --------------------------------------------------------------------------- JPEG


def values(ds: Dataset, keyword: str) -> list[object]:
    """An attribute's values as a list (pydicom gives a single value bare)."""
    elem = ds[keyword]
    return list(elem.value) if elem.VM > 1 else [elem.value]


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_jpeg_baseline_sc_validates_and_reads_back(tmp_path: Path, photometric: str) -> None:
    from pydicom.uid import JPEGBaseline8Bit

    ds = make_source(1300, 1101, photometric=photometric)  # odd columns, also after scaling
    ds.LossyImageCompression = "00"
    result = fake_result(ds, peak=(5, 1))
    model = make_model(demo=True)
    plain = heatmap.build_heatmap_sc(result, model, series_instance_uid=generate_uid())
    sc = heatmap.build_heatmap_sc(result, model, series_instance_uid=generate_uid(),
                                  compression="jpeg-baseline")
    path = save_dataset(sc, tmp_path)
    assert dciodvfy(path) == []

    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert back.PhotometricInterpretation == "YBR_FULL_422"
    assert back.SamplesPerPixel == 3 and back.BitsAllocated == 8 and back.BitsStored == 8
    assert back.LossyImageCompression == "01"
    assert values(back, "LossyImageCompressionMethod") == ["ISO_10918_1"]
    (ratio,) = values(back, "LossyImageCompressionRatio")
    size = path.stat().st_size
    assert ratio > 5 and size < plain.Rows * plain.Columns * 3 / 5
    assert (back.Rows, back.Columns) == (plain.Rows, plain.Columns)
    assert "Lossy JPEG" in back.DerivationDescription
    decoded = back.pixel_array  # pydicom converts YBR_FULL_422 to RGB
    assert decoded.shape == (plain.Rows, plain.Columns, 3)
    error = np.abs(decoded.astype(np.int32) - plain.pixel_array.astype(np.int32))
    assert error.mean() < 3.0, error.mean()


def test_jpeg_baseline_adds_to_an_earlier_lossy_step(tmp_path: Path) -> None:
    ds = make_source()
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [10]
    ds.LossyImageCompressionMethod = ["ISO_15444_1"]
    sc = heatmap.build_heatmap_sc(fake_result(ds), make_model(demo=False),
                                  series_instance_uid=generate_uid(),
                                  compression="jpeg-baseline")
    path = save_dataset(sc, tmp_path)
    # dciodvfy compares each method with the transfer syntax, so the source's earlier step
    # draws a warning, though the Standard lists every step in order (C.7.6.1.1.5).
    warnings_ = dciodvfy(path)
    assert all("<ISO_15444_1>" in w for w in warnings_), warnings_
    back = pydicom.dcmread(path)
    assert values(back, "LossyImageCompressionMethod") == ["ISO_15444_1", "ISO_10918_1"]
    assert len(values(back, "LossyImageCompressionRatio")) == 2


# --------------------------------------------------------------------------- the worker


def test_worker_passes_the_heatmap_options(tmp_path: Path) -> None:
    """cxrd.worker.write_heatmap hands heatmap_max_side and heatmap_compression on."""
    from pydicom.uid import JPEGBaseline8Bit

    from cxrd.worker import prepare, write_heatmap

    ds = make_source(2500, 2048)
    source = tmp_path / "source.dcm"
    ds.save_as(source, enforce_file_format=True)
    model = make_model(demo=False)
    prep = prepare(source, model)
    result = fake_result(ds)
    _, path = write_heatmap(prep, result.probs, result.cam, model,
                            tmp_path / "results", 1, max_side=512,
                            compression="jpeg-baseline")
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert back.Columns == round(2048 * 512 / 2500)
    assert set(prep.timings) >= {"decode", "preprocess", "sc", "write"}


@pytest.mark.parametrize("max_side", [1024, 512])
def test_worker_shares_the_contract_reduce_with_the_sc(tmp_path: Path, max_side: int) -> None:
    """Under cxrd-gray8-stretch-v2, prepare reduces a 2500 x 2048 image by 2 once; the SC
    starts from that image when its own downscale reduces by 2 too (max_side 1024), and
    its pixels are those it makes from the full image, as under v1 (here and at 512,
    where it reduces by 4 from the full image itself)."""
    from PIL import Image

    from cxrd.preprocess import STRETCH_V1, STRETCH_V2, resize_gray8, to_model_input
    from cxrd.worker import prepare

    ds = make_source(2500, 2048)
    source = tmp_path / "source.dcm"
    ds.save_as(source, enforce_file_format=True)
    result = fake_result(ds)
    v1, v2 = (make_model(demo=False, preprocessing=p) for p in (STRETCH_V1, STRETCH_V2))

    def sc_pixels(image: heatmap.ImageResult) -> np.ndarray:
        return heatmap.render_heatmap(image, v2, max_side)

    prep1, prep2 = prepare(source, v1), prepare(source, v2)
    full = dataset_to_gray8(ds)
    assert np.array_equal(prep1.display, full) and np.array_equal(prep2.display, full)
    # v1: no reduce, the model input as before
    assert prep1.reduced is None
    assert np.array_equal(prep1.model_input, to_model_input(resize_gray8(full, 224)))
    # v2: reduced once, by 2, and the model input is made from that image
    assert prep2.reduced is not None and prep2.reduced.factor == 2
    half = np.asarray(Image.fromarray(full).reduce(2))
    assert np.array_equal(prep2.reduced.image, half)
    assert np.array_equal(prep2.model_input, to_model_input(resize_gray8(half, 224)))
    # the SC's pixels do not depend on whether it was handed the reduced image
    today = sc_pixels(heatmap.ImageResult(ds, full, result.probs, result.cam))
    shared = sc_pixels(heatmap.ImageResult(ds, prep2.display, result.probs, result.cam,
                                           prep2.reduced))
    assert np.array_equal(shared, today)
    # ... and it starts from the reduced image exactly when the factors agree
    marked = heatmap.ImageResult(ds, full, result.probs, result.cam,
                                 prep2.reduced._replace(image=255 - prep2.reduced.image))
    assert np.array_equal(sc_pixels(marked), today) == (max_side != 1024)


def test_sc_refuses_a_reduced_image_of_the_wrong_size() -> None:
    from cxrd.preprocess import Reduced

    ds = make_source(500, 400)
    result = fake_result(ds)
    display = dataset_to_gray8(ds)
    with pytest.raises(ValueError, match="reduced"):
        heatmap.ImageResult(ds, display, result.probs, result.cam,
                            Reduced(2, np.zeros((250, 199), np.uint8)))


def _dcmwrite_bytes(ds: Dataset) -> bytes:
    fp = BytesIO()
    pydicom.dcmwrite(fp, ds, enforce_file_format=True)
    return fp.getvalue()


@pytest.mark.parametrize(("rows", "cols", "compression"), [
    (1300, 1100, "none"), (301, 199, "none"), (1300, 1100, "jpeg-baseline")])
def test_an_sc_is_encoded_as_pydicom_writes_it(rows: int, cols: int, compression: str) -> None:
    """Results are written from ``part10_bytes``, which joins a native Pixel Data to what
    pydicom writes before it; the file must be pydicom's, byte for byte (odd pixel counts
    padded, encapsulated JPEG written by pydicom itself)."""
    ds = make_source(rows, cols)
    sc = heatmap.build_heatmap_sc(fake_result(ds, peak=(3, 3)), make_model(demo=True),
                                  series_instance_uid=generate_uid(), compression=compression)
    assert part10_bytes(sc) == _dcmwrite_bytes(sc)


def test_part10_bytes_of_other_pixel_data_and_none() -> None:
    grey = make_source(31, 17)  # 16-bit grey, odd length: OW, padded
    grey.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert part10_bytes(grey) == _dcmwrite_bytes(grey)
    trailing = make_source(20, 20)
    trailing.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    trailing.add_new(0xFFFCFFFC, "OB", b"\0\0")  # an element after the pixels: pydicom's way
    assert part10_bytes(trailing) == _dcmwrite_bytes(trailing)
    del grey.PixelData
    assert part10_bytes(grey) == _dcmwrite_bytes(grey)
