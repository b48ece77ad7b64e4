"""Sources and faked classifications for the result tests (the SR and the heatmap SC),
and the validators they run: synthetic CR/DX images whose CAM peak is known."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrd import heatmap
from cxrd.modelinfo import PREPROCESSING, ModelInfo, OperatingPoint
from cxrd.preprocess import dataset_to_gray8

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
TB_THRESHOLD = 0.3


def make_source(
    rows: int = 600,
    cols: int = 500,
    *,
    sop_class: str = CR,
    photometric: str = "MONOCHROME2",
    study_uid: str | None = None,
    orientation: bool = True,
) -> Dataset:
    """A plausible single-frame chest radiograph with patient and study attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "Müller^Anna"
    ds.PatientID = "MRN-004711"
    ds.IssuerOfPatientID = "CXRD-TEST"
    ds.PatientBirthDate = "19640229"
    ds.PatientSex = "F"
    ds.PatientAge = "059Y"
    ds.AccessionNumber = "ACC20240517"
    ds.StudyID = "4711"
    ds.StudyDate = "20240517"
    ds.StudyTime = "093012"
    ds.StudyDescription = "XR CHEST PA"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.Modality = "CR" if sop_class == CR else "DX"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "ACME Radiography"
    ds.ManufacturerModelName = "Detecto 3000"
    ds.InstitutionName = "General Hospital"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    if orientation:
        ds.PatientOrientation = ["L", "F"]
        ds.ImagerPixelSpacing = [0.143, 0.143]
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    yy, xx = np.mgrid[0:rows, 0:cols]
    pixels = ((xx * 7 + yy * 3) % 4096).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def fake_result(
    ds: Dataset,
    *,
    peak: tuple[int, int] = (2, 5),
    biases: tuple[float, float, float] = (1.0, 0.0, 0.0),
    size: int = 7,
) -> heatmap.ImageResult:
    """A result whose CAM has one hot cell at ``peak`` for every class, shifted per class
    by ``biases``; probs are softmax(mean CAM), as the real model guarantees."""
    cam = np.zeros((size, size, 3), dtype=np.float32)
    for k, bias in enumerate(biases):
        cam[..., k] = bias
        cam[peak[0], peak[1], k] += 6.0
    logits = cam.mean(axis=(0, 1)).astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs = (probs / probs.sum()).astype(np.float32)
    display = heatmap.downscale_for_display(dataset_to_gray8(ds))
    return heatmap.ImageResult(dataset=ds, display=display, probs=probs, cam=cam)


def make_model(*, demo: bool, input_size: int = 224,
               preprocessing: str = PREPROCESSING) -> ModelInfo:
    return ModelInfo(
        name="cxrd-mnv2-035",
        version="2024.05.1",
        device_uid=generate_uid(),
        demo=demo,
        input_size=input_size,
        preprocessing=preprocessing,
        operating_point=OperatingPoint(
            tb_threshold=TB_THRESHOLD,
            method="sensitivity >= 0.90 on validation",
            target_sensitivity=0.9,
            sensitivity=0.91,
            specificity=0.78,
        ),
    )


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; the report tests need dicom3tools and dcmtk.")
    return path


#: dciodvfy's warnings for the Device UID (0018,1002) of a result's Contributing Equipment
#: item, which IHE AIR asks for there: dicom3tools 2022 knows Device UID in General
#: Equipment but not in that item. ``dciodvfy`` leaves them out (they are the only
#: attribute outside its tables); test_air.py checks where they come from.
DEVICE_UID_WARNINGS = (
    "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - "
    "this is a Standard Extended SOP Class",
)


def dciodvfy(path: Path, *, all_warnings: bool = False) -> list[str]:
    """dciodvfy's messages for a file, asserting that none is an error; its warnings, but
    for ``DEVICE_UID_WARNINGS`` (unless ``all_warnings``)."""
    proc = subprocess.run(
        [tool("dciodvfy"), str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line]
    assert errors == [], "\n".join(lines)
    warnings = [line for line in lines if "Warning" in line]
    if all_warnings or DEVICE_UID_WARNINGS[0] not in warnings:
        return warnings
    return [line for line in warnings if line not in DEVICE_UID_WARNINGS]
