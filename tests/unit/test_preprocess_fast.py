"""The preprocessing's fast paths give the plain paths' values, bit for bit.

The shipped model was trained on ``cxrd.preprocess``'s output, so the uncompressed-data
view (instead of pydicom's copy) and the integer arithmetic for affine lookup tables
(instead of the gather) must never change a value. Each test compares a fast path with the
plain computation it replaces, on images made to exercise it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from cxrd import preprocess
from cxrd.errors import DecodeError
from cxrd.preprocess import _affine_form, _sample_step, _unit_interval, dataset_to_gray8


def make(values: np.ndarray, *, bits: int, allocated: int = 16, signed: bool = False,
         photometric: str = "MONOCHROME2", **attrs: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    dtype = {(16, False): "<u2", (16, True): "<i2", (8, False): "u1", (8, True): "i1"}
    ds.PixelData = values.astype(dtype[(allocated, signed)]).tobytes()
    return ds


def image(rng: np.random.Generator, lo: int, hi: int, shape: tuple[int, int] = (90, 70)
          ) -> np.ndarray:
    """Every value of lo..hi at least once, then noise in the same range."""
    values = rng.integers(lo, hi + 1, size=shape, dtype=np.int64)
    flat = values.ravel()
    span = np.arange(lo, hi + 1)
    flat[:len(span)] = span[:len(flat)]
    return values


def table_gray8(ds: Dataset) -> np.ndarray:
    """Steps 1-4 the plain way: pydicom's pixel_array and a gather from the table."""
    arr = ds.pixel_array
    lo, hi = int(arr.min()), int(arr.max())
    sample = arr[::(step := _sample_step(ds, arr)), ::step]
    lut = np.rint(_unit_interval(ds, np.arange(lo, hi + 1, dtype=np.int64), sample)
                  * 255.0).astype(np.uint8)
    return lut[arr.astype(np.int64) - lo]


# --------------------------------------------------------------------------- the view


