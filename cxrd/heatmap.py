"""The heatmap Secondary Capture: one per classified image, in the source study.

What it shows. The radiograph, downscaled so that its long side is at most ``max_side``
(``[results] heatmap_max_side``, 1024 by default; never enlarged), with a legend band burned
in below it: "AI heatmap, not for diagnostic use", the model's name and version (with DEMO
for a demo model), the class shown with its probability, and the TB threshold with P(TB).
The class shown is the reported class, ``cxrd.findings.decide_class`` at the model's TB
operating point, the same decision as the SR's.

The colour rule, one rule for every SC (each SC states it in its Derivation Description):

* NORM: no colour at all. The image part is the plain grey radiograph (R == G == B).
* TB and NTB: the shown class's CAM is upsampled bilinearly onto the display, each cell at
  its receptive field's centre (``cxrd.findings.upsample_cam``); ``lo`` and ``hi`` are its
  minimum and maximum there. A pixel below half-way, ``(lo + hi) / 2``, keeps the plain
  radiograph. From half-way up the pixel is blended with the jet colour of
  ``(c - lo) / (hi - lo)`` (green-yellow at half-way, pure red at the maximum) at an opacity
  rising linearly from 0 at half-way to 0.6 at the maximum. Half-way is the level at which
  ``cxrd.findings.hottest_region`` thresholds the same map, so without the lung
  restriction the SR's region is the box of the coloured blob that holds the maximum. A
  flat CAM (``hi == lo``) shows no colour.
* TB and NTB: the region the SR reports for the image (``cxrd.findings.ImageFindings``:
  the hottest region of the shown class's CAM, inside the lung fields widened by
  ``[results] lung_margin`` when they are known) is outlined on the display: a 1-pixel white
  rectangle on the region's edge with a 1-pixel black one around it, so that one of the
  two stands out on dark or bright grey and both on the jet colours. The outline is grey
  (R == G == B), so everything coloured is still the map. NORM: no outline. With the lung
  restriction the outline can enclose a weaker blob than the reddest one: the colour shows
  the class's evidence everywhere, the outline what the report points at.

Size. ``compression="none"`` stores 8-bit RGB in Explicit VR Little Endian, 3 bytes a pixel
(2.6 MB at 1024 x 839 plus the legend); ``"jpeg-baseline"`` stores JPEG Baseline
(1.2.840.10008.1.2.4.50), quality 90 with 4:2:2 chroma (Photometric Interpretation
YBR_FULL_422), about 20 to 30 times smaller, marked lossy (Lossy Image Compression "01",
its ratio, method ISO_10918_1).

The header follows ``docs/dicom-output.md`` §2: the patient and study of the
source, its own series (Modality OT), ImageType DERIVED\\SECONDARY, a Source Image Sequence
pointing at the radiograph, Body Part Examined (CHEST when the source has none). It is
built with pydicom directly: highdicom's ``SCImage.from_ref_dataset`` made the same
attributes but took longer than rendering the pixels (it looks up its IOD tables on every
call).
"""

from __future__ import annotations

import datetime
import functools
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit

from cxrd.dicom import (
    EQUIPMENT_ACQUISITION,
    SECONDARY_CAPTURE,
    CodeTerm,
    report_series_item,
)
from cxrd.findings import (
    CLASS_LABELS,
    NORM,
    TB,
    Box,
    check_probs,
    check_source,
    decide_class,
    hottest_region,
    upsample_cam,
)
from cxrd.headers import DATE_TIME_VRS, TYPE2_PATIENT_STUDY, parses
from cxrd.modelinfo import (
    CLASS_NAMES,
    ModelInfo,
    contributing_equipment,
    equipment,
    labelled,
    software_versions,
)
from cxrd.preprocess import Reduced
from cxrd.uids import new_uid, validate_uid

logger = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

SC_SERIES_DESCRIPTION = "AI heatmap, not for diagnostic use"
#: The default long side of the radiograph in the SC (``[results] heatmap_max_side``).
DISPLAY_MAX_SIDE = 1024
#: ``[results] heatmap_compression`` values (``cxrd.config.HeatmapCompression``): how the
#: SC's pixels are stored.
COMPRESSIONS = ("none", "jpeg-baseline")
#: Pillow's JPEG quality for "jpeg-baseline".
JPEG_QUALITY = 90
_SOURCE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")
_HEATMAP_MAX_ALPHA = 0.6
_LEGEND_LINE_HEIGHT = 13  # the default bitmap font is 11 px high
_PATIENT_SEXES = ("M", "F", "O")
#: The source's equipment, named in the Contributing Equipment Sequence when present.
_SOURCE_EQUIPMENT = ("ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
                     "InstitutionName", "InstitutionalDepartmentName", "InstitutionAddress",
                     "StationName")


