"""``cxrd predict``: classify files offline with the same stages as the node, no daemon.

DICOM inputs go through the node's steps: the classifier, and the lung segmenter unless
``[model] segmenter = "off"``: the lung-field gate (an image without lungs is reported
skipped, ``no-lung-fields``, and written nothing), the region restricted to the lungs,
a heatmap SC and (with ``[results] segmentation``) a lung SEG each, and one SR per study
in the output folder. PNG and JPEG inputs are classified and printed only (an SR needs a
DICOM source to reference).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from cxrd.config import Config
from cxrd.errors import CxrdError
from cxrd.infer import Classifier
from cxrd.modelinfo import CLASS_NAMES
from cxrd.preprocess import preprocess_file
from cxrd.uids import derived_uid


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def predict_files(config: Config, files: list[Path], out: Path, *, as_json: bool = False) -> int:
    """Classify ``files``; returns the exit code (1 if any file could not be classified)."""
    from cxrd.dicom import SECONDARY_CAPTURE, SEGMENTATION
    from cxrd.durable import save_dataset
    from cxrd.findings import ImageFindings, decide_class
    from cxrd.infer import Segmenter
    from cxrd.lungs import lung_gate
    from cxrd.seg import LungSegEncoder
    from cxrd.sr import build_sr
    from cxrd.worker import (
        heatmap_uids,
        lung_fields,
        prepare,
        seg_uids,
        segmenter_input,
        sr_series_uid,
        write_heatmap,
        write_seg,
    )

    m = config.model
    clf = Classifier(m.path, m.providers, m.intra_op_threads)
    model = clf.info
    seg = Segmenter(m.segmenter, m.providers, m.intra_op_threads) if m.uses_segmenter else None
    encoder = (LungSegEncoder(seg.info)
               if seg is not None and config.results.segmentation else None)
    print(f"model: {model.display_name} providers: {','.join(clf.providers)}", file=sys.stderr)
    if model.demo:
        print("DEMO model: trained on synthetic phantoms, not for clinical use", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    by_study: dict[str, list[ImageFindings]] = defaultdict(list)
    #: Each study's SCs and SEGs, which its SR lists as evidence (SOP class, series, instance).
    related: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    failed = 0
    for path in files:
        row: dict[str, object] = {"file": str(path)}
        try:
            if _is_dicom(path):
                prep = prepare(path, model)
                probs, cam = clf.run(prep.model_input[None])
                seg_probs = None
                if seg is not None:
                    seg_probs = seg.run(segmenter_input(prep, model, seg.info)[None])[0]
                    prep.lung_grid = lung_fields(seg_probs, seg.info)
                    why = lung_gate(prep.lung_grid, m.min_lung_fraction)
                    if why is not None:
                        row.update({"skipped": "no-lung-fields", "detail": why})
                        print(json.dumps(row) if as_json
                              else f"{path}: skipped (no-lung-fields): {why}")
                        continue
                findings = ImageFindings.of(
                    prep.dataset, probs[0], cam[0], model.operating_point.tb_threshold,
                    lungs=prep.lung_grid, margin=config.results.lung_margin)
                study = str(prep.dataset.StudyInstanceUID)
                sc_uid, sc_path = write_heatmap(
                    prep, probs[0], cam[0], model, out, 1,
                    max_side=config.results.heatmap_max_side,
                    compression=config.results.heatmap_compression, region=findings.region,
                    report_series_uid=sr_series_uid(study, model))
                by_study[study].append(findings)
                source = str(prep.dataset.SOPInstanceUID)
                related[study].append(
                    (SECONDARY_CAPTURE, heatmap_uids(source, study, 1, model)[0], sc_uid))
                dicom = True
                row["sc"] = str(sc_path)
                if encoder is not None and seg_probs is not None:
                    seg_uid, seg_path = write_seg(
                        prep, seg_probs, encoder, out, 1,
                        report_series_uid=sr_series_uid(study, model))
                    related[study].append((SEGMENTATION, seg_uids(source, study, 1,
                                                                  encoder.model)[0], seg_uid))
                    row["seg"] = str(seg_path)
            else:
                probs, cam = clf.run(preprocess_file(
                    path, clf.input_size, preprocessing=model.preprocessing)[None])
                dicom = False
        except (CxrdError, OSError) as exc:
            failed += 1
            row["error"] = str(exc)
            print(json.dumps(row) if as_json else f"{path}: cannot classify: {exc}")
            continue
        p = probs[0]
        decision = (decide_class(p, model.operating_point.tb_threshold) if dicom
                    else int(np.argmax(p)))
        row.update({c: round(float(v), 4) for c, v in zip(CLASS_NAMES, p, strict=True)})
        row["tb_threshold"] = model.operating_point.tb_threshold
        row["tb"] = bool(p[0] >= model.operating_point.tb_threshold)
        row["top"] = CLASS_NAMES[int(np.argmax(p))]
        if as_json:
            print(json.dumps(row))
        else:
            at = model.operating_point.tb_threshold
            note = f" (TB at threshold {at:.3f})" if row["tb"] else ""
            print(
                f"{path}: TB {p[0]:.3f}  NTB {p[1]:.3f}  NORM {p[2]:.3f}  -> "
                f"{CLASS_NAMES[decision]}{note}"
            )
    for study_uid, results in by_study.items():
        sr = build_sr(
            results,
            model,
            sop_class=config.results.sr_sop_class.value,
            sop_instance_uid=derived_uid(
                "predict-sr", study_uid, *[r.header.SOPInstanceUID for r in results]
            ),
            series_instance_uid=sr_series_uid(study_uid, model),
            related=related[study_uid],
        )
        path = save_dataset(sr, out)
        print(f"SR for study {study_uid}: {path}", file=sys.stderr)
    return 1 if failed else 0
