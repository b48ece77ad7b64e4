"""What the model found and where: the decision rule at the operating point, and the CAM's
geometry on the source image.

Every output uses these two decisions, so the SR's finding, its Normality and Tuberculosis
evaluations, its region and the heatmap never contradict each other:

* the reported class: TB when P(TB) >= the model's TB threshold, otherwise the likelier of
  NTB and NORM (a plain argmax could say TB while Tuberculosis is Absent when the threshold
  is above 0.5);
* the hottest region of the reported class's CAM, boxed in source pixel coordinates; when
  the lung fields are known (``cxrd.lungs``), the region is searched only inside them,
  widened by a margin, so that evidence on a shoulder, a marker or the abdomen cannot
  become the reported region.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from cxrd.headers import source_record
from cxrd.modelinfo import CLASS_NAMES
from cxrd.preprocess import cam_matrix

F32 = npt.NDArray[np.float32]
Box = tuple[float, float, float, float]

TB, NTB, NORM = (CLASS_NAMES.index(name) for name in ("TB", "NTB", "NORM"))
#: Plain-language class names, in CLASS_NAMES order (legends, logs).
CLASS_LABELS: tuple[str, ...] = tuple(
    {"TB": "tuberculosis", "NTB": "abnormal, not TB", "NORM": "normal"}[name]
    for name in CLASS_NAMES
)

# Samples per CAM cell when hottest_region upsamples (a 7x7 CAM becomes 112x112).
_REGION_SAMPLES_PER_CELL = 16

#: How far outside the lung fields a region may still lie, as a fraction of the image side
#: (``[results] lung_margin``; :func:`allowed_area`). 0.04 is 9 px of a 224 px input, a
#: quarter of a 7x7 CAM cell, and 100 px (14 mm at 0.143 mm a pixel) of a 2500 px image.
#: It keeps what lies on the lung's edge: pleural disease (an effusion's meniscus, an
#: apical cap) and the segmenter's own boundary error (its output grid is 128 a side, and a
#: bilinear CAM peak near the edge sits a fraction of a cell off), while the shoulders, the
#: neck and the abdomen, several times further from the lungs, stay out. On the demo's
#: held-out phantoms no margin drops the pointing game from 0.9275 to 0.9075 (effusions
#: lie on the lung's edge), 0.02 and more keep it, and wider margins only loosen the
#: regions; 0.04 is twice the smallest safe margin there, where the segmentation is near
#: perfect (README, "Lung-restricted localisation").
LUNG_MARGIN = 0.04


def decide_class(probs: F32 | Sequence[float], tb_threshold: float) -> int:
    """The reported class: TB if P(TB) >= tb_threshold, else the likelier of NTB and NORM."""
    p = np.asarray(probs, dtype=np.float64)
    if p[TB] >= tb_threshold:
        return TB
    return NTB if p[NTB] >= p[NORM] else NORM


def study_finding(probs: Sequence[Sequence[float]], tb_threshold: float) -> tuple[int, float]:
    """A study's finding from its images' probabilities, by :func:`decide_class` per image:
    TB when any image is reported TB (its SR says Tuberculosis Present), with the highest
    P(TB); else NTB when any image is, with the highest P(NTB) of those; else NORM, with
    the lowest P(NORM) (the least normal image). Returns (class index, probability)."""
    if not probs:
        raise ValueError("study_finding needs the probabilities of at least one image.")
    rows = np.asarray(probs, dtype=np.float32).reshape(len(probs), len(CLASS_NAMES))
    decided = np.array([decide_class(p, tb_threshold) for p in rows])
    for k in (TB, NTB):
        if np.any(decided == k):
            return k, float(rows[decided == k, k].max())
    return NORM, float(rows[:, NORM].min())


def upsample_cam(cam2d: npt.NDArray[np.floating], rows: int, cols: int) -> F32:
    """Bilinearly resize one CAM channel (h, w) to (rows, cols), each cell at its receptive
    field's centre (``cxrd.preprocess.cam_matrix``); two small matrix products."""
    h, w = cam2d.shape
    a = np.asarray(cam2d, dtype=np.float32)
    out = (cam_matrix(rows, h).astype(np.float32) @ a
           @ cam_matrix(cols, w).astype(np.float32).T)
    return out.astype(np.float32, copy=False)


