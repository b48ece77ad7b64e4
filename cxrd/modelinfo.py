"""The model-file contract: what an exported ONNX model carries in ``metadata_props``.

Training writes it (``training.export``, ``training.segment``), serving reads it
(``cxrd.infer``), so class names, segments, input size, the preprocessing contract's name
and the operating point are defined once, here (what each contract name means is
``cxrd.preprocess.CONTRACTS``). Two kinds of model: the classifier (:class:`ModelInfo`) and
the lung-field segmenter (:class:`SegmentationInfo`, ``cxrd.kind`` = ``segmentation``).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cxrd.errors import ModelError
from cxrd.preprocess import CURRENT_PREPROCESSING, contract

if TYPE_CHECKING:
    import highdicom

INPUT_NAME = "input_image"
OUTPUT_PROBS = "probs"
OUTPUT_CAM = "cam"
#: The segmenter's output: [N, S/2, S/2, len(segments)] probabilities (sigmoid) for an
#: input of side S, channel c = segment c; a cell covers 2 x 2 input pixels.
OUTPUT_SEGMENTS = "segments"
SEGMENTATION_KIND = "segmentation"
CLASS_NAMES: tuple[str, ...] = ("TB", "NTB", "NORM")
#: The preprocessing contract new models are exported with; serving implements every
#: contract of ``cxrd.preprocess.CONTRACTS`` and preprocesses as the model declares.
PREPROCESSING = CURRENT_PREPROCESSING

# metadata_props keys; all values are strings (ONNX requires it).
_PREFIX = "cxrd."


@dataclass(frozen=True)
class OperatingPoint:
    """The TB decision threshold on P(TB) and how it was chosen."""

    tb_threshold: float = 0.5
    method: str = "default 0.5 (not calibrated)"
    target_sensitivity: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None


def _display_name(name: str, version: str, demo: bool) -> str:
    base = f"{name} {version}"
    return f"DEMO {base}" if demo else base


def _required(props: Mapping[str, str], command: str) -> Callable[[str], str]:
    """A reader of ``metadata_props`` keys that every model file of ``python -m training
    <command>`` has: a missing one raises ModelError."""

    def get(key: str) -> str:
        try:
            return props[_PREFIX + key]
        except KeyError:
            raise ModelError(
                f"The model file has no metadata_props key {_PREFIX + key!r}; "
                f"it was not exported by `python -m training {command}`."
            ) from None

    return get


@dataclass(frozen=True)
class ModelInfo:
    """Everything serving needs to know about a model file."""

    name: str
    version: str
    device_uid: str
    class_names: tuple[str, ...] = CLASS_NAMES
    input_size: int = 224
    preprocessing: str = PREPROCESSING
    operating_point: OperatingPoint = field(default_factory=OperatingPoint)
    training_data: str = ""
    demo: bool = False
    manufacturer: str = "cxrd"
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        """Name and version, with DEMO in front when the model is the demo one."""
        return _display_name(self.name, self.version, self.demo)

    def to_props(self) -> dict[str, str]:
        """Serialise to ONNX ``metadata_props`` (string to string)."""
        return {
            _PREFIX + "name": self.name,
            _PREFIX + "version": self.version,
            _PREFIX + "device_uid": self.device_uid,
            _PREFIX + "class_names": ",".join(self.class_names),
            _PREFIX + "input_size": str(self.input_size),
            _PREFIX + "preprocessing": self.preprocessing,
            _PREFIX + "operating_point": json.dumps(asdict(self.operating_point)),
            _PREFIX + "training_data": self.training_data,
            _PREFIX + "demo": "true" if self.demo else "false",
            _PREFIX + "manufacturer": self.manufacturer,
            _PREFIX + "metrics": json.dumps(dict(self.metrics), sort_keys=True),
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ModelInfo:
        """Parse ``metadata_props``; a missing or malformed key raises ModelError."""

        get = _required(props, "export")
        if props.get(_KIND) == SEGMENTATION_KIND:
            raise ModelError("The model file is a segmentation model, not a classifier.")
        try:
            op: dict[str, Any] = json.loads(get("operating_point"))
            info = cls(
                name=get("name"),
                version=get("version"),
                device_uid=get("device_uid"),
                class_names=tuple(get("class_names").split(",")),
                input_size=int(get("input_size")),
                preprocessing=get("preprocessing"),
                operating_point=OperatingPoint(**op),
                training_data=props.get(_PREFIX + "training_data", ""),
                demo=get("demo") == "true",
                manufacturer=props.get(_PREFIX + "manufacturer", "cxrd"),
                metrics=json.loads(props.get(_PREFIX + "metrics", "{}")),
            )
        except (ValueError, TypeError) as exc:
            raise ModelError(f"The model file's metadata_props are malformed: {exc}") from exc
        if info.class_names != CLASS_NAMES:
            raise ModelError(
                f"The model's classes are {info.class_names}; cxrd reports {CLASS_NAMES}."
            )
        contract(info.preprocessing)  # ModelError for a contract cxrd does not implement
        return info


_KIND = _PREFIX + "kind"


@dataclass(frozen=True)
class Segment:
    """One output channel of a segmentation model, coded for DICOM SEG (SNOMED CT)."""

    label: str
    code_value: str
    code_meaning: str
    coding_scheme: str = "SCT"
    #: Segmented Property Category (CID 7150): Anatomical Structure
    category_value: str = "91723000"
    category_meaning: str = "Anatomical Structure"


#: The lung-field segmenter's channels, in order (left and right in the patient's sense).
LUNG_SEGMENTS: tuple[Segment, ...] = (
    Segment("Left lung", "44029006", "Left lung structure"),
    Segment("Right lung", "3341006", "Right lung structure"),
)


@dataclass(frozen=True)
class SegmentationInfo:
    """Everything serving needs to know about a segmentation model file.

    ``threshold`` turns a channel's probability into the mask; ``metrics`` holds the
    held-out figures (``test_dice_left``, ``test_dice_right``, ...).
    """

    name: str
    version: str
    device_uid: str
    segments: tuple[Segment, ...] = LUNG_SEGMENTS
    input_size: int = 256
    preprocessing: str = PREPROCESSING
    threshold: float = 0.5
    training_data: str = ""
    demo: bool = False
    manufacturer: str = "cxrd"
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        return _display_name(self.name, self.version, self.demo)

    def to_props(self) -> dict[str, str]:
        return {
            _KIND: SEGMENTATION_KIND,
            _PREFIX + "name": self.name,
            _PREFIX + "version": self.version,
            _PREFIX + "device_uid": self.device_uid,
            _PREFIX + "segments": json.dumps([asdict(s) for s in self.segments]),
            _PREFIX + "input_size": str(self.input_size),
            _PREFIX + "preprocessing": self.preprocessing,
            _PREFIX + "threshold": repr(self.threshold),
            _PREFIX + "training_data": self.training_data,
            _PREFIX + "demo": "true" if self.demo else "false",
            _PREFIX + "manufacturer": self.manufacturer,
            _PREFIX + "metrics": json.dumps(dict(self.metrics), sort_keys=True),
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> SegmentationInfo:
        """Parse ``metadata_props``; a missing or malformed key raises ModelError."""
        if props.get(_KIND) != SEGMENTATION_KIND:
            raise ModelError(
                f"The model file is not a segmentation model ({_KIND} is "
                f"{props.get(_KIND)!r}, not {SEGMENTATION_KIND!r}).")

        get = _required(props, "export-seg")
        try:
            info = cls(
                name=get("name"),
                version=get("version"),
                device_uid=get("device_uid"),
                segments=tuple(Segment(**s) for s in json.loads(get("segments"))),
                input_size=int(get("input_size")),
                preprocessing=get("preprocessing"),
                threshold=float(get("threshold")),
                training_data=props.get(_PREFIX + "training_data", ""),
                demo=get("demo") == "true",
                manufacturer=props.get(_PREFIX + "manufacturer", "cxrd"),
                metrics=json.loads(props.get(_PREFIX + "metrics", "{}")),
            )
        except (ValueError, TypeError) as exc:
            raise ModelError(f"The model file's metadata_props are malformed: {exc}") from exc
        if info.segments != LUNG_SEGMENTS:
            raise ModelError(
                f"The model's segments are {[s.label for s in info.segments]}; cxrd "
                f"segments {[s.label for s in LUNG_SEGMENTS]}.")
        contract(info.preprocessing)  # ModelError for a contract cxrd does not implement
        return info


def demo_model_path() -> Path:
    """The demo model shipped inside the package (trained on synthetic phantoms)."""
    return Path(str(resources.files("cxrd") / "models" / "cxrd-demo.onnx"))


def demo_segmenter_path() -> Path:
    """The demo lung-field segmenter shipped inside the package (trained on phantoms)."""
    return Path(str(resources.files("cxrd") / "models" / "cxrd-demo-lungseg.onnx"))


def _read_props(path: str | Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, Exception) as exc:  # onnx raises its own DecodeError types
        raise ModelError(f"Cannot read model file {path}: {exc}") from exc
    return {p.key: p.value for p in model.metadata_props}


def read_model_info(path: str | Path) -> ModelInfo:
    """Read the ModelInfo of an ONNX file without starting an inference session."""
    return ModelInfo.from_props(_read_props(path))


def read_segmentation_info(path: str | Path) -> SegmentationInfo:
    """Read the SegmentationInfo of an ONNX segmentation model (no inference session)."""
    return SegmentationInfo.from_props(_read_props(path))


def software_versions(model: ModelInfo | SegmentationInfo) -> list[str]:
    """Software Versions of every object cxrd writes: the model's version, then cxrd's."""
    from cxrd import __version__

    return [model.version, f"cxrd {__version__}"]


def equipment(model: ModelInfo | SegmentationInfo) -> dict[str, object]:
    """The model as equipment, as every result names it in General Equipment, in its
    Contributing Equipment item (IHE AIR) and, in the SR, as device observer (TID 1004):
    Manufacturer, Manufacturer's Model Name (the model's name), Software Versions
    (``software_versions``), Device Serial Number and Device UID (both the model's device
    UID, which identifies one trained model), by keyword."""
    return {
        "Manufacturer": model.manufacturer,
        "ManufacturerModelName": model.name,
        "SoftwareVersions": software_versions(model),
        "DeviceSerialNumber": model.device_uid,
        "DeviceUID": model.device_uid,
    }


def contributing_equipment(model: ModelInfo | SegmentationInfo, when: datetime.datetime
                           ) -> highdicom.ContributingEquipment:
    """The model's item of Contributing Equipment Sequence (IHE AIR 6.5.3.1): ``equipment``
    with the Purpose of Reference ``cxrd.dicom.EQUIPMENT_PROCESSING``, Contribution
    DateTime ``when`` and Contribution Description. A highdicom item, which the SR's and the
    SEG's constructors take as it is; Device UID is added to what highdicom sets.
    highdicom builds it once per model (a quarter of a millisecond); each call copies it
    (tens of microseconds, about what an SC's item cost when pydicom built it there)."""
    from pydicom.valuerep import DT

    fields = equipment(model)
    key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items())
    prototype = _equipment_prototype(key)
    item = type(prototype).__new__(type(prototype))
    super(type(prototype), item).__init__()
    for elem in prototype:
        item.add_new(elem.tag, elem.VR, elem.value)
    item.ContributionDateTime = DT(when)
    return item


@functools.lru_cache(maxsize=16)
def _equipment_prototype(key: tuple[tuple[str, object], ...]
                         ) -> highdicom.ContributingEquipment:
    import highdicom as hd
    from pydicom.sr.coding import Code

    from cxrd.dicom import EQUIPMENT_MODEL_CONTRIBUTION, EQUIPMENT_PROCESSING

    fields = dict(key)
    item = hd.ContributingEquipment(
        manufacturer=str(fields["Manufacturer"]),
        purpose_of_reference=Code(*EQUIPMENT_PROCESSING),
        manufacturer_model_name=str(fields["ManufacturerModelName"]),
        software_versions=[str(v) for v in cast(tuple[str, ...], fields["SoftwareVersions"])],
        device_serial_number=str(fields["DeviceSerialNumber"]),
        contribution_description=EQUIPMENT_MODEL_CONTRIBUTION,
    )
    item.DeviceUID = fields["DeviceUID"]
    return item


def labelled(text: str, model: ModelInfo | SegmentationInfo) -> str:
    """A description as written into a result: prefixed DEMO for a demo model."""
    return f"DEMO {text}" if model.demo else text
