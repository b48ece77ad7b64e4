"""The study's Structured Report, which a report job writes (``cxrd.worker``): one TID 1500
Measurement Report per study generation, built with highdicom from the findings each
classify job recorded (``cxrd.findings.ImageFindings``), in the source study
(docs/dicom-output.md §1). Comprehensive 3D SR by default, as IHE AIR asks; Comprehensive
and Enhanced SR for older archives. The heatmap SC is ``cxrd.heatmap``'s.

Coding choices, so that readers of the SR know what to look for:

* Procedure reported is SNOMED CT (399208008, SCT) "Plain chest X-ray". It is view-agnostic
  (PA, AP, portable alike) and SNOMED CT needs no coding scheme declaration. The LOINC
  chest codes are view-specific (XR Chest AP, XR Chest PA and Lateral, ...; 36572-6 is
  listed as "XR Chest AP" by most sources), and we do not know the view reliably.
* The classes are coded with standard concepts only, so no private coding scheme is
  declared and dciodvfy has nothing to warn about:
  TB = (56717001, SCT) "Tuberculosis"; NORM = (17621005, SCT) "Normal";
  NTB = Finding (263654008, SCT) "Abnormal" together with a qualitative evaluation
  Tuberculosis = (272519000, SCT) "Absent" in the same measurement group.
* The decision at the operating point is ``cxrd.findings.decide_class``: the finding, the
  Normality and Tuberculosis evaluations and the heatmap all use it, so they never
  contradict each other.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DS

from cxrd import __version__
from cxrd.findings import (
    NORM,
    NTB,
    TB,
    ImageFindings,
    decide_class,
)
from cxrd.headers import header_view, library_view
from cxrd.modelinfo import (
    CLASS_NAMES,
    ModelInfo,
    contributing_equipment,
    equipment,
    labelled,
)
from cxrd.srencode import Charset, ItemTemplate, encode_items, sequence
from cxrd.uids import new_uid, validate_uid

logger = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

_SRIod = type[hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR]

from cxrd.dicom import SR_SOP_CLASSES  # noqa: E402

_SR_IODS: dict[str, _SRIod] = {
    SR_SOP_CLASSES["comprehensive3d"]: hd.sr.Comprehensive3DSR,
    SR_SOP_CLASSES["comprehensive"]: hd.sr.ComprehensiveSR,
    SR_SOP_CLASSES["enhanced"]: hd.sr.EnhancedSR,
}

SR_SERIES_DESCRIPTION = "cxrd AI report"


# Concepts (docs/dicom-output.md §1, the code table).
TUBERCULOSIS = Code("56717001", "SCT", "Tuberculosis")
NORMAL = Code("17621005", "SCT", "Normal")
ABNORMAL = Code("263654008", "SCT", "Abnormal")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
NORMALITY = Code("121402", "DCM", "Normality")
PROBABILITY = Code("122157", "DCM", "Probability")
NO_UNITS = Code("1", "UCUM", "no units")
LUNG = Code("39607008", "SCT", "Lung")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
#: Procedure reported. SNOMED CT "Plain chest X-ray (procedure)"; see the module docstring.
CHEST_RADIOGRAPH = Code("399208008", "SCT", "Plain chest X-ray")

#: The Finding concept of each class, in CLASS_NAMES order. NTB is "Abnormal" plus
#: Tuberculosis = Absent in the same group.
CLASS_FINDINGS: tuple[Code, ...] = tuple(
    {"TB": TUBERCULOSIS, "NTB": ABNORMAL, "NORM": NORMAL}[name] for name in CLASS_NAMES
)


# --------------------------------------------------------------------------- SR content
#
# What the SR says is decided by the highdicom objects built below (_image_groups,
# _observation_context). They are built as prototypes, once per model and kind of image
# (_Templates); every SR is then spliced from their encoding (cxrd.srencode), with only
# what differs from SR to SR encoded anew.


def _algorithm(model: ModelInfo, *, with_parameters: bool) -> hd.sr.AlgorithmIdentification:
    parameters: list[str] | None = None
    if with_parameters:
        op = model.operating_point
        parameters = [
            f"tb_threshold={op.tb_threshold:g}",
            f"operating_point_method={op.method}",
        ]
        for key, value in (
            ("target_sensitivity", op.target_sensitivity),
            ("sensitivity", op.sensitivity),
            ("specificity", op.specificity),
        ):
            if value is not None:
                parameters.append(f"{key}={value:g}")
        parameters += [
            f"classes={','.join(model.class_names)}",
            f"input_size={model.input_size}",
            f"preprocessing={model.preprocessing}",
            f"cxrd_version={__version__}",
        ]
        if model.training_data:
            parameters.append(f"training_data={model.training_data}")
        if model.demo:
            parameters.insert(0, "DEMO model, not for clinical use")
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=parameters,
        family=ARTIFICIAL_INTELLIGENCE,
        manufacturer=model.manufacturer,
    )


def _observation_context(model: ModelInfo) -> hd.sr.ObservationContext:
    """The model as device observer (TID 1004), named as the SR's General Equipment and its
    Contributing Equipment item name it (``cxrd.modelinfo.equipment``)."""
    fields = equipment(model)
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=str(fields["DeviceUID"]),
            name=model.name,
            manufacturer_name=str(fields["Manufacturer"]),
            model_name=str(fields["ManufacturerModelName"]),
            serial_number=str(fields["DeviceSerialNumber"]),
        ),
    ))


class _Shape(NamedTuple):
    """What decides an image's groups: the reported class, Tuberculosis at the operating
    point, and whether its region is reported."""

    decided: int
    tb_present: bool
    region: bool


def _shape(result: ImageFindings, model: ModelInfo, include_region: bool) -> _Shape:
    threshold = model.operating_point.tb_threshold
    decided = decide_class(result.probs, threshold)
    # A box around "the most normal region" would mislead a reader, so NORM gets none.
    region = include_region and decided != NORM and result.region is not None
    return _Shape(decided, float(result.probs[TB]) >= threshold, region)


#: The Tracking Identifier of each kind of group, given its class's name and image number.
_TRACKING_TEXTS = {
    "finding": "cxrd finding {}, image {}",
    "probability": "cxrd probability {}, image {}",
    "region": "cxrd hottest region {}, image {}",
}


def _plan(shape: _Shape) -> list[tuple[str, int]]:
    """An image's groups: (kind, class index), in the order of the content tree."""
    return ([("finding", shape.decided)] + [("probability", k) for k in range(len(CLASS_NAMES))]
            + ([("region", shape.decided)] if shape.region else []))


