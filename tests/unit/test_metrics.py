"""Unit tests for training.metrics (scikit-learn is used here only as a cross-check)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from cxrd.preprocess import CAM_CELL_SHIFT
from training import metrics as m

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _random_case(
    seed: int, n: int = 400, decimals: int | None = 1
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.2 * np.eye(3)[y]
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    if decimals is not None:  # coarse rounding -> many tied scores
        p = np.round(p, decimals)
    return y, p


def _dumps(obj: object) -> str:
    return json.dumps(obj, allow_nan=False)


# ------------------------------------------------------------------ AUC / ROC / confusion


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_auc_and_confusion_match_sklearn(seed: int, decimals: int | None) -> None:
    y, p = _random_case(seed, decimals=decimals)
    report = m.classification_report(y, p, n_boot=50, seed=seed)
    for j, name in enumerate(m.CLASSES):
        expected = roc_auc_score(y == j, p[:, j])
        assert report["per_class"][name]["auc"] == pytest.approx(expected, abs=1e-12)
        fpr, tpr, thr = sk_roc_curve(y == j, p[:, j], drop_intermediate=False)
        roc = report["roc"][name]
        np.testing.assert_allclose(roc["fpr"], fpr)
        np.testing.assert_allclose(roc["tpr"], tpr)
        assert roc["thresholds"][0] is None  # +inf: nothing called positive
        np.testing.assert_allclose(roc["thresholds"][1:], thr[1:])
        # trapezoid area under our curve is the same Mann-Whitney AUC
        area = float(np.sum(np.diff(roc["fpr"]) * (np.add(roc["tpr"][1:], roc["tpr"][:-1]) / 2)))
        assert area == pytest.approx(expected, abs=1e-12)
    if decimals is None:
        macro = roc_auc_score(y, p, multi_class="ovr", average="macro")
        assert report["macro_auc"] == pytest.approx(macro, abs=1e-12)
    cm = confusion_matrix(y, p.argmax(axis=1), labels=[0, 1, 2])
    assert report["confusion_matrix"]["matrix"] == cm.tolist()
    assert report["confusion_matrix"]["labels"] == ["TB", "NTB", "NORM"]
    assert report["accuracy"] == pytest.approx(np.mean(y == p.argmax(axis=1)))
    _dumps(report)


def test_roc_auc_heavy_ties_and_degenerate() -> None:
    scores = np.array([0.0, 0.5, 0.5, 0.5, 1.0, 1.0, 0.0, 0.5])
    positive = np.array([0, 1, 0, 1, 1, 0, 0, 0], dtype=bool)
    assert m.roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))
    assert m.roc_auc(np.full(6, 0.3), [0, 1, 0, 1, 1, 0]) == pytest.approx(0.5)
    assert m.roc_auc([0.1, 0.2], [True, True]) is None
    assert m.roc_curve([0.1, 0.2], [False, False]) is None


# ----------------------------------------------------------------- per-class rates


def test_per_class_rates_hand_example() -> None:
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    p = np.full((8, 3), 0.1)
    p[np.arange(8), pred] = 0.8
    report = m.classification_report(y, p, n_boot=0)
    tb, ntb, norm = (report["per_class"][c] for c in m.CLASSES)
    assert (tb["sensitivity"], tb["specificity"], tb["ppv"], tb["npv"]) == pytest.approx(
        (2 / 3, 4 / 5, 2 / 3, 4 / 5)
    )
    assert (ntb["sensitivity"], ntb["specificity"], ntb["ppv"], ntb["npv"]) == pytest.approx(
        (1 / 2, 5 / 6, 1 / 2, 5 / 6)
    )
    assert (norm["sensitivity"], norm["specificity"], norm["ppv"], norm["npv"]) == pytest.approx(
        (2 / 3, 4 / 5, 2 / 3, 4 / 5)
    )
    assert [report["per_class"][c]["support"] for c in m.CLASSES] == [3, 2, 3]
    assert report["accuracy"] == pytest.approx(5 / 8)
    assert report["macro"]["sensitivity"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert tb["auc_ci95"] is None and tb["auc_n_boot"] == 0
    # Brier: each row contributes (0.8-1)^2 + 2*0.1^2 if right, 0.8^2 + 0.9^2 + 0.1^2 if wrong
    right, wrong = 0.04 + 0.02, 0.64 + 0.81 + 0.01
    assert report["brier"] == pytest.approx((5 * right + 3 * wrong) / 8)


def test_undefined_rates_are_none_and_json_clean() -> None:
    # No NORM cases and NORM never predicted: sensitivity, PPV and AUC are undefined.
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.6, 0.3, 0.1],
            [0.2, 0.7, 0.1],
            [0.5, 0.4, 0.1],
            [0.3, 0.6, 0.1],
            [0.1, 0.8, 0.1],
        ]
    )
    report = m.classification_report(y, p, n_boot=20)
    norm = report["per_class"]["NORM"]
    assert norm["sensitivity"] is None and norm["ppv"] is None and norm["f1"] is None
    assert norm["specificity"] == 1.0 and norm["npv"] is not None
    assert norm["auc"] is None and norm["auc_ci95"] is None and norm["auc_n_boot"] == 0
    assert report["roc"]["NORM"] is None
    assert report["macro_auc"] == pytest.approx(
        np.mean([roc_auc_score(y == 0, p[:, 0]), roc_auc_score(y == 1, p[:, 1])])
    )
    text = _dumps(report)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == report


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        m.classification_report(np.array([0, 1]), np.ones((2, 2)) / 2)  # 2 columns
    with pytest.raises(ValueError):
        m.classification_report(np.array([0, 3]), np.ones((2, 3)) / 3)  # label out of range
    with pytest.raises(ValueError):
        m.classification_report(np.array([0, 1]), np.array([[np.nan, 0.5, 0.5], [0.2] * 3]))


def test_to_jsonable_converts_numpy_and_nonfinite() -> None:
    obj = {1: np.float32(0.5), "a": np.array([1, 2]), "b": (np.int64(3), np.nan, np.inf)}
    assert m.to_jsonable(obj) == {"1": 0.5, "a": [1, 2], "b": [3, None, None]}


# ------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_contains_estimate_and_is_deterministic() -> None:
    y, p = _random_case(5, n=300, decimals=2)
    a = m.classification_report(y, p, n_boot=300, seed=7)
    b = m.classification_report(y, p, n_boot=300, seed=7)
    c = m.classification_report(y, p, n_boot=300, seed=8)
    assert a == b
    assert a["bootstrap"]["n_boot"] == 300
    for name in m.CLASSES:
        lo, hi = a["per_class"][name]["auc_ci95"]
        assert lo < a["per_class"][name]["auc"] < hi
        assert a["per_class"][name]["auc_n_boot"] == 300
    assert any(a["per_class"][k]["auc_ci95"] != c["per_class"][k]["auc_ci95"] for k in m.CLASSES)


def test_bootstrap_skips_single_class_resamples() -> None:
    # One TB case among five: about (4/5)^5 = 33% of resamples contain no TB case.
    y = np.array([0, 1, 1, 2, 2])
    p = np.array(
        [[0.6, 0.2, 0.2], [0.3, 0.5, 0.2], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7], [0.7, 0.1, 0.2]]
    )
    report = m.classification_report(y, p, n_boot=400, seed=0)
    used = report["per_class"]["TB"]["auc_n_boot"]
    assert 150 < used < 400
    lo, hi = report["per_class"]["TB"]["auc_ci95"]
    assert 0.0 <= lo <= hi <= 1.0


# ---------------------------------------------------------------------- calibration


def _probs_with_confidence(
    conf: float, n: int, n_correct: int
) -> tuple[list[int], list[list[float]]]:
    rest = (1 - conf) / 2
    probs = [[conf, rest, rest]] * n  # predicted class is 0
    labels = [0] * n_correct + [1] * (n - n_correct)
    return labels, probs


def test_ece_zero_for_perfect_calibration() -> None:
    y1, p1 = _probs_with_confidence(0.7, 10, 7)
    y2, p2 = _probs_with_confidence(0.4, 5, 2)
    y, p = np.array(y1 + y2), np.array(p1 + p2)
    assert m.expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    report = m.classification_report(y, p, n_boot=0)
    rel = report["reliability"]
    assert len(rel["bins"]) == 10 and rel["bins"][0] == [0.0, 0.1]
    assert rel["count"][3] == 5 and rel["count"][6] == 10 and sum(rel["count"]) == 15
    assert rel["accuracy"][6] == pytest.approx(0.7) and rel["confidence"][6] == pytest.approx(0.7)
    assert rel["confidence"][0] is None  # empty bin
    assert set(rel["per_class"]) == set(m.CLASSES)


def test_ece_known_value() -> None:
    y1, p1 = _probs_with_confidence(0.8, 4, 3)  # |0.75 - 0.8| = 0.05 over 4 cases
    y2, p2 = _probs_with_confidence(0.6, 2, 1)  # |0.5 - 0.6| = 0.1 over 2 cases
    y, p = np.array(y1 + y2), np.array(p1 + p2)
    expected = (4 * 0.05 + 2 * 0.1) / 6
    assert m.expected_calibration_error(y, p) == pytest.approx(expected)
    assert m.classification_report(y, p, n_boot=0)["ece"] == pytest.approx(expected)
    # one bin: |mean accuracy - mean confidence|
    assert m.expected_calibration_error(y, p, n_bins=1) == pytest.approx(abs(4 / 6 - 4.4 / 6))


# ------------------------------------------------------------------- operating point


def _tb_example() -> tuple[np.ndarray, np.ndarray]:
    tb_scores = [0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50]
    other_scores = [0.10, 0.20, 0.30, 0.58, 0.62, 0.40]
    scores = np.array(tb_scores + other_scores)
    y = np.array([0] * 10 + [1, 2, 1, 2, 1, 2])
    p = np.stack([scores, (1 - scores) / 2, (1 - scores) / 2], axis=1)
    return y, p


def test_operating_point_highest_threshold() -> None:
    y, p = _tb_example()
    op = m.choose_tb_operating_point(y, p)
    # 9 of 10 TB cases needed -> the 9th highest TB score
    assert op["threshold"] == 0.55
    assert op["sensitivity"] == pytest.approx(0.9)
    assert op["specificity"] == pytest.approx(4 / 6)  # 0.58 and 0.62 are called TB
    assert op["target_sensitivity"] == 0.9
    assert op["method"] == "highest threshold with TB sensitivity >= 0.90 on validation"
    assert "reason" not in op
    # the next higher distinct score gives a sensitivity below the target
    scores = p[:, 0]
    higher = np.unique(scores[scores > op["threshold"]]).min()
    assert higher == 0.58
    assert m.apply_operating_point(y, p, higher)["sensitivity"] < 0.9
    # ... and the chosen threshold reproduces itself when applied
    applied = m.apply_operating_point(y, p, op["threshold"])
    assert applied["sensitivity"] == op["sensitivity"]
    assert applied["specificity"] == op["specificity"]
    assert (applied["n_pos"], applied["n_neg"]) == (10, 6)
    _dumps(op)


def test_operating_point_brute_force_and_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        y, p = _random_case(int(rng.integers(1 << 30)), n=60, decimals=1)
        if not np.any(y == 0):
            continue
        op = m.choose_tb_operating_point(y, p)
        ok = [t for t in np.unique(p[:, 0]) if np.mean(p[y == 0, 0] >= t) >= 0.9]
        assert op["threshold"] == max(ok)
    # ties at the threshold: target 1.0 -> the lowest TB score
    y, p = _tb_example()
    assert m.choose_tb_operating_point(y, p, target_sensitivity=1.0)["threshold"] == 0.50


def test_operating_point_on_test_set() -> None:
    y, p = _tb_example()
    t = m.choose_tb_operating_point(y, p)["threshold"]
    y_test = np.array([0, 0, 0, 0, 1, 2, 1])
    s_test = np.array([0.9, 0.56, 0.55, 0.2, 0.6, 0.1, 0.3])
    p_test = np.stack([s_test, 1 - s_test, np.zeros_like(s_test)], axis=1)
    res = m.apply_operating_point(y_test, p_test, t)
    assert res["threshold"] == t
    assert res["sensitivity"] == pytest.approx(3 / 4)
    assert res["specificity"] == pytest.approx(2 / 3)
    assert res["ppv"] == pytest.approx(3 / 4) and res["npv"] == pytest.approx(2 / 3)
    assert (res["n_pos"], res["n_neg"]) == (4, 3)


def test_operating_point_without_positives() -> None:
    y = np.array([1, 2, 1])
    p = np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]])
    op = m.choose_tb_operating_point(y, p)
    assert op["threshold"] is None and op["sensitivity"] is None
    assert isinstance(op["reason"], str) and op["reason"]
    res = m.apply_operating_point(y, p, op["threshold"])
    assert res["sensitivity"] is None and res["reason"]
    # applying a real threshold where there are no TB cases: sensitivity undefined
    res = m.apply_operating_point(y, p, 0.25)
    assert res["sensitivity"] is None and res["specificity"] == pytest.approx(2 / 3)
    _dumps(op)
    _dumps(res)
    with pytest.raises(ValueError):
        m.choose_tb_operating_point(y, p, target_sensitivity=0.0)


# ----------------------------------------------------------------------- CAM pointing


def _centre(i: int, n_cells: int, size: int) -> float:
    """Image coordinate of CAM cell ``i``'s receptive-field centre (pixel centres aligned)."""
    return (i + 0.5 + CAM_CELL_SHIFT) * size / n_cells - 0.5


