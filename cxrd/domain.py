"""The one domain model: the states of instances, studies, jobs and deliveries, and reasons.

Every state is an Enum stored as its string value; every module that changes a state
imports it from here.
"""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    RECEIVED = "received"  # spooled and committed; its study is still collecting
    QUEUED = "queued"  # admitted: a job exists for it
    SKIPPED = "skipped"  # not classified; ``reason`` says why
    DONE = "done"  # classified; results written
    FAILED = "failed"  # classification failed after all retries; ``detail`` has the error


class StudyState(StrEnum):
    COLLECTING = "collecting"  # instances arriving; admitted after stable_seconds of quiet
    ADMITTED = "admitted"  # jobs queued or running
    REPORTED = "reported"  # the SR for the current generation is written
    NOTHING_TO_DO = "nothing-to-do"  # every instance was skipped or failed


class JobKind(StrEnum):
    CLASSIFY = "classify"  # one instance: decode, infer, heatmap SC, lung SEG, findings record
    REPORT = "report"  # one study generation: the SR, from its classify jobs' records


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"  # leased by a worker until lease_expires
    DONE = "done"
    SKIPPED = "skipped"  # a permanent property of the image (decode failed, photometric)
    FAILED = "failed"  # retries exhausted


class ResultKind(StrEnum):
    SR = "sr"
    SC = "sc"
    SEG = "seg"  # the lung-field Segmentation of one classified image


class DeliveryState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"  # refused permanently, or older than the maximum age


class SkipReason(StrEnum):
    """Why an instance was not classified. Operators see these codes in ``cxrd status``."""

    NOT_RADIOGRAPH = "not-cr-dx"  # Modality / SOP class is not CR or DX
    FOR_PROCESSING = "for-processing"  # raw detector data
    NOT_CHEST = "not-chest"
    LATERAL_VIEW = "lateral-view"
    NO_PIXEL_DATA = "no-pixel-data"
    MULTI_FRAME = "multi-frame"
    DECODE_FAILED = "decode-failed"
    UNSUPPORTED_PHOTOMETRIC = "unsupported-photometric"
    #: The segmenter found no lung fields, or fields too small to be a chest
    #: (``[model] min_lung_fraction``): a mislabelled hand or knee, say.
    NO_LUNG_FIELDS = "no-lung-fields"


class RejectReason(StrEnum):
    """Why a file or data set was refused at ingest (nothing was spooled)."""

    NOT_DICOM = "not-dicom"
    UNREADABLE = "unreadable"
    TRUNCATED = "truncated"  # the data set ends before its last element does
    MISSING_UID = "missing-uid"
    INVALID_UID = "invalid-uid"
    UNSUPPORTED_SOP_CLASS = "unsupported-sop-class"
    SOP_CLASS_MISMATCH = "sop-class-mismatch"
    CONFLICTING_DUPLICATE = "conflicting-duplicate"  # same SOP Instance UID, other content
    STORAGE_FAILED = "storage-failed"
    IMAGE_TOO_LARGE = "image-too-large"  # decoded, it would exceed imagesize.MAX_DECODED_BYTES
    #: Free space below ``[storage] min_free_mb``: refused before anything was written.
    DISK_LOW = "disk-low"
    #: STOW-RS to ``/studies/{uid}``: the instance belongs to another study.
    STUDY_MISMATCH = "study-mismatch"
