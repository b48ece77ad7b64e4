"""The one preprocessing function: pixel data to model input.

Serving (``cxrd.worker``) and training (``training.data``) both call this module, so the two
cannot drift. The steps, in order; the ``preprocessing`` name in a model's metadata says
which contract of :data:`CONTRACTS` it was trained with, and the two differ in step 5 only:

0. decoding the stored values: pydicom's ``pixel_array`` (for an uncompressed file read
   with :func:`read_dicom`, a read-only view of its Pixel Data mapped from the file), or,
   when the caller passes ``min_side``, a reduced-resolution decode of JPEG 2000 (below);
1. the Modality LUT (rescale slope/intercept or a Modality LUT Sequence);
2. the VOI LUT Sequence, or else the first window (LINEAR or SIGMOID), or else a robust
   0.5-99.5 percentile window of the modality values;
3. inversion for MONOCHROME1;
4. scaling to 8 bits;
5. a bilinear, antialiased resize to the model's square input (the aspect ratio is
   stretched, in training and serving alike, so a CAM pixel maps back to the image by two
   scale factors). ``cxrd-gray8-stretch-v1`` resizes the 8-bit image as it is.
   ``cxrd-gray8-stretch-v2`` first box-averages it by a whole factor ``r`` (Pillow's
   ``Image.reduce``): the largest that leaves at least ``decode_min_side(input_size)``
   (1024 for a 224 px model) whole boxes along the image's *shorter* side, ``r = max(1,
   min(rows, cols) // decode_min_side(input_size))`` over the 8-bit image's own rows and
   columns (:meth:`Contract.reduce_factor`). At ``r = 1`` nothing is done, so v2 is v1 bit
   for bit wherever the shorter side is below twice that floor (the demo's 610 x 500
   phantoms, for instance); a 2500 x 2048 radiograph is reduced by 2 to 1250 x 1024.
   Reduced pixel i covers source pixels ``r i .. r i + r - 1``, so the stretch still maps
   the model grid onto the whole image by two scale factors (to within a fraction of a
   source pixel where r does not divide a side and Pillow averages a last, partial box);
6. ``x / 127.5 - 1`` replicated to three channels, the MobileNetV2 input range.

Steps 1-4 run through a lookup table built over the stored values actually present, so a
10 MB radiograph is read once and produces one 8-bit array; no float copy of the full image
is made.

Reduced-resolution decoding (step 0 with ``min_side``). A single-frame grey JPEG 2000
image (1.2.840.10008.1.2.4.90 and .91) is decoded by Pillow's OpenJPEG at the largest
``reduce`` level ``r`` whose image, ``ceil(rows / 2**r)`` by ``ceil(cols / 2**r)``, still
has a long side of at least ``min_side``: the wavelet's own low-pass image, about 4x cheaper
per level. The values keep pydicom's ``pixel_array`` semantics (dtype, signedness,
precision; at ``r = 0`` they equal ``pixel_array`` bit for bit). Steps 1-4 are pointwise, so
the effect is the resampling alone, plus the percentile window of step 2 being estimated on
the low-pass image (at the same positions: the sample stride shrinks with ``r``). Step 5
then starts from the smaller image. Serving (``cxrd.worker``) and training
(``training.data``) pass the same ``decode_min_side(input_size)``, 1024 for a 224 px model,
so they stay identical for JPEG 2000 too; a 2500x2048 radiograph is then decoded at
1250x1024 (r = 1) in about a quarter of the time, and its 8-bit model input differs from the
full decode's by 0.2-1 grey level on average and up to about 12 on sharp edges (see
tests/unit/test_preprocess_j2k.py). Other transfer syntaxes, odd JPEG 2000 files (see
``_j2k_plan``), any file Pillow fails on, and ``min_side=None`` (the default) take the full
pydicom decode.

The reduced decode and v2's reduce compose: both are bounded by the same
``decode_min_side(input_size)``, and v2's factor is computed on the 8-bit image actually
decoded. The wavelet level keeps the *long* side at least that floor, v2's factor the
*short* side, so after a reduced JPEG 2000 decode v2 seldom reduces further (2500 x 2048 is
decoded at 1250 x 1024, where ``r = 1``); a large image whose decode kept a short side of
at least twice the floor is reduced again, by box averaging, to the same floor.
"""

from __future__ import annotations

import functools
import io
import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, Jpeg2KImagePlugin
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder, pixel_array
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from cxrd.errors import DecodeError, ModelError, UnsupportedImage
from cxrd.imagesize import j2k_size, jpeg_size, too_large

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

