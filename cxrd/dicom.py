"""DICOM vocabulary shared by the receivers (C-STORE and STOW-RS), the ingest, admission, the
report writer and the sender: SOP classes, transfer syntaxes, DIMSE status codes, STOW-RS
failure reasons, which of them answers each ingest refusal, and association-reject codes.

Only pydicom and ``cxrd.domain`` are imported (no pynetdicom), so that modules which do not
talk DICOM over the network (the ingest of the watched folder, admission) stay as light as
they are.

The codes that every result (SR, heatmap SC, lung SEG) uses to name the equipment that made
it, as IHE AI Results (AIR) asks, are here too (``EQUIPMENT_*``).
"""

from __future__ import annotations

from typing import NamedTuple

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from cxrd.domain import RejectReason

# ------------------------------------------------------------------------- SOP classes

#: Verification (C-ECHO); pydicom.uid names no constant for it.
VERIFICATION = UID("1.2.840.10008.1.1")
CR = ComputedRadiographyImageStorage
DX_PRESENTATION = DigitalXRayImageStorageForPresentation
DX_PROCESSING = DigitalXRayImageStorageForProcessing
SECONDARY_CAPTURE = SecondaryCaptureImageStorage
#: The lung-field SEG (``cxrd.seg``): BINARY Segmentation Storage.
SEGMENTATION = SegmentationStorage

#: The SOP classes cxrd stores (docs/dicom-output.md §5).
ACCEPTED_SOP_CLASSES = {
    CR: "Computed Radiography Image Storage",
    DX_PRESENTATION: "Digital X-Ray Image Storage - For Presentation",
    DX_PROCESSING: "Digital X-Ray Image Storage - For Processing",
    SECONDARY_CAPTURE: "Secondary Capture Image Storage",
}

#: The SR IODs a structured report can use (``results.sr_sop_class``), by config name
#: (TID 1500 fits all three); the default first.
SR_SOP_CLASSES: dict[str, UID] = {
    "comprehensive3d": Comprehensive3DSRStorage,
    "comprehensive": ComprehensiveSRStorage,
    "enhanced": EnhancedSRStorage,
}

# --------------------------------------------------- equipment (IHE AIR, PS3.3 C.12.1)


class CodeTerm(NamedTuple):
    """A coded concept, named as pydicom's ``Code`` names its parts; ``Code(*term)`` makes
    one. Not pydicom's class itself: importing ``pydicom.sr`` loads its code dictionaries
    (a quarter of a second), which every command and process that imports this module
    would pay."""

    value: str
    scheme_designator: str
    meaning: str


#: Purpose of Reference (CID 7005) of the item of Contributing Equipment Sequence
#: (0018,A001) that names the model that made a result. IHE AIR Rev. 1.1 (6.5.3.1) asks for
#: a "Processing Algorithm" code that it lists as a placeholder, (Newcode1, 99IHE); DICOM
#: has not assigned it, and CID 7005 names the equipment that made a new instance from
#: others "Processing Equipment". (109103 "Modifying Equipment" is for equipment that
#: changed an existing instance, which no result is.)
EQUIPMENT_PROCESSING = CodeTerm("109102", "DCM", "Processing Equipment")
#: The source image's equipment, when a result names it (CID 7005).
EQUIPMENT_ACQUISITION = CodeTerm("109101", "DCM", "Acquisition Equipment")
#: Contribution Description (0018,A003) of the model's item.
EQUIPMENT_MODEL_CONTRIBUTION = "AI model that created this instance"

def report_series_item(study_uid: str, series_uid: str) -> Dataset:
    """The item of Related Series Sequence (0008,1250) by which an SC or a SEG names the
    series of its study's SR (IHE AIR: the SR is written after them, so they cannot name
    it by instance). Its Purpose of Reference is empty: CID 7210 has no code for a
    report."""
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.SeriesInstanceUID = series_uid
    item.PurposeOfReferenceCodeSequence = []
    return item


# ------------------------------------------------------------------- transfer syntaxes

