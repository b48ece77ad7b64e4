"""The decoded-size limit and the codestream size readers (``cxrd.imagesize``), and the
worker's refusal to decode a frame whose codestream disagrees with its header."""

from __future__ import annotations

import io

import numpy as np
import pytest
from dicomfactory import deflate_bomb, make_dataset
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from cxrd.errors import DecodeError
from cxrd.imagesize import MAX_DECODED_BYTES, declared_bytes, j2k_size, jpeg_size, too_large
from cxrd.preprocess import decode_pixels


def _encoded(fmt: str, rows: int, cols: int, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    dtype = np.uint16 if fmt == "JPEG2000" else np.uint8
    Image.fromarray(np.zeros((rows, cols), dtype=dtype)).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_declared_bytes_and_limit() -> None:
    ds = make_dataset(rows=3000, columns=2500, pixels=False)  # 16 bits, 1 sample
    assert declared_bytes(ds) == 3000 * 2500 * 2
    assert too_large(ds) is None
    ds.Rows = ds.Columns = 60000
    ds.NumberOfFrames = 2
    problem = too_large(ds)
    assert problem is not None and "60000 x 60000 x 2 frame(s)" in problem
    assert str(MAX_DECODED_BYTES) in problem


def test_codestream_sizes() -> None:
    assert j2k_size(_encoded("JPEG2000", 40, 56, no_jp2=True)) == (40, 56)
    assert j2k_size(_encoded("JPEG2000", 40, 56)) == (40, 56)  # inside a JP2 wrapper
    assert jpeg_size(_encoded("JPEG", 40, 56)) == (40, 56)
    assert j2k_size(b"\x00" * 100) is None
    assert jpeg_size(b"\xff\xd8\xff\xda\x00\x02") is None  # a scan before any frame header


@pytest.mark.parametrize(("syntax", "fmt", "kwargs"), [
    (JPEG2000Lossless, "JPEG2000", {"no_jp2": True, "irreversible": False}),
    (JPEGBaseline8Bit, "JPEG", {}),
])
def test_frame_larger_than_header_is_not_decoded(syntax: str, fmt: str,
                                                 kwargs: dict[str, object]) -> None:
    ds = make_dataset(rows=32, columns=32, pixels=False)
    if fmt == "JPEG":
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([_encoded(fmt, 64, 48, **kwargs)])
    with pytest.raises(DecodeError, match="64 x 48, the header says 32 x 32"):
        decode_pixels(ds)
    ds.Rows, ds.Columns = 64, 48
    assert decode_pixels(ds).shape == (64, 48)


def test_a_deflate_bomb_is_refused_before_it_is_inflated() -> None:
    """A deflated data set that inflates past the limit (pydicom would inflate it whole in
    memory): refused at ingest with image-too-large; the peak memory stays far below what
    the data set inflates to."""
    import resource

    from cxrd.imagesize import MAX_INFLATED_BYTES, deflated_too_large

    data, bomb = deflate_bomb()  # 384 MB of zeros in well under a megabyte
    assert deflated_too_large(data) is None  # a normal deflated file passes
    assert len(bomb) < (1 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    problem = deflated_too_large(bomb)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert problem is not None and str(MAX_INFLATED_BYTES) in problem
    assert grown_kb < 64 * 1024  # counted a megabyte at a time, never held
