"""Evaluation of an exported ONNX model, through the same session code the daemon uses.

Runs on the validation split and the external test split of a manifest, writes
``report.json`` and PNG plots, chooses the TB operating point on validation, and (on
request) records the operating point and headline figures in the model's metadata.

Where images have lesion boxes (phantoms, TBX11K's TB images), it also scores
localisation (:func:`localisation`): the CAM pointing game, and the region the SR would
report (``cxrd.findings``) against the boxes (IoU with the best-matching box); given a
lung-field segmenter, both again with the evidence restricted to the lungs widened by the
margin, as the node restricts it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cxrd import findings
from cxrd.infer import Classifier
from cxrd.modelinfo import CLASS_NAMES, ModelInfo, OperatingPoint
from cxrd.preprocess import CAM_CELL_SHIFT
from training import metrics
from training.data import ImageSet, load_images, to_inputs
from training.sources import Record

log = logging.getLogger(__name__)

TB_TARGET_SENSITIVITY = 0.90  # WHO target for TB triage tests


def predict_set(clf: Classifier, data: ImageSet, batch: int = 64) -> tuple[Any, Any]:
    """probs (N, 3) and cam (N, h, w, 3) for a preprocessed set."""
    probs, cams = [], []
    for start in range(0, len(data), batch):
        p, c = clf.run(to_inputs(data.images[start : start + batch]))
        probs.append(p)
        cams.append(c)
    return np.concatenate(probs), np.concatenate(cams)


def _with_boxes(data: ImageSet) -> list[int]:
    return [i for i, r in enumerate(data.records) if r.boxes and json.loads(r.boxes)]


def _pointing(data: ImageSet, probs: npt.NDArray[Any], cams: npt.NDArray[Any]) -> dict[str, Any]:
    """Pointing game with the predicted class's CAM, on images that have lesion boxes."""
    sel = _with_boxes(data)
    if not sel:
        return {}
    pred = probs.argmax(axis=1)
    return metrics.pointing_game(
        [cams[i][..., pred[i]] for i in sel],
        [(int(data.sizes[i][0]), int(data.sizes[i][1])) for i in sel],
        [[tuple(b) for b in json.loads(data.records[i].boxes)] for i in sel],
        [data.records[i].label for i in sel],
    )


Mask = npt.NDArray[np.bool_]


def lung_masks(segmenter: Path, data_records: list[Record], *, cache_dir: Path | None = None,
               desc: str = "lungs", batch: int = 16) -> tuple[str, list[Mask]]:
    """The segmenter's display name and, per record, the mask of both lung fields over its
    square input (its output grid, each channel at its threshold): the mask the node passes
    to ``cxrd.findings.ImageFindings.of``."""
    import onnxruntime as ort

    from cxrd.modelinfo import INPUT_NAME, OUTPUT_SEGMENTS, read_segmentation_info

    info = read_segmentation_info(segmenter)
    session = ort.InferenceSession(str(segmenter), providers=["CPUExecutionProvider"])
    gray = load_images(data_records, info.input_size, preprocessing=info.preprocessing,
                       cache_dir=cache_dir, desc=desc)
    masks: list[Mask] = []
    for start in range(0, len(data_records), batch):
        (p,) = session.run([OUTPUT_SEGMENTS],
                           {INPUT_NAME: to_inputs(gray.images[start:start + batch])})
        masks.extend(np.asarray(m, dtype=bool) for m in (p >= info.threshold).any(axis=-1))
    return info.display_name, masks


def _cells_allowed(lungs: Mask | None, h: int, w: int, margin: float) -> Mask | None:
    """Which CAM cells lie in ``cxrd.findings.allowed_area``: a cell counts where its
    receptive field's centre (the pointing game's peak position) does."""
    per_cell = 16
    area = findings.allowed_area(lungs, h * per_cell, w * per_cell, margin)
    if area is None:
        return None
    ys = np.clip(((np.arange(h) + 0.5 + CAM_CELL_SHIFT) * per_cell).astype(int), 0,
                 h * per_cell - 1)
    xs = np.clip(((np.arange(w) + 0.5 + CAM_CELL_SHIFT) * per_cell).astype(int), 0,
                 w * per_cell - 1)
    cells = area[np.ix_(ys, xs)]
    return cells if cells.any() else None


