"""The lung-field Segmentation (DICOM SEG): one per classified image, in the source study.

Written by the worker for each classified image (``cxrd.worker.write_seg``), through a
``LungSegEncoder``: highdicom builds the first SEG of each kind of source, the encoder
makes the others from its encoding (see the class), byte for byte what pydicom would write
for highdicom's.

What it holds. The segmenter's two masks at the source's own size (``cxrd.lungs``
``lung_masks``), as a BINARY Segmentation (1.2.840.10008.5.1.4.1.1.66.4) with one
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
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian

from cxrd import __version__
from cxrd.dicom import EQUIPMENT_ACQUISITION, report_series_item
from cxrd.headers import header_view
from cxrd.lungs import LungMasks, Mask
from cxrd.modelinfo import (
    SegmentationInfo,
    contributing_equipment,
    labelled,
    software_versions,
)
from cxrd.srencode import DatasetTemplate, file_meta_bytes
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
    report_series_uid: str | None = None,
) -> hd.seg.Segmentation:
    """Build the lung-field SEG of one source image (see the module docstring).

    ``source_header`` is the source's header (Pixel Data may be absent); ``masks`` are
    boolean arrays of its Rows x Columns (or ``LungMasks`` of that size), in
    ``model.segments`` order (left lung, then right). ``report_series_uid``, when given,
    is the series of the study's SR (``cxrd.worker.sr_series_uid``), named in Related
    Series Sequence as the heatmap SC names it (IHE AIR; the SR lists the SEG as
    evidence). Raises ValueError for masks of the wrong number, type or size or a
    multi-frame source, and InvalidUID for a malformed UID.
    """
    _check_masks(masks, source_header, model)
    series_uid = validate_uid(series_instance_uid, "series_instance_uid")
    sop_uid = validate_uid(sop_instance_uid, "sop_instance_uid")
    report = _report_series(report_series_uid)
    return _highdicom_seg(header_view(source_header), source_header, masks, model,
                          series_uid, sop_uid, instance_number, series_number, report)


def _report_series(uid: str | None) -> str | None:
    return validate_uid(uid, "report_series_uid") if uid else None


def _highdicom_seg(src: Dataset, source_header: Dataset, masks: Masks,
                   model: SegmentationInfo, series_uid: str, sop_uid: str,
                   instance_number: int, series_number: int,
                   report_series: str | None) -> hd.seg.Segmentation:
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
        contributing_equipment=[contributing_equipment(model, dt.datetime.now())],
    )
    seg.add_new("SoftwareVersions", "LO", software_versions(model))
    seg.add_new("DeviceUID", "UI", model.device_uid)  # General Equipment, as the SR and SC
    if report_series:
        seg.RelatedSeriesSequence = [report_series_item(src.StudyInstanceUID, report_series)]
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


#: What highdicom copies from the source into the SEG's item of Contributing Equipment for
#: the source's acquisition (``ContributingEquipment.for_image_acquisition``): a template
#: is kept per set of these values, so that a SEG never names another source's equipment.
_ACQUISITION_EQUIPMENT = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions",
                          "DeviceSerialNumber", "InstitutionName",
                          "InstitutionalDepartmentName", "InstitutionAddress", "StationName")


def _acquisition_time(view: Dataset) -> object:
    """The Contribution DateTime highdicom gives the source's acquisition item: the
    source's Acquisition DateTime (None: the item has none)."""
    value = view.get("AcquisitionDateTime")
    return value if value not in (None, "") else None


def _template_key(view: Dataset, overlap: bool) -> tuple[object, ...]:
    values = tuple(str(view.get(k, "")) for k in _KEYED_VALUES)
    equipment = tuple(str(view.get(k, "")) for k in _ACQUISITION_EQUIPMENT)
    return (*values, *equipment, _acquisition_time(view) is not None, overlap,
            frozenset(int(t) for t in view.keys()))  # noqa: SIM118


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


#: Top-level elements each SEG sets itself; with the elements highdicom copied from the
#: source, they are the template's top-level slots.
_OWN_ELEMENTS = ("SOPInstanceUID", "SeriesInstanceUID", "InstanceNumber",
                 "PatientOrientation", *_CLOCK_DATES, *_CLOCK_TIMES, "PixelData")