def test_cam_peak_maps_to_its_receptive_field_centre() -> None:
    cam = np.zeros((3, 3))
    cam[1, 1] = 1.0
    for rows, cols in ((90, 90), (90, 150)):
        x, y = m.cam_argmax_location(cam, rows, cols)
        assert abs(x - _centre(1, 3, cols)) <= 0.5 and abs(y - _centre(1, 3, rows)) <= 0.5
    # 32 image pixels per cell: the block's centre is 47.5, the receptive field's 63
    x, y = m.cam_argmax_location(cam, 96, 96)
    assert abs(x - 63.0) <= 0.5 and abs(y - 63.0) <= 0.5
    cam = np.zeros((5, 5))
    cam[2, 3] = 1.0
    x, y = m.cam_argmax_location(cam, 50, 100)
    assert abs(x - _centre(3, 5, 100)) <= 0.5 and abs(y - _centre(2, 5, 50)) <= 0.5


def test_cam_hit_inside_outside_and_tolerance() -> None:
    cam = np.zeros((4, 4))
    cam[1, 2] = 1.0  # rows 400, cols 800: the cell's centre is at x = 596.4, y = 197.9
    x, y = m.cam_argmax_location(cam, 400, 800)
    assert abs(x - _centre(2, 4, 800)) <= 0.5 and abs(y - _centre(1, 4, 400)) <= 0.5
    box = (550, 150, 650, 250)
    assert m.cam_hit(cam, 400, 800, [box])
    # the block of the cell, without the receptive-field shift, is missed
    assert not m.cam_hit(cam, 400, 800, [(400, 100, 590, 190)])
    assert not m.cam_hit(cam, 400, 800, [(0, 0, 100, 100), (700, 100, 800, 200)])
    assert m.cam_hit(cam, 400, 800, [(0, 0, 100, 100), box])
    # inclusive edges, then a box one pixel beyond the peak, rescued by the tolerance
    assert m.cam_hit(cam, 400, 800, [(x, y, x + 10, y + 10)])
    assert not m.cam_hit(cam, 400, 800, [(x + 1, y + 1, x + 50, y + 50)])
    assert m.cam_hit(cam, 400, 800, [(x + 1, y + 1, x + 50, y + 50)], tolerance=1.0)
    # swapped corners are normalised; no boxes is no hit
    assert m.cam_hit(cam, 400, 800, [(box[2], box[3], box[0], box[1])])
    assert not m.cam_hit(cam, 400, 800, [])
    # the same geometry read from a (h, w, 3) CAM by class index
    cam3 = np.zeros((4, 4, 3))
    cam3[:, :, 1] = cam
    cam3[0, 0, 0] = 5.0
    assert m.cam_hit(cam3, 400, 800, [box], class_index=1)
    assert not m.cam_hit(cam3, 400, 800, [box], class_index=0)
    with pytest.raises(ValueError):
        m.cam_hit(cam3, 400, 800, [box])


