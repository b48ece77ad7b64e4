"""The shared preprocessing: DICOM display pipeline, file readers, training == serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrd.errors import DecodeError, ModelError, UnsupportedImage
from cxrd.modelinfo import PREPROCESSING
from cxrd.preprocess import (
    CONTRACTS,
    STRETCH_V1,
    STRETCH_V2,
    contract,
    dataset_to_gray8,
    preprocess_dataset,
    preprocess_file,
    read_gray8_and_size,
    resize_gray8,
    to_model_input,
)


def _ds(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


@pytest.fixture
def ramp() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 4095, 200)[None, :].repeat(160, axis=0)
    return np.clip(base + rng.normal(0, 5, base.shape), 0, 4095).astype(np.uint16)


def test_monochrome1_is_inverted(ramp: np.ndarray) -> None:
    m2 = dataset_to_gray8(_ds(ramp, "MONOCHROME2"))
    m1 = dataset_to_gray8(_ds(4095 - ramp, "MONOCHROME1"))
    assert m2.dtype == np.uint8 and m2.shape == ramp.shape
    assert np.abs(m2.astype(int) - m1.astype(int)).max() <= 1
    assert m2[:, -1].mean() > 200 and m2[:, 0].mean() < 50  # white = dense in both


def test_window_is_applied(ramp: np.ndarray) -> None:
    ds = _ds(ramp)
    ds.WindowCenter, ds.WindowWidth = 1024, 512
    out = dataset_to_gray8(ds)
    assert out[ramp < 700].max() == 0
    assert out[ramp > 1350].min() == 255
    mid = (ramp > 1000) & (ramp < 1048)
    assert 100 < out[mid].mean() < 155


def test_percentile_window_without_window(ramp: np.ndarray) -> None:
    out = dataset_to_gray8(_ds(ramp // 4 + 1000))  # narrow range: stretched to full 8 bits
    assert out.min() == 0 and out.max() == 255


def test_voi_lut_sequence(ramp: np.ndarray) -> None:
    ds = _ds(ramp)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    # an inverting LUT; explicit VR, as a parsed file has it
    item.add_new(0x00283006, "US", [int(v) for v in np.arange(4096)[::-1]])
    ds.VOILUTSequence = [item]
    out = dataset_to_gray8(ds)
    assert out[:, 0].mean() > 200 and out[:, -1].mean() < 50


def test_rescale_slope_intercept(ramp: np.ndarray) -> None:
    plain = dataset_to_gray8(_ds(ramp))
    ds = _ds(ramp)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    assert np.abs(dataset_to_gray8(ds).astype(int) - plain.astype(int)).max() <= 1


def test_unsupported_photometric_and_missing_pixels(ramp: np.ndarray) -> None:
    ds = _ds(ramp)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(UnsupportedImage):
        dataset_to_gray8(ds)
    ds = _ds(ramp)
    del ds.PixelData
    with pytest.raises(DecodeError):
        dataset_to_gray8(ds)


def test_model_input_range_and_shape() -> None:
    gray = np.array([[0, 255], [127, 128]], dtype=np.uint8)
    x = to_model_input(gray)
    assert x.shape == (2, 2, 3) and x.dtype == np.float32
    assert x[0, 0, 0] == -1.0 and x[0, 1, 2] == 1.0


def test_png_16bit_and_8bit(tmp_path: Path, ramp: np.ndarray) -> None:
    p16 = tmp_path / "a.png"
    Image.fromarray(ramp.astype(np.uint16)).save(p16)
    g16 = read_gray8_and_size(p16)[0]
    assert g16.shape == ramp.shape and g16.min() == 0 and g16.max() == 255
    p8 = tmp_path / "b.png"
    Image.fromarray((ramp // 16).astype(np.uint8)).save(p8)
    assert np.array_equal(read_gray8_and_size(p8)[0], (ramp // 16).astype(np.uint8))
    bad = tmp_path / "c.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DecodeError):
        read_gray8_and_size(bad)


@pytest.mark.parametrize("preprocessing", sorted(CONTRACTS))
def test_training_path_equals_serving_path(tmp_path: Path, ramp: np.ndarray,
                                           preprocessing: str) -> None:
    """training.data (manifest -> cache -> tf-free inputs) == the daemon's path
    (``cxrd.worker.prepare``), bit for bit, under each contract; the last image is large
    enough for cxrd-gray8-stretch-v2 to reduce it (by 2)."""
    from resultfactory import make_model

    from cxrd.worker import prepare
    from training.data import load_images, to_inputs
    from training.sources import Record

    rng = np.random.default_rng(1)
    large = np.clip(np.linspace(0, 4095, 2050)[None, :].repeat(2100, axis=0)
                    + rng.normal(0, 40, (2100, 2050)), 0, 4095).astype(np.uint16)
    paths = []
    for i, (pixels, photometric) in enumerate(((4095 - ramp, "MONOCHROME1"),
                                               (ramp, "MONOCHROME2"), (large, "MONOCHROME2"))):
        ds = _ds(pixels, photometric)
        ds.WindowCenter, ds.WindowWidth = 2000 + 100 * i, 3000
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    records = [Record(path=str(p), source="phantom", source_label="NORM", label="NORM",
                      patient_id=str(i)) for i, p in enumerate(paths)]
    cache = tmp_path / "cache"
    loaded = load_images(records, 96, preprocessing=preprocessing, cache_dir=cache, workers=1)
    training_inputs = to_inputs(loaded.images)
    cached = load_images(records, 96, preprocessing=preprocessing, cache_dir=cache, workers=1)
    assert np.array_equal(cached.images, loaded.images)
    model = make_model(demo=False, input_size=96, preprocessing=preprocessing)
    for i, path in enumerate(paths):
        prep = prepare(path, model)
        assert np.array_equal(training_inputs[i], prep.model_input)
        serving = preprocess_dataset(pydicom.dcmread(path), 96, preprocessing=preprocessing)
        assert np.array_equal(serving, prep.model_input)
        assert np.array_equal(preprocess_file(path, 96, preprocessing=preprocessing), serving)
    assert (prep.reduced is not None) == (preprocessing == STRETCH_V2)
    assert tuple(loaded.sizes[0]) == ramp.shape
    # the cache is keyed by the contract: the other one's arrays are not reused
    other = next(c for c in CONTRACTS if c != preprocessing)
    assert not np.array_equal(
        load_images(records, 96, preprocessing=other, cache_dir=cache, workers=1).images,
        loaded.images)


def test_training_uses_the_current_contract() -> None:
    import inspect

    from training.data import load_images

    assert PREPROCESSING == STRETCH_V2
    assert inspect.signature(load_images).parameters["preprocessing"].default == PREPROCESSING


@pytest.mark.parametrize(("rows", "cols", "size", "factor"), [
    (2500, 2048, 224, 2),   # the bench's CR: 1250 x 1024
    (2048, 2500, 224, 2),   # the shorter side counts, whichever it is
    (2047, 4000, 224, 1),   # floor(2047 / 2) = 1023 < 1024
    (4096, 4096, 224, 4),
    (4280, 3520, 224, 3),   # 3520 // 1024
    (3000, 3000, 600, 2),   # floor max(1024, 2 x 600) = 1200
    (610, 500, 224, 1),     # the demo phantoms
    (1250, 1024, 224, 1),   # a 2500 x 2048 JPEG 2000 decoded at reduce level 1
])
def test_v2_reduce_factor(rows: int, cols: int, size: int, factor: int) -> None:
    assert contract(STRETCH_V2).reduce_factor(rows, cols, size) == factor
    assert contract(STRETCH_V1).reduce_factor(rows, cols, size) == 1


def test_v2_is_v1_when_it_does_not_reduce_and_reduce_then_resize_when_it_does() -> None:
    rng = np.random.default_rng(2)
    v1, v2 = contract(STRETCH_V1), contract(STRETCH_V2)
    gray = rng.integers(0, 256, (2047, 2600), dtype=np.uint8)
    assert v2.reduce(gray, 224).factor == 1
    assert np.array_equal(v2.resize(gray, 224), v1.resize(gray, 224))
    yy, xx = np.mgrid[0:2500, 0:2049]
    gray = ((xx * 7 + yy * 3) % 256).astype(np.uint8) ^ rng.integers(0, 16, xx.shape, np.uint8)
    reduced = v2.reduce(gray, 224)
    assert reduced.factor == 2 and reduced.image.shape == (1250, 1025)  # Pillow: ceil
    assert np.array_equal(reduced.image, np.asarray(Image.fromarray(gray).reduce(2)))
    assert np.array_equal(v2.resize(gray, 224), resize_gray8(reduced.image, 224))
    assert np.array_equal(v1.resize(gray, 224), resize_gray8(gray, 224))
    assert not np.array_equal(v2.resize(gray, 224), v1.resize(gray, 224))


def test_unknown_contract_is_refused(tmp_path: Path, ramp: np.ndarray) -> None:
    with pytest.raises(ModelError, match="cxrd-gray8-stretch-v9.*implements.*v1.*v2"):
        contract("cxrd-gray8-stretch-v9")
    path = tmp_path / "a.dcm"
    _ds(ramp).save_as(path, enforce_file_format=True)
    with pytest.raises(ModelError, match="v9"):
        preprocess_file(path, 96, preprocessing="cxrd-gray8-stretch-v9")


def test_resize_is_a_stretch() -> None:
    gray = np.zeros((400, 100), dtype=np.uint8)
    gray[:200] = 255
    out = resize_gray8(gray, 50)
    assert out.shape == (50, 50)
    assert out[:24].min() > 240 and out[26:].max() < 15
