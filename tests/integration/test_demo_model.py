"""The shipped DEMO model: its metadata, and a quick accuracy and CAM check on phantoms
generated now (a seed the training recipe never used)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxrd.infer import Classifier
from cxrd.modelinfo import CLASS_NAMES, PREPROCESSING, demo_model_path, read_model_info
from cxrd.preprocess import preprocess_dataset
from training import metrics, phantoms
from training.demo import MIN_ACCURACY, MIN_POINTING_GAME, PHANTOM_SIZE, demo_input_size

FRESH_SEED = 424242


def test_demo_model_metadata() -> None:
    path = demo_model_path()
    assert path.is_file()
    assert path.stat().st_size < 3_000_000  # ships inside the package (about 2 MB)
    info = read_model_info(path)
    assert info.demo is True and info.display_name.startswith("DEMO ")
    assert info.class_names == CLASS_NAMES and info.preprocessing == PREPROCESSING
    # the input size of the recipe that made it (python -m training demo)
    assert info.input_size == demo_input_size()
    assert "phantom" in info.training_data
    op = info.operating_point
    # <= 1.0: a confident model's TB scores may saturate at exactly 1.0
    assert 0.0 < op.tb_threshold <= 1.0 and "validation" in op.method
    assert op.target_sensitivity == pytest.approx(0.9) and (op.sensitivity or 0) >= 0.9
    assert info.metrics["test_accuracy"] >= MIN_ACCURACY
    assert 0.0 <= info.metrics["test_pointing_game"] <= 1.0  # recorded; target: see below


def test_demo_model_reaches_the_pointing_game_target() -> None:
    info = read_model_info(demo_model_path())
    assert info.metrics["test_pointing_game"] >= MIN_POINTING_GAME


def test_demo_model_on_fresh_phantoms(tmp_path: Path) -> None:
    gt = phantoms.generate_images(tmp_path, 60, FRESH_SEED, fmt="dcm", size=PHANTOM_SIZE)
    clf = Classifier(None, ["CPUExecutionProvider"])
    inputs = [preprocess_dataset(pydicom.dcmread(tmp_path / g.path), clf.input_size) for g in gt]
    probs, cams = clf.run(np.stack(inputs))
    labels = np.array([CLASS_NAMES.index(g.label) for g in gt])
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    assert accuracy >= 0.9, accuracy
    pred = probs.argmax(axis=1)
    with_boxes = [i for i, g in enumerate(gt) if g.boxes]
    game = metrics.pointing_game(
        [cams[i][..., pred[i]] for i in with_boxes],
        [(gt[i].rows, gt[i].cols) for i in with_boxes],
        [gt[i].boxes for i in with_boxes],
        [gt[i].label for i in with_boxes],
    )
    # The recorded held-out figure is reproduced on fresh phantoms (within sampling noise).
    recorded = read_model_info(demo_model_path()).metrics["test_pointing_game"]
    assert abs(game["overall"]["rate"] - recorded) <= 0.2, (game, recorded)