def _component(mask: npt.NDArray[np.bool_], seed: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """The 8-connected component of ``mask`` containing ``seed`` (geodesic dilation)."""
    comp = np.zeros_like(mask)
    comp[seed] = True
    count = 1
    while True:
        grown = comp.copy()
        grown[1:, :] |= comp[:-1, :]
        grown[:-1, :] |= comp[1:, :]
        wide = grown.copy()
        wide[:, 1:] |= grown[:, :-1]
        wide[:, :-1] |= grown[:, 1:]
        wide &= mask
        new_count = int(wide.sum())
        if new_count == count:
            return wide
        comp, count = wide, new_count


def _sample_grid(mask: npt.NDArray[np.bool_], rows: int, cols: int) -> npt.NDArray[np.bool_]:
    """``mask`` (any size, over the same square geometry) sampled at the centres of a
    ``rows`` x ``cols`` grid (nearest): a gather of rows x cols, whatever the mask's size."""
    h, w = mask.shape
    r = ((np.arange(rows) + 0.5) * (h / rows)).astype(np.intp)
    c = ((np.arange(cols) + 0.5) * (w / cols)).astype(np.intp)
    return np.take(np.take(mask, r, axis=0), c, axis=1)


def _dilate(mask: npt.NDArray[np.bool_], radius: int, axis: int) -> npt.NDArray[np.bool_]:
    """``mask`` dilated by ``radius`` cells along one axis: a window count from a cumulative
    sum, so the cost does not grow with the radius."""
    if radius <= 0:
        return mask
    n = mask.shape[axis]
    shape = list(mask.shape)
    shape[axis] = 1
    counts = np.concatenate([np.zeros(shape, np.int32), np.cumsum(mask, axis=axis,
                                                                  dtype=np.int32)], axis=axis)
    i = np.arange(n)
    hi = np.take(counts, np.minimum(i + radius + 1, n), axis=axis)
    lo = np.take(counts, np.maximum(i - radius, 0), axis=axis)
    return hi > lo


def allowed_area(lungs: npt.NDArray[np.bool_] | None, rows: int, cols: int,
                 margin: float = LUNG_MARGIN) -> npt.NDArray[np.bool_] | None:
    """Where a region may lie on a ``rows`` x ``cols`` grid over the model's square input:
    the lung fields ``lungs`` (a boolean mask of both lungs over that square, any size)
    sampled at the grid's cell centres and dilated by ``margin`` of the side along each
    axis (a square structuring element: the margin is a distance in each direction, a
    diagonal one reaches a little further). None, meaning anywhere, when ``lungs`` is None
    or holds no lung on the grid (no chest found: the unrestricted region)."""
    if lungs is None:
        return None
    mask = np.asarray(lungs, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"lungs must be a 2-D mask, not of shape {mask.shape}.")
    if mask.size == 0:
        return None
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"margin must lie in [0, 1], not {margin}.")
    grid = _sample_grid(mask, rows, cols)
    if not grid.any():
        return None
    grid = _dilate(grid, round(margin * rows), 0)
    return _dilate(grid, round(margin * cols), 1)


def _hottest(channel: npt.NDArray[np.floating], lungs: npt.NDArray[np.bool_] | None,
             margin: float) -> npt.NDArray[np.bool_]:
    """The hottest component of one CAM channel on the upsampled grid; see
    :func:`hottest_region`."""
    h, w = channel.shape
    gh, gw = h * _REGION_SAMPLES_PER_CELL, w * _REGION_SAMPLES_PER_CELL
    up = upsample_cam(channel, gh, gw)
    allowed = allowed_area(lungs, gh, gw, margin)
    if allowed is None:
        lo, hi = float(up.min()), float(up.max())
        peak = np.unravel_index(int(np.argmax(up)), up.shape)
        mask = up >= lo + 0.5 * (hi - lo)
    else:
        inside = up[allowed]
        lo, hi = float(inside.min()), float(inside.max())
        peak = np.unravel_index(int(np.argmax(np.where(allowed, up, -np.inf))), up.shape)
        mask = up >= lo + 0.5 * (hi - lo)
        mask &= allowed
    # A flat CAM gives an all-true mask and therefore the whole (allowed) area.
    return _component(mask, (int(peak[0]), int(peak[1])))


