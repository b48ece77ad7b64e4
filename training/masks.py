"""Lung-field masks: how a record names them, reading, left/right split, resizing.

A record's ``lung_masks`` (manifest column) is JSON, one of:

* ``{"left": PATH, "right": PATH}``: one file per lung, sides as named (the phantoms);
* ``{"lungs": [PATH, ...]}``: files whose union holds both lungs (the Shenzhen release's
  one mask per image; Montgomery's ``leftMask``/``rightMask``, whose side convention
  could not be confirmed from its documentation), split by :func:`split_lungs`;
* ``""``: no masks (the image is not used to train or test the segmenter).

An empty mask is a real annotation: the image has no lung fields (a non-chest image).
Left and right are the patient's: on a PA or AP frontal the left lung lies on the image's
right. Files are 8-bit or 1-bit greyscale images, lung = any value above half scale.
Targets have the channel order of the segmenter's output, ``cxrd.modelinfo.LUNG_SEGMENTS``
(left lung, right lung), as every function here returns ``(left, right)``. The model's
output becomes masks in ``cxrd.lungs.probs_to_masks``, serving's and training's alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from cxrd.lungs import Mask

#: A connected component with at least this fraction of its area on each side of the
#: image's middle column (both lungs drawn as one region) is cut at that column.
STRADDLE_FRACTION = 0.25


def sides_spec(left: str | Path, right: str | Path) -> str:
    """The ``lung_masks`` value of a record with one file per lung."""
    return json.dumps({"left": str(left), "right": str(right)})


def union_spec(paths: Sequence[str | Path]) -> str:
    """The ``lung_masks`` value of a record whose files together hold both lungs."""
    return json.dumps({"lungs": [str(p) for p in paths]})


def _read(path: str | Path) -> Mask:
    with Image.open(path) as img:
        arr = np.asarray(img.convert("L"))
    return arr > 127


def split_lungs(mask: Mask) -> tuple[Mask, Mask]:
    """(left, right) from a mask of both lungs of a frontal view.

    Each 8-connected component goes whole to the side its centroid lies on: the image's
    right half is the patient's left. A component with at least ``STRADDLE_FRACTION`` of
    its area on each half (lungs drawn touching) is cut at the middle column instead.
    """
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    cols = mask.shape[1]
    middle = cols / 2.0
    on_right_half = np.arange(cols)[None, :] + 0.5 >= middle
    left = np.zeros_like(mask)
    if n:
        index = np.arange(1, n + 1)
        area = ndimage.sum_labels(mask, labels, index)
        right_area = ndimage.sum_labels(mask & on_right_half, labels, index)
        frac_right = right_area / np.maximum(area, 1)
        centroid_col = np.array([c[1] for c in ndimage.center_of_mass(mask, labels, index)])
        straddle = (frac_right >= STRADDLE_FRACTION) & (frac_right <= 1 - STRADDLE_FRACTION)
        whole_left = (centroid_col + 0.5 >= middle) & ~straddle
        lut = np.zeros(n + 1, dtype=np.uint8)
        lut[1:][whole_left] = 1
        lut[1:][straddle] = 2
        kind = lut[labels]
        left = (kind == 1) | ((kind == 2) & on_right_half)
    return left, mask & ~left


def read_lung_masks(spec: str) -> tuple[Mask, Mask]:
    """(left, right) boolean masks at the files' own size from a ``lung_masks`` value."""
    try:
        data = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise ValueError(f"lung_masks {spec!r} is not JSON: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"left", "right"}:
        left, right = _read(data["left"]), _read(data["right"])
        if left.shape != right.shape:
            raise ValueError(f"the lung masks of {spec} differ in size: "
                             f"{left.shape} and {right.shape}")
        return left, right
    if isinstance(data, dict) and set(data) == {"lungs"} and data["lungs"]:
        union: Mask | None = None
        for path in data["lungs"]:
            m = _read(path)
            if union is not None and m.shape != union.shape:
                raise ValueError(f"the lung masks of {spec} differ in size")
            union = m if union is None else union | m
        assert union is not None
        return split_lungs(union)
    raise ValueError(f"lung_masks {spec!r}: expected {{'left': PATH, 'right': PATH}} or "
                     "{'lungs': [PATH, ...]}")


def resize_mask(mask: Mask, rows: int, cols: int) -> Mask:
    """Stretch a mask to (rows, cols) the way ``cxrd.preprocess.resize_gray8`` stretches
    the image (Pillow bilinear with antialiasing), then keep what is half covered."""
    img = Image.fromarray(mask.astype(np.float32))
    return np.asarray(img.resize((cols, rows), Image.Resampling.BILINEAR)) >= 0.5


def masks_to_target(left: Mask, right: Mask, size: int) -> npt.NDArray[np.uint8]:
    """(size, size, 2) uint8 0/1 target, channels left then right."""
    return np.stack([resize_mask(m, size, size) for m in (left, right)], axis=-1).astype(
        np.uint8)


def dice(pred: Mask, truth: Mask) -> float:
    """Dice coefficient; 1.0 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((pred & truth).sum()) / total
