from __future__ import annotations

import json

import pytest

from cxrd.errors import ModelError
from cxrd.modelinfo import (
    LUNG_SEGMENTS,
    PREPROCESSING,
    ModelInfo,
    OperatingPoint,
    SegmentationInfo,
)
from cxrd.preprocess import CONTRACTS, CURRENT_PREPROCESSING


def _info() -> ModelInfo:
    return ModelInfo(name="m", version="2.0", device_uid="1.2.3.4", input_size=256,
                     operating_point=OperatingPoint(0.27, "chosen", 0.9, 0.91, 0.8),
                     training_data="phantom: TB 10", demo=True, metrics={"test_accuracy": 0.97})


def test_round_trip() -> None:
    info = _info()
    props = info.to_props()
    assert all(isinstance(v, str) for v in props.values())
    assert ModelInfo.from_props(props) == info
    assert info.display_name == "DEMO m 2.0"


@pytest.mark.parametrize("key", ["cxrd.name", "cxrd.device_uid", "cxrd.operating_point",
                                 "cxrd.demo", "cxrd.input_size"])
def test_missing_key(key: str) -> None:
    props = _info().to_props()
    del props[key]
    with pytest.raises(ModelError, match=key):
        ModelInfo.from_props(props)


def test_wrong_classes_or_preprocessing() -> None:
    props = _info().to_props()
    props["cxrd.class_names"] = "NORM,TB,NTB"
    with pytest.raises(ModelError, match="classes"):
        ModelInfo.from_props(props)
    props = _info().to_props()
    props["cxrd.preprocessing"] = "something-else"
    with pytest.raises(ModelError, match="preprocessing"):
        ModelInfo.from_props(props)
    props = _info().to_props()
    props["cxrd.input_size"] = "big"
    with pytest.raises(ModelError, match="malformed"):
        ModelInfo.from_props(props)


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_every_implemented_contract_is_accepted(name: str) -> None:
    props = _info().to_props()
    props["cxrd.preprocessing"] = name
    assert ModelInfo.from_props(props).preprocessing == name


def test_new_models_declare_the_current_contract() -> None:
    assert _info().preprocessing == PREPROCESSING == CURRENT_PREPROCESSING in CONTRACTS


def test_unknown_contract_names_the_implemented_ones() -> None:
    props = _info().to_props()
    props["cxrd.preprocessing"] = "something-else"
    with pytest.raises(ModelError, match="'something-else'.*cxrd-gray8-stretch-v1"):
        ModelInfo.from_props(props)


# --------------------------------------------------------------------------- segmentation

def _seg() -> SegmentationInfo:
    return SegmentationInfo(name="s", version="1.0", device_uid="1.2.3.5", demo=True,
                            metrics={"test_dice_left": 0.97, "test_dice_right": 0.98})


def test_segmentation_round_trip_and_codes() -> None:
    info = _seg()
    props = info.to_props()
    assert all(isinstance(v, str) for v in props.values())
    assert props["cxrd.kind"] == "segmentation" and props["cxrd.input_size"] == "256"
    assert SegmentationInfo.from_props(props) == info
    assert info.display_name == "DEMO s 1.0"
    # channel order and SNOMED CT codes: left lung, then right lung
    assert [(s.label, s.code_value, s.code_meaning, s.coding_scheme) for s in LUNG_SEGMENTS] == [
        ("Left lung", "44029006", "Left lung structure", "SCT"),
        ("Right lung", "3341006", "Right lung structure", "SCT")]
    assert {(s.category_value, s.category_meaning) for s in LUNG_SEGMENTS} == {
        ("91723000", "Anatomical Structure")}


def test_segmentation_and_classifier_files_are_told_apart() -> None:
    with pytest.raises(ModelError, match="segmentation model, not a classifier"):
        ModelInfo.from_props(_seg().to_props())
    with pytest.raises(ModelError, match="not a segmentation model"):
        SegmentationInfo.from_props(_info().to_props())


@pytest.mark.parametrize("key", ["cxrd.name", "cxrd.segments", "cxrd.threshold", "cxrd.demo"])
def test_segmentation_missing_key(key: str) -> None:
    props = _seg().to_props()
    del props[key]
    with pytest.raises(ModelError, match=key):
        SegmentationInfo.from_props(props)


def test_segmentation_wrong_segments_or_preprocessing() -> None:
    props = _seg().to_props()
    swapped = json.loads(props["cxrd.segments"])[::-1]
    props["cxrd.segments"] = json.dumps(swapped)
    with pytest.raises(ModelError, match="segments"):
        SegmentationInfo.from_props(props)
    props = _seg().to_props()
    props["cxrd.preprocessing"] = "something-else"
    with pytest.raises(ModelError, match="preprocessing"):
        SegmentationInfo.from_props(props)
    props = _seg().to_props()
    props["cxrd.threshold"] = "half"
    with pytest.raises(ModelError, match="malformed"):
        SegmentationInfo.from_props(props)


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_segmentation_accepts_every_implemented_contract(name: str) -> None:
    props = _seg().to_props()
    props["cxrd.preprocessing"] = name
    assert SegmentationInfo.from_props(props).preprocessing == name