def test_cam_corners_non_square() -> None:
    rows, cols = 100, 200  # 2x2 CAM: each cell covers 50 rows x 100 cols
    for r in (0, 1):
        for c in (0, 1):
            cam = np.zeros((2, 2))
            cam[r, c] = 1.0
            x, y = m.cam_argmax_location(cam, rows, cols)
            assert 0 <= x <= cols - 1 and 0 <= y <= rows - 1
            # a border cell's peak is its receptive field's centre, not a point of the flat
            # (clamped) heatmap between it and the image border; the last cell's centre is
            # within a pixel of the image's last pixel
            assert (x, y) == (_centre(c, 2, cols), _centre(r, 2, rows))
            # each peak stays in its own quadrant
            assert (x < cols / 2) == (c == 0) and (y < rows / 2) == (r == 0)


def test_cam_tied_cells_resolve_to_the_middle_one() -> None:
    x, y = m.cam_argmax_location(np.full((3, 3), 0.7), 90, 150)  # a constant CAM
    assert (x, y) == (_centre(1, 3, 150), _centre(1, 3, 90))
    cam = np.zeros((1, 5))
    cam[0, 1:4] = 2.0  # three equal cells in a row
    assert m.cam_argmax_location(cam, 10, 100)[0] == _centre(2, 5, 100)