def _probability(result: ImageFindings, k: int) -> float:
    # The shortest decimal that reads back as the same float32 ("0.6", not "0.6000000238").
    return float(str(np.float32(result.probs[k])))


def _box(region: tuple[float, float, float, float]) -> F32:
    """The region as a closed POLYLINE (x0,y0) (x1,y0) (x1,y1) (x0,y1) (x0,y0)."""
    x0, y0, x1, y1 = region
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def _image_groups(
    shape: _Shape, result: ImageFindings, view: Dataset, model: ModelInfo, number: int
) -> list[
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    """TID 1501 finding group, one TID 1501 probability group per class, optional TID 1410."""
    source = hd.sr.SourceImageForMeasurementGroup.from_source_image(view)
    site = hd.sr.FindingSite(LUNG)
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    for kind, k in _plan(shape):
        tracking = hd.sr.TrackingIdentifier(
            uid=new_uid(), identifier=_TRACKING_TEXTS[kind].format(CLASS_NAMES[k], number))
        if kind == "finding":
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=CLASS_FINDINGS[k],
                finding_sites=[site],
                algorithm_id=_algorithm(model, with_parameters=True),
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(NORMALITY, NORMAL if k == NORM else ABNORMAL),
                    hd.sr.QualitativeEvaluation(
                        TUBERCULOSIS, PRESENT if shape.tb_present else ABSENT),
                ],
                source_images=[source],
            ))
        elif kind == "probability":
            # NTB has no code of its own: "Abnormal" with Tuberculosis Absent defines it.
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=CLASS_FINDINGS[k],
                finding_sites=[site],
                algorithm_id=_algorithm(model, with_parameters=False),
                measurements=[hd.sr.Measurement(
                    name=PROBABILITY, value=_probability(result, k), unit=NO_UNITS)],
                qualitative_evaluations=(
                    [hd.sr.QualitativeEvaluation(TUBERCULOSIS, ABSENT)] if k == NTB else None),
                source_images=[source],
            ))
        else:
            assert result.region is not None
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=_box(result.region),
                    source_image=hd.sr.SourceImageForRegion.from_source_image(view),
                ),
                finding_type=CLASS_FINDINGS[k],
                finding_sites=[site],
                algorithm_id=_algorithm(model, with_parameters=False),
            ))
    return groups


