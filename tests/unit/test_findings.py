"""The reported region restricted to the lung fields (cxrd.findings): evidence outside the
lungs widened by the margin cannot become the region, and without lungs nothing changes."""

from __future__ import annotations

import time

import numpy as np
import pytest
from resultfactory import make_source

from cxrd.findings import LUNG_MARGIN, ImageFindings, allowed_area, hottest_region

#: Regions of seeded random CAMs as hottest_region computed them before the lung
#: restriction existed: (rows, cols, class, box).
BEFORE = [
    (600, 500, 0, (263.39285714285717, 0.0, 500.0, 417.85714285714283)),
    (2500, 2048, 1, (969.1428571428571, 0.0, 2048.0, 1696.4285714285716)),
    (512, 512, 2, (434.2857142857143, 406.85714285714283, 512.0, 512.0)),
    (1300, 1100, 0, (1001.7857142857142, 452.67857142857144, 1100.0, 719.6428571428572)),
    (640, 520, 1, (0.0, 0.0, 520.0, 640.0)),
    (3000, 2400, 2, (449.99999999999994, 2062.5, 964.2857142857142, 2812.5)),
]


def lung_fields(size: int = 128) -> np.ndarray:
    """Two upright ellipses, like a frontal chest's lung fields, over a square."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    left = ((xx - 0.31) / 0.17) ** 2 + ((yy - 0.52) / 0.33) ** 2 < 1
    right = ((xx - 0.69) / 0.17) ** 2 + ((yy - 0.52) / 0.33) ** 2 < 1
    return left | right


def one_hot(cells: dict[tuple[int, int], float], size: int = 7) -> np.ndarray:
    cam = np.zeros((size, size, 3), dtype=np.float32)
    for (r, c), v in cells.items():
        cam[r, c, :] = v
    return cam


def test_without_lungs_the_region_is_as_before() -> None:
    rng = np.random.default_rng(20261206)
    for rows, cols, k, box in BEFORE:
        cam = rng.normal(size=(7, 7, 3)).astype(np.float32)
        assert hottest_region(cam, k, rows, cols) == box
        for lungs in (None, np.zeros((128, 128), bool), np.zeros((0, 0), bool)):
            assert hottest_region(cam, k, rows, cols, lungs) == box
            assert hottest_region(cam, k, rows, cols, lungs, margin=0.0) == box
        # lungs everywhere allow everything
        assert hottest_region(cam, k, rows, cols, np.ones((64, 64), bool)) == box


def test_hot_evidence_outside_the_lungs_cannot_become_the_region() -> None:
    rows, cols = 2500, 2048
    # The hottest cell on the top-left corner (a shoulder, a marker), a weaker one over the
    # right part of the image's left lung field.
    cam = one_hot({(0, 0): 5.0, (3, 2): 3.0})
    x0, y0, x1, y1 = hottest_region(cam, 0, rows, cols)
    assert (x0, y0) == (0.0, 0.0) and x1 < cols / 4 and y1 < rows / 4
    lungs = lung_fields()
    x0, y0, x1, y1 = hottest_region(cam, 0, rows, cols, lungs)
    # the weaker cell's blob, at its receptive field's centre (about (2.9, 3.9) cells of 7)
    assert 0.3 * cols < (x0 + x1) / 2 < 0.5 * cols and 0.45 * rows < (y0 + y1) / 2 < 0.65 * rows
    # inside the lungs widened by the margin (on hottest_region's 112 x 112 grid)
    area = allowed_area(lungs, 112, 112, LUNG_MARGIN)
    assert area is not None
    ys, xs = np.nonzero(area)
    assert xs.min() * cols / 112 <= x0 and x1 <= (xs.max() + 1) * cols / 112
    assert ys.min() * rows / 112 <= y0 and y1 <= (ys.max() + 1) * rows / 112
    # ImageFindings carries it
    ds = make_source(rows, cols)
    probs = np.array([0.9, 0.05, 0.05], np.float32)
    assert ImageFindings.of(ds, probs, cam, 0.5, lungs).region == (x0, y0, x1, y1)
    assert ImageFindings.of(ds, probs, cam, 0.5).region == hottest_region(cam, 0, rows, cols)
    normal = np.array([0.05, 0.05, 0.9], np.float32)
    assert ImageFindings.of(ds, normal, cam, 0.5, lungs).region is None


def test_the_margin_keeps_evidence_on_the_lung_edge() -> None:
    """A blob just outside the lung field: within the margin it is the region; with no
    margin only its part on the lung is."""
    rows = cols = 1000
    lungs = np.zeros((100, 100), bool)
    lungs[30:70, 10:45] = True  # a lung field whose right edge is at x = 450
    cam = np.zeros((7, 7, 3), np.float32)
    cam[3, 3, 0] = 4.0  # centred near x = 3.5 cells + CAM_CELL_SHIFT, about x = 570
    wide = hottest_region(cam, 0, rows, cols, lungs, margin=0.2)
    assert wide == hottest_region(cam, 0, rows, cols)
    narrow = hottest_region(cam, 0, rows, cols, lungs, margin=0.0)
    assert narrow[2] <= 450 and narrow[0] < 450
    edge = hottest_region(cam, 0, rows, cols, lungs, margin=0.05)
    assert 450 < edge[2] <= 500 + 1000 / 112


def test_the_mask_resolution_does_not_matter() -> None:
    cam = one_hot({(0, 6): 5.0, (4, 5): 2.0, (2, 1): 1.5})
    small = lung_fields(128)
    large = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)
    a = hottest_region(cam, 0, 2500, 2048, small)
    assert a == hottest_region(cam, 0, 2500, 2048, large)
    assert a != hottest_region(cam, 0, 2500, 2048)


def test_bad_lungs_and_margins_are_refused() -> None:
    cam = one_hot({(3, 3): 1.0})
    with pytest.raises(ValueError, match="2-D mask"):
        hottest_region(cam, 0, 100, 100, np.ones((4, 4, 2), bool))
    with pytest.raises(ValueError, match=r"margin must lie in \[0, 1\]"):
        hottest_region(cam, 0, 100, 100, np.ones((4, 4), bool), margin=-0.1)


def test_the_restriction_is_cheap() -> None:
    """Thread CPU per region, 7x7 CAMs onto a 2500 x 2048 image: with the lungs at most
    1 ms above without (measured about 1.2 ms without, 0.1 ms for the allowed area, and the
    component inside the lungs is often smaller, so the total is often lower)."""
    rng = np.random.default_rng(1)
    cams = [rng.normal(size=(7, 7, 3)).astype(np.float32) for _ in range(40)]
    lungs = lung_fields()
    best = {"none": np.inf, "lungs": np.inf}
    for _ in range(3):
        for name, mask in (("none", None), ("lungs", lungs)):
            t = time.thread_time()
            for cam in cams:
                hottest_region(cam, 0, 2500, 2048, mask)
            best[name] = min(best[name], (time.thread_time() - t) / len(cams))
    assert best["lungs"] - best["none"] < 1e-3, best

