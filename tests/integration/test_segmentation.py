"""The segmenter's pipeline end to end on phantoms the test generates: train-seg (one
epoch of two steps, small images) -> export-seg (tf2onnx, parity with Keras) ->
onnxruntime -> evaluate-seg -> metadata round trip. Needs the [train] extra."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.train

keras = pytest.importorskip("keras", reason="the [train] extra (TensorFlow) is not installed")

from cxrd.errors import ModelError  # noqa: E402
from cxrd.modelinfo import (  # noqa: E402
    INPUT_NAME,
    LUNG_SEGMENTS,
    OUTPUT_SEGMENTS,
    PREPROCESSING,
    read_model_info,
    read_segmentation_info,
)
from training import phantoms, sources  # noqa: E402
from training.cli import main  # noqa: E402
from training.data import load_images, to_inputs  # noqa: E402
from training.export import ExportCheckFailed  # noqa: E402
from training.model import build_segmenter  # noqa: E402
from training.segment import load_mask_set  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seg")
    phantoms.generate_studies(root / "ph", 10, 3, size=(150, 123), masks=True)
    phantoms.generate_studies(root / "ph-test", 4, 4, size=(150, 123), masks=True)
    train = sources.assign_splits(sources.index_phantom(root / "ph").records,
                                  val_fraction=0.3, test_sources=())
    test = [dataclasses.replace(r, split="test")
            for r in sources.index_phantom(root / "ph-test").records]
    manifest = root / "manifest.csv"
    sources.write_manifest(train + test, manifest)
    run, model = root / "run", root / "model.onnx"
    assert main(["train-seg", "--manifest", str(manifest), "--run", str(run), "--input-size",
                 str(SIZE), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4"]) == 0
    assert main(["export-seg", "--run", str(run), "--manifest", str(manifest), "--out",
                 str(model), "--name", "seg-test", "--version", "0.0.1", "--demo",
                 "--allow-untrained"]) == 0
    assert main(["evaluate-seg", "--model", str(model), "--manifest", str(manifest), "--out",
                 str(root / "eval"), "--write-metadata"]) == 0
    return {"root": root, "manifest": manifest, "run": run, "model": model}


def test_run_outputs(exported: dict[str, Path]) -> None:
    run = exported["run"]
    for name in ("checkpoint.weights.h5", "history.csv", "curves.png", "run.json"):
        assert (run / name).is_file(), name
    history = (run / "history.csv").read_text().splitlines()
    assert "val_dice_left" in history[0] and len(history) == 2
    meta = json.loads((run / "run.json").read_text())
    assert meta["input_size"] == SIZE and "phantom" in meta["training_data"]
    assert meta["preprocessing"] == PREPROCESSING


def test_onnx_contract_and_parity(exported: dict[str, Path]) -> None:
    path = exported["model"]
    info = read_segmentation_info(path)
    assert (info.name, info.version, info.demo) == ("seg-test", "0.0.1", True)
    assert info.input_size == SIZE and info.preprocessing == PREPROCESSING
    assert info.segments == LUNG_SEGMENTS
    assert info.device_uid == json.loads((exported["run"] / "run.json").read_text())["device_uid"]
    with pytest.raises(ModelError, match="segmentation model"):
        read_model_info(path)  # serving's classifier reader refuses it
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == [INPUT_NAME]
    assert [o.name for o in graph.output] == [OUTPUT_SEGMENTS]
    records = [r for r in sources.read_manifest(exported["manifest"]) if r.split == "test"]
    x = to_inputs(load_images(records, SIZE).images)
    (probs,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        [OUTPUT_SEGMENTS], {INPUT_NAME: x})
    assert probs.shape == (len(records), SIZE // 2, SIZE // 2, 2)
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    model = build_segmenter(SIZE, str(exported["run"] / "checkpoint.weights.h5"))
    keras_probs = model.predict(x, verbose=0)
    assert float(np.max(np.abs(keras_probs - probs))) <= 1e-4


def test_evaluation_report_and_metadata(exported: dict[str, Path]) -> None:
    report = json.loads((exported["root"] / "eval" / "report.json").read_text())
    test = report["splits"]["test"]
    masked = [r for r in sources.read_manifest(exported["manifest"])
              if r.split == "test" and r.lung_masks]
    assert test["images"] == len(masked)
    assert test["dice_left"]["n"] + test["no_lung_images"] == len(masked)
    assert 0.0 <= test["dice_left"]["mean"] <= 1.0
    info = read_segmentation_info(exported["model"])
    assert info.metrics == report["headline"]
    assert info.metrics["test_dice_right"] == pytest.approx(test["dice_right"]["mean"], abs=1e-4)


def test_targets_follow_the_patients_sides(exported: dict[str, Path]) -> None:
    records = [r for r in sources.read_manifest(exported["manifest"])
               if r.lung_masks and r.split == "train"]
    data = load_mask_set(records, SIZE)
    chest = data.targets.reshape(len(records), -1).any(axis=1)
    assert chest.any() and data.targets.shape[1:] == (SIZE // 2, SIZE // 2, 2)
    cols = np.arange(SIZE // 2)
    for t in data.targets[chest]:  # channel 0 (left lung) on the image's right
        left, right = (float((t[..., c].sum(axis=0) * cols).sum() / t[..., c].sum())
                       for c in (0, 1))
        assert left > SIZE / 4 > right


def test_export_refuses_an_untrained_model(exported: dict[str, Path]) -> None:
    with pytest.raises(ExportCheckFailed, match="untrained"):
        main_args = ["export-seg", "--run", str(exported["run"]), "--manifest",
                     str(exported["manifest"]), "--out", str(exported["root"] / "x.onnx")]
        main(main_args)
    assert not (exported["root"] / "x.onnx").exists()