# --------------------------------------------------------------------------- SR templates

#: The content items that differ from SR to SR, by concept name: in a prototype's content
#: sequence they become slots (named by the value), everything between them is kept encoded.
_SLOTS: dict[tuple[str, str], str] = {
    (code.scheme_designator, code.value): slot
    for code, slot in (
        (codes.DCM.TrackingIdentifier, "tracking"),
        (codes.DCM.TrackingUniqueIdentifier, "uid"),
        (PROBABILITY, "probability"),
        (codes.DCM.SourceOfMeasurement, "source"),
        (codes.DCM.ImageRegion, "region"),
        (codes.DCM.ImageLibrary, "library"),
        (codes.DCM.ImagingMeasurements, "measurements"),
    )
}

#: The elements filled per SR in each slot's item (and in the items nested in it).
_SLOT_ELEMENTS: dict[str, tuple[str, ...]] = {
    "tracking": ("TextValue",),
    "uid": ("UID",),
    "probability": ("MeasuredValueSequence",),
    "source": ("ReferencedSOPSequence",),
    "region": ("ContentSequence", "GraphicData"),
    "library": ("ContentSequence",),
    "measurements": ("ContentSequence",),
}

Parts = tuple[bytes | str, ...]


def _carve(items: Sequence[Dataset], charset: Charset) -> tuple[Parts, dict[str, Dataset]]:
    """A content sequence as runs of encoded items and the names of its slots (``_SLOTS``),
    with the first item found for each slot."""
    parts: list[bytes | str] = []
    found: dict[str, Dataset] = {}
    run: list[Dataset] = []
    for ds in items:
        names = ds.get("ConceptNameCodeSequence") or [Dataset()]
        slot = _SLOTS.get((names[0].get("CodingSchemeDesignator"), names[0].get("CodeValue")))
        if slot is None:
            run.append(ds)
            continue
        if run:
            parts.append(encode_items(run, charset))
            run = []
        parts.append(slot)
        found.setdefault(slot, ds)
    if run:
        parts.append(encode_items(run, charset))
    return tuple(parts), found


def _splice(parts: Parts, values: Mapping[str, bytes]) -> bytes:
    return b"".join(values[p] if isinstance(p, str) else p for p in parts)


class _LibraryEntry(NamedTuple):
    """An image's TID 1601 entry, but for its reference; its group's coded modality (the
    library groups images by modality and Frame of Reference, as highdicom does) and the
    group's Frame of Reference item, if any."""

    template: ItemTemplate
    modality: tuple[str, str]
    group_head: bytes


#: A stand-in SOP Instance UID for prototypes; the slots replace it.
_STAND_IN_UID = "1.2.3"
_SOP_INSTANCE_UID = 0x00080018
#: An image's library view less its SOP Instance UID: (tag, VR, value) in the view's order.
_EntryKey = tuple[tuple[int, str, object], ...]


@functools.lru_cache(maxsize=256)
def _library_entry(key: _EntryKey, charset: Charset) -> _LibraryEntry:
    """The entry of an image whose library view (``cxrd.headers.library_view``) less its
    SOP Instance UID is ``key``."""
    view = Dataset()
    for tag, vr, value in key:
        view.add_new(tag, vr, list(value) if isinstance(value, tuple) else value)
    view.SOPInstanceUID = _STAND_IN_UID
    (library,) = hd.sr.ImageLibrary([view])
    (group,) = library.ContentSequence
    entry = next(ds for ds in group.ContentSequence if ds.ValueType == "IMAGE")
    head = [ds for ds in group.ContentSequence if ds.ValueType != "IMAGE"]
    modality = entry.ContentSequence[0].ConceptCodeSequence[0]
    return _LibraryEntry(ItemTemplate(entry, ["ReferencedSOPSequence"], charset),
                         (modality.CodingSchemeDesignator, modality.CodeValue),
                         encode_items(head, charset))


