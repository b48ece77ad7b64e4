"""The lung-field Segmentation (DICOM SEG): one per classified image, in the source study.

Written by the worker for each classified image (``cxrd.worker.write_seg``), through a
``LungSegEncoder``: highdicom builds the first SEG of each kind of source, the encoder
makes the others from it (see the class), identical element for element.

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

import copy
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian

from cxrd import __version__
from cxrd.headers import header_view
from cxrd.lungs import LungMasks, Mask
from cxrd.modelinfo import SegmentationInfo, labelled, software_versions
from cxrd.uids import validate_uid

logger = logging.getLogger(__name__)

#: A SEG's masks, in ``model.segments`` order: boolean arrays of the source's Rows x
#: Columns, or ``cxrd.lungs.LungMasks`` (the worker's: packed from their grid).
Masks = Sequence[Mask] | LungMasks

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


def _check_masks(masks: Masks, src: Dataset, model: SegmentationInfo) -> None:
    shape = (int(src.Rows), int(src.Columns))
    count = len(masks.grid) if isinstance(masks, LungMasks) else len(masks)
    if count != len(model.segments):
        raise ValueError(f"build_lung_seg needs {len(model.segments)} masks "
                         f"({', '.join(s.label for s in model.segments)}), not {count}.")
    arrays = masks.grid if isinstance(masks, LungMasks) else masks
    for mask in arrays:
        size = masks.shape if isinstance(masks, LungMasks) else mask.shape
        if mask.dtype != np.bool_ or size != shape:
            raise ValueError(f"Each mask must be a boolean array of the source's "
                             f"Rows x Columns {shape}, not {mask.dtype} {size}.")
    if int(src.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError("The source of a lung SEG must be a single-frame image.")


def _arrays(masks: Masks) -> Sequence[Mask]:
    return masks.full() if isinstance(masks, LungMasks) else masks


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
    masks: Masks,
    model: SegmentationInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    series_number: int = SEG_SERIES_NUMBER,
) -> hd.seg.Segmentation:
    """Build the lung-field SEG of one source image (see the module docstring).

    ``source_header`` is the source's header (Pixel Data may be absent); ``masks`` are
    boolean arrays of its Rows x Columns (or ``LungMasks`` of that size), in
    ``model.segments`` order (left lung, then right). Raises ValueError for masks of the
    wrong number, type or size or a multi-frame source, and InvalidUID for a malformed UID.
    """
    _check_masks(masks, source_header, model)
    series_uid = validate_uid(series_instance_uid, "series_instance_uid")
    sop_uid = validate_uid(sop_instance_uid, "sop_instance_uid")
    return _highdicom_seg(header_view(source_header), source_header, masks, model,
                          series_uid, sop_uid, instance_number, series_number)


def _highdicom_seg(src: Dataset, source_header: Dataset, masks: Masks,
                   model: SegmentationInfo, series_uid: str, sop_uid: str,
                   instance_number: int, series_number: int) -> hd.seg.Segmentation:
    """``build_lung_seg``'s object from checked arguments; ``src`` is the source's
    ``header_view``."""
    seg = hd.seg.Segmentation(
        source_images=[src],
        pixel_array=_pixel_array(_arrays(masks)),
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


# ------------------------------------------------------------------------------ templates

#: Set by highdicom from the clock when it builds a SEG; the encoder sets them afresh.
_CLOCK_DATES = ("ContentDate", "InstanceCreationDate")
_CLOCK_TIMES = ("ContentTime", "InstanceCreationTime")
#: Source elements whose *values* highdicom turns into something else (not a copy of the
#: element): a template is shared only by sources that agree on them.
_KEYED_VALUES = ("SOPClassUID", "SpecificCharacterSet", "FrameOfReferenceUID",
                 "LossyImageCompression", "LossyImageCompressionRatio",
                 "LossyImageCompressionMethod", "Rows", "Columns")
#: Templates kept per encoder (kinds of source met; a worker meets a handful).
MAX_TEMPLATES = 64


def _template_key(view: Dataset, overlap: bool) -> tuple[object, ...]:
    values = tuple(str(view.get(k, "")) for k in _KEYED_VALUES)
    return (*values, overlap, frozenset(int(t) for t in view.keys()))  # noqa: SIM118


def _frames(masks: Masks) -> tuple[bytes, bool]:
    """BINARY frames as a SEG stores them, and whether the masks overlap: one frame per
    segment, in segment order, the bits of all frames packed together, least significant
    bit first, padded to an even length (PS3.5 8.1.1; what highdicom writes, byte for
    byte). Each mask is packed on its own when its pixels fill whole bytes (then the
    overlap test runs on the packed bits, an eighth of the memory). ``LungMasks`` whose
    rows fill whole bytes are packed from their grid: each grid row once, at the image's
    width, then the packed rows repeated as the image's rows take them (about 0.2 ms for
    both lungs of a 2500 x 2048 image, against 3-4 ms to enlarge and pack); they overlap
    where their grids do."""
    if isinstance(masks, LungMasks) and masks.cols % 8 == 0:
        union = np.zeros_like(masks.grid[0])
        overlap = False
        for grid in masks.grid:
            overlap = overlap or bool(np.logical_and(union, grid).any())
            union |= grid
        rows = masks.row_index
        planes = [np.packbits(masks.expanded_columns(channel), axis=1, bitorder="little")
                  for channel in range(len(masks.grid))]
        packed = b"".join((plane if len(rows) == len(plane) else plane[rows]).tobytes()
                          for plane in planes)
        return (packed + b"\0" if len(packed) % 2 else packed), overlap
    arrays = _arrays(masks)
    if arrays[0].size % 8:
        packed = np.packbits(np.stack(arrays).ravel(), bitorder="little").tobytes()
        seen = np.zeros(arrays[0].shape, dtype=bool)
        overlap = False
        for mask in arrays:
            overlap = overlap or bool(np.logical_and(seen, mask).any())
            seen |= mask
    else:
        planes = [np.packbits(mask.ravel(), bitorder="little") for mask in arrays]
        union_bits = np.zeros_like(planes[0])
        overlap = False
        for plane in planes:
            overlap = overlap or bool(np.bitwise_and(union_bits, plane).any())
            union_bits |= plane
        packed = b"".join(plane.tobytes() for plane in planes)
    return (packed + b"\0" if len(packed) % 2 else packed), overlap


#: The template's sequences that each SEG changes (references to its source, the clock):
#: copied deeply per SEG; every other element is shared with the template, never changed.
_PER_SEG_SEQUENCES = ("ReferencedSeriesSequence", "SourceImageSequence",
                      "PerFrameFunctionalGroupsSequence", "ContributingEquipmentSequence")


@dataclass(frozen=True)
class _Template:
    """A SEG highdicom built, without its Pixel Data, and the top-level elements it took
    from its source (``copied``), which every SEG of the same kind of source takes from
    its own."""

    seg: Dataset
    copied: tuple[BaseTag, ...]
    pixel_vr: str


class LungSegEncoder:
    """Lung SEGs at a fraction of highdicom's cost, identical to what it builds.

    ``build_lung_seg`` (highdicom) takes about 22 ms of CPU for a 2500 x 2048 image, most
    of it checks and bookkeeping that come out the same for every image of the same kind.
    The encoder builds the first SEG of each kind of source with ``build_lung_seg`` and
    keeps it as a template. For the next source of that kind it shares the template's
    unchanged elements and copies the four sequences it changes; takes from the new source
    the elements highdicom copied from the first one (found by identity: highdicom adds
    the source's own element objects, and they stay shared with the source header, as
    highdicom leaves them); sets what refers to the source image (Referenced Series,
    Source Image and each frame's Derivation Image sequences), the UIDs, the instance
    number and the clock; and packs the masks: about 2.9 ms in all. A kind of source is
    everything highdicom reads other than by copying an element: its SOP class, character
    set, size, Frame of Reference, lossy compression (and ratio), the set of elements
    present, and whether the masks overlap. The test compares the encoder's output with
    highdicom's for each kind of source the project generates, element by element.
    """

    def __init__(self, model: SegmentationInfo, *,
                 series_number: int = SEG_SERIES_NUMBER) -> None:
        self.model = model
        self.series_number = series_number
        self._templates: dict[tuple[object, ...], _Template] = {}

    def build(self, source_header: Dataset, masks: Masks, *,
              series_instance_uid: str, sop_instance_uid: str,
              instance_number: int) -> Dataset:
        """The lung SEG of one source image, as ``build_lung_seg`` makes it (same
        arguments, same errors)."""
        _check_masks(masks, source_header, self.model)
        series_uid = validate_uid(series_instance_uid, "series_instance_uid")
        sop_uid = validate_uid(sop_instance_uid, "sop_instance_uid")
        view = header_view(source_header)
        frames, overlap = _frames(masks)
        key = _template_key(view, overlap)
        template = self._templates.get(key)
        if template is None:
            return self._first(key, view, source_header, masks, series_uid, sop_uid,
                               instance_number)
        seg = Dataset()
        for elem in template.seg:
            seg.add(elem)  # shared: each one changed below is replaced, not modified
        for keyword in _PER_SEG_SEQUENCES:
            if keyword in template.seg:
                seg.add_new(keyword, "SQ", copy.deepcopy(template.seg[keyword].value))
        seg.file_meta = copy.deepcopy(template.seg.file_meta)
        seg.preamble = template.seg.preamble
        for tag in template.copied:
            seg.add(view[tag])
        source_uid = str(view.SOPInstanceUID)
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID = view.SeriesInstanceUID
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0] \
            .ReferencedSOPInstanceUID = source_uid
        for item in seg.get("SourceImageSequence") or []:
            item.ReferencedSOPInstanceUID = source_uid
        for frame in seg.PerFrameFunctionalGroupsSequence:
            for derivation in frame.get("DerivationImageSequence") or []:
                for item in derivation.SourceImageSequence:
                    item.ReferencedSOPInstanceUID = source_uid
        seg.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        seg.add_new("SOPInstanceUID", "UI", sop_uid)
        seg.add_new("SeriesInstanceUID", "UI", series_uid)
        seg.add_new("InstanceNumber", "IS", instance_number)
        seg.add_new("PatientOrientation", "CS",
                    list(source_header.get("PatientOrientation") or []))
        now = dt.datetime.now()
        for keyword in _CLOCK_DATES:
            seg.add_new(keyword, "DA", now.strftime("%Y%m%d"))
        for keyword in _CLOCK_TIMES:
            seg.add_new(keyword, "TM", now.strftime("%H%M%S.%f"))
        for item in seg.get("ContributingEquipmentSequence") or []:
            if "ContributionDateTime" in item:
                item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S.%f")
        seg.add_new("PixelData", template.pixel_vr, frames)
        return seg

    def _first(self, key: tuple[object, ...], view: Dataset, source_header: Dataset,
               masks: Masks, series_uid: str, sop_uid: str,
               instance_number: int) -> Dataset:
        seg = _highdicom_seg(view, source_header, masks, self.model, series_uid, sop_uid,
                             instance_number, self.series_number)
        copied = tuple(BaseTag(tag) for tag in seg.keys()  # noqa: SIM118
                       if tag in view and seg.get_item(tag) is view.get_item(tag))
        template = Dataset()
        for elem in seg:
            if elem.keyword != "PixelData":
                template.add(elem)
        template.file_meta = seg.file_meta
        template.preamble = seg.preamble
        if len(self._templates) >= MAX_TEMPLATES:
            self._templates.pop(next(iter(self._templates)))
        self._templates[key] = _Template(copy.deepcopy(template), copied,
                                         seg["PixelData"].VR)
        return seg
