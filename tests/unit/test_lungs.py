"""cxrd.lungs: the segmenter's probabilities to (left, right) masks at the image's size."""

from __future__ import annotations

import numpy as np

from cxrd import lungs


def test_probs_to_masks() -> None:
    probs = np.zeros((4, 4, 2), dtype=np.float32)
    probs[:, 2:, 0] = 0.9
    probs[:, :2, 1] = 0.8
    left, right = lungs.probs_to_masks(probs, 40, 40)
    assert left.shape == (40, 40) and left.dtype == np.bool_
    assert left[:, 25:].all() and not left[:, :15].any()
    assert right[:, :15].all() and not right[:, 25:].any()
    left, right = lungs.probs_to_masks(probs, 40, 40, threshold=0.85)  # the model's threshold
    assert left[:, 25:].all() and not right.any()


def test_probs_to_masks_on_a_large_image_goes_through_the_smooth_grid() -> None:
    probs = np.zeros((8, 8, 2), dtype=np.float32)
    probs[:, 4:, 0] = 1.0
    rows, cols = 2 * lungs.SMOOTH_GRID + 10, lungs.SMOOTH_GRID + 90
    left, right = lungs.probs_to_masks(probs, rows, cols)
    assert left.shape == right.shape == (rows, cols) and not right.any()
    edge = np.flatnonzero(left[0])[0]  # the edge stays at the middle, within a few pixels
    assert abs(edge - cols / 2) <= cols / lungs.SMOOTH_GRID + 1 and left[:, edge:].all()


def _nearest_by_loops(grid: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The image-size mask written out pixel by pixel: each pixel's centre, as a fraction
    of the image, falls in one grid cell."""
    out = np.zeros((rows, cols), dtype=bool)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = grid[int((r + 0.5) / rows * grid.shape[0]),
                             int((c + 0.5) / cols * grid.shape[1])]
    return out


def test_lung_masks_keep_the_grid_and_enlarge_it_by_nearest_cell() -> None:
    rng = np.random.default_rng(3)
    probs = rng.random((16, 16, 2)).astype(np.float32)
    for rows, cols in ((lungs.SMOOTH_GRID + 45, lungs.SMOOTH_GRID + 7), (30, 20),
                       (lungs.SMOOTH_GRID, 2 * lungs.SMOOTH_GRID)):
        masks = lungs.lung_masks(probs, rows, cols, threshold=0.5)
        assert masks.shape == (rows, cols)
        assert all(g.shape == (min(rows, lungs.SMOOTH_GRID), min(cols, lungs.SMOOTH_GRID))
                   for g in masks.grid)
        full = masks.full()
        for channel, grid in enumerate(masks.grid):
            assert np.array_equal(full[channel], _nearest_by_loops(grid, rows, cols))
            # every grid cell is some pixel's: what holds on the grid holds on the image
            assert set(np.unique(masks.row_index)) == set(range(grid.shape[0]))
            assert set(np.unique(masks.col_index)) == set(range(grid.shape[1]))
        assert np.array_equal(np.stack(full), np.stack(lungs.probs_to_masks(probs, rows, cols)))