def _jet_lut() -> U8:
    """A 256-entry jet-like colour map whose top end is pure red, so "hottest" is exact."""
    stops = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
    colours = np.array(
        [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 96, 0], [255, 0, 0]],
        dtype=np.float64,
    )
    x = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(x, stops, colours[:, c]) for c in range(3)], axis=-1)
    return np.rint(lut).astype(np.uint8)


_LUT = _jet_lut()


def _opacity() -> npt.NDArray[np.float64]:
    """Opacity of each activation index i = (c - lo) / (hi - lo) * 255: 0 below half-way
    (i <= 127), then rising linearly to _HEATMAP_MAX_ALPHA at the maximum (i = 255)."""
    i = np.arange(256, dtype=np.float64)
    return np.clip((i - 127.5) / 127.5, 0.0, 1.0) * _HEATMAP_MAX_ALPHA


def _blend_table() -> U8:
    """RGB for every (activation index, grey) pair, flattened to (256 * 256, 3): the grey
    itself below half-way, the jet colour blended in at the opacity of ``_opacity`` above."""
    alpha = _opacity()
    gray = np.arange(256, dtype=np.float64)
    out = (
        gray[None, :, None] * (1.0 - alpha)[:, None, None]
        + alpha[:, None, None] * _LUT[:, None, :].astype(np.float64)
    )
    return np.rint(out).astype(np.uint8).reshape(256 * 256, 3)


_BLEND = _blend_table()
#: _BLEND as one little-endian RGBX word per entry: a gather of 4-byte words is about three
#: times faster than one of 3-byte rows, and Pillow reads RGBX as it is.
_BLEND_RGBX = np.concatenate([_BLEND, np.zeros((256 * 256, 1), np.uint8)], axis=1).view(
    np.dtype("<u4")).ravel()