#: What the receiver accepts: every transfer syntax that pydicom + the pylibjpeg plugins
#: decode (docs/dicom-output.md §5).
RECEIVE_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
]
#: What the sender proposes for its results (SR, SC, SEG): explicit, then implicit VR little
#: endian.
SEND_TRANSFER_SYNTAXES: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: A heatmap SC stored as JPEG Baseline (``[results] heatmap_compression``) goes in a
#: presentation context of its own: a destination may accept the SC class uncompressed only.
SEND_COMPRESSED_SC_SYNTAX: str = JPEGBaseline8Bit
#: Transfer syntaxes whose data set is deflated as a whole (JPIP Referenced Deflate, too;
#: pydicom.uid names no constant for it).
DEFLATED = {DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.4.95"}

# -------------------------------------------------------------------- DIMSE statuses
# PS3.4 Annex B.2.3 (Storage Service Class), PS3.7 Annex C

STATUS_SUCCESS = 0x0000
STATUS_WARNING_COERCION = 0xB000
STATUS_WARNING_ELEMENTS_DISCARDED = 0xB006
STATUS_WARNING_DOES_NOT_MATCH_SOP_CLASS = 0xB007
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
#: A C-STORE answered with one of these stored the object (success or a warning).
STATUS_STORED = (STATUS_SUCCESS, STATUS_WARNING_COERCION, STATUS_WARNING_ELEMENTS_DISCARDED,
                 STATUS_WARNING_DOES_NOT_MATCH_SOP_CLASS)
#: The Storage Service Class's warnings: the object is stored, changed or with less in it.
STATUS_WARNING_MEANINGS = {
    STATUS_WARNING_COERCION: "coercion of data elements",
    STATUS_WARNING_ELEMENTS_DISCARDED: "elements discarded",
    STATUS_WARNING_DOES_NOT_MATCH_SOP_CLASS: "data set does not match SOP class",
}
#: PS3.7 C.1: the Warning category (0x0001 and 0xBxxx); the operation was performed.
STATUS_WARNING_RANGE = range(0xB000, 0xC000)
STATUS_WARNING_OTHER = 0x0001


def stored_with_warning(code: int) -> bool:
    """A warning status: the destination stored the object, perhaps not as sent."""
    return code == STATUS_WARNING_OTHER or code in STATUS_WARNING_RANGE
#: 0xA7xx: out of resources; the object itself is fine, so a sender may retry it.
STATUS_OUT_OF_RESOURCES_RANGE = range(0xA700, 0xA800)

#: The C-STORE status of each ingest refusal (``cxrd.ingest``); any other reason is
#: 0xC000, cannot understand. An unsupported SOP class is a data set that does not match
#: the presentation context it came in (the context itself was negotiated).
_STORE_STATUS = {
    RejectReason.STORAGE_FAILED: STATUS_OUT_OF_RESOURCES,
    RejectReason.DISK_LOW: STATUS_OUT_OF_RESOURCES,
    RejectReason.SOP_CLASS_MISMATCH: STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    RejectReason.UNSUPPORTED_SOP_CLASS: STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
}


def store_status(reason: RejectReason | None) -> int:
    """The C-STORE status for an ingest outcome: success, out of resources, SOP class, or
    cannot understand."""
    if reason is None:
        return STATUS_SUCCESS
    return _STORE_STATUS.get(reason, STATUS_CANNOT_UNDERSTAND)


# ------------------------------------------------ STOW-RS failure reasons (PS3.18 I.2.2)

#: Processing failure: something went wrong in cxrd itself (the client may retry).
FAILURE_PROCESSING = 0x0110
#: Referenced SOP Class not supported: with no presentation context negotiated, a SOP
#: class cxrd does not store is refused per instance.
FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: An instance posted to ``/studies/{uid}`` of another study: the data set does not fit
#: the resource it was sent to (A9xx, "does not match").
FAILURE_STUDY_MISMATCH = STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS

#: Where STOW-RS answers an ingest refusal otherwise than C-STORE does.
_STOW_FAILURE = {
    RejectReason.UNSUPPORTED_SOP_CLASS: FAILURE_SOP_CLASS_NOT_SUPPORTED,
    RejectReason.STUDY_MISMATCH: FAILURE_STUDY_MISMATCH,
}


def stow_failure_reason(reason: RejectReason) -> int:
    """The Failure Reason (0008,1197) of a STOW-RS response for an ingest refusal: the
    C-STORE status (``store_status``: 0xA700, 0xA900, 0xC000), except for what only STOW-RS
    can meet (``_STOW_FAILURE``)."""
    return _STOW_FAILURE.get(reason) or store_status(reason)

# ------------------------------------------------------------- A-ASSOCIATE-RJ (PS3.8 9.3.4)

#: Result: rejected-permanent (0x02 is rejected-transient).
REJECT_PERMANENT = 0x01
#: Source: DICOM UL service-user.
REJECT_SOURCE_SERVICE_USER = 0x01
#: Reason (service-user source): no reason given (an association proposing no SOP class
#: that cxrd supports).
REJECT_REASON_NO_REASON_GIVEN = 0x01
#: Reason (service-user source): calling AE title not recognised.
REJECT_REASON_CALLING_AE_NOT_RECOGNISED = 0x03
