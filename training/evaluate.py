"""Evaluation of an exported ONNX model, through the same session code the daemon uses.

Runs on the validation split and the external test split of a manifest, writes
``report.json`` and PNG plots, chooses the TB operating point on validation, and (on
request) records the operating point and headline figures in the model's metadata.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cxrd.infer import Classifier
from cxrd.modelinfo import CLASS_NAMES, ModelInfo, OperatingPoint
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


def _pointing(data: ImageSet, probs: npt.NDArray[Any], cams: npt.NDArray[Any]) -> dict[str, Any]:
    """Pointing game with the predicted class's CAM, on images that have lesion boxes."""
    sel = [i for i, r in enumerate(data.records) if r.boxes and json.loads(r.boxes)]
    if not sel:
        return {}
    pred = probs.argmax(axis=1)
    return metrics.pointing_game(
        [cams[i][..., pred[i]] for i in sel],
        [(int(data.sizes[i][0]), int(data.sizes[i][1])) for i in sel],
        [[tuple(b) for b in json.loads(data.records[i].boxes)] for i in sel],
        [data.records[i].label for i in sel],
    )


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
) -> dict[str, Any]:
    """Evaluate on the ``val`` and ``test`` splits; returns (and writes) the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clf = Classifier(model_path, ["CPUExecutionProvider"])
    report: dict[str, Any] = {
        "model": clf.info.display_name,
        "device_uid": clf.info.device_uid,
        "splits": {},
    }
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
    op = report.get("operating_point_on_test")
    if op:
        out["test_tb_sensitivity_at_op"] = float(op["sensitivity"])
        out["test_tb_specificity_at_op"] = float(op["specificity"])
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
