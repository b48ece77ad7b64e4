"""Evaluation metrics for the 3-class chest X-ray classifier (TB / NTB / NORM).

Everything here is plain numpy (no scikit-learn) and every report is JSON-serialisable:
python ``int``/``float``/``None`` only, a quantity that is undefined (a division by zero,
an AUC with a single class present) is ``None``, never NaN.

Conventions
-----------
* ``y_true`` holds integer class indices into ``classes`` (default :data:`CLASSES`);
  ``probs`` is an ``(N, K)`` array of class probabilities in the same order.
* Per-class sensitivity / specificity / PPV / NPV are one-vs-rest, computed from the
  argmax prediction.
* ROC AUC is one-vs-rest on ``probs[:, k]``; it equals the Mann-Whitney U statistic
  divided by ``n_pos * n_neg``, ties counting 1/2 (identical to scikit-learn's
  ``roc_auc_score``).  The 95% CI is a seeded percentile bootstrap over cases; resamples
  in which the class is absent (or is the only class) are skipped and the number used
  is reported as ``auc_n_boot``.
* The confusion matrix has rows = truth, columns = prediction.
* Calibration bins are equal-width and right-closed, ``(lo, hi]``, the first one also
  holding 0.  ECE uses the top-label confidence (max probability) against accuracy.
  The Brier score is the multi-class one, ``mean_i sum_k (p_ik - [y_i == k])^2``
  (range 0..2).
* The TB operating point is a threshold ``t`` on ``P(TB)``; a case is called TB when
  ``P(TB) >= t``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cxrd.preprocess import CAM_CELL_SHIFT

__all__ = [
    "CLASSES",
    "WHO_TB_TRIAGE_SENSITIVITY",
    "apply_operating_point",
    "best_box_iou",
    "cam_argmax_location",
    "cam_hit",
    "choose_tb_operating_point",
    "classification_report",
    "expected_calibration_error",
    "plot_confusion",
    "plot_reliability",
    "plot_roc",
    "pointing_game",
    "region_overlap",
    "roc_auc",
    "roc_curve",
    "to_jsonable",
]

CLASSES: tuple[str, ...] = ("TB", "NTB", "NORM")
WHO_TB_TRIAGE_SENSITIVITY = 0.90

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Upper bound on the number of elements of one (resamples x cases) weight matrix.
_BOOT_CHUNK_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------- helpers


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` (nested dicts/lists/tuples, numpy scalars/arrays) to plain JSON types.

    Non-finite floats become ``None``; mapping keys become strings.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def _safe_div(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _as_labels_probs(
    y_true: npt.ArrayLike, probs: npt.ArrayLike, n_classes: int | None = None
) -> tuple[IntArray, FloatArray]:
    """Validate and convert ``(y_true, probs)``; returns int64 labels and float64 probs."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be a 2-D (N, K) array, got shape {p.shape}")
    n, k = p.shape
    if n == 0:
        raise ValueError("no cases (probs has 0 rows)")
    if n_classes is not None and k != n_classes:
        raise ValueError(f"probs has {k} columns, expected {n_classes}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    y_raw = np.asarray(y_true)
    if y_raw.ndim != 1 or y_raw.shape[0] != n:
        raise ValueError(f"y_true must have shape ({n},), got {y_raw.shape}")
    if y_raw.dtype.kind == "f":
        if not np.all(np.isfinite(y_raw)) or not np.all(y_raw == np.round(y_raw)):
            raise ValueError("y_true must hold integer class indices")
    elif y_raw.dtype.kind not in "iu":
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_raw.dtype}")
    y = y_raw.astype(np.int64)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true values must lie in [0, {k - 1}]")
    return y, p