def _entry_key(view: Dataset) -> _EntryKey:
    # items(), not iteration, which sorts the tags and looks up each keyword (30 times slower)
    return tuple(
        (int(tag), str(elem.VR),
         tuple(elem.value) if isinstance(elem.value, (list, MultiValue)) else elem.value)
        for tag, elem in view.items() if tag != _SOP_INSTANCE_UID
    )


class _Templates:
    """The SR content of one model in one character set, encoded: built from highdicom
    prototypes of the first image the model reports, and of each new image shape."""

    def __init__(self, model: ModelInfo, charset: Charset, result: ImageFindings,
                 view: Dataset) -> None:
        self.model = model
        self.charset = charset
        self._items: dict[str, ItemTemplate] = {}
        self._groups: dict[_Shape, list[tuple[ItemTemplate, Parts]]] = {}
        # Any of the image's groups do for the root's prototype; they are kept for their shape.
        shape = _shape(result, model, False)
        prototypes = _image_groups(shape, result, view, model, 1)
        self._add_groups(shape, prototypes)
        report = hd.sr.MeasurementReport(
            observation_context=_observation_context(model),
            procedure_reported=CHEST_RADIOGRAPH,
            imaging_measurements=prototypes,
            referenced_images=[library_view(result.header)],
        )
        root = report[0]
        #: The root container's attributes, its content sequence aside.
        self.root: list[DataElement | RawDataElement] = [
            sequence(elem.keyword, encode_items(elem.value, charset)) if elem.VR == "SQ"
            else elem
            for elem in root if elem.keyword != "ContentSequence"
        ]
        self.root_parts, found = _carve(root.ContentSequence, charset)
        self._add_items(found)
        library = found["library"]
        self.library_group = ItemTemplate(library.ContentSequence[0], ["ContentSequence"],
                                          charset)

    def _add_items(self, found: Mapping[str, Dataset]) -> None:
        for slot, ds in found.items():
            if slot not in self._items:
                self._items[slot] = ItemTemplate(ds, _SLOT_ELEMENTS[slot], self.charset)
                if slot == "probability":
                    self._items["value"] = ItemTemplate(
                        ds.MeasuredValueSequence[0], ("NumericValue", "FloatingPointValue"),
                        self.charset)
                elif slot == "source":
                    self._items["reference"] = ItemTemplate(
                        ds.ReferencedSOPSequence[0],
                        ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"), self.charset)
                elif slot == "region":
                    self._items["region source"] = ItemTemplate(
                        ds.ContentSequence[0], ("ReferencedSOPSequence",), self.charset)

    def _add_groups(self, shape: _Shape, prototypes: Sequence[Sequence[Dataset]]) -> None:
        groups = []
        for (container,) in prototypes:
            parts, found = _carve(container.ContentSequence, self.charset)
            self._add_items(found)
            groups.append((ItemTemplate(container, ["ContentSequence"], self.charset), parts))
        self._groups[shape] = groups

    def content(self, results: Sequence[ImageFindings], views: Sequence[Dataset],
                include_region: bool) -> RawDataElement:
        """The root's Content Sequence of the SR of ``results``."""
        items = self._items
        library: dict[tuple[tuple[str, str], object], list[bytes]] = {}
        groups: list[bytes] = []
        for number, (result, view) in enumerate(zip(results, views, strict=True), start=1):
            shape = _shape(result, self.model, include_region)
            if shape not in self._groups:
                self._add_groups(shape, _image_groups(shape, result, view, self.model, number))
            references = items["reference"].fill(view.SOPClassUID, view.SOPInstanceUID)
            lib_view = library_view(result.header)
            entry = _library_entry(_entry_key(lib_view), self.charset)
            library.setdefault((entry.modality, lib_view.get("FrameOfReferenceUID")),
                               [entry.group_head]).append(entry.template.fill(references))
            values = {"source": items["source"].fill(references)}
            for (kind, k), (container, parts) in zip(_plan(shape), self._groups[shape],
                                                      strict=True):
                text = _TRACKING_TEXTS[kind].format(CLASS_NAMES[k], number)
                values["tracking"] = items["tracking"].fill(text)
                values["uid"] = items["uid"].fill(new_uid())
                if kind == "probability":
                    p = _probability(result, k)
                    values["probability"] = items["probability"].fill(
                        items["value"].fill(DS(p, auto_format=True), p))
                elif kind == "region":
                    assert result.region is not None
                    values["region"] = items["region"].fill(
                        items["region source"].fill(references),
                        _box(result.region).flatten().tolist())
                groups.append(container.fill(_splice(parts, values)))
        content = _splice(self.root_parts, {
            "library": items["library"].fill(b"".join(
                self.library_group.fill(b"".join(entries)) for entries in library.values())),
            "measurements": items["measurements"].fill(b"".join(groups)),
        })
        return sequence("ContentSequence", content)


#: Templates per model and character set (a process serves one model; tests build many).
_TEMPLATES: dict[tuple[object, ...], _Templates] = {}


def _templates(model: ModelInfo, charset: Charset, first: ImageFindings,
               view: Dataset) -> _Templates:
    key = (tuple(sorted(model.to_props().items())), __version__, charset)
    templates = _TEMPLATES.get(key)
    if templates is None:
        if len(_TEMPLATES) >= 8:
            _TEMPLATES.clear()
        templates = _TEMPLATES[key] = _Templates(model, charset, first, view)
    return templates


# --------------------------------------------------------------------------- SR

def _encode_as_built(sr: Dataset) -> None:
    """Let pydicom write the SR as it is.

    A data set that was not read from a file has no original encoding, so pydicom's
    writer runs its ambiguous-VR pass over it, and that pass descends into every sequence,
    for each nested item again, and would decode the spliced content tree to do so. The
    pass is run once here, over the header, before the content tree is added, and every
    data set is then marked as already in the encoding it is written in (Explicit VR
    Little Endian, its character set)."""
    correct_ambiguous_vr(sr, True)
    todo = [sr]
    while todo:
        ds = todo.pop()
        ds.set_original_encoding(False, True, ds._character_set)
        for elem in ds.values():
            if elem.VR == "SQ" and not isinstance(elem, RawDataElement):
                todo.extend(elem.value)


def _sr_iod_for(sop_class: str) -> _SRIod:
    uid = SR_SOP_CLASSES.get(sop_class, sop_class)
    try:
        return _SR_IODS[uid]
    except KeyError:
        raise ValueError(
            f"sop_class {sop_class!r} is not one of {sorted(SR_SOP_CLASSES)} "
            "or their SOP Class UIDs."
        ) from None


def build_sr(
    results: Sequence[ImageFindings],
    model: ModelInfo,
    *,
    series_instance_uid: str | None = None,
    series_number: int = 9001,
    instance_number: int = 1,
    sop_class: str = "comprehensive3d",
    predecessor: Dataset | None = None,
    sop_instance_uid: str | None = None,
    include_region: bool = True,
    related: Sequence[tuple[str, str, str]] = (),
) -> Dataset:
    """Build the one TID 1500 SR for a study from the recorded findings of its images.

    The SR is a new instance in the source study, in its own series (Modality SR),
    COMPLETE and UNVERIFIED, with the model as device observer. Per image it holds a
    finding group for the reported class (Finding Site Lung, Normality, Tuberculosis at
    the operating point, algorithm identification with the threshold), one group per
    class with its Probability, and, unless the image is reported NORM or
    ``include_region`` is False, the recorded hottest CAM region as a closed polyline box.
    Nothing here reads a file: the findings carry the source headers' recorded part.
    ``predecessor`` is the earlier cxrd SR of the study that this one supersedes.
    ``related`` are the other results of the same analysis in the study (the heatmap SCs
    and lung SEGs of its images), as (SOP Class UID, Series Instance UID, SOP Instance
    UID): they are listed in Current Requested Procedure Evidence with the source images,
    so that a reader finds them from the SR (IHE AIR). The model is named in General
    Equipment, in Contributing Equipment and as device observer alike
    (``cxrd.modelinfo.equipment``).
    Raises ValueError when the results are empty, span several studies or repeat an
    image, and InvalidUID for a malformed UID.
    """
    if not results:
        raise ValueError("build_sr needs at least one ImageFindings.")
    iod = _sr_iod_for(sop_class)
    study_uid = str(results[0].header.StudyInstanceUID)
    seen: set[str] = set()
    for r in results:
        if str(r.header.StudyInstanceUID) != study_uid:
            raise ValueError(
                "All results of one SR must share StudyInstanceUID; got "
                f"{study_uid} and {r.header.StudyInstanceUID}."
            )
        image_uid = str(r.header.SOPInstanceUID)
        if image_uid in seen:
            raise ValueError(f"SOPInstanceUID {image_uid} appears twice in the results.")
        seen.add(image_uid)
    validate_uid(model.device_uid)
    series_uid = validate_uid(series_instance_uid) if series_instance_uid else new_uid()
    sop_uid = validate_uid(sop_instance_uid) if sop_instance_uid else new_uid()
    previous: list[Dataset] | None = None
    if predecessor is not None:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not predecessor.get(keyword):
                raise ValueError(f"The predecessor SR has no {keyword}.")
        if str(predecessor.StudyInstanceUID) != study_uid:
            raise ValueError(
                f"The predecessor SR belongs to study {predecessor.StudyInstanceUID}, "
                f"not to {study_uid}."
            )
        if str(predecessor.SOPInstanceUID) == sop_uid:
            raise ValueError("The new SR cannot reuse its predecessor's SOPInstanceUID.")
        previous = [predecessor]

    views = [header_view(r.header) for r in results]
    evidence = list(views)
    for sop_class_uid, series_uid_, instance_uid in related:
        reference = Dataset()
        reference.StudyInstanceUID = study_uid
        reference.SeriesInstanceUID = validate_uid(series_uid_, "related series UID")
        reference.SOPClassUID = validate_uid(sop_class_uid, "related SOP Class UID")
        reference.SOPInstanceUID = validate_uid(instance_uid, "related SOP Instance UID")
        evidence.append(reference)
    # The IOD is built around a stub of the root container: highdicom's SR constructor
    # deep-copies the content tree, parses it back and searches it for references, none of
    # which changes the document. The evidence (Current Requested Procedure Evidence
    # Sequence) is built from ``views`` either way: highdicom lists every evidence data set.
    stub = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport,
                                      template_id="1500")
    stub.add_new("ContentSequence", "SQ", [])
    built = iod(
        evidence=evidence,
        content=stub,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        is_complete=True,
        is_verified=False,
        previous_versions=previous,
        series_description=labelled(SR_SERIES_DESCRIPTION, model),
        manufacturer_model_name=model.name,
        contributing_equipment=[contributing_equipment(model, datetime.datetime.now())],
    )
    sr = Dataset()
    sr.update(built)
    sr.file_meta = built.file_meta
    fields = equipment(model)
    sr.add_new("SoftwareVersions", "LO", fields["SoftwareVersions"])
    sr.add_new("DeviceSerialNumber", "LO", fields["DeviceSerialNumber"])
    sr.add_new("DeviceUID", "UI", fields["DeviceUID"])
    _encode_as_built(sr)
    # The content tree, spliced from the model's encoded templates (cxrd.srencode); it is
    # added after _encode_as_built, whose pass would decode it again. The result is a plain
    # Dataset (highdicom's ``content`` view would show the stub).
    charset = sr.get("SpecificCharacterSet")
    if charset is not None and not isinstance(charset, str):
        charset = tuple(charset)
    templates = _templates(model, charset, results[0], views[0])
    for elem in templates.root:
        sr[elem.tag] = elem
    content = templates.content(results, views, include_region)
    sr[content.tag] = content
    logger.debug(
        "built SR",
        extra={
            "action": "build_sr",
            "sop_instance_uid": sop_uid,
            "study_instance_uid": study_uid,
            "images": len(results),
        },
    )
    return sr




# --------------------------------------------------------------------------- files
