"""Localisation in ``python -m training evaluate``: the pointing game and the reported
region's IoU with the lesion boxes, with and without the lung fields, through the shipped
DEMO classifier and segmenter (onnxruntime; no TensorFlow needed), on a TBX11K-shaped tree
(its real layout: ``imgs/{health,sick,tb}``, the official lists, Pascal VOC TB boxes)
and on the demo recipe's held-out phantoms."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cxrd.findings import LUNG_MARGIN
from cxrd.modelinfo import (
    demo_model_path,
    demo_segmenter_path,
    read_model_info,
    read_segmentation_info,
)
from training import phantoms, sources
from training.cli import main
from training.demo import demo_localisation

FRESH_SEED = 626262
README = Path(__file__).resolve().parents[2] / "README.md"
_VOC = """<annotation><folder>tb</folder><filename>{name}.png</filename>
  <size><width>{cols}</width><height>{rows}</height><depth>1</depth></size>{objects}
</annotation>"""
_OBJECT = """<object><name>ActiveTuberculosis</name><bndbox><xmin>{0}</xmin><ymin>{1}</ymin>
  <xmax>{2}</xmax><ymax>{3}</ymax></bndbox></object>"""


def tbx11k_tree(root: Path, n: int) -> tuple[Path, int]:
    """A TBX11K tree of 512 x 512 phantoms (TB in ``tb/`` with VOC boxes, NTB in ``sick/``
    without, as TBX11K has none for them, NORM in ``health/``), every image on the
    official validation list; returns the root and the number of TB images."""
    work = root / "ph"
    truth = phantoms.generate_images(work, n, FRESH_SEED, fmt="png", size=(512, 512))
    dataset = root / "TBX11K"
    folder = {"TB": "tb", "NTB": "sick", "NORM": "health"}
    listed = []
    for i, g in enumerate(truth):
        rel = f"{folder[g.label]}/{folder[g.label][0]}{i:04d}.png"
        target = dataset / "imgs" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / g.path, target)
        listed.append(rel)
        if g.label == "TB":
            xml = dataset / "annotations" / "xml" / f"{target.stem}.xml"
            xml.parent.mkdir(parents=True, exist_ok=True)
            # VOC coordinates are pixel edges: an inclusive box ends one pixel further.
            objects = "".join(_OBJECT.format(x0, y0, x1 + 1, y1 + 1) for x0, y0, x1, y1 in g.boxes)
            xml.write_text(_VOC.format(name=target.stem, rows=g.rows, cols=g.cols,
                                       objects=objects))
    lists = dataset / "lists"
    lists.mkdir(parents=True)
    (lists / "TBX11K_train.txt").write_text("")
    (lists / "TBX11K_val.txt").write_text("\n".join(listed) + "\n")
    return dataset, sum(g.label == "TB" for g in truth)


def test_evaluate_scores_tbx11k_tb_boxes_with_the_lungs(tmp_path: Path) -> None:
    dataset, n_tb = tbx11k_tree(tmp_path, 18)
    manifest = tmp_path / "manifest.csv"
    assert main(["index", "--source", f"tbx11k={dataset}", "--out", str(manifest)]) == 0
    records = sources.read_manifest(manifest)
    assert sum(bool(r.boxes) for r in records) == n_tb > 0
    # All on the validation split: the localisation is scored on val and test alike.
    sources.write_manifest([r.__class__(**{**r.__dict__, "split": "val"}) for r in records],
                           manifest)
    before = demo_model_path().read_bytes()
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(demo_model_path()), "--manifest", str(manifest),
                 "--out", str(out), "--bootstrap", "20",
                 "--segmenter", str(demo_segmenter_path())]) == 0
    assert demo_model_path().read_bytes() == before  # no --write-metadata: untouched
    report = json.loads((out / "report.json").read_text())
    assert report["segmenter"] == read_segmentation_info(demo_segmenter_path()).display_name
    loc = report["splits"]["val"]["localisation"]
    assert loc["images"] == n_tb and loc["lung_margin"] == LUNG_MARGIN
    assert loc["tb_threshold"] == read_model_info(demo_model_path()).operating_point.tb_threshold
    for variant in ("unrestricted", "lungs"):
        tb = loc[variant]["region_iou"]["TB"]
        assert tb["n"] == n_tb and loc[variant]["region_iou"]["NTB"]["n"] == 0
        # the demo model finds the phantoms' lesions: most reported regions overlap a box
        assert 0.2 < tb["mean_iou"] <= 1 and tb["iou_ge_0.1"] >= 0.6, tb
        assert loc[variant]["pointing_game"]["TB"]["total"] == n_tb
    headline = report["headline"]
    for key in ("val_tb_region_iou", "val_tb_region_iou_ge_0.1", "val_tb_region_iou_ge_0.3",
                "val_tb_region_iou_lungs", "val_pointing_game_lungs"):
        assert 0.0 <= headline[key] <= 1.0, key
    assert "val_ntb_region_iou" not in headline  # TBX11K boxes its TB images only

    # Without a segmenter: the unrestricted figures only.
    assert main(["evaluate", "--model", str(demo_model_path()), "--manifest", str(manifest),
                 "--out", str(tmp_path / "plain"), "--bootstrap", "20"]) == 0
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert "lungs" not in plain["splits"]["val"]["localisation"]
    assert (plain["splits"]["val"]["localisation"]["unrestricted"]
            == loc["unrestricted"])


def test_the_lungs_keep_the_demo_models_pointing_game(tmp_path: Path) -> None:
    """On fresh phantoms (a seed the recipes never used) the lung-restricted pointing game
    is at least the unrestricted one, and the restricted region overlaps the lesions at
    least as well."""
    figures = demo_localisation(tmp_path, n_test=60, seed=FRESH_SEED, n_boot=20,
                                write_metadata=False)
    assert figures["test_pointing_game_lungs"] >= figures["test_pointing_game"] >= 0.85
    assert figures["test_tb_region_iou_lungs"] >= figures["test_tb_region_iou"] - 0.02


def test_shipped_models_and_readme_carry_the_localisation_figures() -> None:
    """``python -m training demo-localisation --write-metadata`` recorded the held-out
    figures in both shipped models, and the README quotes them."""
    clf = read_model_info(demo_model_path()).metrics
    seg = read_segmentation_info(demo_segmenter_path()).metrics
    assert clf["test_lung_margin"] == seg["localisation_lung_margin"] == LUNG_MARGIN
    assert clf["test_pointing_game_lungs"] >= clf["test_pointing_game"]
    assert seg["localisation_pointing_game_lungs"] == clf["test_pointing_game_lungs"]
    assert seg["localisation_tb_region_iou_lungs"] == clf["test_tb_region_iou_lungs"]
    text = " ".join(README.read_text(encoding="utf-8").split())
    phrase = (r"lung-restricted pointing game is ([\d.]+) \((\d+)/(\d+)\), as without the "
              r"lungs \(([\d.]+)\); the TB region's mean IoU with its best-matching lesion box "
              r"is ([\d.]+) \(([\d.]+) without the lungs\), ([\d.]+) of TB images reach IoU "
              r">= 0.1 and ([\d.]+) reach 0.3")
    quoted = re.search(phrase, text)
    assert quoted is not None, "README lost the localisation figures"
    hits, total = int(quoted.group(2)), int(quoted.group(3))
    assert float(quoted.group(1)) == pytest.approx(clf["test_pointing_game_lungs"], abs=5e-4)
    assert hits / total == pytest.approx(clf["test_pointing_game_lungs"], abs=1e-4)
    assert float(quoted.group(4)) == pytest.approx(clf["test_pointing_game"], abs=5e-4)
    assert float(quoted.group(5)) == pytest.approx(clf["test_tb_region_iou_lungs"], abs=5e-4)
    assert float(quoted.group(6)) == pytest.approx(clf["test_tb_region_iou"], abs=5e-4)
    assert float(quoted.group(7)) == pytest.approx(clf["test_tb_region_iou_ge_0.1_lungs"],
                                                   abs=5e-4)
    assert float(quoted.group(8)) == pytest.approx(clf["test_tb_region_iou_ge_0.3_lungs"],
                                                   abs=5e-4)