PERCENTILE_WINDOW = (0.5, 99.5)
#: Model input = gray8 * SCALE + OFFSET (MobileNetV2 expects [-1, 1]).
SCALE = 1.0 / 127.5
OFFSET = -1.0
_GRAY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")

log = logging.getLogger(__name__)

#: The smallest long side a reduced-resolution decode keeps: the heatmap SC's display size
#: (``cxrd.heatmap.DISPLAY_MAX_SIDE``), so the SC loses nothing. It sets the reduce level
#: and therefore the model input of JPEG 2000 files, and the floor of v2's box average
#: (``Contract.reduce_factor``): training and serving must agree on it.
DECODE_MIN_SIDE = 1024
#: Names the decode rule; training's cache key includes it, so arrays cached under another
#: rule (before reduced JPEG 2000 decoding, or with another DECODE_MIN_SIDE) are not reused.
DECODE_REVISION = f"j2k-reduced-min{DECODE_MIN_SIDE}"
#: Values longer than this stay in the file when :func:`read_dicom` reads a native file
#: (in practice Pixel Data alone), so that ``decode_pixels`` maps them instead of copying.
_DEFER_BYTES = 1 << 20
#: The syntaxes whose deferred Pixel Data is mapped: native, not deflated, so that a
#: value's offset in the data set is its offset in the file.
_MAPPED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Transfer syntaxes decoded at reduced resolution when asked (HTJ2K is not received).
_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000)
#: Compressed syntaxes whose frames state their own size, and how to read it (RLE frames
#: do not: they are decoded into the header's size).
_FRAME_SIZE_READERS = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                     "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
                     "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                     "1.2.840.10008.1.2.4.203"), j2k_size),
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                     "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
                     "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), jpeg_size),
}


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


def dataset_to_gray8(
    ds: Dataset, pixels: npt.NDArray[np.generic] | None = None, *, min_side: int | None = None
) -> U8:
    """Steps 1-4: a single-frame DICOM image to an 8-bit array.

    ``pixels`` may be passed when the caller has already decoded the pixel data with
    :func:`decode_pixels` (full or reduced resolution); otherwise it is decoded here with
    ``min_side`` (None: full resolution; see :func:`decode_pixels`). The result has the
    shape of the decoded pixels, which for a reduced JPEG 2000 decode is smaller than
    Rows x Columns. Raises UnsupportedImage for layouts cxrd does not classify and
    DecodeError when the pixel data cannot be decoded.
    """
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _GRAY_PHOTOMETRICS + _COLOUR_PHOTOMETRICS:
        raise UnsupportedImage(
            f"PhotometricInterpretation {photometric or '(missing)'} is not supported."
        )
    if pixels is None:
        pixels = decode_pixels(ds, min_side=min_side)
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
    sample = arr[::(step := _sample_step(ds, arr)), ::step]
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        lo, hi = int(arr.min()), int(arr.max())
        values = np.arange(lo, hi + 1, dtype=np.int64)
        lut = np.rint(_unit_interval(ds, values, sample) * 255.0).astype(np.uint8)
        affine = _affine_form_of(lut.tobytes(), lo)
        if affine is not None:
            return _apply_affine(arr, *affine)
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


#: _affine_form tries tables of at most this many values (a 14-bit range): the search
#: costs about 0.1 ms per 1000 values, more than it saves on wider ranges.
_AFFINE_MAX_VALUES = 1 << 14
#: Rows per block in _apply_affine (the int32 scratch block stays in cache).
_AFFINE_BLOCK_ROWS = 256