def hottest_region(cam: npt.NDArray[np.floating], class_index: int, rows: int,
                   cols: int, lungs: npt.NDArray[np.bool_] | None = None,
                   margin: float = LUNG_MARGIN) -> Box:
    """Bounding box (x0, y0, x1, y1) of the hottest region of one class's CAM, in the
    coordinates of a ``rows`` x ``cols`` source image.

    ``cam`` is (h, w, classes). The class's channel is upsampled bilinearly, thresholded
    halfway between its minimum and maximum, and the connected component holding the
    maximum is boxed. Coordinates are (column, row) with the top-left corner of the image
    at (0, 0) and the bottom-right corner at (cols, rows), as SR SCOORD graphic data uses
    them. The CAM covers the image stretched to a square, so x scales by cols/w and y by
    rows/h.

    ``lungs``, a boolean mask of both lung fields over the same square (any size; e.g.
    ``cxrd.lungs`` masks or the segmenter's grid thresholded), restricts the search to
    :func:`allowed_area` (the lungs widened by ``margin`` of the side): minimum, maximum,
    peak and component are taken inside it, so evidence outside cannot become the region,
    however hot. None, or a mask without lung, gives the unrestricted region.
    Cost (thread CPU, onto 2500 x 2048): for the demo model's CAMs of 378 held-out
    phantoms 0.43 ms unrestricted, 0.51 ms restricted by the segmenter's 128 x 128 mask,
    0.55 ms by a 2560 x 2048 one (the allowed area is a gather of the grid, whatever the
    mask's size); for noisy random CAMs about 1.2 ms either way, most of it the
    component's growth (``tests/unit/test_findings.py`` holds the restriction to less
    than 1 ms extra).
    """
    channel = np.asarray(cam)[..., class_index]
    comp = _hottest(channel, lungs, margin)
    gh, gw = comp.shape
    rows_hit = np.flatnonzero(comp.any(axis=1))
    cols_hit = np.flatnonzero(comp.any(axis=0))
    sy = rows / gh
    sx = cols / gw
    return (
        float(cols_hit[0] * sx),
        float(rows_hit[0] * sy),
        float((cols_hit[-1] + 1) * sx),
        float((rows_hit[-1] + 1) * sy),
    )


def check_probs(probs: F32, what: str) -> None:
    """ValueError unless ``probs`` is one probability in [0, 1] per class."""
    n = len(CLASS_NAMES)
    if probs.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), not {probs.shape}.")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or np.any(probs > 1):
        raise ValueError(f"{what} must lie in [0, 1], got {probs}.")


def check_source(ds: Dataset, what: str) -> None:
    """ValueError unless ``ds`` (a source header or its record) names its image and gives
    its full-size geometry, which every result needs."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not ds.get(keyword):
            raise ValueError(f"{what} has no {keyword}.")
    if int(ds.get("Rows") or 0) < 1 or int(ds.get("Columns") or 0) < 1:
        raise ValueError(f"{what} needs Rows and Columns (the full-size geometry).")


@dataclass(frozen=True)
class ImageFindings:
    """One classified image as the study's SR reports it, recorded by the worker that
    classified it (``Job.record``), so the SR is built without opening the spool.

    ``header`` is the source's :func:`cxrd.headers.source_record`; ``probs`` are P(TB),
    P(NTB), P(NORM); ``region`` is the hottest region of the reported class's CAM in
    source pixel coordinates, None when the image is reported NORM.
    """

    header: Dataset
    probs: F32
    region: Box | None

    def __post_init__(self) -> None:
        check_probs(self.probs, "ImageFindings.probs")
        check_source(self.header, "ImageFindings.header")

    @classmethod
    def of(cls, dataset: Dataset, probs: npt.ArrayLike, cam: npt.NDArray[np.floating],
           tb_threshold: float, lungs: npt.NDArray[np.bool_] | None = None,
           margin: float = LUNG_MARGIN) -> ImageFindings:
        """The findings of a classified image: ``cam`` is the model's (h, w, classes);
        ``lungs`` (both lung fields over the model's square input, any size) and
        ``margin`` restrict the region as :func:`hottest_region` says."""
        p = np.asarray(probs, dtype=np.float32)
        decided = decide_class(p, tb_threshold)
        region = None
        if decided != NORM:
            region = hottest_region(cam, decided, int(dataset.get("Rows") or 0),
                                    int(dataset.get("Columns") or 0), lungs, margin)
        return cls(source_record(dataset), p, region)

    def record(self) -> dict[str, object]:
        """The JSON-able record stored in ``Job.record`` (probabilities are stored apart)."""
        return {"header": self.header.to_json_dict(), "region": list(self.region)
                if self.region is not None else None}

    @classmethod
    def from_record(cls, probs: Sequence[float], record: Mapping[str, object]) -> ImageFindings:
        region = record.get("region")
        box: Box | None = None
        if isinstance(region, list) and len(region) == 4:
            x0, y0, x1, y1 = (float(v) for v in region)
            box = (x0, y0, x1, y1)
        return cls(Dataset.from_json(record["header"]),  # type: ignore[arg-type]
                   np.asarray(probs, dtype=np.float32), box)
