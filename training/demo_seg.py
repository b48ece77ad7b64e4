"""The DEMO lung-field segmenter: phantoms with masks end to end, then ship into
``cxrd/models``.

``python -m training demo-seg`` runs the commands a user runs on public mask sets
(train-seg, export-seg, evaluate-seg) on phantom studies the project generates: frontal
chest images with their lung masks and, in about one study in seven, hand or knee images
with empty masks, so that the model learns to find no lung where there is none. It
refuses to ship a model below ``MIN_DICE`` per lung on held-out phantoms.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import training.phantoms as phantoms
from training import sources
from training.demo import PHANTOM_SIZE

log = logging.getLogger(__name__)

MIN_DICE = 0.95
DEMO_SEG_NAME = "cxrd-demo-lungseg-phantom"
DEMO_SEG_VERSION = "1.1.0"
DEMO_SEG_EPOCHS = 14
INPUT_SIZE = 224


class DemoSegBelowTarget(RuntimeError):
    """The freshly trained demo segmenter misses its Dice target; nothing was shipped."""


def _generate(root: Path, n_studies: int, seed: int) -> None:
    if not (root / "ground_truth.csv").exists():
        phantoms.generate_studies(root, n_studies, seed, images_per_study=(1, 2),
                                  include_lateral=False, size=PHANTOM_SIZE, masks=True,
                                  progress=True)


def build_demo_segmenter(work: Path, out: Path, *, n_train: int = 600, n_test: int = 150,
                         epochs: int = DEMO_SEG_EPOCHS, seed: int = 11,
                         ship_below_target: bool = False) -> dict[str, float]:
    """Regenerate the demo segmenter; returns its headline figures (also in its metadata)."""
    from training.cli import main

    work.mkdir(parents=True, exist_ok=True)
    train_root, test_root = work / "phantoms-train", work / "phantoms-test"
    _generate(train_root, n_train, seed)
    _generate(test_root, n_test, seed + 1000)
    train = sources.assign_splits(sources.index_phantom(train_root).records, seed=seed,
                                  test_sources=())
    test = [dataclasses.replace(r, split="test")
            for r in sources.index_phantom(test_root).records]
    manifest = work / "manifest.csv"
    sources.write_manifest(train + test, manifest)
    run, model = work / "run", work / "model.onnx"
    steps = [
        ["train-seg", "--manifest", str(manifest), "--run", str(run), "--input-size",
         str(INPUT_SIZE), "--epochs", str(epochs), "--seed", str(seed)],
        ["export-seg", "--run", str(run), "--manifest", str(manifest), "--out", str(model),
         "--name", DEMO_SEG_NAME, "--version", DEMO_SEG_VERSION, "--demo"],
        ["evaluate-seg", "--model", str(model), "--manifest", str(manifest), "--out",
         str(work / "eval"), "--write-metadata"],
    ]
    for argv in steps:
        if main(argv) != 0:
            raise RuntimeError(f"python -m training {' '.join(argv)} failed")
    figures = json.loads((work / "eval" / "report.json").read_text())["headline"]
    worst = min(figures.get("test_dice_left", 0.0), figures.get("test_dice_right", 0.0))
    if worst < MIN_DICE and not ship_below_target:
        raise DemoSegBelowTarget(
            f"held-out Dice left {figures.get('test_dice_left', 0.0):.4f}, right "
            f"{figures.get('test_dice_right', 0.0):.4f} (needs {MIN_DICE} each); "
            f"{out} left unchanged.")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, out)
    log.info("shipped %s: %s", out, figures)
    return dict(figures)