def localisation(data: ImageSet, probs: npt.NDArray[Any], cams: npt.NDArray[Any],
                 tb_threshold: float, lungs: list[Mask] | None = None,
                 margin: float = findings.LUNG_MARGIN) -> dict[str, Any]:
    """Localisation on the images with lesion boxes, ``{"unrestricted": {...}}`` and, with
    ``lungs`` (one mask per image of ``data``), ``"lungs"`` the same with the evidence
    restricted to the lungs widened by ``margin``. Each holds:

    * ``pointing_game``: :func:`training.metrics.pointing_game` with the predicted
      (argmax) class's CAM, as the headline figure has always been taken; restricted, the
      peak is the highest cell whose receptive field's centre lies in the allowed area;
    * ``region_iou``: :func:`training.metrics.region_overlap` of the region the SR would
      report (the class decided at ``tb_threshold``, ``cxrd.findings.hottest_region``)
      against the boxes, per true class;

    and, where the boxed images come from several sources, the same ``by_source``.
    """
    sel = _with_boxes(data)
    if not sel:
        return {}
    variants: dict[str, list[Mask | None]] = {"unrestricted": [None] * len(data)}
    if lungs is not None:
        if len(lungs) != len(data):
            raise ValueError("lungs must hold one mask per image")
        variants["lungs"] = list(lungs)
    pred = probs.argmax(axis=1)
    out: dict[str, Any] = {"tb_threshold": tb_threshold, "images": len(sel)}
    if lungs is not None:
        out["lung_margin"] = margin
    for name, masks in variants.items():
        peak_cams, regions = {}, {}
        for i in sel:
            rows, cols = int(data.sizes[i][0]), int(data.sizes[i][1])
            cam = np.asarray(cams[i][..., pred[i]], dtype=np.float64)
            h, w = cam.shape
            allowed = _cells_allowed(masks[i], h, w, margin)
            if allowed is not None:
                cam = np.where(allowed, cam, cam.min() - 1.0)
            peak_cams[i] = cam
            k = findings.decide_class(probs[i], tb_threshold)
            regions[i] = (None if k == findings.NORM else
                          findings.hottest_region(cams[i], k, rows, cols, masks[i], margin))

        def score(chosen: list[int], cams_: dict[int, Any] = peak_cams,
                  regions_: dict[int, Any] = regions) -> dict[str, Any]:
            boxes = [[tuple(b) for b in json.loads(data.records[i].boxes)] for i in chosen]
            labels = [data.records[i].label for i in chosen]
            return {
                "pointing_game": metrics.pointing_game(
                    [cams_[i] for i in chosen],
                    [(int(data.sizes[i][0]), int(data.sizes[i][1])) for i in chosen],
                    boxes, labels),
                "region_iou": metrics.region_overlap([regions_[i] for i in chosen], boxes,
                                                     labels),
            }

        entry = score(sel)
        by_source = sorted({data.records[i].source for i in sel})
        if len(by_source) > 1:
            entry["by_source"] = {src: score([i for i in sel if data.records[i].source == src])
                                  for src in by_source}
        out[name] = entry
    return out