@dataclass(frozen=True)
class ImageResult:
    """The classification of one source image, as the heatmap SC needs it.

    ``dataset`` is the source header (Pixel Data may be absent); its Rows and Columns are
    the full-size geometry. ``display`` is the source as 8-bit grey after the modality/VOI
    LUTs and MONOCHROME1 inversion, with the aspect ratio kept, at any size: the decoded
    image (``cxrd.worker.prepare`` passes the full image, or a reduced JPEG 2000 decode),
    which the SC downscales to its ``max_side``. ``probs`` are P(TB), P(NTB), P(NORM).
    ``cam`` is (h, w, 3) class-activation logits (centred over the classes, see
    ``training.model.build_export_model``) over the model input, which is the
    image stretched to a square. ``reduced``, when given, is ``display`` box-averaged by a
    whole factor with Pillow's ``Image.reduce`` (``cxrd.worker.prepare`` has it from the
    model's ``cxrd-gray8-stretch-v2`` preprocessing): the SC starts from it when its own
    downscale reduces by that factor, the same pixels without a second ``reduce``.
    ``region`` is the region the SR reports for the image, ``ImageFindings.region`` (source
    pixel coordinates x0, y0, x1, y1), which the SC outlines: pass it, so that the outline
    is the SR's (lung-restricted when the findings were) and costs no second search. None:
    the SC computes it from ``cam`` as ``ImageFindings.of`` does without lungs (about
    1.2 ms of CPU).
    """

    dataset: Dataset
    display: U8
    probs: F32
    cam: F32
    reduced: Reduced | None = None
    region: Box | None = None

    def __post_init__(self) -> None:
        n = len(CLASS_NAMES)
        check_probs(self.probs, "ImageResult.probs")
        if self.cam.ndim != 3 or self.cam.shape[-1] != n or min(self.cam.shape[:2]) < 1:
            raise ValueError(f"ImageResult.cam must have shape (h, w, {n}), not {self.cam.shape}.")
        if self.display.ndim != 2 or self.display.dtype != np.uint8:
            raise ValueError(
                "ImageResult.display must be a 2-D uint8 array, "
                f"not {self.display.dtype} {self.display.shape}."
            )
        if self.reduced is not None:
            factor, image = self.reduced
            want = tuple(-(-n // factor) for n in self.display.shape)
            if image.dtype != np.uint8 or image.shape != want:
                raise ValueError(f"ImageResult.reduced must be a uint8 array of shape {want} "
                                 f"(the display reduced by {factor}), not "
                                 f"{image.dtype} {image.shape}.")
        if self.region is not None:
            box = np.asarray(self.region, dtype=np.float64)
            if (box.shape != (4,) or not np.all(np.isfinite(box)) or box[0] > box[2]
                    or box[1] > box[3]):
                raise ValueError("ImageResult.region must be (x0, y0, x1, y1) with "
                                 f"x0 <= x1 and y0 <= y1, not {self.region}.")
        check_source(self.dataset, "ImageResult.dataset")


# --------------------------------------------------------------------------- pixels


def display_size(rows: int, cols: int, max_side: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(rows, cols) of an image shrunk so its long side is ``max_side``, aspect kept; the
    image's own size when it is no larger."""
    long_side = max(rows, cols)
    if long_side <= max_side:
        return rows, cols
    scale = max_side / long_side
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def _downscale(gray: U8, max_side: int, reduced: Reduced | None = None) -> Image.Image:
    """``gray`` as an 'L' image at :func:`display_size`: a box average by the whole factor
    (``Image.reduce``, the cheap part), then a box filter for the remaining factor below 2.
    Area averaging throughout, so no aliasing; about 4 ms for 2500x2048 to 1024x839, where
    an antialiased bilinear resize from full size takes 25 ms. When ``reduced`` is
    ``gray`` already reduced by that whole factor, the box filter starts from it."""
    rows, cols = gray.shape
    out_rows, out_cols = display_size(rows, cols, max_side)
    if (out_rows, out_cols) == (rows, cols):
        return Image.fromarray(gray)
    factor = min(rows // out_rows, cols // out_cols)
    if factor >= 2 and reduced is not None and reduced.factor == factor:
        img = Image.fromarray(reduced.image)
    else:
        img = Image.fromarray(gray)
        if factor >= 2:
            img = img.reduce(factor)
    if img.size != (out_cols, out_rows):
        img = img.resize((out_cols, out_rows), Image.Resampling.BOX)
    return img


def downscale_for_display(gray: U8, max_side: int = DISPLAY_MAX_SIDE,
                          reduced: Reduced | None = None) -> U8:
    """Shrink an 8-bit image so its long side is at most ``max_side`` (aspect kept);
    ``reduced`` as in :class:`ImageResult`."""
    return np.asarray(_downscale(gray, max_side, reduced), dtype=np.uint8)


def _ascii(text: str) -> str:
    # The default bitmap font covers Latin-1 only; keep the legend plain ASCII.
    return text.encode("ascii", "replace").decode("ascii")


@functools.cache
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


def _legend_band(lines: Sequence[str], width: int) -> Image.Image:
    """White text on black ('L'), ``width`` wide: the default bitmap font scaled up by a
    whole factor (1 to 4) that fits, or shrunk to fit a narrow image."""
    font = _font()
    text_width = max(int(font.getbbox(line)[2]) for line in lines)
    band_h = len(lines) * _LEGEND_LINE_HEIGHT + 4
    fits = text_width + 8 <= width
    scale = max(1, min(4, (width - 8) // max(text_width, 1))) if fits else 1
    band_w = -(-width // scale) if fits else text_width + 8
    img = Image.new("L", (band_w, band_h), 0)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((3, 2 + i * _LEGEND_LINE_HEIGHT), line, fill=255, font=font)
    if not fits:
        return img.resize((width, max(1, round(band_h * width / band_w))),
                          Image.Resampling.BOX)
    big = img.resize((band_w * scale, band_h * scale), Image.Resampling.NEAREST)
    return big.crop((0, 0, width, big.height))


def _colour(cam2d: F32, display: Image.Image) -> tuple[tuple[int, int], Image.Image] | None:
    """The coloured part of the overlay (see the module docstring): the top-left corner
    (column, row) and the RGB image of the smallest rectangle holding every pixel at or
    above half-way, or None when the CAM is flat. Pixels of the rectangle below half-way
    come out grey (opacity 0), so only the rectangle needs blending."""
    cols, rows = display.size
    up = upsample_cam(cam2d, rows, cols)
    lo, hi = float(up.min()), float(up.max())
    if not hi > lo:
        return None
    half = lo + 0.5 * (hi - lo)
    rows_hit = np.flatnonzero(up.max(axis=1) >= half)
    r0, r1 = int(rows_hit[0]), int(rows_hit[-1]) + 1
    cols_hit = np.flatnonzero(up[r0:r1].max(axis=0) >= half)
    c0, c1 = int(cols_hit[0]), int(cols_hit[-1]) + 1
    # Activation index (c - lo) / (hi - lo) * 255, rounded: below half-way it is at most
    # 127, whose opacity is 0.
    idx = up[r0:r1, c0:c1]
    idx -= np.float32(lo)
    idx *= np.float32(255.0 / (hi - lo))
    idx += np.float32(0.5)
    table_idx = idx.astype(np.uint16)
    # One gather from the (activation, grey) -> RGB table does the colour map and blend.
    table_idx <<= 8
    table_idx |= np.asarray(display.crop((c0, r0, c1, r1)), dtype=np.uint8)
    rgbx = np.take(_BLEND_RGBX, table_idx)
    return (c0, r0), Image.frombuffer("RGB", (c1 - c0, r1 - r0), rgbx, "raw", "RGBX", 0, 1)


def _outline(image: Image.Image, region: Box, source: tuple[int, int],
             display: tuple[int, int]) -> None:
    """Draw ``region`` (source pixel coordinates of a ``source`` (rows, cols) image) on the
    top ``display`` (rows, cols) of ``image``: white on the region's edge pixels, black just
    outside them, both clipped to the display (never on the legend). A few microseconds."""
    rows, cols = display
    sy, sx = rows / source[0], cols / source[1]
    x0, y0, x1, y1 = region

    def clip(v: float, n: int) -> int:
        return min(max(int(v), 0), n - 1)

    inner = (clip(math.floor(x0 * sx), cols), clip(math.floor(y0 * sy), rows),
             clip(math.ceil(x1 * sx) - 1, cols), clip(math.ceil(y1 * sy) - 1, rows))
    outer = (clip(inner[0] - 1, cols), clip(inner[1] - 1, rows),
             clip(inner[2] + 1, cols), clip(inner[3] + 1, rows))
    draw = ImageDraw.Draw(image)
    draw.rectangle(outer, outline=(0, 0, 0))
    draw.rectangle(inner, outline=(255, 255, 255))


def _legend_lines(result: ImageResult, model: ModelInfo, k: int) -> list[str]:
    threshold = model.operating_point.tb_threshold
    p_k = float(result.probs[k])
    lines = [SC_SERIES_DESCRIPTION, _ascii(model.display_name)]
    if k == NORM:
        lines.append(f"Result: {CLASS_NAMES[k]} ({CLASS_LABELS[k]}), P={p_k:.3f}")
    else:
        lines.append(f"Class shown: {CLASS_NAMES[k]} ({CLASS_LABELS[k]}), P={p_k:.3f}")
    lines.append(f"TB threshold {threshold:g}, P(TB)={float(result.probs[TB]):.3f}")
    lines.append("No colour overlay for a normal result" if k == NORM
                 else f"Colour: {CLASS_NAMES[k]} map above half-way, red = max")
    if k != NORM:
        lines.append("Box: the region the SR reports")
    return lines


def _render(result: ImageResult, model: ModelInfo, max_side: int) -> Image.Image:
    """The SC's pixels as an RGB image: the display with the overlay, the legend below."""
    k = decide_class(result.probs, model.operating_point.tb_threshold)
    display = _downscale(result.display, max_side, result.reduced)
    cols, rows = display.size
    band = _legend_band(_legend_lines(result, model, k), cols)
    gray = Image.new("L", (cols, rows + band.height))
    gray.paste(display, (0, 0))
    gray.paste(band, (0, rows))
    out = Image.merge("RGB", (gray, gray, gray))
    if k != NORM:
        coloured = _colour(result.cam[..., k], display)
        if coloured is not None:
            corner, patch = coloured
            out.paste(patch, corner)
        source = (int(result.dataset.Rows), int(result.dataset.Columns))
        region = result.region
        if region is None:
            region = hottest_region(result.cam, k, *source)
        _outline(out, region, source, (rows, cols))
    return out


def render_heatmap(result: ImageResult, model: ModelInfo,
                   max_side: int = DISPLAY_MAX_SIDE) -> U8:
    """The SC pixels: (H + legend, W, 3) uint8, the display with the shown class's
    overlay (none for NORM) and the legend band below; see the module docstring."""
    return np.asarray(_render(result, model, max_side), dtype=np.uint8)


# --------------------------------------------------------------------------- header


def _code_item(code: Code | CodeTerm) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _source_value(src: Dataset, keyword: str) -> object:
    """The source's value, or None (empty) when it is missing or is a malformed date or
    time ("1901-12-31", seen in the wild), as ``cxrd.headers.header_view`` treats them."""
    if keyword not in src:
        return None
    elem = src[keyword]
    parse = DATE_TIME_VRS.get(elem.VR)
    if elem.value in (None, "") or (parse is not None and not parses(parse, elem.value)):
        return None
    return elem.value


def _long_string(text: str, what: str) -> str:
    if len(text) > 64 or "\\" in text:
        raise ValueError(f"{what} {text!r} does not fit a DICOM LO value "
                         "(at most 64 characters, no backslash).")
    return text


def _equipment(src: Dataset, model: ModelInfo, now: datetime.datetime) -> list[Dataset]:
    """Contributing Equipment: the source's acquisition equipment (when it names its
    Manufacturer) and the model that made this object (``cxrd.modelinfo``
    ``contributing_equipment``, as the SR and the SEG name it: IHE AIR)."""
    items: list[Dataset] = []
    manufacturer = _source_value(src, "Manufacturer")
    if manufacturer:
        acquisition = Dataset()
        acquisition.Manufacturer = manufacturer
        for keyword in _SOURCE_EQUIPMENT:
            value = _source_value(src, keyword)
            if value:
                setattr(acquisition, keyword, value)
        when = _source_value(src, "AcquisitionDateTime")
        if when:
            acquisition.ContributionDateTime = when
        acquisition.ContributionDescription = "Acquisition equipment of the source image(s)"
        acquisition.PurposeOfReferenceCodeSequence = [_code_item(EQUIPMENT_ACQUISITION)]
        items.append(acquisition)
    items.append(contributing_equipment(model, now))
    return items


def _derivation(result: ImageResult, model: ModelInfo, k: int, cols: int,
                compression: str) -> str:
    shown = (f"{CLASS_NAMES[k]} ({CLASS_LABELS[k]}, P={float(result.probs[k]):.3f}) "
             f"from {_ascii(model.display_name)}")
    if k == NORM:
        text = (f"Reported class {shown}: no colour overlay (shown for TB and NTB results "
                "only); ")
    else:
        text = (f"Class activation map of class {shown}, bilinearly upsampled; coloured only "
                "where it is at or above half-way between its minimum and maximum (the level "
                "of the SR's region), jet colour, opacity rising linearly from 0 there to "
                f"{_HEATMAP_MAX_ALPHA:g} at its maximum, the plain radiograph elsewhere; "
                "the SR's region outlined, white inside black; ")
    text += f"source image downscaled to {cols} columns, legend burned in below."
    if compression == "jpeg-baseline":
        text += f" Lossy JPEG baseline, quality {JPEG_QUALITY}."
    return text + " Not for diagnostic use."


def build_heatmap_sc(
    result: ImageResult,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    series_number: int = 9002,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    max_side: int = DISPLAY_MAX_SIDE,
    compression: str = "none",
    report_series_uid: str | None = None,
) -> Dataset:
    """Build the heatmap Secondary Capture for one image, in the source study.

    RGB 8-bit (``compression="none"``, Explicit VR Little Endian) or JPEG Baseline
    (``"jpeg-baseline"``, YBR_FULL_422), ImageType DERIVED\\SECONDARY, Source Image
    Sequence pointing at the radiograph, the radiograph at most ``max_side`` on its long
    side with the overlay of the module docstring, the legend burned in below.
    ``report_series_uid``, when given, is the series of the study's SR (``cxrd.worker``
    ``sr_series_uid``), named in Related Series Sequence: the SR is written later, by the
    study's report job, and lists this SC among its evidence. Raises
    ValueError for an unknown ``compression``, a ``max_side``, series or instance number
    below 1, or a model name too long for the header, and InvalidUID for a malformed UID.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, "
                         f"not {compression!r}.")
    if max_side < 1 or series_number < 1 or instance_number < 1:
        raise ValueError("max_side, series_number and instance_number must be at least 1, "
                         f"not {max_side}, {series_number}, {instance_number}.")
    src = result.dataset
    series_uid = validate_uid(series_instance_uid)
    sop_uid = validate_uid(sop_instance_uid) if sop_instance_uid else new_uid()
    report_series = (validate_uid(report_series_uid, "report_series_uid")
                     if report_series_uid else None)
    k = decide_class(result.probs, model.operating_point.tb_threshold)
    image = _render(result, model, max_side)
    cols, rows = image.size
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")

    sc = Dataset()
    sc.file_meta = FileMetaDataset()
    sc.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    sc.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    charset = src.get("SpecificCharacterSet")
    if charset:
        sc.SpecificCharacterSet = charset
    # SOP Common
    sc.SOPClassUID = SECONDARY_CAPTURE
    sc.SOPInstanceUID = sop_uid
    sc.InstanceCreationDate, sc.InstanceCreationTime = date, time
    sc.SoftwareVersions = software_versions(model)
    sc.ContributingEquipmentSequence = _equipment(src, model, now)
    # Patient and General Study: the source's
    sc.StudyInstanceUID = src.StudyInstanceUID
    for keyword in TYPE2_PATIENT_STUDY:
        setattr(sc, keyword, _source_value(src, keyword))
    if sc.PatientSex not in _PATIENT_SEXES:
        sc.PatientSex = None
    # General Series: a series of its own. Without Body Part Examined, dciodvfy cannot
    # rule out a paired organ and demands Laterality; cxrd reports on chest radiographs
    # only, so CHEST is the fallback.
    sc.Modality = "OT"
    sc.SeriesInstanceUID = series_uid
    sc.SeriesNumber = series_number
    sc.SeriesDescription = labelled(SC_SERIES_DESCRIPTION, model)
    sc.BodyPartExamined = str(src.get("BodyPartExamined") or "CHEST")
    laterality = str(src.get("Laterality", "") or "")
    if laterality in ("R", "L"):
        sc.Laterality = laterality
    if report_series:
        sc.RelatedSeriesSequence = [report_series_item(src.StudyInstanceUID, report_series)]
    # General Equipment (the model, as in the SR and the SEG), SC Equipment
    _long_string(model.manufacturer, "The model's manufacturer")
    _long_string(model.name, "The model's name")
    for keyword, value in equipment(model).items():
        if keyword != "SoftwareVersions":  # set above, in SOP Common's place
            setattr(sc, keyword, value)
    sc.ConversionType = "WSD"  # produced by software on a workstation
    # General Image, SC Image. The pixels are the source's, downscaled without flips, so
    # its Patient Orientation holds (Type 2: empty when the source has none).
    sc.InstanceNumber = instance_number
    sc.PatientOrientation = list(src.get("PatientOrientation") or [])
    sc.ContentDate, sc.ContentTime = date, time
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = date, time
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = _derivation(result, model, k, cols, compression)
    reference = Dataset()
    reference.ReferencedSOPClassUID = src.SOPClassUID
    reference.ReferencedSOPInstanceUID = src.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [_code_item(_SOURCE_FOR_PROCESSING)]
    sc.SourceImageSequence = [reference]
    for keyword in ("BurnedInAnnotation", "LossyImageCompression",
                    "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if src.get(keyword):
            setattr(sc, keyword, src[keyword].value)
    # Image Pixel
    sc.SamplesPerPixel = 3
    sc.PlanarConfiguration = 0
    sc.Rows, sc.Columns = rows, cols
    sc.BitsAllocated, sc.BitsStored, sc.HighBit, sc.PixelRepresentation = 8, 8, 7, 0
    if compression == "jpeg-baseline":
        _store_jpeg(sc, image)
    else:
        sc.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sc.PhotometricInterpretation = "RGB"
        sc.PixelData = image.tobytes()
    logger.debug(
        "built heatmap SC",
        extra={
            "action": "build_heatmap_sc",
            "sop_instance_uid": sop_uid,
            "source_sop_instance_uid": str(src.SOPInstanceUID),
        },
    )
    return sc


def _store_jpeg(sc: Dataset, image: Image.Image) -> None:
    """JPEG Baseline pixels: Pillow encodes RGB as YCbCr with 4:2:2 chroma subsampling
    (``subsampling=1``), which DICOM calls YBR_FULL_422."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=1)
    frame = buffer.getvalue()
    sc.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    sc.PhotometricInterpretation = "YBR_FULL_422"
    sc.PixelData = encapsulate([frame])
    sc["PixelData"].VR = "OB"
    sc["PixelData"].is_undefined_length = True
    # Lossy Image Compression is "01" once lossy, and ratio and method list every lossy
    # step, the source's first (PS3.3 C.7.6.1.1.5).
    ratios = [str(r) for r in _as_list(sc.get("LossyImageCompressionRatio"))]
    methods = [str(m) for m in _as_list(sc.get("LossyImageCompressionMethod"))]
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionRatio = [*ratios, f"{image.width * image.height * 3 / len(frame):.2f}"]
    sc.LossyImageCompressionMethod = [*methods, "ISO_10918_1"]


def _as_list(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [value]
    return list(value)