@dataclass(frozen=True)
class _Template:
    """The first SEG of a kind of source, encoded (``cxrd.srencode.DatasetTemplate``), and
    the top-level elements highdicom took from its source (``copied``), which every SEG
    of the same kind of source takes from its own."""

    encoded: DatasetTemplate
    copied: tuple[BaseTag, ...]
    file_meta: FileMetaDataset
    preamble: bytes | None
    pixel_vr: str
    contributed: bool  # it holds a Contribution DateTime (set from the clock)


class LungSegEncoder:
    """Lung SEGs at a fraction of highdicom's cost, identical to what it builds.

    ``build_lung_seg`` (highdicom) takes about 22 ms of CPU for a 2500 x 2048 image and
    pydicom's writer 3-4 ms more, most of it checks, bookkeeping and encoding that come out
    the same for every image of the same kind. The encoder builds the first SEG of each
    kind of source with ``build_lung_seg``, sets its clock, writes it with pydicom, and
    keeps its encoding as a template (``cxrd.srencode.DatasetTemplate``) whose slots are
    what differs from one source to the next: the elements highdicom copied from the first
    source (found by identity: highdicom adds the source's own element objects), the SEG's
    own UIDs, instance number, Patient Orientation, clock and Pixel Data (``_OWN_ELEMENTS``),
    and, inside the sequences, every reference to the source image and its series, the
    Contribution DateTime and the SR's series and study (Related Series Sequence). For the
    next source of that kind it encodes only those and packs the masks: about 2.5-3.5 ms
    of CPU for a 2500 x 2048 image. A kind of source is everything highdicom reads other
    than by copying an element: its SOP class, character set, size, Frame of Reference,
    lossy compression (and ratio), the set of elements present, whether the masks overlap,
    and whether the SEG names the SR's series.
    The tests compare, for each kind of source the project generates, the encoder's bytes
    with what pydicom writes for highdicom's SEG of the same source (the clock set alike),
    and its decoded output with highdicom's element by element.
    """

    def __init__(self, model: SegmentationInfo, *,
                 series_number: int = SEG_SERIES_NUMBER) -> None:
        self.model = model
        self.series_number = series_number
        self._templates: dict[tuple[object, ...], _Template] = {}

    def encode(self, source_header: Dataset, masks: Masks, *, series_instance_uid: str,
               sop_instance_uid: str, instance_number: int,
               now: dt.datetime | None = None, report_series_uid: str | None = None
               ) -> bytes:
        """The lung SEG of one source image as a DICOM file's bytes (what pydicom writes
        for ``build_lung_seg``'s object with the same arguments; same errors), its clock
        set to ``now`` (default: the current time)."""
        _check_masks(masks, source_header, self.model)
        series_uid = validate_uid(series_instance_uid, "series_instance_uid")
        sop_uid = validate_uid(sop_instance_uid, "sop_instance_uid")
        report = _report_series(report_series_uid)
        view = header_view(source_header)
        frames, overlap = _frames(masks)
        key = (*_template_key(view, overlap), report is not None)
        now = now or dt.datetime.now()
        template = self._templates.get(key)
        if template is None:
            return self._first(key, view, source_header, masks, series_uid, sop_uid,
                               instance_number, now, report)
        meta = FileMetaDataset()
        for elem in template.file_meta:
            meta.add(elem)  # shared: the one changed is replaced, not modified
        meta.add_new("MediaStorageSOPInstanceUID", "UI", sop_uid)
        elements: dict[int, DataElement] = {int(tag): view[tag] for tag in template.copied}
        for elem in _own_elements(source_header, sop_uid, series_uid, instance_number, now,
                                  template.pixel_vr, frames):
            elements[int(elem.tag)] = elem
        values: dict[str, object] = {"source": str(view.SOPInstanceUID),
                                     "source series": str(view.SeriesInstanceUID)}
        if report is not None:
            values["report series"] = report
            values["report study"] = str(view.StudyInstanceUID)
        if template.contributed:
            values["contribution"] = _contribution(now)
        acquired = _acquisition_time(view)
        if acquired is not None:  # the key holds that this source has one, as the first
            values["acquisition time"] = acquired
        return (file_meta_bytes(meta, template.preamble)
                + template.encoded.fill(values, elements))

    def build(self, source_header: Dataset, masks: Masks, *, series_instance_uid: str,
              sop_instance_uid: str, instance_number: int,
              now: dt.datetime | None = None, report_series_uid: str | None = None
              ) -> Dataset:
        """:meth:`encode`'s SEG read back as a data set."""
        return dcmread(io.BytesIO(self.encode(
            source_header, masks, series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid, instance_number=instance_number, now=now,
            report_series_uid=report_series_uid)))

    def _first(self, key: tuple[object, ...], view: Dataset, source_header: Dataset,
               masks: Masks, series_uid: str, sop_uid: str, instance_number: int,
               now: dt.datetime, report: str | None) -> bytes:
        seg = _highdicom_seg(view, source_header, masks, self.model, series_uid, sop_uid,
                             instance_number, self.series_number, report)
        copied = tuple(BaseTag(tag) for tag in seg.keys()  # noqa: SIM118
                       if tag in view and seg.get_item(tag) is view.get_item(tag))
        contributed = False
        acquired = _acquisition_time(view)
        for item in seg.get("ContributingEquipmentSequence") or []:
            # The source's acquisition keeps its own time (a slot below); the others, the
            # model's and highdicom's, are the SEG's clock.
            if "ContributionDateTime" in item and not _is_acquisition(item):
                item.ContributionDateTime = _contribution(now)
                contributed = True
        for elem in _own_elements(source_header, sop_uid, series_uid, instance_number, now,
                                  seg["PixelData"].VR, seg.PixelData):
            seg.add(elem)
        fp = io.BytesIO()
        dcmwrite(fp, seg, enforce_file_format=True)
        # the VR pydicom resolved highdicom's "OB or OW" to, as written
        pixel_vr = dcmread(io.BytesIO(fp.getvalue()))["PixelData"].VR
        charset = seg.get("SpecificCharacterSet")
        values: dict[str, tuple[str, object]] = {
            "source": ("ReferencedSOPInstanceUID", str(view.SOPInstanceUID)),
            "source series": ("SeriesInstanceUID", str(view.SeriesInstanceUID))}
        if contributed:
            values["contribution"] = ("ContributionDateTime", _contribution(now))
        if acquired is not None:
            values["acquisition time"] = ("ContributionDateTime", acquired)
        if report is not None:  # Related Series Sequence's item
            values["report series"] = ("SeriesInstanceUID", report)
            values["report study"] = ("StudyInstanceUID", str(view.StudyInstanceUID))
        encoded = DatasetTemplate(
            seg, values=values,
            elements=[*copied, *(Tag(k) for k in _OWN_ELEMENTS)],
            charset=charset if charset is None or isinstance(charset, str) else tuple(charset))
        if len(self._templates) >= MAX_TEMPLATES:
            self._templates.pop(next(iter(self._templates)))
        self._templates[key] = _Template(encoded, copied, copy.deepcopy(seg.file_meta),
                                         seg.preamble, pixel_vr, contributed)
        return fp.getvalue()


