"""The one preprocessing function: pixel data to model input.

Serving (``cxrd.infer``) and training (``training.data``) both call this module, so the two
cannot drift. The steps, in order (the name ``cxrd-gray8-stretch-v1`` in the model's metadata
refers to exactly these):

1. the Modality LUT (rescale slope/intercept or a Modality LUT Sequence);
2. the VOI LUT Sequence, or else the first window (LINEAR or SIGMOID), or else a robust
   0.5-99.5 percentile window of the modality values;
3. inversion for MONOCHROME1;
4. scaling to 8 bits;
5. a bilinear, antialiased resize to a square (the aspect ratio is stretched, in training
   and serving alike, so a CAM pixel maps back to the image by two scale factors);
6. ``x / 127.5 - 1`` replicated to three channels, the MobileNetV2 input range.

Steps 1-4 run through a lookup table built over the stored values actually present, so a
10 MB radiograph is read once and produces one 8-bit array; no float copy of the full image
is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi

from cxrd.errors import DecodeError, UnsupportedImage

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

PERCENTILE_WINDOW = (0.5, 99.5)
#: Model input = gray8 * SCALE + OFFSET (MobileNetV2 expects [-1, 1]).
SCALE = 1.0 / 127.5
OFFSET = -1.0
_GRAY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")


def _window(
    values: npt.NDArray[np.float64], center: float, width: float, function: str
) -> npt.NDArray[np.float64]:
    """Map values to [0, 1] with a DICOM window (PS3.3 C.11.2.1.2)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
    # LINEAR, the default
    if width < 1:
        width = 1.0
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(value: object) -> float:
    """First value of a possibly multi-valued numeric attribute."""
    if isinstance(value, list | tuple) or hasattr(value, "__iter__") and not isinstance(value, str):
        return float(next(iter(value)))
    return float(value)  # type: ignore[arg-type]


