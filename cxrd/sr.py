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

import functools
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cxrd import __version__
from cxrd.findings import (
    NORM,
    NTB,
    TB,
    ImageFindings,
    decide_class,
)
from cxrd.headers import header_view, library_view
from cxrd.modelinfo import CLASS_NAMES, ModelInfo, labelled, software_versions
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


# --------------------------------------------------------------------------- UIDs and headers


# --------------------------------------------------------------------------- SR


#: A model's TID 4019 items, built once per model: they are the same in every group of
#: every SR the model writes (about a tenth of an SR's build time otherwise).
_ALGORITHMS: dict[tuple[str, bool], hd.sr.AlgorithmIdentification] = {}


def _algorithm(model: ModelInfo, *, with_parameters: bool) -> hd.sr.AlgorithmIdentification:
    key = (f"{model.device_uid}|{model.name}|{model.version}|{model.demo}|"
           f"{model.operating_point}|{model.training_data}", with_parameters)
    cached = _ALGORITHMS.get(key)
    if cached is None:
        if len(_ALGORITHMS) > 16:  # a process serves one model; tests build many
            _ALGORITHMS.clear()
        cached = _ALGORITHMS[key] = _build_algorithm(model, with_parameters=with_parameters)
    return cached


def _build_algorithm(model: ModelInfo, *, with_parameters: bool
                     ) -> hd.sr.AlgorithmIdentification:
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


@functools.cache
def _finding_site() -> hd.sr.FindingSite:
    """Finding Site = Lung. Constant content items are built once per process and shared
    by every group that holds them (a content item is written by value; nothing changes
    it once built), as are an image's source image reference and the evaluations below."""
    return hd.sr.FindingSite(LUNG)


@functools.cache
def _evaluation(name: Code, value: Code) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name, value)


def _tracking(text: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=new_uid(), identifier=text)


def _image_groups(
    result: ImageFindings, view: Dataset, model: ModelInfo, number: int, include_region: bool
) -> list[
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    """TID 1501 finding group, one TID 1501 probability group per class, optional TID 1410."""
    threshold = model.operating_point.tb_threshold
    decided = decide_class(result.probs, threshold)
    tb_present = float(result.probs[TB]) >= threshold
    name = CLASS_NAMES[decided]
    source = hd.sr.SourceImageForMeasurementGroup.from_source_image(view)
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(f"cxrd finding {name}, image {number}"),
            finding_type=CLASS_FINDINGS[decided],
            finding_sites=[_finding_site()],
            algorithm_id=_algorithm(model, with_parameters=True),
            qualitative_evaluations=[
                _evaluation(NORMALITY, NORMAL if decided == NORM else ABNORMAL),
                _evaluation(TUBERCULOSIS, PRESENT if tb_present else ABSENT),
            ],
            source_images=[source],
        )
    ]
    for k, class_name in enumerate(CLASS_NAMES):
        # NTB has no code of its own: "Abnormal" with Tuberculosis Absent defines it.
        evaluations = [_evaluation(TUBERCULOSIS, ABSENT)] if k == NTB else None
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(f"cxrd probability {class_name}, image {number}"),
                finding_type=CLASS_FINDINGS[k],
                finding_sites=[_finding_site()],
                algorithm_id=_algorithm(model, with_parameters=False),
                measurements=[
                    hd.sr.Measurement(
                        # The shortest decimal that reads back as the same float32 ("0.6",
                        # not "0.60000002384186").
                        name=PROBABILITY, value=float(str(np.float32(result.probs[k]))),
                        unit=NO_UNITS,
                    )
                ],
                qualitative_evaluations=evaluations,
                source_images=[source],
            )
        )
    # A box around "the most normal region" would mislead a reader, so NORM gets none.
    if include_region and decided != NORM and result.region is not None:
        x0, y0, x1, y1 = result.region
        box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=box,
            source_image=hd.sr.SourceImageForRegion.from_source_image(view),
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(f"cxrd hottest region {name}, image {number}"),
                referenced_region=region,
                finding_type=CLASS_FINDINGS[decided],
                finding_sites=[_finding_site()],
                algorithm_id=_algorithm(model, with_parameters=False),
            )
        )
    return groups


def _encode_as_built(sr: Dataset) -> None:
    """Let pydicom write the SR's ~800 nested data sets as they are.

    A data set that was not read from a file has no original encoding, so pydicom's
    writer runs its ambiguous-VR pass over it, and that pass descends into every sequence:
    for each nested item again, about a third of the SR's write time. The pass is run once
    here, over the whole tree, and every data set is then marked as already in the
    encoding it is written in (Explicit VR Little Endian, its character set)."""
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
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    for number, (result, view) in enumerate(zip(results, views, strict=True), start=1):
        groups.extend(_image_groups(result, view, model, number, include_region))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid,
            name=model.name,
            manufacturer_name=model.manufacturer,
            model_name=model.display_name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CHEST_RADIOGRAPH,
        imaging_measurements=groups,
        referenced_images=[library_view(r.header) for r in results],
    )
    # highdicom's SR constructor deep-copies the content tree, parses it back into its own
    # objects and searches it for references: over half of the SR's cost for a tree of
    # ~800 items (4 images), and none of it changes the document. So the IOD is built
    # around a one-item stub of the same root container, and the real tree's root
    # attributes replace the stub's, as highdicom itself copies them. The evidence
    # (Current Requested Procedure Evidence Sequence) is built from ``views`` either way:
    # highdicom lists every evidence data set, referenced or not. The result is returned as
    # a plain Dataset (highdicom's ``content`` view would show the stub).
    root = report[0]
    stub = hd.sr.ContainerContentItem(name=root.ConceptNameCodeSequence[0],
                                      template_id=root.ContentTemplateSequence[0].TemplateIdentifier)
    stub.add_new("ContentSequence", "SQ", [])
    built = iod(
        evidence=views,
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
    )
    sr = Dataset()
    sr.update(built)
    sr.file_meta = built.file_meta
    for tag, value in root.items():
        sr[tag] = value
    sr.add_new("SoftwareVersions", "LO", software_versions(model))
    _encode_as_built(sr)
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