def test_cam_peak_on_a_large_image() -> None:
    cam = np.zeros((16, 16))
    cam[4, 11] = 1.0
    rows, cols = 3000, 4500
    x, y = m.cam_argmax_location(cam, rows, cols)
    assert np.isclose(x, _centre(11, 16, cols)) and np.isclose(y, _centre(4, 16, rows))


def test_cam_peak_offsets_measure_a_systematic_offset() -> None:
    # 8 x 8 cells on 400 x 800 (rows x cols): one cell is 50 rows x 100 cols
    rows, cols, n = 400, 800, 8
    cams, boxes = [], []
    for k in range(3):
        cam = np.zeros((n, n))
        cam[2 + k, 1 + k] = 1.0  # the peak: cell (row 2 + k, column 1 + k)
        x, y = _centre(1 + k, n, cols), _centre(2 + k, n, rows)
        # the lesion two cells left of and one above the peak, plus a far decoy box
        cx, cy = x - 2 * cols / n, y - rows / n
        boxes.append([(cx - 20, cy - 10, cx + 20, cy + 10), (700, 350, 790, 390)])
        cams.append(cam)
    labels = ["TB", "TB", "NTB"]
    got = m.pointing_game(cams, [(rows, cols)] * 3, boxes, labels)["peak_offset"]
    assert got["TB"]["n"] == 2 and got["NTB"]["n"] == 1
    for name in ("TB", "NTB"):
        # the peak maps to the nearest pixel: within one working pixel of (2, 1) cells
        assert np.allclose(got[name]["median_cells"], (2.0, 1.0), atol=0.02), got
        assert np.allclose(got[name]["std_cells"], 0.0, atol=0.02)
    # no boxes, other classes: not counted
    none = m.pointing_game(cams, [(rows, cols)] * 3, [[], [], []],
                           ["TB", "NORM", "TB"])["peak_offset"]
    assert none["TB"] == {"n": 0, "median_cells": None, "std_cells": None}
    _dumps(none)