def _binary_rates(pos: BoolArray, pred_pos: BoolArray) -> dict[str, Any]:
    tp = int(np.count_nonzero(pos & pred_pos))
    fn = int(np.count_nonzero(pos & ~pred_pos))
    fp = int(np.count_nonzero(~pos & pred_pos))
    tn = int(np.count_nonzero(~pos & ~pred_pos))
    return {
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "ppv": _safe_div(tp, tp + fp),
        "npv": _safe_div(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


# ----------------------------------------------------------------------- ROC / AUC


def roc_curve(
    scores: npt.ArrayLike, positive: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray] | None:
    """ROC curve of ``scores`` for the binary truth ``positive``.

    Returns ``(fpr, tpr, thresholds)``, one point per distinct score (descending), with a
    leading ``(0, 0)`` point at threshold ``+inf`` (nothing called positive), or ``None``
    when only one class is present.  A case is called positive when ``score >= threshold``.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    if s.shape != pos.shape:
        raise ValueError("scores and positive must have the same length")
    n_pos = int(np.count_nonzero(pos))
    n_neg = int(pos.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    pos_sorted = pos[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(pos_sorted)[last_of_group].astype(np.float64)
    fps = (last_of_group + 1).astype(np.float64) - tps
    tpr = np.r_[0.0, tps] / n_pos
    fpr = np.r_[0.0, fps] / n_neg
    thresholds = np.r_[np.inf, s_sorted[last_of_group]]
    return fpr, tpr, thresholds


class _AucPrep:
    """Sort order and tie groups of one score vector, reused across bootstrap resamples."""

    def __init__(self, scores: FloatArray, positive: BoolArray) -> None:
        self.order = np.argsort(scores, kind="mergesort")
        s_sorted = scores[self.order]
        self.starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
        self.pos = positive[self.order].astype(np.float64)

    def auc(self, weights: FloatArray) -> FloatArray:
        """AUC for each row of case ``weights`` (shape (B, N)); NaN where undefined.

        With integer weights (bootstrap counts) this is the Mann-Whitney AUC of the
        resample: P(score_pos > score_neg) + 1/2 P(tie).
        """
        w = weights[:, self.order]
        w_pos = np.add.reduceat(w * self.pos, self.starts, axis=1)
        w_neg = np.add.reduceat(w * (1.0 - self.pos), self.starts, axis=1)
        neg_below = np.cumsum(w_neg, axis=1) - w_neg
        num = np.sum(w_pos * (neg_below + 0.5 * w_neg), axis=1)
        den = np.sum(w_pos, axis=1) * np.sum(w_neg, axis=1)
        out = np.full(num.shape, np.nan)
        ok = den > 0
        out[ok] = num[ok] / den[ok]
        return out


def roc_auc(scores: npt.ArrayLike, positive: npt.ArrayLike) -> float | None:
    """Mann-Whitney ROC AUC (ties count 1/2); ``None`` when only one class is present."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    if s.shape != pos.shape:
        raise ValueError("scores and positive must have the same length")
    if s.size == 0:
        return None
    value = _AucPrep(s, pos).auc(np.ones((1, s.size)))[0]
    return float(value) if math.isfinite(value) else None


def _bootstrap_aucs(preps: Sequence[_AucPrep], n: int, n_boot: int, seed: int) -> list[FloatArray]:
    """Percentile-bootstrap AUC replicates for each prep (same resamples for all classes).

    Each entry holds only the valid replicates (resamples with both classes present).
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _BOOT_CHUNK_ELEMENTS // max(n, 1)))
    parts: list[list[FloatArray]] = [[] for _ in preps]
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        for part, prep in zip(parts, preps, strict=True):
            part.append(prep.auc(counts))
        done += b
    out: list[FloatArray] = []
    for part in parts:
        values = np.concatenate(part) if part else np.empty(0)
        out.append(values[np.isfinite(values)])
    return out


# ---------------------------------------------------------------------- calibration


def _bin_indices(values: FloatArray, n_bins: int) -> IntArray:
    """Equal-width right-closed bins on [0, 1]: bin i is (i/n, (i+1)/n], 0 goes to bin 0."""
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    idx = np.searchsorted(edges, values, side="left") - 1
    return np.clip(idx, 0, n_bins - 1).astype(np.int64)


def _reliability(
    predicted: FloatArray, observed: FloatArray, n_bins: int
) -> tuple[dict[str, Any], float]:
    """Per-bin mean prediction / observed frequency / count, and the calibration error."""
    idx = _bin_indices(predicted, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    sum_pred = np.bincount(idx, weights=predicted, minlength=n_bins)
    sum_obs = np.bincount(idx, weights=observed, minlength=n_bins)
    nonempty = count > 0
    mean_pred = np.where(nonempty, sum_pred / np.maximum(count, 1), np.nan)
    mean_obs = np.where(nonempty, sum_obs / np.maximum(count, 1), np.nan)
    gaps = np.abs(mean_obs - mean_pred)
    error = float(np.sum(count[nonempty] * gaps[nonempty]) / predicted.size)
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    data = {
        "bins": [[float(edges[i]), float(edges[i + 1])] for i in range(n_bins)],
        "confidence": [float(v) if ok else None for v, ok in zip(mean_pred, nonempty, strict=True)],
        "accuracy": [float(v) if ok else None for v, ok in zip(mean_obs, nonempty, strict=True)],
        "count": [int(c) for c in count],
    }
    return data, error


def expected_calibration_error(
    y_true: npt.ArrayLike, probs: npt.ArrayLike, n_bins: int = 10
) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (n_bin/N) * |acc - conf|."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y, p = _as_labels_probs(y_true, probs)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return _reliability(confidence, correct, n_bins)[1]


# ---------------------------------------------------------------------------- report


def classification_report(
    y_true: npt.ArrayLike,
    probs: npt.ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Full evaluation of ``probs`` against ``y_true``; JSON-serialisable dict.

    Keys: ``n``, ``classes``, ``accuracy``, ``per_class`` (sensitivity, specificity, ppv,
    npv, f1, auc, auc_ci95, auc_n_boot, support, predicted), ``macro`` (unweighted means of
    the defined per-class values), ``macro_auc``, ``confusion_matrix`` (``labels``,
    ``matrix`` with rows = truth), ``ece``, ``classwise_ece``, ``brier``,
    ``brier_per_class``, ``roc`` (per class ``fpr``/``tpr``/``thresholds``; the first
    threshold is ``null`` = +inf; ``null`` when the class or its complement is absent),
    ``reliability`` (top-label ``bins``/``confidence``/``accuracy``/``count`` and
    ``per_class`` with ``bins``/``confidence`` (mean P(class))/``accuracy`` (observed
    frequency of the class)/``count``), ``bootstrap`` (``n_boot``, ``seed``, ``method``).
    """
    if n_boot < 0:
        raise ValueError("n_boot must be >= 0")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    names = [str(c) for c in classes]
    k = len(names)
    y, p = _as_labels_probs(y_true, probs, n_classes=k)
    n = int(y.size)
    pred = p.argmax(axis=1)

    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)

    preps = [_AucPrep(p[:, j], y == j) for j in range(k)]
    boot = _bootstrap_aucs(preps, n, n_boot, seed) if n_boot > 0 else [np.empty(0)] * k

    per_class: dict[str, Any] = {}
    roc: dict[str, Any] = {}
    for j, name in enumerate(names):
        pos = y == j
        rates = _binary_rates(pos, pred == j)
        auc = roc_auc(p[:, j], pos)
        replicates = boot[j]
        ci: list[float] | None = None
        if auc is not None and replicates.size > 0:
            lo, hi = np.percentile(replicates, [2.5, 97.5])
            ci = [float(lo), float(hi)]
        sens, ppv = rates["sensitivity"], rates["ppv"]
        f1 = None
        if sens is not None and ppv is not None:
            f1 = 0.0 if sens + ppv == 0 else 2 * sens * ppv / (sens + ppv)
        per_class[name] = {
            "sensitivity": sens,
            "specificity": rates["specificity"],
            "ppv": ppv,
            "npv": rates["npv"],
            "f1": f1,
            "auc": auc,
            "auc_ci95": ci,
            "auc_n_boot": int(replicates.size),
            "support": int(np.count_nonzero(pos)),
            "predicted": int(np.count_nonzero(pred == j)),
        }
        curve = roc_curve(p[:, j], pos)
        roc[name] = (
            None if curve is None else {"fpr": curve[0], "tpr": curve[1], "thresholds": curve[2]}
        )

    macro = {
        key: _mean_defined([per_class[name][key] for name in names])
        for key in ("sensitivity", "specificity", "ppv", "npv", "f1")
    }
    macro_auc = _mean_defined([per_class[name]["auc"] for name in names])

    confidence = p.max(axis=1)
    correct = (pred == y).astype(np.float64)
    top_label, ece = _reliability(confidence, correct, n_bins)
    per_class_rel: dict[str, Any] = {}
    class_errors: list[float] = []
    for j, name in enumerate(names):
        data, err = _reliability(p[:, j], (y == j).astype(np.float64), n_bins)
        per_class_rel[name] = data
        class_errors.append(err)

    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0
    sq = (p - onehot) ** 2

    report = {
        "n": n,
        "classes": names,
        "accuracy": float(np.mean(correct)),
        "per_class": per_class,
        "macro": macro,
        "macro_auc": macro_auc,
        "confusion_matrix": {"labels": names, "matrix": confusion},
        "ece": ece,
        "classwise_ece": float(np.mean(class_errors)),
        "brier": float(np.mean(np.sum(sq, axis=1))),
        "brier_per_class": {name: float(np.mean(sq[:, j])) for j, name in enumerate(names)},
        "roc": roc,
        "reliability": {**top_label, "n_bins": n_bins, "per_class": per_class_rel},
        "bootstrap": {
            "n_boot": int(n_boot),
            "seed": int(seed),
            "method": "percentile bootstrap over cases; single-class resamples skipped",
        },
    }
    out: dict[str, Any] = to_jsonable(report)
    return out


# -------------------------------------------------------------------- operating point


def _check_threshold_inputs(
    y_true: npt.ArrayLike, probs: npt.ArrayLike, tb_index: int
) -> tuple[FloatArray, BoolArray]:
    y, p = _as_labels_probs(y_true, probs)
    if not 0 <= tb_index < p.shape[1]:
        raise ValueError(f"tb_index {tb_index} out of range for {p.shape[1]} classes")
    return p[:, tb_index], y == tb_index


def apply_operating_point(
    y_true: npt.ArrayLike,
    probs: npt.ArrayLike,
    threshold: float | None,
    *,
    tb_index: int = 0,
) -> dict[str, Any]:
    """Evaluate the fixed TB threshold (TB called when ``P(TB) >= threshold``), TB vs rest.

    Returns ``threshold``, ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``n_pos``,
    ``n_neg`` and the counts ``tp``/``fp``/``tn``/``fn``.  With ``threshold=None`` (no
    operating point could be chosen) all rates are ``None`` and ``reason`` says why.
    """
    scores, pos = _check_threshold_inputs(y_true, probs, tb_index)
    n_pos = int(np.count_nonzero(pos))
    n_neg = int(pos.size - n_pos)
    if threshold is None:
        return {
            "threshold": None,
            "sensitivity": None,
            "specificity": None,
            "ppv": None,
            "npv": None,
            "n_pos": n_pos,
            "n_neg": n_neg,
            "reason": "no operating point (threshold is None)",
        }
    t = float(threshold)
    if not math.isfinite(t):
        raise ValueError("threshold must be finite")
    rates = _binary_rates(pos, scores >= t)
    return {"threshold": t, **rates, "n_pos": n_pos, "n_neg": n_neg}


def choose_tb_operating_point(
    y_true: npt.ArrayLike,
    probs: npt.ArrayLike,
    *,
    target_sensitivity: float = WHO_TB_TRIAGE_SENSITIVITY,
    tb_index: int = 0,
) -> dict[str, Any]:
    """Highest threshold on ``P(TB)`` whose TB-vs-rest sensitivity is >= the target.

    Meant for the validation split; the result's ``threshold`` is then applied unchanged
    to the test set with :func:`apply_operating_point`.  The threshold is always one of the
    TB cases' scores (sensitivity only changes there), so any higher threshold gives a
    sensitivity below the target.  Without TB cases the threshold is ``None`` with a
    ``reason``.
    """
    target = float(target_sensitivity)
    if not 0.0 < target <= 1.0:
        raise ValueError("target_sensitivity must lie in (0, 1]")
    scores, pos = _check_threshold_inputs(y_true, probs, tb_index)
    n_pos = int(np.count_nonzero(pos))
    n_neg = int(pos.size - n_pos)
    result: dict[str, Any] = {
        "threshold": None,
        "sensitivity": None,
        "specificity": None,
        "ppv": None,
        "npv": None,
        "target_sensitivity": target,
        "method": f"highest threshold with TB sensitivity >= {target:.2f} on validation",
        "n_pos": n_pos,
        "n_neg": n_neg,
    }
    if n_pos == 0:
        result["reason"] = "no TB-positive cases: sensitivity is undefined"
        return result
    pos_scores = np.sort(scores[pos])
    candidates = np.unique(pos_scores)[::-1]  # distinct TB-case scores, descending
    tp_at = n_pos - np.searchsorted(pos_scores, candidates, side="left")
    sensitivity = tp_at / n_pos  # same division as in _binary_rates
    # Non-decreasing as the threshold falls; the lowest candidate gives sensitivity 1.
    first_ok = int(np.flatnonzero(sensitivity >= target)[0])
    threshold = float(candidates[first_ok])
    rates = _binary_rates(pos, scores >= threshold)  # exactly what apply_operating_point does
    for key in ("sensitivity", "specificity", "ppv", "npv"):
        result[key] = rates[key]
    result["threshold"] = threshold
    if n_neg == 0:
        result["reason"] = "no TB-negative cases: specificity is undefined"
    return result


# ----------------------------------------------------------------------- CAM pointing


def _select_cam(cam: npt.ArrayLike, class_index: int | None) -> FloatArray:
    c = np.asarray(cam, dtype=np.float64)
    if c.ndim == 3:
        if class_index is None:
            raise ValueError("a (h, w, C) CAM needs class_index")
        c = c[:, :, class_index]
    elif c.ndim != 2:
        raise ValueError(f"CAM must be (h, w) or (h, w, C), got shape {c.shape}")
    if c.size == 0:
        raise ValueError("empty CAM")
    if not np.all(np.isfinite(c)):
        raise ValueError("CAM contains NaN or infinite values")
    return c


def cam_argmax_location(
    cam: npt.ArrayLike,
    rows: int,
    cols: int,
    *,
    class_index: int | None = None,
) -> tuple[float, float]:
    """Peak of the CAM in original image coordinates, as ``(x, y)`` (x = column).

    The peak is the CAM's highest cell, placed at the centre of its receptive field: the
    model input is a square stretch of the image, and cell i sits at model-input position
    ``(i + 0.5 + CAM_CELL_SHIFT) * stride - 0.5``, which is image position
    ``(i + 0.5 + CAM_CELL_SHIFT) * size / n_cells - 0.5`` per axis (pixel centres aligned),
    clamped to the image. The bilinearly upsampled CAM (the heatmap,
    ``cxrd.preprocess.cam_matrix``) has its maximum there too; between the image border
    and the outermost cells' centres it is clamped flat, and a point on that flat part
    carries nothing of its own, so none is chosen. Tied cells (a constant CAM) go to the
    one nearest their centroid: symmetric and deterministic.
    """
    rows, cols = int(rows), int(cols)
    if rows < 1 or cols < 1:
        raise ValueError("image size must be positive")
    c = _select_cam(cam, class_index)
    h, w = c.shape
    peak = float(c.max())
    span = float(peak - c.min())
    rr, cc = np.nonzero(c >= peak - 1e-9 * max(span, abs(peak), 1e-300))
    nearest = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
    r, col = int(rr[nearest]), int(cc[nearest])
    y = (r + 0.5 + CAM_CELL_SHIFT) * rows / h - 0.5
    x = (col + 0.5 + CAM_CELL_SHIFT) * cols / w - 0.5
    return float(np.clip(x, 0.0, cols - 1.0)), float(np.clip(y, 0.0, rows - 1.0))


def _boxes(boxes: npt.ArrayLike) -> FloatArray:
    """Boxes as a (k, 4) array of ``(x0, y0, x1, y1)``, corners normalised (k may be 0)."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4))
    if b.shape[-1] != 4:
        raise ValueError(f"boxes must be (x0, y0, x1, y1), got shape {b.shape}")
    b = b.reshape(-1, 4)
    return np.stack([np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3]),
                     np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])], axis=1)


def _inside(x: float, y: float, b: FloatArray, tolerance: float) -> bool:
    return bool(np.any((b[:, 0] - tolerance <= x) & (x <= b[:, 2] + tolerance)
                       & (b[:, 1] - tolerance <= y) & (y <= b[:, 3] + tolerance)))


def cam_hit(
    cam: npt.ArrayLike,
    rows: int,
    cols: int,
    boxes: npt.ArrayLike,
    tolerance: float = 0.0,
    *,
    class_index: int | None = None,
) -> bool:
    """Pointing-game hit: does the CAM peak fall inside any box ``(x0, y0, x1, y1)``?

    Boxes are in original pixel coordinates, inclusive on all sides and widened by
    ``tolerance`` pixels.  No boxes means no hit.  See :func:`cam_argmax_location`.
    """
    b = _boxes(boxes)
    if len(b) == 0:
        return False
    x, y = cam_argmax_location(cam, rows, cols, class_index=class_index)
    return _inside(x, y, b, tolerance)


def pointing_game(
    cams: Sequence[npt.ArrayLike],
    sizes: Sequence[tuple[int, int]],
    boxes: Sequence[Sequence[Sequence[float]]],
    labels: Sequence[str | int],
    *,
    tolerance: float = 0.0,
    class_indices: Sequence[int] | None = None,
    scored_classes: Sequence[str] = ("TB", "NTB"),
) -> dict[str, Any]:
    """Pointing game over images: ``{"TB": {...}, "NTB": {...}, "overall": {...},
    "peak_offset": {...}}``.

    ``cams[i]`` is the predicted-class CAM ``(h, w)`` or an ``(h, w, C)`` CAM with
    ``class_indices[i]``; ``sizes[i]`` is the original ``(rows, cols)``; ``boxes[i]`` the
    ground-truth boxes; ``labels[i]`` the true class (name, or index into ``CLASSES``).
    Only images with at least one box and a label in ``scored_classes`` count; each entry
    holds ``hits``, ``total`` and ``rate`` (``None`` when ``total`` is 0), and ``overall``
    pools the scored classes.

    ``peak_offset`` says where the peaks sit relative to the lesions: per scored class, the
    median and standard deviation of the offset (x, y) from each CAM peak to the nearest
    box centre, in CAM cells (positive: right of, below the lesion). A low rate is either a
    spread (peaks anywhere) or a systematic offset (a large median, a small deviation);
    this tells them apart.
    """
    n = len(cams)
    if not (len(sizes) == len(boxes) == len(labels) == n):
        raise ValueError("cams, sizes, boxes and labels must have the same length")
    if class_indices is not None and len(class_indices) != n:
        raise ValueError("class_indices must have one entry per CAM")
    tally = {name: [0, 0] for name in scored_classes}
    offsets: dict[str, list[tuple[float, float]]] = {name: [] for name in scored_classes}
    for i in range(n):
        label = labels[i]
        name = CLASSES[label] if isinstance(label, (int, np.integer)) else str(label)
        b = _boxes(boxes[i])
        if name not in tally or len(b) == 0:
            continue
        rows, cols = sizes[i]
        cam = _select_cam(cams[i], None if class_indices is None else int(class_indices[i]))
        x, y = cam_argmax_location(cam, rows, cols)
        tally[name][0] += int(_inside(x, y, b, tolerance))
        tally[name][1] += 1
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        j = int(np.argmin((cx - x) ** 2 + (cy - y) ** 2))
        offsets[name].append(((x - cx[j]) * cam.shape[1] / cols,
                              (y - cy[j]) * cam.shape[0] / rows))

    def entry(hits: int, total: int) -> dict[str, Any]:
        return {"hits": hits, "total": total, "rate": _safe_div(hits, total)}

    def spread(values: list[tuple[float, float]]) -> dict[str, Any]:
        a = np.asarray(values, dtype=np.float64).reshape(-1, 2)
        return {"n": len(values),
                "median_cells": np.median(a, axis=0).tolist() if values else None,
                "std_cells": np.std(a, axis=0).tolist() if values else None}

    out: dict[str, Any] = {name: entry(h, t) for name, (h, t) in tally.items()}
    out["overall"] = entry(sum(h for h, _ in tally.values()), sum(t for _, t in tally.values()))
    out["peak_offset"] = {name: spread(v) for name, v in offsets.items()}
    return out


# ------------------------------------------------------------------ region overlap

#: The IoU levels at which :func:`region_overlap` counts the share of images reaching them.
IOU_LEVELS = (0.1, 0.3)


def best_box_iou(region: Sequence[float] | None, boxes: npt.ArrayLike) -> float:
    """Intersection over union of a reported region with the best-matching lesion box.

    ``region`` is ``(x0, y0, x1, y1)`` with pixel edges as coordinates (the SR's SCOORD:
    the image spans 0 to Columns), or None (no region reported: 0). ``boxes`` are the
    ground truth's inclusive pixel boxes (the manifest's ``boxes``: a box covers columns x0
    to x1), so a box's right and bottom edges are x1 + 1 and y1 + 1. No boxes: 0.
    """
    b = _boxes(boxes)
    if region is None or len(b) == 0:
        return 0.0
    x0, y0, x1, y1 = (float(v) for v in region)
    bx0, by0, bx1, by1 = b[:, 0], b[:, 1], b[:, 2] + 1.0, b[:, 3] + 1.0
    iw = np.clip(np.minimum(x1, bx1) - np.maximum(x0, bx0), 0.0, None)
    ih = np.clip(np.minimum(y1, by1) - np.maximum(y0, by0), 0.0, None)
    inter = iw * ih
    union = (x1 - x0) * (y1 - y0) + (bx1 - bx0) * (by1 - by0) - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return float(iou.max())


def region_overlap(
    regions: Sequence[Sequence[float] | None],
    boxes: Sequence[Sequence[Sequence[float]]],
    labels: Sequence[str | int],
    *,
    scored_classes: Sequence[str] = ("TB", "NTB"),
    levels: Sequence[float] = IOU_LEVELS,
) -> dict[str, Any]:
    """How well reported regions cover the lesions, per true class: ``{"TB": {...},
    "NTB": {...}}``, each with ``n`` (images with a label in ``scored_classes`` and at
    least one box), ``mean_iou`` (the mean over them of :func:`best_box_iou`; None when
    ``n`` is 0), ``iou_ge_<level>`` (the share reaching each level), ``no_region``
    (images reported without a region, NORM, which count as IoU 0) and
    ``mean_iou_reported`` (the mean over the images with a region).
    """
    if not (len(regions) == len(boxes) == len(labels)):
        raise ValueError("regions, boxes and labels must have the same length")
    ious: dict[str, list[float]] = {name: [] for name in scored_classes}
    missing = dict.fromkeys(scored_classes, 0)
    for region, b, label in zip(regions, boxes, labels, strict=True):
        name = CLASSES[label] if isinstance(label, (int, np.integer)) else str(label)
        if name not in ious or len(_boxes(b)) == 0:
            continue
        ious[name].append(best_box_iou(region, b))
        missing[name] += region is None
    out: dict[str, Any] = {}
    for name, values in ious.items():
        a = np.asarray(values, dtype=np.float64)
        entry: dict[str, Any] = {"n": len(values),
                                 "mean_iou": float(a.mean()) if len(a) else None}
        for level in levels:
            entry[f"iou_ge_{level:g}"] = float((a >= level).mean()) if len(a) else None
        entry["no_region"] = missing[name]
        reported = len(values) - missing[name]
        entry["mean_iou_reported"] = float(a.sum() / reported) if reported else None
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def plot_roc(report: dict[str, Any], path: Path, title: str) -> None:
    """One-vs-rest ROC curves with AUC (95% CI) per class; the TB operating point is marked
    when ``report["tb_operating_point"]`` holds its sensitivity and specificity."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 6.0))
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for name, curve in report.get("roc", {}).items():
        if not curve:
            continue
        stats = report.get("per_class", {}).get(name, {})
        ci = stats.get("auc_ci95")
        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        label = f"{name}: AUC {_fmt(stats.get('auc'))}{ci_text}"
        ax.plot(curve["fpr"], curve["tpr"], linewidth=1.8, label=label)
    op = report.get("tb_operating_point")
    if op and op.get("sensitivity") is not None and op.get("specificity") is not None:
        ax.plot(
            [1.0 - op["specificity"]],
            [op["sensitivity"]],
            marker="o",
            markersize=8,
            color="black",
            linestyle="none",
            label=f"TB operating point (t = {_fmt(op.get('threshold'))})",
        )
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    _save(plt, fig, path)