def _affine_form(lut: U8, lo: int) -> tuple[int, int, int, bool] | None:
    """Integers (m, b, s) with ``clip((v * m + b) >> s, 0, 255) == lut[v - lo]`` for every
    stored value v in ``lo .. lo + len(lut) - 1``, and whether the clip is needed there;
    None when there are none.

    A linear pipeline (rescale, a LINEAR or LINEAR_EXACT window or the percentile window,
    MONOCHROME1 or not) makes a table that is a rounded, clipped affine function of v
    unless a value falls exactly on a rounding tie; integer arithmetic then computes it
    in about 55% of the time of ``_apply_lut``'s gather. On the unclipped part, each run
    of equal entries y from v0 to v1 asks ``y * 2**s <= v * m + b < (y + 1) * 2**s`` at
    v0 and v1, so m must make the spread of ``y * 2**s - v * m`` over those end points
    less than ``2**s``; that spread is convex in m, and its minimum is found by bisection
    around a least-squares slope. A form is returned only when it reproduces every entry
    of the table, so the result is the table's, value for value; anything else (a SIGMOID
    window, a LUT sequence, ties) keeps the gather.
    """
    n = len(lut)
    if n > _AFFINE_MAX_VALUES:
        return None
    y = lut.astype(np.int64)
    v = np.arange(lo, lo + n, dtype=np.int64)
    inner = np.flatnonzero((y > 0) & (y < 255))
    if len(inner) < 2:
        return None
    vi, yi = v[inner].astype(np.float64), y[inner].astype(np.float64)
    vc = vi - vi.mean()
    slope = float(vc @ (yi - yi.mean()) / (vc @ vc))
    if slope == 0.0:
        return None
    # Scale so that every |v * m + b| stays below 2**30 (int32 scratch, no overflow).
    reach = abs(slope) * max(abs(lo), abs(lo + n - 1)) + 256.0
    s = min(24, int(np.floor(np.log2(2.0**30 / reach))))
    if s < 8:
        return None
    unit = 1 << s
    # The end points of the runs of equal entries: each asks y * 2**s <= v m + b (lower)
    # and v m + b < (y + 1) * 2**s (upper), but a clipped entry only the side that the clip
    # does not supply (0: upper; 255: lower).
    ends = np.flatnonzero(np.diff(y) != 0)
    points = np.unique(np.concatenate([[0, n - 1], ends, ends + 1]))
    lower, upper = points[y[points] > 0], points[y[points] < 255]
    lv, lc = v[lower], y[lower] * unit
    uv, uc = v[upper], y[upper] * unit

    def spread(m: int) -> int:
        """max(lower bounds on b) - min(upper bounds on b) + 2**s - 1: b exists iff it
        is below 2**s."""
        return int((lc - lv * m).max() - (uc - uv * m).min())

    m0 = round(slope * unit)
    low, high = m0 - abs(m0) // 16 - 16, m0 + abs(m0) // 16 + 16
    while low < high:  # the first m where the convex spread stops falling
        mid = (low + high) // 2
        if spread(mid + 1) >= spread(mid):
            high = mid
        else:
            low = mid + 1
    m = low
    if spread(m) >= unit:
        return None
    b = int((lc - lv * m).max())
    vm = v * m
    formula = vm + b
    fits = max(abs(b), int(np.abs(vm).max()), int(np.abs(formula).max())) < 2**31
    shifted = formula >> s
    if fits and np.array_equal(np.clip(shifted, 0, 255), y):
        return m, b, s, not np.array_equal(shifted, y)
    return None


@functools.lru_cache(maxsize=64)
def _affine_form_of(lut: bytes, lo: int) -> tuple[int, int, int, bool] | None:
    """:func:`_affine_form`, remembered: images from one device share their window and
    often their range of values, hence their table."""
    return _affine_form(np.frombuffer(lut, dtype=np.uint8), lo)


def _apply_affine(arr: npt.NDArray[np.integer], m: int, b: int, s: int, clip: bool) -> U8:
    """``clip((arr * m + b) >> s, 0, 255)`` as uint8, in int32 blocks of rows (without the
    clip when ``_affine_form`` found the values in range anyway)."""
    out = np.empty(arr.shape, dtype=np.uint8)
    scratch = np.empty((_AFFINE_BLOCK_ROWS, arr.shape[1]), dtype=np.int32)
    for r in range(0, arr.shape[0], _AFFINE_BLOCK_ROWS):
        block = arr[r:r + _AFFINE_BLOCK_ROWS]
        t = scratch[:len(block)]
        np.multiply(block, m, out=t, dtype=np.int32, casting="unsafe")
        t += b
        t >>= s
        if clip:
            np.clip(t, 0, 255, out=t)
        out[r:r + _AFFINE_BLOCK_ROWS] = t
    return out


def _sample_step(ds: Dataset, arr: npt.NDArray[np.generic]) -> int:
    """Stride of the percentile-window sample: every 4th row and column of the full image,
    so the same positions (every 2nd) of an image decoded at half resolution."""
    rows = int(ds.get("Rows") or 0) or arr.shape[0]
    return max(1, round(4 * arr.shape[0] / rows))


def _float_to_gray8(arr: npt.NDArray[np.generic], top: float) -> U8:
    return np.clip(np.rint(np.asarray(arr, dtype=np.float64) * (255.0 / top)), 0, 255).astype(
        np.uint8
    )