def evaluate(
    model_path: Path,
    records: list[Record],
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    write_metadata: bool = False,
    progress: bool = False,
    segmenter: Path | None = None,
    lung_margin: float = findings.LUNG_MARGIN,
) -> dict[str, Any]:
    """Evaluate on the ``val`` and ``test`` splits; returns (and writes) the report.
    ``segmenter`` (an ONNX lung-field segmenter) adds the lung-restricted localisation
    figures, with ``lung_margin`` as ``[results] lung_margin``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clf = Classifier(model_path, ["CPUExecutionProvider"])
    report: dict[str, Any] = {
        "model": clf.info.display_name,
        "device_uid": clf.info.device_uid,
        "splits": {},
    }
    if segmenter is not None:
        report["segmenter"] = str(segmenter)
    outputs: dict[str, tuple[ImageSet, Any, Any]] = {}
    for split in ("val", "test"):
        subset = [r for r in records if r.split == split]
        if not subset:
            continue
        data = load_images(
            subset, clf.input_size, preprocessing=clf.info.preprocessing,
            cache_dir=cache_dir, progress=progress, desc=split
        )
        probs, cams = predict_set(clf, data)
        outputs[split] = (data, probs, cams)
        rep = metrics.classification_report(data.labels, probs, n_boot=n_boot, seed=seed)
        pointing = _pointing(data, probs, cams)
        if pointing:
            rep["pointing_game"] = pointing
            lungs = None
            if segmenter is not None:
                boxed = _with_boxes(data)
                report["segmenter"], found = lung_masks(
                    segmenter, [data.records[i] for i in boxed], cache_dir=cache_dir,
                    desc=f"lungs-{split}")
                lungs = [np.zeros((1, 1), bool)] * len(data)
                for i, mask in zip(boxed, found, strict=True):
                    lungs[i] = mask
            rep["localisation"] = localisation(
                data, probs, cams, clf.info.operating_point.tb_threshold, lungs, lung_margin)
        report["splits"][split] = rep
        title = f"{clf.info.display_name} - {split} (n={len(data)})"
        metrics.plot_roc(rep, out_dir / f"roc_{split}.png", title)
        metrics.plot_confusion(rep, out_dir / f"confusion_{split}.png", title)
        metrics.plot_reliability(rep, out_dir / f"reliability_{split}.png", title)
    if "val" in outputs:
        data, probs, _ = outputs["val"]
        op = metrics.choose_tb_operating_point(
            data.labels, probs, target_sensitivity=TB_TARGET_SENSITIVITY
        )
        report["operating_point"] = op
        if "test" in outputs and op.get("threshold") is not None:
            tdata, tprobs, _ = outputs["test"]
            report["operating_point_on_test"] = metrics.apply_operating_point(
                tdata.labels, tprobs, float(op["threshold"])
            )
    report["headline"] = headline(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    if write_metadata:
        record_in_model(model_path, report)
    return report


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The figures printed by ``evaluate`` and recorded in the model's metadata."""
    out: dict[str, float] = {}
    for split, rep in report["splits"].items():
        out[f"{split}_accuracy"] = float(rep["accuracy"])
        tb = rep["per_class"][CLASS_NAMES[0]]
        if tb.get("auc") is not None:
            out[f"{split}_tb_auc"] = float(tb["auc"])
        pg = rep.get("pointing_game", {}).get("overall")
        if pg and pg.get("rate") is not None:
            out[f"{split}_pointing_game"] = float(pg["rate"])
        out.update(localisation_headline(split, rep.get("localisation") or {}))
    op = report.get("operating_point_on_test")
    if op:
        out["test_tb_sensitivity_at_op"] = float(op["sensitivity"])
        out["test_tb_specificity_at_op"] = float(op["specificity"])
    return out


def localisation_headline(split: str, loc: dict[str, Any]) -> dict[str, float]:
    """The localisation figures of one split worth a model's metadata:
    ``<split>_pointing_game_lungs`` and, per class, ``<split>_<class>_region_iou`` (the mean
    best-box IoU of the reported region) and the shares ``..._iou_ge_0.1`` and ``0.3``,
    with a ``_lungs`` suffix for the lung-restricted region."""
    out: dict[str, float] = {}
    lungs = loc.get("lungs")
    if lungs:
        rate = lungs["pointing_game"]["overall"]["rate"]
        if rate is not None:
            out[f"{split}_pointing_game_lungs"] = round(float(rate), 4)
    for variant, suffix in (("unrestricted", ""), ("lungs", "_lungs")):
        for name, entry in (loc.get(variant) or {}).get("region_iou", {}).items():
            if not entry["n"]:
                continue
            stem = f"{split}_{name.lower()}_region_iou"
            out[stem + suffix] = round(float(entry["mean_iou"]), 4)
            for level in metrics.IOU_LEVELS:
                out[f"{stem}_ge_{level:g}{suffix}"] = round(float(entry[f"iou_ge_{level:g}"]), 4)
    return out


def record_in_model(model_path: Path, report: dict[str, Any]) -> None:
    """Write the validation operating point and the headline figures into the model file."""
    from training.export import update_metadata

    op = report.get("operating_point") or {}
    updates: dict[str, Any] = {"metrics": report["headline"]}
    if op.get("threshold") is not None:
        updates["operating_point"] = OperatingPoint(
            tb_threshold=float(op["threshold"]),
            method=str(
                op.get("method", "highest threshold with TB sensitivity >= 0.90 on validation")
            ),
            target_sensitivity=float(op.get("target_sensitivity", TB_TARGET_SENSITIVITY)),
            sensitivity=float(op["sensitivity"]),
            specificity=float(op["specificity"]),
        )
    info = update_metadata(model_path, updates, ModelInfo)
    log.info("recorded operating point %s in %s", replace(info.operating_point), model_path)
