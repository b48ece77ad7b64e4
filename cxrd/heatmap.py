"""The heatmap Secondary Capture: one per classified image, in the source study.

The radiograph, downscaled for display, with the class activation map (CAM) of the class
shown blended in colour and a legend burned in below: "AI heatmap, not for diagnostic use",
the model's name and version, and the class shown. See ``docs/dicom-output.md`` §2 for
the object's header.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from cxrd.findings import CLASS_LABELS, TB, decide_class, upsample_cam
from cxrd.headers import header_view
from cxrd.modelinfo import CLASS_NAMES, ModelInfo
from cxrd.report import _described, _new_uid, _software_versions
from cxrd.uids import validate_uid

logger = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

SC_SERIES_DESCRIPTION = "AI heatmap, not for diagnostic use"
#: The long side of the heatmap Secondary Capture; larger displays are downscaled first.
DISPLAY_MAX_SIDE = 1024
_SOURCE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")
_HEATMAP_MAX_ALPHA = 0.6
_LEGEND_LINE_HEIGHT = 13  # the default bitmap font is 11 px high


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


def _blend_table() -> U8:
    """RGB for every (activation index, grey) pair, flattened to (256 * 256, 3).

    Opacity grows with activation: cold areas keep the radiograph, hot ones turn red.
    """
    alpha = np.arange(256, dtype=np.float64) / 255.0 * _HEATMAP_MAX_ALPHA
    gray = np.arange(256, dtype=np.float64)
    out = (
        gray[None, :, None] * (1.0 - alpha)[:, None, None]
        + alpha[:, None, None] * _LUT[:, None, :].astype(np.float64)
    )
    return np.rint(out).astype(np.uint8).reshape(256 * 256, 3)


_BLEND = _blend_table()


@dataclass(frozen=True)
class ImageResult:
    """The classification of one source image, as the heatmap SC needs it.

    ``dataset`` is the source header (Pixel Data may be absent); its Rows and Columns are
    the full-size geometry. ``display`` is the source as 8-bit grey after the modality/VOI
    LUTs and MONOCHROME1 inversion, already downscaled to at most DISPLAY_MAX_SIDE on the
    long side with the aspect ratio kept. ``probs`` are P(TB), P(NTB), P(NORM).
    ``cam`` is (h, w, 3) class-activation logits (centred over the classes, see
    ``training.model.build_export_model``) over the model input, which is the
    image stretched to a square.
    """

    dataset: Dataset
    display: U8
    probs: F32
    cam: F32

    def __post_init__(self) -> None:
        n = len(CLASS_NAMES)
        if self.probs.shape != (n,):
            raise ValueError(f"ImageResult.probs must have shape ({n},), not {self.probs.shape}.")
        if not np.all(np.isfinite(self.probs)) or np.any(self.probs < 0) or np.any(self.probs > 1):
            raise ValueError(f"ImageResult.probs must lie in [0, 1], got {self.probs}.")
        if self.cam.ndim != 3 or self.cam.shape[-1] != n or min(self.cam.shape[:2]) < 1:
            raise ValueError(f"ImageResult.cam must have shape (h, w, {n}), not {self.cam.shape}.")
        if self.display.ndim != 2 or self.display.dtype != np.uint8:
            raise ValueError(
                "ImageResult.display must be a 2-D uint8 array, "
                f"not {self.display.dtype} {self.display.shape}."
            )
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not self.dataset.get(keyword):
                raise ValueError(f"ImageResult.dataset has no {keyword}.")
        if int(self.dataset.get("Rows") or 0) < 1 or int(self.dataset.get("Columns") or 0) < 1:
            raise ValueError("ImageResult.dataset needs Rows and Columns (the full-size geometry).")



def downscale_for_display(gray: U8, max_side: int = DISPLAY_MAX_SIDE) -> U8:
    """Shrink an 8-bit image so its long side is at most ``max_side`` (aspect kept)."""
    rows, cols = gray.shape
    scale = max_side / max(rows, cols)
    if scale >= 1.0:
        return gray
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    # reducing_gap=1: Pillow first box-averages by the whole factor (2 for a 2500-row
    # radiograph), then resamples the rest. Half the time of a full antialiased resize
    # (about 12 ms instead of 22 ms), within a few grey levels of it; the model input
    # does not come from here, so training and serving are unaffected.
    img = Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR, reducing_gap=1.0)
    return np.asarray(img, dtype=np.uint8)


def _ascii(text: str) -> str:
    # The default bitmap font covers Latin-1 only; keep the legend plain ASCII.
    return text.encode("ascii", "replace").decode("ascii")


def _legend_band(lines: Sequence[str], width: int) -> U8:
    """White text on black, the default bitmap font scaled up by a whole factor."""
    font = ImageFont.load_default_imagefont()
    text_width = max(int(font.getbbox(line)[2]) for line in lines)
    scale = max(1, min(4, (width - 8) // max(text_width, 1)))
    band_w = -(-width // scale)
    band_h = len(lines) * _LEGEND_LINE_HEIGHT + 4
    img = Image.new("L", (band_w, band_h), 0)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((3, 2 + i * _LEGEND_LINE_HEIGHT), line, fill=255, font=font)
    big = img.resize((band_w * scale, band_h * scale), Image.Resampling.NEAREST)
    return np.asarray(big, dtype=np.uint8)[:, :width]


def render_heatmap(result: ImageResult, model: ModelInfo) -> U8:
    """The SC pixels: (H + legend, W, 3) uint8, display blended with the shown class's CAM."""
    display = downscale_for_display(result.display)
    rows, cols = display.shape
    k = decide_class(result.probs, model.operating_point.tb_threshold)
    up = upsample_cam(result.cam[..., k], rows, cols)
    lo, hi = float(up.min()), float(up.max())
    scale = np.float32(255.0 / (hi - lo) if hi > lo else 0.0)
    up -= np.float32(lo)
    up *= scale
    up += np.float32(0.5)
    idx = up.astype(np.uint16)
    # One gather from the (activation, grey) -> RGB table does the colour map and blend.
    idx <<= 8
    idx |= display
    blended = np.take(_BLEND, idx, axis=0)

    lines = [
        SC_SERIES_DESCRIPTION,
        _ascii(model.display_name),
        f"Class shown: {CLASS_NAMES[k]} ({CLASS_LABELS[k]}), P={float(result.probs[k]):.3f}",
        f"TB threshold {model.operating_point.tb_threshold:g}, "
        f"P(TB)={float(result.probs[TB]):.3f}",
    ]
    band = _legend_band(lines, cols)
    out = np.empty((rows + band.shape[0], cols, 3), dtype=np.uint8)
    out[:rows] = blended
    out[rows:] = band[..., None]
    return out


