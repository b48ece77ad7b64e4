"""Synthetic phantoms: determinism, class signal, boxes, PNG/DICOM encodings, dciodvfy."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from cxrd.preprocess import read_gray8_and_size
from training import phantoms as P

SMALL = (244, 200)  # rows, cols: the 2500 x 2048 aspect, small enough to be quick


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def study() -> P.PatientStudy:
    return P.random_patient_study(rng(99))


def _stored(ph: P.Phantom, bits: int, mono1: bool) -> np.ndarray:
    top = (1 << bits) - 1  # the documented scaling: float32 image * top, rounded
    v = np.clip(np.rint(ph.image * np.float32(top)), 0, top).astype(np.uint16)
    return top - v if mono1 else v


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- phantoms


def test_phantom_basic_properties() -> None:
    for label in P.CLASSES:
        ph = P.make_phantom(rng(1), label, *SMALL)
        assert ph.image.shape == SMALL
        assert ph.image.dtype == np.float32
        assert float(ph.image.min()) >= 0.0 and float(ph.image.max()) <= 1.0
        assert ph.label == label and ph.body_part == "CHEST" and ph.view in ("PA", "AP")
        assert float(ph.image.std()) > 0.1  # real content, not a flat field


def test_make_phantom_is_deterministic() -> None:
    a = P.make_phantom(rng(7), "TB", *SMALL)
    b = P.make_phantom(rng(7), "TB", *SMALL)
    c = P.make_phantom(rng(8), "TB", *SMALL)
    assert np.array_equal(a.image, b.image) and a.boxes == b.boxes and a.view == b.view
    assert not np.array_equal(a.image, c.image)


def test_unknown_label_is_rejected() -> None:
    with pytest.raises(ValueError, match="label"):
        P.make_phantom(rng(0), "COVID", *SMALL)


@pytest.mark.parametrize("label", ["TB", "NTB", "NORM"])
def test_boxes_inside_image_and_in_the_right_zone(label: str) -> None:
    rows, cols = SMALL
    for seed in range(40):
        ph, lung = P._render_frontal(rng(seed), label, rows, cols)
        lx0, ly0, lx1, ly1 = lung
        assert 0 <= lx0 < lx1 < cols and 0 <= ly0 < ly1 < rows
        if label == "NORM":
            assert ph.boxes == ()
            continue
        assert 1 <= len(ph.boxes) <= 2
        mid = (ly0 + ly1) / 2
        for x0, y0, x1, y1 in ph.boxes:
            assert 0 <= x0 < x1 < cols and 0 <= y0 < y1 < rows, (seed, ph.boxes)
            # large enough to be found after a 224 x 224 stretch
            assert (x1 - x0 + 1) >= 0.07 * cols and (y1 - y0 + 1) >= 0.05 * rows, (seed, ph.boxes)
            cy = (y0 + y1) / 2
            if label == "TB":
                assert cy < mid, f"TB lesion below mid-lung (seed {seed})"
            else:
                assert cy > mid, f"NTB lesion above mid-lung (seed {seed})"


def test_tb_box_size_distribution() -> None:
    rows, cols = 610, 500
    w, h = [], []
    for seed in range(40):
        for x0, y0, x1, y1 in P.make_phantom(rng(seed), "TB", rows, cols).boxes:
            w.append((x1 - x0 + 1) / cols)
            h.append((y1 - y0 + 1) / rows)
    assert 0.12 <= float(np.median(w)) <= 0.25
    assert 0.12 <= float(np.median(h)) <= 0.25


@pytest.mark.parametrize("label", ["TB", "NTB"])
def test_lesion_is_really_there(label: str) -> None:
    """Same generator state: same patient and noise; only the lesion boxes differ."""
    rows, cols = SMALL
    for seed in range(12):
        sick = P.make_phantom(rng(seed), label, rows, cols)
        norm = P.make_phantom(rng(seed), "NORM", rows, cols)
        diff = sick.image.astype(np.float64) - norm.image
        outside = np.ones(diff.shape, dtype=bool)
        for x0, y0, x1, y1 in sick.boxes:
            box = diff[y0:y1 + 1, x0:x1 + 1]
            assert box.mean() > 0.04, (seed, box.mean())  # denser where the lesion is
            mx, my = (x1 - x0) // 2, (y1 - y0) // 2  # and next to it (faint margins)
            outside[max(0, y0 - my):y1 + my + 1, max(0, x0 - mx):x1 + mx + 1] = False
        assert np.abs(diff[outside]).max() < 0.02, seed


def test_anatomy_varies() -> None:
    imgs = [P.make_phantom(rng(s), "NORM", *SMALL).image for s in range(6)]
    means = [float(i.mean()) for i in imgs]
    assert max(means) - min(means) > 0.03
    assert min(float(np.abs(a - b).mean()) for a, b in zip(imgs, imgs[1:], strict=False)) > 0.02


def test_lateral_and_non_chest() -> None:
    lat = P.make_lateral(rng(3), *SMALL)
    assert (lat.label, lat.view, lat.body_part, lat.boxes) == ("NORM", "LL", "CHEST", ())
    assert lat.image.shape == SMALL and lat.image.dtype == np.float32
    parts = set()
    for s in range(8):
        nc = P.make_non_chest(rng(s), 160, 128)
        assert nc.image.shape == (160, 128) and nc.image.dtype == np.float32
        assert nc.view == "" and nc.boxes == () and nc.label == "NORM"
        assert float(nc.image.min()) >= 0.0 and float(nc.image.max()) <= 1.0
        parts.add(nc.body_part)
    assert parts == {"HAND", "KNEE"}
    assert not np.array_equal(P.make_lateral(rng(3), *SMALL).image,
                              P.make_phantom(rng(3), "NORM", *SMALL).image)


def test_generation_is_fast() -> None:
    def best(rows: int, cols: int, n: int) -> float:
        times = []
        for s in range(n):
            t = time.perf_counter()
            P.make_phantom(rng(s), "TB", rows, cols)
            times.append(time.perf_counter() - t)
        return min(times)

    assert best(2500, 2048, 2) < 1.0
    assert best(512, 512, 3) < 0.1


# --------------------------------------------------------------------------- PNG


@pytest.mark.parametrize("bits", [8, 16])
def test_png_round_trip(tmp_path: Path, bits: int) -> None:
    ph = P.make_phantom(rng(4), "NTB", *SMALL)
    path = tmp_path / "x.png"
    P.write_png(ph, path, bits=bits)
    with Image.open(path) as img:
        assert img.mode == ("L" if bits == 8 else "I;16")
        back = np.asarray(img)
    assert np.array_equal(back.astype(np.uint16), _stored(ph, bits, mono1=False))


def test_png_bits_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        P.write_png(P.make_phantom(rng(4), "NORM", *SMALL), tmp_path / "x.png", bits=12)


# --------------------------------------------------------------------------- DICOM


@pytest.fixture(scope="module")
def small_tb() -> P.Phantom:
    return P.make_phantom(rng(5), "TB", 122, 100)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_dicom_round_trip(tmp_path: Path, small_tb: P.Phantom, study: P.PatientStudy,
                          modality: str, photometric: str, bits: int, ts: str) -> None:
    opts = P.DicomOptions(modality=modality, photometric=photometric, bits_stored=bits,
                          transfer_syntax=ts)
    path = tmp_path / "x.dcm"
    P.write_dicom(small_tb, path, study, opts, sop_instance_uid="1.2.3.4.5",
                  series_instance_uid="1.2.3.4", series_number=3, instance_number=2)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ts
    assert ds.Modality == modality and ds.PhotometricInterpretation == photometric
    assert ds.SOPClassUID == (P.CR_IMAGE_STORAGE if modality == "CR"
                              else P.DX_PRESENTATION_STORAGE)
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert ds.SeriesInstanceUID == "1.2.3.4" and ds.StudyInstanceUID == study.study_instance_uid
    assert (ds.SeriesNumber, ds.InstanceNumber) == (3, 2)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == \
        (16, bits, bits - 1, 0)
    assert (ds.Rows, ds.Columns) == small_tb.image.shape
    assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition == small_tb.view
    assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
    assert abs(float(ds.PixelSpacing[0]) - 0.15 * 2048 / 100) < 1e-6
    expected = _stored(small_tb, bits, photometric == "MONOCHROME1")
    assert np.array_equal(ds.pixel_array, expected)
    lo, hi = int(expected.min()), int(expected.max())
    assert float(ds.WindowCenter) == pytest.approx((lo + hi + 1) / 2)
    assert float(ds.WindowWidth) == hi - lo + 1


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, JPEGLSLossless,
                                DeflatedExplicitVRLittleEndian])
def test_dicom_other_transfer_syntaxes(tmp_path: Path, small_tb: P.Phantom,
                                       study: P.PatientStudy, ts: str) -> None:
    path = tmp_path / "x.dcm"
    P.write_dicom(small_tb, path, study, P.DicomOptions(transfer_syntax=ts, bits_stored=16))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ts
    assert np.array_equal(ds.pixel_array, _stored(small_tb, 16, mono1=False))


def test_dicom_unsupported_transfer_syntax(small_tb: P.Phantom, study: P.PatientStudy) -> None:
    with pytest.raises(ValueError, match="JPEG Baseline"):
        P.to_dataset(small_tb, study, P.DicomOptions(transfer_syntax=JPEGBaseline8Bit))
    with pytest.raises(ValueError, match="bits_stored"):
        P.to_dataset(small_tb, study, P.DicomOptions(bits_stored=10))


def test_dicom_window_and_processing_options(small_tb: P.Phantom, study: P.PatientStudy) -> None:
    ds = P.to_dataset(small_tb, study, P.DicomOptions(window=False))
    assert "WindowCenter" not in ds and "WindowWidth" not in ds
    ds = P.to_dataset(small_tb, study, P.DicomOptions(modality="DX",
                                                      presentation_intent="FOR PROCESSING"))
    assert ds.SOPClassUID == P.DX_PROCESSING_STORAGE == "1.2.840.10008.5.1.4.1.1.1.1.1"
    assert ds.PresentationIntentType == "FOR PROCESSING" and "WindowCenter" not in ds
    ds = P.to_dataset(small_tb, study, P.DicomOptions(modality="DX", photometric="MONOCHROME1"))
    assert ds.PresentationLUTShape == "INVERSE" and ds.ImageLaterality == "U"


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    assert exe is not None, "dciodvfy (dicom3tools) is not installed"
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]


@pytest.mark.parametrize("modality,intent,photometric,kind", [
    ("CR", "FOR PRESENTATION", "MONOCHROME1", "frontal"),
    ("CR", "FOR PRESENTATION", "MONOCHROME2", "lateral"),
    ("CR", "FOR PRESENTATION", "MONOCHROME2", "hand"),
    ("DX", "FOR PRESENTATION", "MONOCHROME2", "frontal"),
    ("DX", "FOR PRESENTATION", "MONOCHROME1", "lateral"),
    ("DX", "FOR PROCESSING", "MONOCHROME1", "frontal"),
    ("DX", "FOR PRESENTATION", "MONOCHROME2", "knee"),
])
def test_dciodvfy_reports_no_errors(tmp_path: Path, study: P.PatientStudy, modality: str,
                                    intent: str, photometric: str, kind: str) -> None:
    ph = {
        "frontal": lambda: P.make_phantom(rng(6), "NTB", *SMALL),
        "lateral": lambda: P.make_lateral(rng(6), *SMALL),
        "hand": lambda: P._non_chest(rng(6), "HAND", 128, 128),
        "knee": lambda: P._non_chest(rng(6), "KNEE", 128, 128),
    }[kind]()
    path = tmp_path / "x.dcm"
    P.write_dicom(ph, path, study, P.DicomOptions(modality=modality, photometric=photometric,
                                                  presentation_intent=intent))
    assert _dciodvfy_errors(path) == []


def test_dciodvfy_sees_errors(tmp_path: Path, study: P.PatientStudy) -> None:
    """The check above is live: a broken file does produce Error lines."""
    ds = P.to_dataset(P.make_phantom(rng(6), "NORM", *SMALL), study, P.DicomOptions())
    del ds.Rows
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) != []


def test_read_gray8_monochrome1_matches_monochrome2(tmp_path: Path,
                                                    study: P.PatientStudy) -> None:
    rows, cols = SMALL
    ph = P.make_phantom(rng(11), "NORM", rows, cols)
    for modality in ("CR", "DX"):
        for bits in (12, 16):
            m1, m2 = tmp_path / f"m1_{modality}{bits}.dcm", tmp_path / f"m2_{modality}{bits}.dcm"
            P.write_dicom(ph, m1, study, P.DicomOptions(modality=modality, bits_stored=bits,
                                                        photometric="MONOCHROME1"))
            P.write_dicom(ph, m2, study, P.DicomOptions(modality=modality, bits_stored=bits))
            g1, g2 = read_gray8_and_size(m1)[0], read_gray8_and_size(m2)[0]
            assert g1.dtype == np.uint8 and g1.shape == (rows, cols)
            assert np.abs(g1.astype(int) - g2.astype(int)).max() <= 1
    # display convention: dense is bright. Lungs sit either side of the mediastinum.
    _, lung = P._render_frontal(rng(11), "NORM", rows, cols)
    lx0, ly0, lx1, ly1 = lung
    cy = ly0 + (ly1 - ly0) * 2 // 5
    dy, dx = max(2, rows // 40), max(2, cols // 40)
    xs = {"right lung": lx0 + (lx1 - lx0) // 6, "left lung": lx1 - (lx1 - lx0) // 6,
          "mediastinum": (lx0 + lx1) // 2}
    nowin = tmp_path / "nowin.dcm"  # the percentile-window fallback must agree
    P.write_dicom(ph, nowin, study, P.DicomOptions(photometric="MONOCHROME1", window=False))
    for gray in (g1, read_gray8_and_size(nowin)[0]):
        m = {k: float(gray[cy - dy:cy + dy, x - dx:x + dx].mean()) for k, x in xs.items()}
        assert m["right lung"] < m["mediastinum"] - 40, m
        assert m["left lung"] < m["mediastinum"] - 40, m


def test_random_patient_study() -> None:
    a, b = P.random_patient_study(rng(1)), P.random_patient_study(rng(1))
    assert a == b
    assert "^" in a.patient_name and a.sex in ("M", "F", "O")
    assert len(a.birth_date) == 8 and len(a.study_date) == 8 and len(a.study_time) == 6
    assert a.birth_date < a.study_date
    assert pydicom.uid.UID(a.study_instance_uid).is_valid
    studies = {P.random_patient_study(rng(s)).patient_id for s in range(20)}
    assert len(studies) == 20


# --------------------------------------------------------------------------- data sets


def test_generate_images_png(tmp_path: Path) -> None:
    gt = P.generate_images(tmp_path / "a", 10, seed=3, size=SMALL)
    assert Counter(r.label for r in gt) == {"TB": 4, "NTB": 3, "NORM": 3}  # round robin
    assert [r.label for r in gt] != sorted(r.label for r in gt)  # shuffled
    for i, r in enumerate(gt):
        assert r.path == f"{r.label}/{r.label}_{i:05d}.png"
        assert (tmp_path / "a" / r.path).is_file()
        assert (r.rows, r.cols) == SMALL and r.body_part == "CHEST"
        assert bool(r.boxes) == (r.label != "NORM")
        assert r.study_instance_uid == "" and r.sop_instance_uid == ""
    assert P.read_ground_truth(tmp_path / "a" / "ground_truth.csv") == gt
    header = (tmp_path / "a" / "ground_truth.csv").read_text().splitlines()[0]
    assert header == ("path,label,boxes,rows,cols,view,body_part,study_instance_uid,"
                      "sop_instance_uid,left_mask,right_mask")
    assert all(r.left_mask == r.right_mask == "" for r in gt)  # masks only when asked for
    assert not (tmp_path / "a" / "masks").exists()
    # determinism: same seed, same bytes; another seed differs
    P.generate_images(tmp_path / "b", 10, seed=3, size=SMALL)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    P.generate_images(tmp_path / "c", 10, seed=4, size=SMALL)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_generate_images_classes_and_random_sizes(tmp_path: Path) -> None:
    gt = P.generate_images(tmp_path, 2, seed=1, classes=("TB", "NORM"))
    assert Counter(r.label for r in gt) == {"TB": 1, "NORM": 1}
    for r in gt:
        assert 1600 <= r.cols <= 2600 and 0.89 * r.cols <= r.rows <= 1.31 * r.cols
        with Image.open(tmp_path / r.path) as img:
            assert img.size == (r.cols, r.rows)
    with pytest.raises(ValueError):
        P.generate_images(tmp_path, 1, seed=1, classes=("TB", "COVID"))
    with pytest.raises(ValueError):
        P.generate_images(tmp_path, 1, seed=1, fmt="jpg")


def test_generate_images_dicom(tmp_path: Path) -> None:
    gt = P.generate_images(tmp_path / "a", 12, seed=5, fmt="dcm", size=(122, 100))
    seen = set()
    for r in gt:
        ds = pydicom.dcmread(tmp_path / "a" / r.path)
        assert r.path.endswith(".dcm") and ds.SOPInstanceUID == r.sop_instance_uid
        assert ds.StudyInstanceUID == r.study_instance_uid and ds.ViewPosition == r.view
        seen.add((ds.Modality, ds.PhotometricInterpretation, int(ds.BitsStored)))
        assert (ds.Rows, ds.Columns) == (r.rows, r.cols)
    assert {s[0] for s in seen} == {"CR", "DX"}
    assert {s[1] for s in seen} == {"MONOCHROME1", "MONOCHROME2"}
    assert {s[2] for s in seen} == {12, 16}
    assert len({r.study_instance_uid for r in gt}) == 12
    P.generate_images(tmp_path / "b", 12, seed=5, fmt="dcm", size=(122, 100))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    fixed = P.DicomOptions(modality="DX", photometric="MONOCHROME1", bits_stored=16)
    for r in P.generate_images(tmp_path / "c", 4, seed=5, fmt="dcm", size=(122, 100),
                               dicom=fixed):
        ds = pydicom.dcmread(tmp_path / "c" / r.path)
        assert (ds.Modality, ds.PhotometricInterpretation, ds.BitsStored) == \
            ("DX", "MONOCHROME1", 16)


def test_generate_studies(tmp_path: Path) -> None:
    gt = P.generate_studies(tmp_path, 30, seed=2, size=(122, 100))
    assert P.read_ground_truth(tmp_path / "ground_truth.csv") == gt
    by_study: dict[str, list[P.GroundTruth]] = {}
    for r in gt:
        assert r.path == f"{r.study_instance_uid}/{r.sop_instance_uid}.dcm"
        by_study.setdefault(r.study_instance_uid, []).append(r)
    assert len(by_study) == 30
    views, parts = Counter(), Counter()
    for rows in by_study.values():
        assert 1 <= len(rows) <= 3
        dss = [pydicom.dcmread(tmp_path / r.path) for r in rows]
        assert len({(d.PatientID, d.PatientName, d.Modality, d.AccessionNumber) for d in dss}) == 1
        assert len({d.SOPInstanceUID for d in dss}) == len(dss)
        for r, d in zip(rows, dss, strict=True):
            assert d.BodyPartExamined == r.body_part and d.ViewPosition == r.view
            views[r.view] += 1
            parts[r.body_part] += 1
        if rows[0].body_part == "CHEST":
            assert rows[0].view in ("PA", "AP")  # the first image is frontal
            labels = {r.label for r in rows if r.view != "LL"}
            assert len(labels) == 1
        else:
            assert {r.body_part for r in rows} == {rows[0].body_part}
            assert all(r.view == "" and r.boxes == () for r in rows)
    assert views["LL"] > 0 and parts["CHEST"] > 0 and (parts["HAND"] + parts["KNEE"]) > 0
    assert all(r.label == "NORM" and r.boxes == () for r in gt if r.view == "LL")


def test_generate_studies_options(tmp_path: Path) -> None:
    gt = P.generate_studies(tmp_path, 6, seed=9, images_per_study=(2, 2), include_lateral=False,
                            include_non_chest=False, size=(122, 100))
    assert len(gt) == 12
    assert all(r.body_part == "CHEST" and r.view in ("PA", "AP") for r in gt)
    with pytest.raises(ValueError):
        P.generate_studies(tmp_path, 1, seed=1, images_per_study=(2, 1))


# --------------------------------------------------------------------------- lung masks


def _centroid_col(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lung_masks_sides_and_shape(seed: int) -> None:
    ph = P.make_phantom(rng(seed), "NTB", *SMALL, masks=True)
    assert ph.lungs is not None
    left, right = ph.lungs
    assert left.shape == right.shape == SMALL and left.dtype == right.dtype == np.bool_
    assert not (left & right).any()
    cols = SMALL[1]
    # the patient's left lung lies on the image's right on a PA/AP frontal
    assert _centroid_col(left) > 0.6 * cols and _centroid_col(right) < 0.4 * cols
    for m in (left, right):
        assert 0.05 < m.mean() < 0.3  # a lung field, not a sliver nor the whole image
    # lung fields are dark (the renderer darkens them); the masks sit on them
    lungs = left | right
    assert ph.image[lungs].mean() < ph.image[~lungs].mean()


def test_lung_masks_leave_the_image_and_lesions_unchanged() -> None:
    for label in P.CLASSES:
        plain = P.make_phantom(rng(5), label, *SMALL)
        masked = P.make_phantom(rng(5), label, *SMALL, masks=True)
        assert plain.lungs is None
        assert np.array_equal(plain.image, masked.image) and plain.boxes == masked.boxes
    # the masks are the anatomy's: the same patient with or without lesions
    a = P.make_phantom(rng(6), "NORM", *SMALL, masks=True).lungs
    b = P.make_phantom(rng(6), "TB", *SMALL, masks=True).lungs
    assert a is not None and b is not None
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_non_chest_masks_are_empty_and_laterals_have_none() -> None:
    for s in range(4):
        nc = P.make_non_chest(rng(s), 160, 128, masks=True)
        assert nc.lungs is not None and nc.body_part in ("HAND", "KNEE")
        assert all(m.shape == (160, 128) and not m.any() for m in nc.lungs)
    assert P.make_lateral(rng(3), *SMALL).lungs is None


def test_generate_images_writes_masks(tmp_path: Path) -> None:
    gt = P.generate_images(tmp_path / "a", 6, seed=3, size=SMALL, masks=True)
    plain = P.generate_images(tmp_path / "p", 6, seed=3, size=SMALL)
    for r, q in zip(gt, plain, strict=True):  # the same images as without masks
        assert (tmp_path / "a" / r.path).read_bytes() == (tmp_path / "p" / q.path).read_bytes()
        stem = r.path.removesuffix(".png")
        assert (r.left_mask, r.right_mask) == (f"masks/{stem}_left.png", f"masks/{stem}_right.png")
        with Image.open(tmp_path / "a" / r.left_mask) as img:
            assert img.mode == "L" and img.size == (SMALL[1], SMALL[0])
            left = np.asarray(img)
        assert set(np.unique(left)) == {0, 255}
        assert _centroid_col(left > 127) > SMALL[1] / 2
    assert P.read_ground_truth(tmp_path / "a" / "ground_truth.csv") == gt
    P.generate_images(tmp_path / "b", 6, seed=3, size=SMALL, masks=True)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_generate_studies_masks(tmp_path: Path) -> None:
    gt = P.generate_studies(tmp_path, 30, seed=2, size=(122, 100), masks=True)
    kinds = Counter()
    for r in gt:
        if r.view == "LL":
            assert r.left_mask == r.right_mask == ""
            kinds["lateral"] += 1
            continue
        assert r.left_mask == f"masks/{r.study_instance_uid}/{r.sop_instance_uid}_left.png"
        masks = [np.asarray(Image.open(tmp_path / m)) for m in (r.left_mask, r.right_mask)]
        if r.body_part == "CHEST":
            assert all(m.any() for m in masks)
            kinds["frontal"] += 1
        else:
            assert not any(m.any() for m in masks)
            kinds["non_chest"] += 1
    assert kinds["lateral"] and kinds["frontal"] and kinds["non_chest"]
    # the DICOM files are the ones written without masks
    P.generate_studies(tmp_path / "plain", 30, seed=2, size=(122, 100))
    assert all((tmp_path / r.path).read_bytes() == (tmp_path / "plain" / r.path).read_bytes()
               for r in gt)