@pytest.mark.parametrize(("bits", "allocated", "signed"), [
    (12, 16, False), (16, 16, False), (10, 16, False), (12, 16, True), (16, 16, True),
    (8, 8, False), (7, 8, False), (8, 8, True),
])
def test_uncompressed_pixels_are_a_view_with_pixel_arrays_values(
        bits: int, allocated: int, signed: bool) -> None:
    rng = np.random.default_rng(bits + allocated + signed)
    top = 1 << bits
    lo, hi = (-(top // 2), top // 2 - 1) if signed else (0, top - 1)
    ds = make(image(rng, lo, hi), bits=bits, allocated=allocated, signed=signed)
    got = preprocess.decode_pixels(ds)
    want = ds.pixel_array
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert not got.flags.writeable and not got.flags.owndata  # no 10 MB copy


@pytest.mark.parametrize("signed", [False, True])
def test_bits_above_bits_stored_go_to_pixel_array(signed: bool) -> None:
    """Stray high bits: pydicom clears them (sign-extends signed data); so does decode."""
    rng = np.random.default_rng(5)
    values = image(rng, -2048 if signed else 0, 2047 if signed else 4095)
    raw = values.astype("<i2" if signed else "<u2")
    raw[0, :10] ^= np.array(0x3000, dtype=raw.dtype)  # bits 12 and 13 set
    ds = make(raw, bits=12, signed=signed)
    got = preprocess.decode_pixels(ds)
    assert np.array_equal(got, ds.pixel_array)
    assert not np.array_equal(got, raw)
    assert np.array_equal(dataset_to_gray8(ds), table_gray8(ds))


def test_other_layouts_take_pixel_array() -> None:
    rng = np.random.default_rng(6)
    big = make(image(rng, 0, 4095), bits=12)
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    assert preprocess._native_view(big) is None
    two = make(image(rng, 0, 4095, (2 * 40, 30)), bits=12, NumberOfFrames=2)
    two.Rows = 40
    assert preprocess._native_view(two) is None
    rgb = make(image(rng, 0, 255, (20, 30)), bits=8, allocated=8)
    rgb.SamplesPerPixel = 3
    assert preprocess._native_view(rgb) is None


def save(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(("bits", "allocated", "signed"), [
    (12, 16, False), (16, 16, True), (8, 8, False),
])
def test_a_native_files_pixels_are_mapped_from_it(tmp_path: Path, syntax: str, bits: int,
                                                  allocated: int, signed: bool) -> None:
    """read_dicom leaves Pixel Data in the file, decode_pixels maps it: pixel_array's
    values, no copy; and ds.PixelData still reads the bytes."""
    rng = np.random.default_rng(bits + allocated)
    top = 1 << bits
    lo, hi = (-(top // 2), top // 2 - 1) if signed else (0, top - 1)
    shape = (1200, 1000) if allocated == 8 else (800, 700)  # over _DEFER_BYTES
    path = save(make(image(rng, lo, hi, shape), bits=bits, allocated=allocated,
                     signed=signed), tmp_path / "a.dcm", syntax)
    want = pydicom.dcmread(path)
    ds = preprocess.read_dicom(path)
    assert ds.get_item("PixelData", keep_deferred=True).value is None  # left in the file
    got = preprocess.decode_pixels(ds)
    assert got.dtype == want.pixel_array.dtype and np.array_equal(got, want.pixel_array)
    assert not got.flags.writeable and not got.flags.owndata
    assert np.array_equal(dataset_to_gray8(ds, got), dataset_to_gray8(want))
    assert ds.PixelData == want.PixelData


def test_deflated_and_small_files_are_read_whole(tmp_path: Path) -> None:
    """A deflated file keeps no file offsets, so nothing of it is deferred."""
    rng = np.random.default_rng(8)
    values = image(rng, 0, 4095, (800, 700))
    deflated = save(make(values, bits=12), tmp_path / "d.dcm", DeflatedExplicitVRLittleEndian)
    ds = preprocess.read_dicom(deflated)
    assert ds.get_item("PixelData", keep_deferred=True).value is not None
    assert np.array_equal(preprocess.decode_pixels(ds), values)
    small = save(make(values[:40, :30], bits=12), tmp_path / "s.dcm")
    ds = preprocess.read_dicom(small)
    assert ds.get_item("PixelData", keep_deferred=True).value is not None
    assert np.array_equal(preprocess.decode_pixels(ds), values[:40, :30])


def test_a_truncated_native_file_is_a_decode_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    path = save(make(image(rng, 0, 4095, (800, 700)), bits=12), tmp_path / "t.dcm")
    path.write_bytes(path.read_bytes()[:-1000])
    ds = preprocess.read_dicom(path)
    with pytest.raises(DecodeError):
        preprocess.decode_pixels(ds)


# --------------------------------------------------------------------------- the table


def window_cases() -> list[dict[str, object]]:
    """Random linear pipelines (and some that are not), seeded."""
    rng = np.random.default_rng(2024)
    cases: list[dict[str, object]] = []
    for i in range(160):
        bits = int(rng.choice([8, 10, 12, 12, 12, 14, 16]))
        signed = bool(rng.random() < 0.25)
        attrs: dict[str, object] = {}
        if rng.random() < 0.3:
            attrs["RescaleSlope"] = float(rng.choice([1, 0.5, 2, 0.25]))
            attrs["RescaleIntercept"] = int(rng.integers(-1024, 1024))
        kind = rng.choice(["window", "window", "window", "exact", "sigmoid", "percentile"])
        top = 1 << bits
        if kind != "percentile":
            centre = float(rng.integers(-top // 2, top)) + float(rng.choice([0, 0.5]))
            width = float(rng.integers(2, 2 * top))
            attrs["WindowCenter"], attrs["WindowWidth"] = centre, width
            if kind == "exact":
                attrs["VOILUTFunction"] = "LINEAR_EXACT"
            elif kind == "sigmoid":
                attrs["VOILUTFunction"] = "SIGMOID"
        photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
        cases.append({"seed": i, "bits": bits, "signed": signed, "kind": str(kind),
                      "photometric": photometric, "attrs": attrs})
    return cases


def test_affine_tables_equal_the_gather() -> None:
    """dataset_to_gray8 (affine arithmetic where it finds a form, the gather elsewhere)
    equals the plain table gather on 160 random pipelines; most linear ones take the
    arithmetic, so the test exercises it."""
    affine = linear = 0
    for case in window_cases():
        rng = np.random.default_rng(int(case["seed"]))  # type: ignore[call-overload]
        bits, signed = int(case["bits"]), bool(case["signed"])  # type: ignore[call-overload]
        top = 1 << bits
        lo, hi = (-(top // 2), top // 2 - 1) if signed else (0, top - 1)
        ds = make(image(rng, lo, hi, (130, 130)), bits=bits, allocated=16, signed=signed,
                  photometric=str(case["photometric"]),
                  **case["attrs"])  # type: ignore[arg-type]
        want = table_gray8(ds)
        assert np.array_equal(dataset_to_gray8(ds), want), case
        arr = ds.pixel_array
        vmin, vmax = int(arr.min()), int(arr.max())
        lut = np.rint(_unit_interval(ds, np.arange(vmin, vmax + 1), arr[::4, ::4])
                      * 255.0).astype(np.uint8)
        if case["kind"] in ("window", "exact", "percentile"):
            linear += 1
            affine += _affine_form(lut, vmin) is not None
    assert affine >= linear // 2, (affine, linear)


def test_the_benchmark_window_is_affine() -> None:
    """A 12-bit CR with the full-range window (the benchmark's radiographs) takes the
    arithmetic, without a clip, and gives the table's values."""
    rng = np.random.default_rng(3)
    ds = make(image(rng, 0, 4095, (300, 256)), bits=12, WindowCenter=2048, WindowWidth=4096)
    arr = ds.pixel_array
    lut = np.rint(_unit_interval(ds, np.arange(0, 4096), arr[::4, ::4]) * 255.0).astype(
        np.uint8)
    form = _affine_form(lut, 0)
    assert form is not None and form[3] is False
    assert np.array_equal(dataset_to_gray8(ds), table_gray8(ds))


def test_non_affine_tables_keep_the_gather() -> None:
    values = np.arange(0, 4096, dtype=np.int64)
    sigmoid = np.rint(255 / (1 + np.exp(-4 * (values - 2000) / 1500))).astype(np.uint8)
    assert _affine_form(sigmoid, 0) is None
    root = np.rint(np.sqrt(values / 4095) * 255).astype(np.uint8)
    assert _affine_form(root, 0) is None
    assert _affine_form(np.zeros(10, np.uint8), 0) is None  # nothing unclipped
    assert _affine_form(np.full(70000, 7, np.uint8), 0) is None  # too wide a range