def build_heatmap_sc(
    result: ImageResult,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    series_number: int = 9002,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Build the heatmap Secondary Capture for one image, in the source study.

    RGB 8-bit, Explicit VR Little Endian, ImageType DERIVED\\SECONDARY, Source Image
    Sequence pointing at the radiograph, the legend "AI heatmap, not for diagnostic use",
    the model name and the class shown burned in below the image.
    """
    src = result.dataset
    series_uid = validate_uid(series_instance_uid)
    sop_uid = validate_uid(sop_instance_uid) if sop_instance_uid else _new_uid()
    pixels = render_heatmap(result, model)
    k = decide_class(result.probs, model.operating_point.tb_threshold)
    laterality = str(src.get("Laterality", "") or "")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header_view(src),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        # highdicom insists on an orientation here; the source's own value replaces it below.
        patient_orientation=("L", "F"),
        laterality=laterality if laterality in ("R", "L") else None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=_described(SC_SERIES_DESCRIPTION, model),
        manufacturer_model_name=model.name,
    )
    sc.add_new("SoftwareVersions", "LO", _software_versions(model))
    # The pixels are the source's, downscaled without flips, so its orientation holds;
    # Type 2, so empty when the source has none.
    sc.PatientOrientation = list(src.get("PatientOrientation") or [])
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"  # produced by software on a workstation
    for keyword in ("BurnedInAnnotation", "LossyImageCompression",
                    "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if src.get(keyword):
            setattr(sc, keyword, src[keyword].value)
    # Without Body Part Examined, dciodvfy cannot rule out a paired organ and demands
    # Laterality. cxrd reports on chest radiographs only, so CHEST is the fallback.
    sc.BodyPartExamined = str(src.get("BodyPartExamined") or "CHEST")
    reference = Dataset()
    reference.ReferencedSOPClassUID = src.SOPClassUID
    reference.ReferencedSOPInstanceUID = src.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(_SOURCE_FOR_PROCESSING)
    ]
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = (
        f"Class activation map of class {CLASS_NAMES[k]} ({CLASS_LABELS[k]}, "
        f"P={float(result.probs[k]):.3f}) from {_ascii(model.display_name)}, bilinearly "
        f"upsampled and blended in colour onto a copy of the source image downscaled to "
        f"{pixels.shape[1]} columns, legend burned in below. "
        "Not for diagnostic use."
    )
    logger.debug(
        "built heatmap SC",
        extra={
            "action": "build_heatmap_sc",
            "sop_instance_uid": sop_uid,
            "source_sop_instance_uid": str(src.SOPInstanceUID),
        },
    )
    return sc
