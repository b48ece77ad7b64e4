"""Every compressed transfer syntax of docs/dicom-output.md §5 decodes through the serving path
(pydicom + the pylibjpeg plugins), on files pydicom ships."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from cxrd.dicom import RECEIVE_TRANSFER_SYNTAXES
from cxrd.errors import DecodeError
from cxrd.preprocess import dataset_to_gray8

CASES = {
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG extended, 12-bit
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compressed_syntax_decodes(name: str) -> None:
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not shipped with this pydicom"
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == CASES[name]
    assert CASES[name] in RECEIVE_TRANSFER_SYNTAXES  # the receiver accepts it
    gray = dataset_to_gray8(ds)
    assert gray.dtype == np.uint8 and gray.shape == (ds.Rows, ds.Columns)
    assert gray.max() > gray.min()


def test_corrupt_jpeg_is_a_decode_error() -> None:
    """pydicom ships a 12-bit JPEG with a misplaced marker: a clear DecodeError."""
    path = get_testdata_file("JPEG-lossy.dcm", download=False)
    assert path
    with pytest.raises(DecodeError, match="1.2.840.10008.1.2.4.51"):
        dataset_to_gray8(pydicom.dcmread(path))