def decode_min_side(input_size: int) -> int:
    """The ``min_side`` the worker and training pass for a model of ``input_size``:
    ``max(DECODE_MIN_SIDE, 2 * input_size)``, the display size or twice the model input;
    also the floor of ``cxrd-gray8-stretch-v2``'s box average."""
    return max(DECODE_MIN_SIDE, 2 * input_size)


def decode_pixels(ds: Dataset, min_side: int | None = None) -> npt.NDArray[np.generic]:
    """Step 0: decode the pixel data; DecodeError on failure.

    With ``min_side`` None (the default) this is pydicom's ``pixel_array`` (with the
    pylibjpeg plugins), at full resolution. With ``min_side`` set, a single-frame grey
    JPEG 2000 image is decoded at reduced resolution when that keeps a long side of at
    least ``min_side`` (:func:`decode_j2k_reduced`); the array then has
    ``ceil(Rows / 2**r)`` x ``ceil(Columns / 2**r)`` values with ``pixel_array``'s dtype and
    meaning. Every other image, and one Pillow cannot decode, takes the full decode.
    """
    if "PixelData" not in ds:
        raise DecodeError("The data set has no Pixel Data.")
    check_decoded_size(ds)
    if min_side is not None:
        plan = _j2k_plan(ds, min_side)
        if plan is not None:
            try:
                return _decode_j2k(plan)
            except Exception as exc:  # Pillow / OpenJPEG raise many types: decode in full
                log.warning("action=j2k-reduced-fallback sop_instance_uid=%s reduce=%d "
                            "error=%s", ds.get("SOPInstanceUID", ""), plan.reduce,
                            f"{type(exc).__name__}: {exc}")
    view = _native_view(ds)
    if view is not None:
        return view
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises many types for corrupt or unsupported data
        tsuid = (
            ds.file_meta.get("TransferSyntaxUID", "unknown")
            if hasattr(ds, "file_meta")
            else "unknown"
        )
        raise DecodeError(f"Cannot decode pixel data (transfer syntax {tsuid}): {exc}") from exc