def test_pointing_game_tally() -> None:
    hit = np.zeros((4, 4))
    hit[1, 2] = 1.0
    miss = np.zeros((4, 4))
    miss[3, 0] = 1.0
    box = [(550, 150, 650, 250)]
    result = m.pointing_game(
        cams=[hit, miss, hit, hit, hit],
        sizes=[(400, 800)] * 5,
        boxes=[box, box, box, [], box],
        labels=["TB", "TB", "NTB", "TB", "NORM"],
    )
    assert result["TB"] == {"hits": 1, "total": 2, "rate": 0.5}
    assert result["NTB"] == {"hits": 1, "total": 1, "rate": 1.0}
    assert result["overall"] == {"hits": 2, "total": 3, "rate": pytest.approx(2 / 3)}
    empty = m.pointing_game([], [], [], [])
    assert empty["TB"]["rate"] is None and empty["overall"]["total"] == 0
    # (h, w, 3) CAMs with class indices, integer labels
    cam3 = np.zeros((4, 4, 3))
    cam3[:, :, 0] = hit
    cam3[:, :, 1] = miss
    result = m.pointing_game(
        [cam3, cam3], [(400, 800)] * 2, [box, box], [0, 1], class_indices=[0, 1]
    )
    assert result["TB"]["hits"] == 1 and result["NTB"]["hits"] == 0
    _dumps(result)


