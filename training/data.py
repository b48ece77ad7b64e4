"""Loading manifest images into arrays, through the serving preprocessing.

Each image goes through ``cxrd.preprocess.read_gray8_and_size`` and the contract's step 5
(``Contract.resize``), the functions the daemon uses, with the daemon's
``decode_min_side(size)``: JPEG 2000 DICOM is decoded at the same reduced resolution as in
serving. Training uses the current contract (``cxrd.modelinfo.PREPROCESSING``); evaluating
a model, the one it declares. Images are cached as uint8 at the training size, keyed by the
contract's name and ``DECODE_REVISION``. The float model input is made from that cache with
``cxrd.preprocess``'s SCALE and OFFSET, in numpy (``to_inputs``) or in TensorFlow
(``training.train``), identically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cxrd.modelinfo import CLASS_NAMES, PREPROCESSING
from cxrd.preprocess import (
    DECODE_REVISION,
    OFFSET,
    SCALE,
    contract,
    decode_min_side,
    read_gray8_and_size,
)
from training.sources import Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images of one split."""

    images: npt.NDArray[np.uint8]  # (N, size, size) gray8, resized
    labels: npt.NDArray[np.int64]  # (N,) index into CLASS_NAMES
    sizes: npt.NDArray[np.int64]  # (N, 2) original rows, cols
    records: tuple[Record, ...]

    def __len__(self) -> int:
        return len(self.records)


def _load_one(args: tuple[str, int, str]) -> tuple[npt.NDArray[np.uint8], tuple[int, int]]:
    path, size, preprocessing = args
    # The same reduced JPEG 2000 decode as cxrd.worker.prepare; sizes stay the full ones.
    gray, full_size = read_gray8_and_size(path, decode_min_side(size))
    return contract(preprocessing).resize(gray, size), full_size


def load_images(
    records: Sequence[Record],
    size: int,
    *,
    preprocessing: str = PREPROCESSING,
    cache_dir: Path | None = None,
    workers: int = 2,
    progress: bool = False,
    desc: str = "images",
) -> ImageSet:
    """Preprocess ``records`` under the contract named ``preprocessing`` (cached by path
    list, size and contract)."""
    contract(preprocessing)  # ModelError for an unknown contract, before any work
    labels = np.array([CLASS_NAMES.index(r.label) for r in records], dtype=np.int64)
    key = hashlib.sha256(
        json.dumps([preprocessing, DECODE_REVISION, size, [r.path for r in records]]).encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"{desc}-{size}-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            return ImageSet(z["images"], labels, z["sizes"], tuple(records))
    images = np.zeros((len(records), size, size), dtype=np.uint8)
    sizes = np.zeros((len(records), 2), dtype=np.int64)
    jobs = [(r.path, size, preprocessing) for r in records]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"preprocess {desc}", unit="img")
    if workers > 1 and len(jobs) > 16:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(_load_one, jobs, chunksize=16)
            for i, (img, shape) in enumerate(results):
                images[i], sizes[i] = img, shape
                if bar:
                    bar.update()
    else:
        for i, job in enumerate(jobs):
            images[i], sizes[i] = _load_one(job)
            if bar:
                bar.update()
    if bar:
        bar.close()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, images=images, sizes=sizes)
        tmp.replace(cache)
    return ImageSet(images, labels, sizes, tuple(records))


def to_inputs(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """(N, H, W) gray8 to (N, H, W, 3) model inputs, as cxrd.preprocess.to_model_input."""
    x = images.astype(np.float32) * np.float32(SCALE) + np.float32(OFFSET)
    return np.repeat(x[..., None], 3, axis=-1)