def plot_confusion(report: dict[str, Any], path: Path, title: str) -> None:
    """Confusion matrix (rows = truth), coloured by row-normalised fraction, with counts."""
    plt = _pyplot()
    cm = report["confusion_matrix"]
    labels = list(cm["labels"])
    matrix = np.asarray(cm["matrix"], dtype=np.float64)
    row_sums = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(
                j,
                i,
                f"{int(matrix[i, j])}\n({100 * frac[i, j]:.1f}%)",
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.5 else "black",
                fontsize=10,
            )
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    accuracy = report.get("accuracy")
    ax.set_title(f"{title}\n(n = {int(matrix.sum())}, accuracy {_fmt(accuracy)})")
    _save(plt, fig, path)


def plot_reliability(report: dict[str, Any], path: Path, title: str) -> None:
    """Reliability diagram: top-label accuracy vs confidence and per-class observed
    frequency vs mean predicted probability, with the top-label bin counts below."""
    plt = _pyplot()
    rel = report["reliability"]
    bins = np.asarray(rel["bins"], dtype=np.float64)
    centres = bins.mean(axis=1)
    widths = bins[:, 1] - bins[:, 0]
    fig, (ax, ax_count) = plt.subplots(
        2, 1, figsize=(6.0, 7.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfect calibration")
    conf = [np.nan if v is None else v for v in rel["confidence"]]
    acc = [np.nan if v is None else v for v in rel["accuracy"]]
    ax.bar(
        centres,
        np.nan_to_num(np.asarray(acc, dtype=np.float64)),
        width=widths,
        alpha=0.35,
        edgecolor="tab:blue",
        color="tab:blue",
        label="top-label accuracy per bin",
    )
    top_label = f"top label (ECE {_fmt(report.get('ece'))})"
    ax.plot(conf, acc, marker="o", color="tab:blue", label=top_label)
    for name, data in rel.get("per_class", {}).items():
        pc = [np.nan if v is None else v for v in data["confidence"]]
        pa = [np.nan if v is None else v for v in data["accuracy"]]
        ax.plot(pc, pa, marker=".", linewidth=1, linestyle=":", label=f"{name} (one-vs-rest)")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("Observed accuracy / frequency")
    ax.set_title(f"{title}\n(ECE {_fmt(report.get('ece'))}, Brier {_fmt(report.get('brier'))})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax_count.bar(centres, rel["count"], width=widths, color="0.5", edgecolor="black")
    ax_count.set_xlabel("Predicted probability (top-label confidence)")
    ax_count.set_ylabel("Cases")
    ax_count.grid(True, alpha=0.3)
    _save(plt, fig, path)
