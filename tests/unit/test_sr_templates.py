"""The SR's content tree is spliced from encoded templates (cxrd.sr, cxrd.srencode): it must
be byte for byte the tree highdicom's templates build and pydicom writes, for every model,
study and character set one process meets, in any order (nothing cached may leak)."""

from __future__ import annotations

from collections.abc import Iterator

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid
from resultfactory import DX_PRESENTATION, fake_result, make_model, make_source

from cxrd import sr as report
from cxrd.findings import ImageFindings
from cxrd.headers import library_view
from cxrd.modelinfo import ModelInfo, OperatingPoint
from cxrd.srencode import ItemTemplate, encode_items, sequence


def findings(ds: Dataset, model: ModelInfo, biases: tuple[float, float, float],
             peak: tuple[int, int] = (2, 5)) -> ImageFindings:
    r = fake_result(ds, biases=biases, peak=peak)
    return ImageFindings.of(ds, r.probs, r.cam, model.operating_point.tb_threshold)


def study(model: ModelInfo, *, charset: str | None = "ISO_IR 100",
          other: bool = False) -> list[ImageFindings]:
    """Four images of one study: TB (CR), NTB (DX with a Frame of Reference), NORM (CR
    without orientation), NTB (DX, another geometry); ``other``: other sizes, the other
    way round."""
    uid = generate_uid()
    grow = 40 if other else 0
    sources = [
        make_source(600 + grow, 500, study_uid=uid),
        make_source(640, 520 + grow, sop_class=DX_PRESENTATION, photometric="MONOCHROME1",
                    study_uid=uid),
        make_source(600, 500 + grow, study_uid=uid, orientation=False),
        make_source(700 + grow, 560, sop_class=DX_PRESENTATION, study_uid=uid),
    ]
    sources[1].FrameOfReferenceUID = generate_uid()
    for ds in sources:
        if charset is None:
            del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = charset
    biases = [(1.0, 0.0, 0.0), (-2.0, 1.5, 0.0), (-2.0, 0.0, 1.5), (-2.0, 1.5, 0.0)]
    results = [findings(ds, model, b, peak=(k + 1, 5 - k))
               for k, (ds, b) in enumerate(zip(sources, biases, strict=True))]
    return results[::-1] if other else results


def highdicom_tree(results: list[ImageFindings], model: ModelInfo, include_region: bool,
                   charset: str | None) -> tuple[Dataset, bytes]:
    """The report's root item as highdicom's MeasurementReport builds it, and its Content
    Sequence as pydicom encodes it."""
    groups = []
    for number, r in enumerate(results, start=1):
        view = report.header_view(r.header)
        shape = report._shape(r, model, include_region)
        groups += report._image_groups(shape, r, view, model, number)
    tree = hd.sr.MeasurementReport(
        observation_context=report._observation_context(model),
        procedure_reported=report.CHEST_RADIOGRAPH,
        imaging_measurements=groups,
        referenced_images=[library_view(r.header) for r in results],
    )
    return tree[0], encode_items(tree[0].ContentSequence, charset)


def tracking_uids(items: pydicom.Sequence) -> Iterator[str]:
    """The Tracking Unique Identifiers of a content tree, in document order."""
    for item in items:
        name = item.ConceptNameCodeSequence[0]
        if (name.CodingSchemeDesignator, name.CodeValue) == ("DCM", "112040"):
            yield str(item.UID)
        yield from tracking_uids(item.get("ContentSequence", []))