def _own_elements(source_header: Dataset, sop_uid: str, series_uid: str,
                  instance_number: int, now: dt.datetime, pixel_vr: str,
                  frames: bytes) -> list[DataElement]:
    """The SEG's elements of ``_OWN_ELEMENTS``: its UIDs and instance number, the source's
    Patient Orientation (see ``_highdicom_seg``), the clock, and the packed frames."""
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    return [
        DataElement("SOPInstanceUID", "UI", sop_uid),
        DataElement("SeriesInstanceUID", "UI", series_uid),
        DataElement("InstanceNumber", "IS", instance_number),
        DataElement("PatientOrientation", "CS",
                    list(source_header.get("PatientOrientation") or [])),
        *(DataElement(k, "DA", date) for k in _CLOCK_DATES),
        *(DataElement(k, "TM", time) for k in _CLOCK_TIMES),
        DataElement("PixelData", pixel_vr, frames),
    ]


def _is_acquisition(item: Dataset) -> bool:
    """Whether an item of Contributing Equipment Sequence names acquisition equipment."""
    codes = item.get("PurposeOfReferenceCodeSequence") or []
    wanted = (EQUIPMENT_ACQUISITION.value, EQUIPMENT_ACQUISITION.scheme_designator)
    return any((str(c.get("CodeValue", "")), str(c.get("CodingSchemeDesignator", "")))
               == wanted for c in codes)


def _contribution(now: dt.datetime) -> str:
    return now.strftime("%Y%m%d%H%M%S.%f")
