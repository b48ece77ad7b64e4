"""training.masks: mask specs, the left/right split of a one-file mask, resizing, Dice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import masks as M


def _blocks(shape: tuple[int, int], *spans: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for c0, c1 in spans:
        m[10:50, c0:c1] = True
    return m


def test_split_two_lungs_by_image_side() -> None:
    mask = _blocks((60, 80), (8, 35), (45, 72))
    left, right = M.split_lungs(mask)
    # the patient's left lung is on the image's right
    assert np.array_equal(left, _blocks((60, 80), (45, 72)))
    assert np.array_equal(right, _blocks((60, 80), (8, 35)))


def test_split_keeps_small_pieces_with_their_side_and_cuts_a_joined_pair() -> None:
    mask = _blocks((60, 80), (8, 35), (45, 72))
    mask[55:58, 42:44] = True  # a speck just right of the middle column
    left, right = M.split_lungs(mask)
    assert left[55:58, 42:44].all() and not right[55:58].any()
    joined = _blocks((60, 80), (8, 72))  # both lungs drawn as one region
    left, right = M.split_lungs(joined)
    assert left[:, 40:].sum() == joined[:, 40:].sum() and not left[:, :40].any()
    assert np.array_equal(left | right, joined) and not (left & right).any()
    empty = np.zeros((10, 10), dtype=bool)
    assert not any(m.any() for m in M.split_lungs(empty))


def _png(path: Path, mask: np.ndarray) -> Path:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def test_read_lung_masks_specs(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.png", _blocks((60, 80), (45, 72)))
    b = _png(tmp_path / "b.png", _blocks((60, 80), (8, 35)))
    left, right = M.read_lung_masks(M.sides_spec(a, b))
    assert left[:, 45:72].any() and right[:, 8:35].any()
    # a union is split by position, whatever the files are called
    left2, right2 = M.read_lung_masks(M.union_spec([b, a]))
    assert np.array_equal(left, left2) and np.array_equal(right, right2)
    assert json.loads(M.sides_spec(a, b)) == {"left": str(a), "right": str(b)}
    small = _png(tmp_path / "small.png", np.zeros((6, 6), dtype=bool))
    with pytest.raises(ValueError, match="size"):
        M.read_lung_masks(M.sides_spec(a, small))
    for bad in ("not json", json.dumps({"left": str(a)}), json.dumps({"lungs": []})):
        with pytest.raises(ValueError):
            M.read_lung_masks(bad)


def test_resize_and_target_follow_the_image_stretch() -> None:
    mask = np.zeros((100, 60), dtype=bool)
    mask[:50, 30:] = True  # the top-right quarter
    small = M.resize_mask(mask, 10, 10)
    assert small.shape == (10, 10) and small[:5, 5:].all() and small.sum() == 25
    target = M.masks_to_target(mask, ~mask, 8)
    assert target.shape == (8, 8, 2) and target.dtype == np.uint8
    assert target[..., 0].sum() == 16 and target[..., 1].sum() == 48


def test_dice() -> None:
    left = np.zeros((40, 40), dtype=bool)
    left[:, 20:] = True
    truth = left.copy()
    truth[:, 19] = True
    assert 0.95 < M.dice(left, truth) < 1.0
    assert M.dice(left, ~left) == 0.0
    empty = np.zeros((4, 4), dtype=bool)
    assert M.dice(empty, empty) == 1.0 and M.dice(empty, ~empty) == 0.0