def assert_same_tree(results: list[ImageFindings], model: ModelInfo, *,
                     include_region: bool = True, charset: str | None = "ISO_IR 100") -> bytes:
    """Build the SR, then highdicom's tree with the same tracking UIDs; compare the bytes."""
    sr = report.build_sr(results, model, include_region=include_region)
    spliced = sr.get_item("ContentSequence").value  # still raw: not decoded
    fp = DicomBytesIO()
    sr.save_as(fp, enforce_file_format=True)
    back = pydicom.dcmread(DicomBytesIO(fp.getvalue()))
    uids = iter(list(tracking_uids(back.ContentSequence)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "new_uid", lambda: next(uids))
        root, expected = highdicom_tree(results, model, include_region, charset)
    assert next(uids, None) is None
    assert spliced == expected
    assert encode_items(back.ContentSequence, charset) == expected  # and it reads back
    for elem in root:
        if elem.keyword != "ContentSequence":
            assert sr[elem.tag].value == elem.value, elem.keyword
    return spliced


@pytest.mark.parametrize("include_region", [True, False])
@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192", None])
def test_spliced_tree_is_highdicoms(include_region: bool, charset: str | None) -> None:
    model = make_model(demo=True)
    results = study(model, charset=charset)
    assert_same_tree(results, model, include_region=include_region, charset=charset)


def test_nothing_cached_leaks_between_models_or_studies() -> None:
    """Two models and three studies (two in one character set), interleaved in one
    process: each SR holds its own model's and its own study's content, exactly."""
    a = make_model(demo=False)
    b = ModelInfo(name="cxrd-effnet-7", version="3.0", device_uid=generate_uid(), demo=True,
                  manufacturer="Ärzte-Software",
                  operating_point=OperatingPoint(tb_threshold=0.9, method="fixed"),
                  training_data="two hospitals")
    one, two = study(a), study(a, other=True)
    three = study(b, charset="ISO_IR 192")
    trees = {}
    for model, results, charset in [(a, one, "ISO_IR 100"), (b, three, "ISO_IR 192"),
                                    (a, two, "ISO_IR 100"), (b, one, "ISO_IR 100"),
                                    (a, three, "ISO_IR 192"), (b, two, "ISO_IR 100"),
                                    (a, one, "ISO_IR 100")]:
        trees[model.name, id(results)] = assert_same_tree(
            results, model, charset=charset)
    # The checks above compare with highdicom; these say what a leak would look like.
    assert b"cxrd-effnet-7" not in trees[a.name, id(two)]
    assert b"cxrd-mnv2-035" not in trees[b.name, id(one)]
    for r in one:
        assert str(r.header.SOPInstanceUID).encode() not in trees[a.name, id(two)]
        assert str(r.header.SOPInstanceUID).encode() not in trees[b.name, id(two)]
    assert b"cxrd finding NTB, image 1" in trees[a.name, id(two)]  # the other way round
    # Model b's threshold (0.9) reports image 1 of study one as NTB, model a's (0.3) as TB.
    assert b"tb_threshold=0.9" in trees[b.name, id(one)]
    assert b"cxrd finding NTB, image 1" in trees[b.name, id(one)]
    assert b"cxrd finding TB, image 1" in trees[a.name, id(one)]


def test_item_template_fills_as_pydicom_encodes() -> None:
    """An ItemTemplate's item is pydicom's encoding of the prototype with the new values,
    whatever the order of the slots and their place among the other elements."""
    prototype = Dataset()
    prototype.RelationshipType = "CONTAINS"
    prototype.ValueType = "NUM"
    inner = Dataset()
    inner.NumericValue = "1"
    inner.FloatingPointValue = 1.0
    prototype.MeasuredValueSequence = [inner]
    prototype.add(DataElement(0x00700022, "FL", [0.0, 1.0]))
    template = ItemTemplate(prototype, ["GraphicData", "MeasuredValueSequence", "ValueType"],
                            "ISO_IR 192")
    value = Dataset()
    value.NumericValue = "0.25"
    value.FloatingPointValue = 0.25
    filled = template.fill([2.5, 3.0, 4.0], encode_items([value], "ISO_IR 192"), "TEXT")
    expected = Dataset()
    expected.RelationshipType = "CONTAINS"
    expected.ValueType = "TEXT"
    expected.MeasuredValueSequence = [value]
    expected.add(DataElement(0x00700022, "FL", [2.5, 3.0, 4.0]))
    assert filled == encode_items([expected], "ISO_IR 192")
    with pytest.raises(TypeError):
        template.fill("TEXT")
    # A spliced sequence reads back as the items it holds.
    ds = Dataset()
    ds[0x0040A730] = sequence("ContentSequence", filled)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(fp, ds)
    back = pydicom.filereader.read_dataset(DicomBytesIO(fp.getvalue()), False, True)
    assert back.ContentSequence[0].ValueType == "TEXT"
    assert back.ContentSequence[0].MeasuredValueSequence[0].FloatingPointValue == 0.25
    assert np.allclose(back.ContentSequence[0].GraphicData, [2.5, 3.0, 4.0])
