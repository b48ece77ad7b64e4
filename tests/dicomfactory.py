"""Small synthetic DICOM objects for tests: CR, DX and Secondary Capture radiographs whose
attributes (modality, body part, view, presentation intent, photometric interpretation,
pixel data, UIDs) are set by keyword.

Nothing here carries real patient data; the patient name is deliberately PHI-shaped so
tests can check that it never reaches a log line.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.uid import generate_uid as _generate_uid

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"

SOP_CLASS_FOR_MODALITY = {"CR": CR, "DX": DX, "SC": SC, "OT": SC, "CT": CT}

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-4711"
PATIENT_BIRTH_DATE = "19700101"

#: What must never appear in a log line (every data set made here carries these).
PHI = (PATIENT_NAME, "Doe", PATIENT_ID, PATIENT_BIRTH_DATE)

_UNSET: Any = object()


def assert_no_phi(records: Iterable[logging.LogRecord], *extra: str) -> None:
    """No log record carries patient data or any of ``extra`` (file names, say)."""
    for record in records:
        message = record.getMessage()
        for needle in (*PHI, *extra):
            assert needle not in message, f"{needle!r} logged: {message}"


def uid() -> str:
    """A fresh UID under pydicom's root (2.25 would be longer than needed)."""
    return str(_generate_uid())


def make_dataset(
    modality: str = "CR",
    *,
    sop_class_uid: str | None = None,
    body_part: str | None = "CHEST",
    view_position: str | None = "PA",
    presentation_intent: str | None = _UNSET,
    photometric: str = "MONOCHROME2",
    pixels: bool = True,
    rows: int = 16,
    columns: int = 16,
    frames: int | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    seed: int = 0,
    **extra: Any,
) -> Dataset:
    """One image data set (no file meta). ``None`` for an attribute leaves it out;
    ``sop_class_uid`` defaults from the modality (CR, DX, SC for anything else)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid or SOP_CLASS_FOR_MODALITY.get(modality, SC)
    ds.SOPInstanceUID = sop_uid or uid()
    ds.StudyInstanceUID = study_uid or uid()
    ds.SeriesInstanceUID = series_uid or uid()
    ds.Modality = modality
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.PatientSex = "F"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "cxrd-tests"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view_position is not None:
        ds.ViewPosition = view_position
    if presentation_intent is _UNSET:
        presentation_intent = "FOR PRESENTATION" if ds.SOPClassUID in (DX, DX_PROCESSING) else None
    if presentation_intent is not None:
        ds.PresentationIntentType = presentation_intent
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    rng = np.random.default_rng(seed)
    if photometric in ("RGB", "YBR_FULL"):
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        shape: tuple[int, ...] = (rows, columns, 3)
        array = rng.integers(0, 255, size=shape, dtype=np.uint8)
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        shape = (rows, columns)
        array = rng.integers(0, 4095, size=shape, dtype=np.uint16)
    if frames is not None:
        ds.NumberOfFrames = frames
        array = np.stack([array] * frames)
    if pixels:
        ds.PixelData = array.tobytes()
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def part10_bytes(ds: Dataset, *, implicit: bool = False) -> bytes:
    """The data set as a DICOM Part 10 file (preamble, DICM, file meta)."""
    out = Dataset()
    out.update(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out.file_meta = meta
    out.preamble = b"\0" * 128
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def bare_bytes(ds: Dataset, *, implicit: bool = True, little_endian: bool = True) -> bytes:
    """The data set alone: no preamble, no file meta (as some old tools write)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little_endian
    write_dataset(fp, ds)
    return fp.getvalue()


def deflate_bomb() -> tuple[bytes, bytes]:
    """A normal Deflated Explicit VR Little Endian CR file, and the same file meta followed
    by 384 MB of zeros deflated into well under a megabyte (a deflate bomb)."""
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = make_dataset("CR")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(64 << 20)
    body = b"".join(compressor.compress(zeros) for _ in range(6)) + compressor.flush()
    return data, data[:meta_end] + body


def write(path: Path, ds: Dataset | bytes, **kwargs: Any) -> Path:
    """Write a data set (as Part 10) or raw bytes to ``path``, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ds if isinstance(ds, bytes) else part10_bytes(ds, **kwargs))
    return path