def _unit_interval(
    ds: Dataset, stored: npt.NDArray[np.integer], sample: npt.NDArray[np.integer]
) -> npt.NDArray[np.float64]:
    """Steps 1-3 applied to ``stored`` values; result in [0, 1], 1 = white (dense)."""
    modality = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        voi = np.asarray(apply_voi(modality.astype(np.int64), ds, index=0), dtype=np.float64)
        top = float(np.max(np.asarray(item.LUTData))) or 1.0
        out = np.clip(voi / top, 0.0, 1.0)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        out = _window(modality, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
    else:
        sample_mod = np.asarray(apply_modality_lut(sample, ds), dtype=np.float64)
        lo, hi = np.percentile(sample_mod, PERCENTILE_WINDOW)
        out = np.clip((modality - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out
    return out


def dataset_to_gray8(ds: Dataset, pixels: npt.NDArray[np.generic] | None = None) -> U8:
    """Steps 1-4: a single-frame DICOM image to an 8-bit array, full resolution.

    ``pixels`` may be passed when the caller has already decoded ``ds.pixel_array``.
    Raises UnsupportedImage for layouts cxrd does not classify and DecodeError when the
    pixel data cannot be decoded.
    """
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _GRAY_PHOTOMETRICS + _COLOUR_PHOTOMETRICS:
        raise UnsupportedImage(
            f"PhotometricInterpretation {photometric or '(missing)'} is not supported."
        )
    if pixels is None:
        pixels = decode_pixels(ds)
    arr = np.asarray(pixels)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    if photometric in _COLOUR_PHOTOMETRICS:
        # pydicom has converted YBR to RGB; digitised film is grey in colour clothing.
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise UnsupportedImage(f"Colour image with pixel shape {arr.shape} is not supported.")
        gray = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        return _float_to_gray8(gray, float(2 ** int(ds.get("BitsStored", 8)) - 1))
    if arr.ndim != 2:
        raise UnsupportedImage(f"Grey image with pixel shape {arr.shape} is not supported.")
    sample = arr[::4, ::4]
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        lo, hi = int(arr.min()), int(arr.max())
        values = np.arange(lo, hi + 1, dtype=np.int64)
        lut = np.rint(_unit_interval(ds, values, sample) * 255.0).astype(np.uint8)
        if lo >= 0 and arr.dtype.kind == "u":
            lut = np.concatenate([np.zeros(lo, dtype=np.uint8), lut])
            return _apply_lut(lut, arr, 0)
        return _apply_lut(lut, arr, lo)
    # Float or 32-bit data: map directly (rare for CR/DX).
    return np.rint(_unit_interval(ds, arr, sample) * 255.0).astype(np.uint8)


#: Rows per block in _apply_lut: numpy widens the indices to intp for a gather, so a
#: whole 2500x2048 image would need a 40 MB index copy; blocks of this many rows keep it
#: in cache (about 2.5x faster on a 10 MB radiograph, same result).
_LUT_BLOCK_ROWS = 64


def _apply_lut(lut: U8, arr: npt.NDArray[np.integer], offset: int) -> U8:
    """``lut[arr - offset]`` for a 2-D integer image, block by block."""
    out = np.empty(arr.shape, dtype=np.uint8)
    for r in range(0, arr.shape[0], _LUT_BLOCK_ROWS):
        block = arr[r:r + _LUT_BLOCK_ROWS]
        if offset:
            block = block.astype(np.int64) - offset
        # The LUT spans every value present, so no index is out of range; "clip" only
        # spares numpy the buffered output that mode="raise" implies.
        np.take(lut, block, out=out[r:r + _LUT_BLOCK_ROWS], mode="clip")
    return out


def _float_to_gray8(arr: npt.NDArray[np.generic], top: float) -> U8:
    return np.clip(np.rint(np.asarray(arr, dtype=np.float64) * (255.0 / top)), 0, 255).astype(
        np.uint8
    )


def decode_pixels(ds: Dataset) -> npt.NDArray[np.generic]:
    """Decode the pixel data (pydicom with the pylibjpeg plugins); DecodeError on failure."""
    if "PixelData" not in ds:
        raise DecodeError("The data set has no Pixel Data.")
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises many types for corrupt or unsupported data
        tsuid = (
            ds.file_meta.get("TransferSyntaxUID", "unknown")
            if hasattr(ds, "file_meta")
            else "unknown"
        )
        raise DecodeError(f"Cannot decode pixel data (transfer syntax {tsuid}): {exc}") from exc


def read_gray8(path: str | Path) -> U8:
    """Steps 1-4 for a file: DICOM, PNG or JPEG. 8-bit PNG/JPEG is taken as it is
    (the public sets are already windowed); 16-bit PNG gets the percentile window."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise DecodeError(f"{path.name}: not a readable DICOM file: {exc}") from exc
        return dataset_to_gray8(ds)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                lo, hi = np.percentile(arr[::4, ::4], PERCENTILE_WINDOW)
                return _float_to_gray8(np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1), 1.0)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DecodeError(f"{path.name}: not a readable image: {exc}") from exc


def resize_gray8(gray: U8, size: int) -> U8:
    """Step 5: stretch to ``size`` x ``size``, bilinear with antialiasing (Pillow)."""
    img = (
        Image.fromarray(gray, mode="L")
        if gray.dtype == np.uint8
        else Image.fromarray(gray.astype(np.uint8))
    )
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def to_model_input(gray_resized: U8) -> F32:
    """Step 6: an (H, W) uint8 array to an (H, W, 3) float32 model input in [-1, 1]."""
    x = gray_resized.astype(np.float32) * np.float32(SCALE) + np.float32(OFFSET)
    return np.repeat(x[..., None], 3, axis=-1)


def preprocess_dataset(
    ds: Dataset, size: int, pixels: npt.NDArray[np.generic] | None = None
) -> F32:
    """Serving path: a DICOM data set to one model input (size, size, 3)."""
    return to_model_input(resize_gray8(dataset_to_gray8(ds, pixels), size))


def preprocess_file(path: str | Path, size: int) -> F32:
    """Training path: a DICOM, PNG or JPEG file to one model input (size, size, 3)."""
    return to_model_input(resize_gray8(read_gray8(path), size))