def check_decoded_size(ds: Dataset) -> None:
    """Raise DecodeError, before anything is decoded or allocated, when the header declares
    more than ``cxrd.imagesize.MAX_DECODED_BYTES``, or when a compressed frame declares
    another size than the header's, or none: decoders size their buffers from the
    codestream, so a few hundred bytes could otherwise take gigabytes."""
    problem = too_large(ds)
    if problem is not None:
        raise DecodeError(f"Image too large: {problem}.")
    meta = getattr(ds, "file_meta", None)
    reader = _FRAME_SIZE_READERS.get(str(meta.get("TransferSyntaxUID", ""))) if meta else None
    if reader is None:
        return
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    try:
        frames = list(generate_frames(ds.PixelData,
                                      number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    except Exception:  # malformed encapsulation: the decoder reports it, decoding nothing
        return
    for number, frame in enumerate(frames, 1):
        size = reader(frame)
        if size is None:
            raise DecodeError(f"Frame {number}: the codestream states no image size.")
        if size != (rows, cols):
            raise DecodeError(f"Frame {number}: the codestream is {size[0]} x {size[1]}, "
                              f"the header says {rows} x {cols}; not decoded.")


def read_dicom(path: str | Path | bytes) -> Dataset:
    """``pydicom.dcmread(path)``, except that the Pixel Data of a native (uncompressed,
    little-endian, not deflated) file stays in the file: :func:`decode_pixels` maps it
    read-only instead of reading a copy, which for a 10 MB radiograph saves the copy and
    the fresh pages it fills (about 1 ms). Reading ``ds.PixelData`` still gives its
    bytes: pydicom reads a deferred value on first use. Any other file is read whole (a
    deferred value is read back at its offset in the file, which a deflated file does
    not keep). An object's bytes (a store without local files) are read as they are.
    Errors are pydicom's."""
    if isinstance(path, bytes):
        return pydicom.dcmread(io.BytesIO(path))
    ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _MAPPED_SYNTAXES:
        ds = pydicom.dcmread(path)
    return ds


def _mapped_pixel_data(ds: Dataset) -> memoryview | None:
    """The Pixel Data value that :func:`read_dicom` left in the file, mapped read-only from
    it, or None when it was read (or the file does not hold all of it: a truncated file,
    which pydicom's own read then reports)."""
    try:
        raw = ds.get_item("PixelData", keep_deferred=True)
        path = ds.filename
    except (KeyError, AttributeError):
        return None
    if (not isinstance(raw, RawDataElement) or raw.value is not None
            or not isinstance(path, str | Path)):
        return None
    start, length = raw.value_tell, raw.length
    try:
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    if start + length > len(mapped):
        mapped.close()
        return None
    return memoryview(mapped)[start:start + length]


def _native_view(ds: Dataset) -> npt.NDArray[np.integer] | None:
    """``ds.pixel_array`` of an uncompressed little-endian single-frame grey image, as a
    read-only view of the Pixel Data bytes (mapped from the file when :func:`read_dicom`
    left them there), or None for any other image.

    ``pixel_array`` copies the 10 MB of a radiograph and clears the bits above Bits Stored
    (sign-extending signed data). The view skips both; it is taken only when the values
    are already in Bits Stored's range, where clearing changes nothing, so its values are
    ``pixel_array``'s. Anything unusual, or any error, goes to ``pixel_array``.
    """
    try:
        syntax = ds.file_meta.TransferSyntaxUID
        if (syntax.is_encapsulated or not syntax.is_little_endian
                or int(ds.get("NumberOfFrames", 1) or 1) != 1
                or int(ds.get("SamplesPerPixel", 1)) != 1
                or str(ds.get("PhotometricInterpretation", "")) not in _GRAY_PHOTOMETRICS
                or int(ds.BitsAllocated) not in (8, 16)
                or int(ds.PixelRepresentation) not in (0, 1)):
            return None
        bits = int(ds.BitsStored)
        mapped = _mapped_pixel_data(ds)
        if mapped is None:
            arr = pixel_array(ds, view_only=True, correct_unused_bits=False)
        else:
            options: dict[str, Any] = {
                "rows": int(ds.Rows), "columns": int(ds.Columns), "number_of_frames": 1,
                "samples_per_pixel": 1, "bits_allocated": int(ds.BitsAllocated),
                "bits_stored": bits, "pixel_representation": int(ds.PixelRepresentation),
                "photometric_interpretation": str(ds.PhotometricInterpretation),
                "pixel_keyword": "PixelData", "view_only": True, "correct_unused_bits": False}
            arr, _ = get_decoder(syntax).as_array(mapped, **options)
    except Exception:  # missing or malformed attributes: pixel_array reports them
        return None
    if arr.ndim != 2 or arr.dtype.kind not in "ui" or arr.dtype.itemsize * 8 != ds.BitsAllocated:
        return None
    if bits < arr.dtype.itemsize * 8 and arr.size:
        if arr.dtype.kind == "u":
            in_range = int(arr.max()) < 1 << bits
        else:
            in_range = -(1 << (bits - 1)) <= int(arr.min()) and int(arr.max()) < 1 << (bits - 1)
        if not in_range:
            return None
    return arr


@dataclass(frozen=True)
class _J2kPlan:
    """How to decode one JPEG 2000 frame with Pillow."""

    codestream: bytes
    reduce: int
    precision: int  # bits per sample in the codestream (== BitsStored)
    signed: bool  # == PixelRepresentation 1
    shape: tuple[int, int]  # rows, cols at ``reduce``


@dataclass(frozen=True)
class _J2kHeader:
    """What the main header of a JPEG 2000 codestream says (ISO/IEC 15444-1 A.5, A.6)."""

    rows: int
    cols: int
    components: int
    precision: int
    signed: bool
    offset: bool  # image or component origin other than (0, 0) / subsampling
    levels: int  # decomposition levels: the largest usable reduce


def _j2k_header(codestream: bytes) -> _J2kHeader | None:
    """SIZ and the COD/COC decomposition levels of a raw codestream; None if unparseable
    (a JP2 file wrapper, which DICOM does not allow, is not unwrapped)."""
    if codestream[:4] != b"\xff\x4f\xff\x51" or len(codestream) < 45:
        return None
    try:
        lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">HHIIII", codestream, 4)
        (csiz,) = struct.unpack_from(">H", codestream, 40)
        ssiz, xrsiz, yrsiz = codestream[42], codestream[43], codestream[44]
        levels: int | None = None
        pos = 4 + lsiz
        while pos + 4 <= len(codestream):
            marker, length = struct.unpack_from(">HH", codestream, pos)
            if marker == 0xFF90:  # SOT: the main header is over
                break
            if marker == 0xFF52:  # COD: Scod, SGcod (4 bytes), then SPcod's levels
                nl = codestream[pos + 9]
                levels = nl if levels is None else min(levels, nl)
            elif marker == 0xFF53:  # COC: Ccoc (1 or 2 bytes), Scoc, then the levels
                nl = codestream[pos + 6 + (csiz >= 257)]
                levels = nl if levels is None else min(levels, nl)
            pos += 2 + length
    except (struct.error, IndexError):
        return None
    if levels is None:
        return None
    return _J2kHeader(rows=ysiz - yosiz, cols=xsiz - xosiz, components=csiz,
                      precision=(ssiz & 0x7F) + 1, signed=bool(ssiz & 0x80),
                      offset=bool(xosiz or yosiz or xrsiz != 1 or yrsiz != 1), levels=levels)


def _reduced(n: int, r: int) -> int:
    """OpenJPEG's size of ``n`` samples (origin 0) at reduce level ``r``: ceil(n / 2**r)."""
    return -(-n // (1 << r))


def _pillow_reduced(n: int, r: int) -> int:
    """The size Pillow allots at reduce level ``r`` (it rounds; OpenJPEG takes the ceiling,
    and Pillow refuses the tiles when the two differ)."""
    power = 1 << r
    return int((n + (power >> 1)) / power)


def j2k_reduce_level(rows: int, cols: int, levels: int, min_side: int) -> int:
    """The largest reduce level ``r <= levels`` with ``max(ceil(rows / 2**r),
    ceil(cols / 2**r)) >= min_side``, lowered while Pillow would size the image wrongly
    (never below 1, where the two agree)."""
    r = 0
    while r < levels and max(_reduced(rows, r + 1), _reduced(cols, r + 1)) >= min_side:
        r += 1
    while r > 1 and (_pillow_reduced(rows, r), _pillow_reduced(cols, r)) != (
            _reduced(rows, r), _reduced(cols, r)):
        r -= 1
    return r


def _j2k_plan(ds: Dataset, min_side: int, reduce: int | None = None) -> _J2kPlan | None:
    """A reduced decode of ``ds`` when it is eligible and worth it, else None.

    Eligible: JPEG 2000 (lossless or not), one frame, one grey sample (MONOCHROME1/2),
    Bits Allocated 16, and a codestream whose size, precision and signedness are those of
    the header (9 to 16 bits, Pillow's I;16 mode), with origin (0, 0). Anything else goes
    to pydicom, which knows the corrections for odd files (precision or sign mismatches).
    ``reduce`` forces the level (tests use 0 to compare with ``pixel_array``).
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _J2K_SYNTAXES:
        return None
    try:
        if (int(ds.get("NumberOfFrames", 1) or 1) != 1
                or int(ds.get("SamplesPerPixel", 1)) != 1
                or str(ds.get("PhotometricInterpretation", "")) not in _GRAY_PHOTOMETRICS
                or int(ds.BitsAllocated) != 16
                or int(ds.PixelRepresentation) not in (0, 1)):
            return None
        rows, cols, bits_stored = int(ds.Rows), int(ds.Columns), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # missing or malformed attributes: pydicom reports them
        return None
    head = _j2k_header(codestream)
    if (head is None or head.components != 1 or head.offset
            or (head.rows, head.cols) != (rows, cols)
            or head.precision != bits_stored or not 9 <= head.precision <= 16
            or head.signed != signed):
        return None
    if reduce is None:
        reduce = j2k_reduce_level(rows, cols, head.levels, min_side)
        if reduce == 0:  # nothing to gain over pydicom
            return None
    return _J2kPlan(codestream, reduce, head.precision, signed,
                    (_reduced(rows, reduce), _reduced(cols, reduce)))


def _decode_j2k(plan: _J2kPlan) -> npt.NDArray[np.integer]:
    """Decode a planned frame with Pillow, then undo Pillow's scaling to 16 bits.

    Pillow (Jpeg2KDecode.c, ``j2ku_gray_i``) stores ``(v + offset) << (16 - precision)``
    in an unsigned 16-bit image, ``offset`` being ``2**(precision-1)`` for signed data.
    Shifting back (and for signed data, removing the offset) gives pydicom's values, in
    uint16 or int16 as ``pixel_array`` has them.
    """
    with Image.open(io.BytesIO(plan.codestream), formats=("JPEG2000",)) as img:
        if not isinstance(img, Jpeg2KImagePlugin.Jpeg2KImageFile) or img.mode != "I;16":
            raise ValueError(f"Pillow opened the codestream as mode {img.mode}")
        img.reduce = plan.reduce
        img.load()
        arr = np.array(img, dtype=np.uint16)
    if arr.shape != plan.shape:
        raise ValueError(f"Pillow decoded {arr.shape}, expected {plan.shape}")
    shift = 16 - plan.precision
    if plan.signed:
        # (v + 2**(p-1)) << s with the top bit flipped is v << s in two's complement;
        # the arithmetic shift then restores v with its sign.
        arr ^= np.uint16(0x8000)
        out = arr.view(np.int16)
        out >>= shift
        return out
    arr >>= shift
    return arr


def decode_j2k_reduced(ds: Dataset, reduce: int) -> npt.NDArray[np.integer] | None:
    """Pillow's decode of an eligible JPEG 2000 ``ds`` at reduce level ``reduce`` (no
    fallback; None when ``ds`` is not eligible). For tests and measurements: serving and
    training call :func:`decode_pixels` with ``min_side``."""
    plan = _j2k_plan(ds, 0, reduce)
    return None if plan is None else _decode_j2k(plan)


def read_gray8_and_size(path: str | Path, min_side: int | None = None
                        ) -> tuple[U8, tuple[int, int]]:
    """Steps 0-4 for a file: DICOM, PNG or JPEG. 8-bit PNG/JPEG is taken as it is
    (the public sets are already windowed); 16-bit PNG gets the percentile window.
    ``min_side`` applies to JPEG 2000 DICOM only (see :func:`decode_pixels`).

    Returns the gray image and the image's full size (rows, cols): for a DICOM file the
    header's, which a reduced JPEG 2000 decode does not have."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        try:
            ds = read_dicom(path)
        except Exception as exc:
            raise DecodeError(f"{path.name}: not a readable DICOM file: {exc}") from exc
        gray = dataset_to_gray8(ds, min_side=min_side)
        return gray, (int(ds.get("Rows") or gray.shape[0]), int(ds.get("Columns") or gray.shape[1]))
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                lo, hi = np.percentile(arr[::4, ::4], PERCENTILE_WINDOW)
                gray = _float_to_gray8(np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1), 1.0)
            else:
                gray = np.asarray(img.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DecodeError(f"{path.name}: not a readable image: {exc}") from exc
    return gray, (int(gray.shape[0]), int(gray.shape[1]))


def resize_gray8(gray: U8, size: int) -> U8:
    """Step 5's resize: stretch to ``size`` x ``size``, bilinear with antialiasing (Pillow)."""
    img = (
        Image.fromarray(gray, mode="L")
        if gray.dtype == np.uint8
        else Image.fromarray(gray.astype(np.uint8))
    )
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


class Reduced(NamedTuple):
    """An 8-bit image box-averaged by ``factor`` (Pillow's ``Image.reduce``; 1: as it was)."""

    factor: int
    image: U8


def reduce_gray8(gray: U8, factor: int) -> Reduced:
    """``gray`` box-averaged by ``factor`` with Pillow's ``Image.reduce`` (the same call the
    heatmap SC's display downscale makes); ``factor`` 1 returns ``gray`` itself."""
    if factor == 1:
        return Reduced(1, gray)
    return Reduced(factor, np.asarray(Image.fromarray(gray).reduce(factor), dtype=np.uint8))


@dataclass(frozen=True)
class Contract:
    """One preprocessing contract: what a model's ``preprocessing`` name means. Steps 0-4
    and 6 are shared; ``reduces`` says whether step 5 box-averages before the resize."""

    name: str
    reduces: bool

    def reduce_factor(self, rows: int, cols: int, size: int) -> int:
        """Step 5's box-average factor for an 8-bit image of ``rows`` x ``cols`` and a model
        of ``size``: 1 without ``reduces``; else ``max(1, min(rows, cols) //
        decode_min_side(size))``, the largest whole factor that leaves at least
        ``decode_min_side(size)`` full boxes along the shorter side."""
        if not self.reduces:
            return 1
        return max(1, min(rows, cols) // decode_min_side(size))

    def reduce(self, gray: U8, size: int) -> Reduced:
        """The first part of step 5: ``gray`` box-averaged by :meth:`reduce_factor`."""
        rows, cols = gray.shape
        return reduce_gray8(gray, self.reduce_factor(rows, cols, size))

    def resize(self, gray: U8, size: int) -> U8:
        """Step 5: an 8-bit image to the model's ``size`` x ``size`` 8-bit input."""
        return resize_gray8(self.reduce(gray, size).image, size)


STRETCH_V1 = "cxrd-gray8-stretch-v1"
STRETCH_V2 = "cxrd-gray8-stretch-v2"
#: The preprocessing contracts this cxrd implements, by the name a model's metadata gives.
CONTRACTS: dict[str, Contract] = {c.name: c for c in (
    Contract(STRETCH_V1, reduces=False),
    Contract(STRETCH_V2, reduces=True),
)}
#: The contract training trains and exports new models with.
CURRENT_PREPROCESSING = STRETCH_V2


def contract(name: str) -> Contract:
    """The contract called ``name``; ModelError when this cxrd does not implement it."""
    try:
        return CONTRACTS[name]
    except KeyError:
        raise ModelError(
            f"The model expects preprocessing {name!r}; this cxrd implements "
            f"{', '.join(repr(n) for n in CONTRACTS)}."
        ) from None


def to_model_input(gray_resized: U8) -> F32:
    """Step 6: an (H, W) uint8 array to an (H, W, 3) float32 model input in [-1, 1]."""
    x = gray_resized.astype(np.float32) * np.float32(SCALE) + np.float32(OFFSET)
    return np.repeat(x[..., None], 3, axis=-1)


def gray8_to_model_input(gray: U8, size: int, preprocessing: str,
                         reduced: Reduced | None = None) -> F32:
    """Steps 5 and 6 under the contract ``preprocessing``: a decoded 8-bit image to one
    model input (size, size, 3). A worker runs a second model (the segmenter) on the image
    it decoded for the first; ``reduced`` is that image box-averaged already (by the first
    model's contract) and is used when its factor is the one this contract wants here, so
    the result is the same bit for bit and the box average is not paid twice."""
    c = contract(preprocessing)
    factor = c.reduce_factor(int(gray.shape[0]), int(gray.shape[1]), size)
    if factor == 1:
        source = gray
    elif reduced is not None and reduced.factor == factor:
        source = reduced.image
    else:
        source = reduce_gray8(gray, factor).image
    return to_model_input(resize_gray8(source, size))


def preprocess_dataset(
    ds: Dataset, size: int, pixels: npt.NDArray[np.generic] | None = None, *,
    preprocessing: str, min_side: int | None = None,
) -> F32:
    """A DICOM data set to one model input (size, size, 3) under the contract named
    ``preprocessing``. The worker passes ``min_side=decode_min_side(size)``; None decodes
    at full resolution."""
    gray = dataset_to_gray8(ds, pixels, min_side=min_side)
    return to_model_input(contract(preprocessing).resize(gray, size))


def preprocess_file(path: str | Path, size: int, *, preprocessing: str,
                    min_side: int | None = None) -> F32:
    """A DICOM, PNG or JPEG file to one model input (size, size, 3); ``preprocessing`` and
    ``min_side`` as in :func:`preprocess_dataset`."""
    gray = read_gray8_and_size(path, min_side)[0]
    return to_model_input(contract(preprocessing).resize(gray, size))


#: Where the CAM's cells sit on the model input, in cells. The Keras MobileNetV2 pads its
#: five stride-2 convolutions on the bottom and right only ("same" for Conv1, ``correct_pad``
#: ((0, 1), (0, 1)) for the blocks, at even sizes), so each halving puts output pixel o over
#: input pixels 2o .. 2o+2, centred at 2o + 1. Composed, cell i of ``out_relu`` is centred
#: on input pixel 32 i + 31 (for input sizes that are multiples of 32), not on the centre of
#: its 32-pixel block (32 i + 15.5): half a cell, less half a pixel, further right and down.
#: ``tests/integration/test_training.py`` measures it on the network's receptive fields.
CAM_STRIDE = 32
CAM_CELL_SHIFT = 0.5 - 0.5 / CAM_STRIDE


def bilinear_matrix(n_out: int, n_in: int, shift: float = 0.0) -> npt.NDArray[np.float64]:
    """(n_out, n_in) bilinear interpolation weights, pixel centres aligned (half-pixel),
    edges clamped; with ``shift``, input sample i sits at i + ``shift`` instead of i (in
    input samples).

    The stretch of step 5 maps model-grid positions to image positions this way, so the
    CAM of the model input is mapped back to the image with it, with
    ``shift=CAM_CELL_SHIFT`` (where the cells really are): by the heatmap and the SR's
    region (``cxrd.heatmap``, ``cxrd.findings``) and by the pointing game
    (``training.metrics``) alike.
    """
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5 - shift
    pos = np.clip(pos, 0.0, n_in - 1.0)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def cam_matrix(n_out: int, n_cells: int) -> npt.NDArray[np.float64]:
    """Bilinear weights from ``n_cells`` CAM cells to ``n_out`` image pixels along one axis,
    each cell at the centre of its receptive field (``CAM_CELL_SHIFT``)."""
    return bilinear_matrix(n_out, n_cells, CAM_CELL_SHIFT)
