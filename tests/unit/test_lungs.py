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
