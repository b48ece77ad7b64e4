"""cxrd.srencode.DatasetTemplate: a data set encoded once, its slots filled per object, equal
to what pydicom writes for the same data set with those values."""

from __future__ import annotations

import copy
from io import BytesIO

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from cxrd.srencode import DatasetTemplate, file_meta_bytes

SOURCE = "1.2.3.4.5"


def _prototype(source: str, name: str, series: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.9"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.9"
    ds.PatientName = name
    ds.SeriesInstanceUID = "1.2.3.7"  # the object's own series: not the slot
    reference = Dataset()
    reference.ReferencedSOPInstanceUID = source
    reference.ReferencedSOPClassUID = SecondaryCaptureImageStorage
    series_item = Dataset()
    series_item.SeriesInstanceUID = series
    series_item.ReferencedInstanceSequence = [copy.deepcopy(reference)]
    ds.ReferencedSeriesSequence = [series_item]
    ds.SourceImageSequence = [reference]
    ds.ImageComments = "fixed text"
    return ds


def _written(ds: Dataset) -> bytes:
    fp = BytesIO()
    dcmwrite(fp, ds, enforce_file_format=True)
    return fp.getvalue()


def test_filled_slots_give_what_pydicom_writes_for_the_same_values() -> None:
    first = _prototype(SOURCE, "First^Patient", "1.2.3.6")
    template = DatasetTemplate(
        first, values={"source": ("ReferencedSOPInstanceUID", SOURCE),
                       "source series": ("SeriesInstanceUID", "1.2.3.6")},
        elements=[0x00100010], charset=None)
    other = "1.2.3.4.5.6.7.8.99"  # a longer UID: the lengths of the items holding it change
    second = _prototype(other, "Second^Patient^With^A^Longer^Name", "1.2.3.66")
    body = template.fill({"source": other, "source series": "1.2.3.66"},
                         {0x00100010: second["PatientName"]})
    assert file_meta_bytes(second.file_meta, None) + body == _written(second)
    # the object's own Series Instance UID kept its prototype value (a different value)
    assert b"1.2.3.7" in body


def test_a_slot_the_prototype_lacks_or_two_alike_are_refused() -> None:
    ds = _prototype(SOURCE, "A^B", "1.2.3.6")
    with pytest.raises(ValueError, match="not found"):
        DatasetTemplate(ds, values={"x": ("ReferencedSOPInstanceUID", "9.9")}, elements=(),
                        charset=None)
    with pytest.raises(ValueError, match="same keyword"):
        DatasetTemplate(ds, values={"a": ("ReferencedSOPInstanceUID", SOURCE),
                                    "b": ("ReferencedSOPInstanceUID", SOURCE)},
                        elements=(), charset=None)


def test_an_element_slot_left_out_is_left_out() -> None:
    ds = _prototype(SOURCE, "A^B", "1.2.3.6")
    template = DatasetTemplate(ds, values={}, elements=[0x00204000], charset=None)
    body = template.fill({}, {})
    without = copy.deepcopy(ds)
    del without.ImageComments
    assert file_meta_bytes(ds.file_meta, None) + body == _written(without)
    body = template.fill({}, {0x00204000: DataElement(0x00204000, "LT", "other text")})
    without.ImageComments = "other text"
    assert file_meta_bytes(ds.file_meta, None) + body == _written(without)
