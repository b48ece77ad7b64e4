"""Source headers as the result objects need them: views that highdicom accepts, and the
compact record of a source image that the study's SR is built from.

A worker records what the SR copies from each image when it classifies the image
(:func:`source_record`), so building the SR later opens no spool file. The record keeps the
patient, clinical-trial and study attributes (groups 0010, 0012, 0032 and the study
attributes of group 0008/0020), the identifiers, and the geometry the SR's image library
and regions use. It is stored as DICOM JSON (``cxrd.findings.ImageFindings``).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import DA, DT, TM

# Bulk data never needed by the report stage; left out of the header views.
_BULK_GROUPS = (0x7FE0, 0x5400)
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


DATE_TIME_VRS: dict[str, type] = {"DA": DA, "DT": DT, "TM": TM}


def parses(parse: type, value: object) -> bool:
    """Whether every value of a date/time element converts as highdicom converts it."""
    values = value if isinstance(value, (list, MultiValue)) else [value]
    try:
        for v in values:
            if v not in (None, ""):
                parse(v)
    except (TypeError, ValueError):
        return False
    return True


def header_view(ds: Dataset) -> Dataset:
    """A shallow header-only copy of the source, with the Type 2 patient/study attributes
    that highdicom reads as attributes present (empty when the source lacks them)."""
    view = Dataset()
    # keys(), not iteration: iterating a Dataset converts every raw element, Pixel Data too.
    for tag in ds.keys():  # noqa: SIM118
        btag = BaseTag(tag)
        overlay_data = 0x6000 <= btag.group <= 0x60FF and btag.element == 0x3000
        if btag.group in _BULK_GROUPS or overlay_data:
            continue
        elem = ds[btag]
        parse = DATE_TIME_VRS.get(elem.VR)
        if parse is not None and not parses(parse, elem.value):
            # A malformed date or time ("1901-12-31", seen in the wild) makes highdicom
            # refuse the whole object, quoting the value (a birth date) in its error. The
            # copy gets it empty (Type 2 or 3 where it is copied to); the source keeps it.
            view.add_new(btag, elem.VR, None)
            continue
        view.add(elem)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in view:
            setattr(view, keyword, None)
    return view


def library_view(ds: Dataset) -> Dataset:
    """What highdicom's TID 1600 image library reads from an image.

    For CR/DX highdicom adds the TID 1603 descriptors and then requires both Patient
    Orientation and Imager Pixel Spacing. Those descriptors are optional in TID 1603 and
    the attributes are Type 2/3 in CR, so when either is missing the view hides the
    Modality from that check; the coded Modality descriptor comes from the SOP Class and
    is still written.
    """
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "Modality",
                    "FrameOfReferenceUID", "PatientOrientation", "ImagerPixelSpacing"):
        if keyword in ds and ds[keyword].value not in (None, ""):
            setattr(view, keyword, ds[keyword].value)
    orientation = list(view.get("PatientOrientation") or [])
    spacing = list(view.get("ImagerPixelSpacing") or [])
    complete = len(orientation) == 2 and all(orientation) and len(spacing) == 2
    if not complete or "Modality" not in view:
        view.Modality = ""
    return view


#: Whole groups recorded: Patient (and Patient Study), Clinical Trial, Study (retired).
_RECORD_GROUPS = (0x0010, 0x0012, 0x0032)
#: Other attributes recorded: the study's, the identifiers, and the geometry.
_RECORD_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
    "SeriesInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "StudyDescription", "ProcedureCodeSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
    "ReferencedStudySequence", "RequestingService", "RequestingServiceCodeSequence",
    "ReasonForPerformedProcedureCodeSequence", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "StudyID", "Modality", "FrameOfReferenceUID",
    "PatientOrientation", "Rows", "Columns", "ImagerPixelSpacing", "InstanceNumber",
    "Laterality", "ImageLaterality",
)
def _record_tags() -> frozenset[int]:
    from pydicom.datadict import tag_for_keyword

    tags = set()
    for keyword in _RECORD_KEYWORDS:
        tag = tag_for_keyword(keyword)
        if tag is None:  # a keyword pydicom does not know: a typo here
            raise ValueError(f"unknown DICOM keyword {keyword!r}")
        tags.add(int(tag))
    return frozenset(tags)


_KEYWORD_TAGS = _record_tags()


def source_record(ds: Dataset) -> Dataset:
    """The part of a source header the SR needs (see the module docstring), from a data set
    whose Pixel Data may still be present (it is not touched)."""
    record = Dataset()
    for tag in ds.keys():  # noqa: SIM118  (keys(): iteration would convert Pixel Data)
        btag = BaseTag(tag)
        if btag.group in _RECORD_GROUPS or int(btag) in _KEYWORD_TAGS:
            record.add(ds[btag])
    return record