# ---------------------------------------------------------------------------- plots


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000


def test_plots_write_png(tmp_path: Path) -> None:
    y, p = _random_case(11, n=200, decimals=None)
    report = json.loads(_dumps(m.classification_report(y, p, n_boot=50)))
    report["tb_operating_point"] = m.choose_tb_operating_point(y, p)
    m.plot_roc(report, tmp_path / "roc.png", "ROC - validation")
    m.plot_confusion(report, tmp_path / "cm.png", "Confusion - validation")
    m.plot_reliability(report, tmp_path / "sub" / "rel.png", "Reliability - validation")
    for name in ("roc.png", "cm.png", "sub/rel.png"):
        _assert_png(tmp_path / name)


def test_plots_tolerate_missing_class(tmp_path: Path) -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]] * 2)
    report = m.classification_report(y, p, n_boot=10)
    m.plot_roc(report, tmp_path / "roc.png", "ROC")
    m.plot_confusion(report, tmp_path / "cm.png", "Confusion")
    m.plot_reliability(report, tmp_path / "rel.png", "Reliability")
    for name in ("roc.png", "cm.png", "rel.png"):
        _assert_png(tmp_path / name)


def test_best_box_iou_reads_boxes_as_inclusive_pixels() -> None:
    # The region covers columns 10..19 and rows 0..9 (edges 10-20, 0-10); the inclusive
    # box [10, 0, 19, 9] is the same pixels.
    assert m.best_box_iou((10.0, 0.0, 20.0, 10.0), [[10, 0, 19, 9]]) == pytest.approx(1.0)
    # half of it: the left half of the region
    assert m.best_box_iou((10.0, 0.0, 20.0, 10.0), [[10, 0, 14, 9]]) == pytest.approx(0.5)
    # the best of several boxes, corners in any order; disjoint boxes give 0
    boxes = [[100, 100, 120, 120], [19, 9, 15, 0]]
    assert m.best_box_iou((10.0, 0.0, 20.0, 10.0), boxes) == pytest.approx(0.5)
    assert m.best_box_iou((0.0, 0.0, 5.0, 5.0), [[50, 50, 60, 60]]) == 0.0
    # no region reported (NORM), or no box: 0
    assert m.best_box_iou(None, [[0, 0, 9, 9]]) == 0.0
    assert m.best_box_iou((0.0, 0.0, 5.0, 5.0), []) == 0.0
    # a zero-area region on a zero-area union cannot divide by zero
    assert m.best_box_iou((3.0, 3.0, 3.0, 3.0), [[0, 0, 0, 0]]) == 0.0


def test_region_overlap_per_class() -> None:
    box = [[0, 0, 9, 9]]
    result = m.region_overlap(
        regions=[(0.0, 0.0, 10.0, 10.0), (0.0, 0.0, 10.0, 20.0), None, (0.0, 0.0, 10.0, 10.0),
                 (0.0, 0.0, 10.0, 10.0), (0.0, 0.0, 40.0, 40.0)],
        boxes=[box, box, box, [], box, box],
        labels=["TB", "TB", "TB", "TB", "NORM", 1],
    )
    tb = result["TB"]
    assert tb["n"] == 3 and tb["no_region"] == 1
    assert tb["mean_iou"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert tb["mean_iou_reported"] == pytest.approx(0.75)
    assert tb["iou_ge_0.1"] == pytest.approx(2 / 3) and tb["iou_ge_0.3"] == pytest.approx(2 / 3)
    ntb = result["NTB"]
    assert ntb["n"] == 1 and ntb["mean_iou"] == pytest.approx(100 / 1600)
    assert ntb["iou_ge_0.1"] == 0.0
    empty = m.region_overlap([], [], [])
    assert empty["TB"] == {"n": 0, "mean_iou": None, "iou_ge_0.1": None, "iou_ge_0.3": None,
                           "no_region": 0, "mean_iou_reported": None}
    _dumps(result)
    with pytest.raises(ValueError, match="same length"):
        m.region_overlap([None], [], [])
