"""The lung-field Segmentation (DICOM SEG): one per classified image, in the source study.

Not yet written by the worker: this module builds the object; wiring it into the report
path (a job's outputs, the outbox) is a later step (docs/dicom-output.md §3).

What it holds. The segmenter's two masks at the source's own size (``cxrd.lungs``
``probs_to_masks``), as a BINARY Segmentation (1.2.840.10008.5.1.4.1.1.66.4) with one
segment per channel of ``SegmentationInfo.segments`` (the patient's left lung, then the
right; SNOMED CT codes, category Anatomical Structure), each segment one frame. Both
frames are always written, an empty mask as an empty frame (a frame of zeros costs
Rows x Columns / 8 bytes), so every SEG has the same two frames in the same order and a
reader never meets a segment without a frame. An image with no lung found (both masks
empty) therefore still gets a valid SEG, which says so.

The source is a single-frame CR or DX image without a Frame of Reference; highdicom
accepts that for one source frame and then aligns the frames with the source's pixels
(no plane positions, no pixel measures). It leaves Patient Orientation out, which the
General Image module then wants (Type 2C), so it is copied from the source here (empty
when the source has none).

Storage: Explicit VR Little Endian with the BINARY frames bit-packed (1 bit a pixel,
about 1.3 MB for both lungs of a 2500 x 2048 image). highdicom could also write JPEG 2000
Lossless or RLE, but not every archive or viewer accepts compressed SEG; the native
encoding is the one every SEG reader must accept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from cxrd import __version__
from cxrd.headers import header_view
from cxrd.lungs import Mask
from cxrd.modelinfo import SegmentationInfo, labelled, software_versions
from cxrd.uids import validate_uid

logger = logging.getLogger(__name__)

SEG_SERIES_DESCRIPTION = "AI lung fields, not for diagnostic use"
#: Series Number of the SEG series (the SR's is 9001, the heatmap SC's 9002).
SEG_SERIES_NUMBER = 9003
#: Content Label (CS, at most 16 characters, upper case).
SEG_CONTENT_LABEL = "LUNG_FIELDS"
#: Algorithm Parameters of a demo model start with this, as the SR's do.
DEMO_PARAMETER = "DEMO model, not for clinical use"


def _algorithm(model: SegmentationInfo) -> hd.AlgorithmIdentificationSequence:
    """The model's name, version and family (Artificial Intelligence); its parameters as
    ``key=value`` items separated by "; ", the demo warning first for a demo model."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        version=model.version,
        family=codes.cid7162.ArtificialIntelligence,
        source=model.manufacturer,
    )
    parameters = [f"threshold={model.threshold:g}", f"input_size={model.input_size}",
                  f"preprocessing={model.preprocessing}", f"cxrd_version={__version__}"]
    if model.training_data:
        parameters.append(f"training_data={model.training_data}")
    if model.demo:
        parameters.insert(0, DEMO_PARAMETER)
    algorithm[0].AlgorithmParameters = "; ".join(parameters)
    return algorithm


def _segment_descriptions(model: SegmentationInfo) -> list[hd.seg.SegmentDescription]:
    algorithm = _algorithm(model)
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.label,
            segmented_property_category=hd.sr.CodedConcept(
                segment.category_value, segment.coding_scheme, segment.category_meaning),
            segmented_property_type=hd.sr.CodedConcept(
                segment.code_value, segment.coding_scheme, segment.code_meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, segment in enumerate(model.segments, start=1)
    ]


def _check_masks(masks: Sequence[Mask], src: Dataset, model: SegmentationInfo) -> None:
    shape = (int(src.Rows), int(src.Columns))
    if len(masks) != len(model.segments):
        raise ValueError(f"build_lung_seg needs {len(model.segments)} masks "
                         f"({', '.join(s.label for s in model.segments)}), not {len(masks)}.")
    for mask in masks:
        if mask.dtype != np.bool_ or mask.shape != shape:
            raise ValueError(f"Each mask must be a boolean array of the source's "
                             f"Rows x Columns {shape}, not {mask.dtype} {mask.shape}.")
    if int(src.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError("The source of a lung SEG must be a single-frame image.")


def _pixel_array(masks: Sequence[Mask]) -> npt.NDArray[np.uint8]:
    """highdicom's input: (1, rows, columns), pixel = the number of the segment it is in,
    0 for none, when no pixel is in two segments (the usual case); (1, rows, columns,
    segments), one 0/1 plane per segment, otherwise. highdicom checks the second form
    for overlaps pixel by pixel along its last axis (about 80 ms of CPU at 2500 x 2048);
    the first cannot overlap, and its check is one maximum."""
    labels = np.zeros(masks[0].shape, dtype=np.uint8)
    for number, mask in enumerate(masks, start=1):
        if labels[mask].any():
            return np.stack(masks, axis=-1).view(np.uint8)[None]
        labels[mask] = number
    return labels[None]


def build_lung_seg(
    source_header: Dataset,
    masks: Sequence[Mask],
    model: SegmentationInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    series_number: int = SEG_SERIES_NUMBER,
) -> hd.seg.Segmentation:
    """Build the lung-field SEG of one source image (see the module docstring).

    ``source_header`` is the source's header (Pixel Data may be absent); ``masks`` are
    boolean arrays of its Rows x Columns, in ``model.segments`` order (left lung, then
    right). Raises ValueError for masks of the wrong number, type or size or a multi-frame
    source, and InvalidUID for a malformed UID.
    """
    _check_masks(masks, source_header, model)
    series_uid = validate_uid(series_instance_uid, "series_instance_uid")
    sop_uid = validate_uid(sop_instance_uid, "sop_instance_uid")
    src = header_view(source_header)
    seg = hd.seg.Segmentation(
        source_images=[src],
        pixel_array=_pixel_array(masks),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(model),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        manufacturer_model_name=model.name,
        software_versions=model.version,  # all of them below: highdicom takes one
        device_serial_number=model.device_uid,
        content_label=SEG_CONTENT_LABEL,
        content_description=labelled("Lung fields, not for diagnostic use", model),
        series_description=labelled(SEG_SERIES_DESCRIPTION, model),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
    )
    seg.add_new("SoftwareVersions", "LO", software_versions(model))
    # From a source with Pixel Spacing (many CR images have it) highdicom writes a Pixel
    # Measures item without Slice Thickness, which its own reader (hd.seg.segread)
    # then refuses. Without a Frame of Reference the frames are the source's pixels, so
    # the spacing is the source's: the item goes, as for a source without spacing
    # (Shared Functional Groups keeps its one, empty, item).
    shared = seg.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0] and "FrameOfReferenceUID" not in seg:
        del shared[0].PixelMeasuresSequence
    # The frames are the source's pixels, neither flipped nor rotated: its orientation
    # holds (General Image, Type 2C without a Frame of Reference; empty when unknown).
    seg.PatientOrientation = list(source_header.get("PatientOrientation") or [])
    logger.debug(
        "built lung SEG",
        extra={"action": "build_lung_seg", "sop_instance_uid": sop_uid,
               "source_sop_instance_uid": str(source_header.SOPInstanceUID)},
    )
    return seg
