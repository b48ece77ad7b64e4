"""The training pipeline end to end on phantoms the test generates: index -> train (a few
steps, small images) -> export (tf2onnx) -> parity and CAM checks -> onnxruntime ->
evaluate -> metadata round trip. Needs the [train] extra."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.train

keras = pytest.importorskip("keras", reason="the [train] extra (TensorFlow) is not installed")

from cxrd.infer import Classifier  # noqa: E402
from cxrd.modelinfo import ModelInfo, read_model_info  # noqa: E402
from training import phantoms, sources  # noqa: E402
from training.cli import main  # noqa: E402
from training.data import load_images, to_inputs  # noqa: E402
from training.export import ExportCheckFailed, check_export, export, softmax  # noqa: E402
from training.model import build_classifier, build_export_model  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    phantoms.generate_images(root / "ph", 36, 3, fmt="dcm", size=(150, 123))
    phantoms.generate_images(root / "ph-test", 9, 4, fmt="png", size=(150, 123))
    manifest = root / "manifest.csv"
    assert (
        main(
            [
                "index",
                "--source",
                f"phantom={root / 'ph'}",
                "--out",
                str(manifest),
                "--val-fraction",
                "0.25",
            ]
        )
        == 0
    )
    records = sources.read_manifest(manifest)
    test = [r for r in sources.index_phantom(root / "ph-test", None).records]
    sources.write_manifest(
        records + [r.__class__(**{**r.__dict__, "split": "test"}) for r in test], manifest
    )
    run = root / "run"
    assert (
        main(
            [
                "train",
                "--manifest",
                str(manifest),
                "--run",
                str(run),
                "--input-size",
                str(SIZE),
                "--epochs",
                "2",
                "--steps-per-epoch",
                "2",
                "--batch-size",
                "8",
                "--patience",
                "5",
            ]
        )
        == 0
    )
    return {"root": root, "manifest": manifest, "run": run}


def test_training_outputs(trained: dict[str, Path]) -> None:
    run = trained["run"]
    for name in (
        "checkpoint.weights.h5",
        "history.csv",
        "curves.png",
        "train_config.json",
        "run.json",
    ):
        assert (run / name).stat().st_size > 0, name
    meta = json.loads((run / "run.json").read_text())
    assert (
        meta["input_size"] == SIZE
        and meta["device_uid"].startswith("2.25.")
        or "." in meta["device_uid"]
    )
    assert "phantom" in meta["training_data"]
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["hflip"] is False  # no left-right flip by default
    assert set(cfg["class_weights"]) == {"0", "1", "2"}


def _sharpened(run: Path, x: np.ndarray) -> object:
    """The tiny run's model made input-sensitive: a few training steps leave the batch-norm
    moving statistics at their initial values, where activations vanish through the
    network and every input gives the same probabilities (a parity check then proves
    nothing). Set each BN layer's statistics from real inputs, as long training would.
    The random head is kept moderate (logits within about +-5): float32 rounding across
    the ~50 layers differs between TensorFlow and onnxruntime by ~1e-5 in the logits'
    scale, and a head five times larger (logits to +-24) put max |delta probs| at up
    to 1.1e-4 on some runs of the (not bit-reproducible) tiny training, over the 1e-4
    bound, with nothing wrong in the conversion."""
    model = build_classifier(SIZE, str(run / "checkpoint.weights.h5"))
    for layer in model.layers:
        if layer.__class__.__name__ != "BatchNormalization":
            continue
        feed = keras.Model(model.input, layer.input)
        a = np.asarray(feed(x, training=False))
        gamma, beta, _, _ = layer.get_weights()
        layer.set_weights([gamma, beta, a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2)) + 1e-3])
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    rng = np.random.default_rng(0)
    head.set_weights([rng.normal(0, 0.1, kernel.shape).astype(np.float32), bias])
    return model


def test_export_parity_cam_and_metadata(trained: dict[str, Path], tmp_path: Path) -> None:
    val = [r for r in sources.read_manifest(trained["manifest"]) if r.split == "val"]
    samples = to_inputs(load_images(val, SIZE).images)
    model = _sharpened(trained["run"], samples)
    info = ModelInfo(
        name="tiny",
        version="0.0.1",
        device_uid="1.2.826.0.1.3680043.10.1",
        input_size=SIZE,
        training_data="phantom",
        demo=True,
    )
    out = tmp_path / "tiny.onnx"
    checks = export(model, out, info, samples, min_output_spread=0.05)
    assert checks["parity_max_abs"] <= 1e-4 and checks["cam_max_abs"] <= 1e-4
    assert checks["keras_output_spread"] > 0.05
    assert read_model_info(out) == info  # metadata round trip

    clf = Classifier(out, ["CPUExecutionProvider"])
    assert clf.providers == ["CPUExecutionProvider"]
    probs, cam = clf.run(samples)
    keras_probs = model.predict(samples, verbose=0)
    assert np.max(np.abs(probs - keras_probs)) <= 1e-4
    assert cam.shape == (len(samples), SIZE // 32, SIZE // 32, 3)
    assert np.max(np.abs(softmax(cam.mean(axis=(1, 2))) - probs)) <= 1e-4
    # dynamic batch and spatial size: batch of 1 at another size still runs
    p1, c1 = clf.session.run(["probs", "cam"], {"input_image": samples[:1, :32, :32]})
    assert p1.shape == (1, 3) and c1.shape == (1, 1, 1, 3)


def test_export_refuses_untrained_and_detects_mismatch(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    val = [r for r in sources.read_manifest(trained["manifest"]) if r.split == "val"]
    samples = to_inputs(load_images(val, SIZE).images)
    info = ModelInfo(name="x", version="0", device_uid="1.2.3")
    untrained = build_classifier(SIZE, "none")
    with pytest.raises(ExportCheckFailed, match="untrained"):
        export(untrained, tmp_path / "u.onnx", info, samples, min_output_spread=0.05)
    assert not (tmp_path / "u.onnx").exists()
    # An ONNX file from one model checked against another must fail the parity check.
    sharp = _sharpened(trained["run"], samples)
    export(sharp, tmp_path / "s.onnx", info, samples, min_output_spread=0.05)
    other = _sharpened(trained["run"], samples)
    head = other.get_layer("head")
    k, b = head.get_weights()
    head.set_weights([k[:, ::-1].copy(), b])
    with pytest.raises(ExportCheckFailed, match="disagree"):
        check_export(tmp_path / "s.onnx", other, samples)


def test_export_model_cam_identity() -> None:
    model = build_classifier(SIZE, "none")
    twin = build_export_model(model)
    x = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    probs, cam = twin.predict(x, verbose=0)
    assert np.allclose(softmax(cam.mean(axis=(1, 2))), probs, atol=1e-5)
    assert np.allclose(model.predict(x, verbose=0), probs, atol=1e-5)
    # the head at every position, centred over the classes
    features = keras.Model(model.input, model.get_layer("out_relu").output).predict(
        x, verbose=0)
    kernel, bias = model.get_layer("head").get_weights()
    raw = features @ kernel + bias
    assert np.allclose(cam, raw - raw.mean(axis=-1, keepdims=True), atol=1e-4)
    assert np.allclose(cam.sum(axis=-1), 0.0, atol=1e-4)


def test_weights_from_local_files(tmp_path: Path) -> None:
    """--weights PATH: a whole-classifier file, and a MobileNetV2 no-top backbone file."""
    source = build_classifier(SIZE, "none")
    rng = np.random.default_rng(2)
    for layer in source.layers:
        if layer.weights:
            layer.set_weights(
                [rng.normal(0, 0.1, w.shape).astype(np.float32) for w in layer.get_weights()]
            )
    whole = tmp_path / "whole.weights.h5"
    source.save_weights(str(whole))
    # at the same input size, and at another one (the demo recipe's later stages start
    # from an earlier stage's weights at a larger size)
    for size in (SIZE, SIZE + 32):
        loaded = build_classifier(size, str(whole))
        assert loaded.input_shape == (None, size, size, 3)
        for a, b in zip(source.weights, loaded.weights, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))

    backbone = keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), weights=None, include_top=False, alpha=0.35
    )
    conv = backbone.get_layer("Conv1")
    conv.set_weights([np.full(w.shape, 0.123, np.float32) for w in conv.get_weights()])
    notop = tmp_path / "mobilenet_v2_0.35_no_top.weights.h5"
    backbone.save_weights(str(notop))
    model = build_classifier(SIZE, str(notop))
    assert np.allclose(model.get_layer("Conv1").get_weights()[0], 0.123)
    with pytest.raises(FileNotFoundError):
        build_classifier(SIZE, str(tmp_path / "missing.h5"))


def test_architecture_is_the_founding_one() -> None:
    model = build_classifier(224, "none")
    assert model.input.name.startswith("input_image") or model.inputs[0].name == "input_image"
    assert model.input_shape == (None, 224, 224, 3)
    assert model.get_layer("gap").__class__.__name__ == "GlobalAveragePooling2D"
    head = model.get_layer("head")
    assert head.units == 3 and head.activation.__name__ == "softmax"
    assert model.get_layer("out_relu").output.shape[-1] == 1280
    assert build_classifier(512, "none").input_shape == (None, 512, 512, 3)


def test_evaluate_writes_report_and_records_operating_point(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    val = [r for r in sources.read_manifest(trained["manifest"]) if r.split == "val"]
    samples = to_inputs(load_images(val, SIZE).images)
    model = _sharpened(trained["run"], samples)
    out = tmp_path / "m.onnx"
    export(model, out, ModelInfo(name="m", version="1", device_uid="1.2.3.9"), samples)
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out),
                "--manifest",
                str(trained["manifest"]),
                "--out",
                str(tmp_path / "eval"),
                "--bootstrap",
                "50",
                "--write-metadata",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["splits"]) == {"val", "test"}
    for split in ("val", "test"):
        rep = report["splits"][split]
        assert {"per_class", "confusion_matrix", "ece", "roc"} <= set(rep)
        assert "pointing_game" in rep
        for kind in ("roc", "confusion", "reliability"):
            assert (tmp_path / "eval" / f"{kind}_{split}.png").stat().st_size > 1000
    info = read_model_info(out)
    op = report["operating_point"]
    assert info.operating_point.tb_threshold == pytest.approx(op["threshold"])
    assert op["sensitivity"] >= 0.9
    assert info.metrics["val_accuracy"] == pytest.approx(report["splits"]["val"]["accuracy"])


def test_cam_pool_twin_shares_the_classifiers_weights() -> None:
    """The top-k pooled CAM output is the head applied at every position, pooled by the
    mean of the k highest; it adds no weight of its own."""
    from training.train import TrainConfig, build_training_model

    model = build_classifier(SIZE, "none")
    k = 3
    twin = build_training_model(model, TrainConfig(input_size=SIZE, cam_loss_weight=1.0,
                                                   cam_top_k=k))
    assert len(twin.weights) == len(model.weights)
    assert {id(w) for w in twin.weights} == {id(w) for w in model.weights}
    x = np.random.default_rng(3).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    out = np.asarray(twin(x, training=False))
    _, cam = build_export_model(model).predict(x, verbose=0)
    flat = cam.reshape(2, -1, 3)
    pooled = np.sort(flat, axis=1)[:, -k:, :].mean(axis=1)
    assert out.shape == (2, 2, 3)
    assert np.allclose(out[:, 0], model.predict(x, verbose=0), atol=1e-5)
    assert np.allclose(out[:, 1], softmax(pooled), atol=1e-5)


def test_head_phase_changes_only_the_head(trained: dict[str, Path], tmp_path: Path) -> None:
    """The second phase fits the Dense head alone: every other weight (batch-norm statistics
    included) is unchanged, the model is trainable again afterwards, and the export still
    holds the CAM identity. The two-phase run itself goes through ``train``."""
    from training.train import TrainConfig, _fit_head, class_weights, make_dataset, train

    records = sources.read_manifest(trained["manifest"])
    sets = {
        split: load_images([r for r in records if r.split == split], SIZE)
        for split in ("train", "val")
    }
    cfg = TrainConfig(input_size=SIZE, epochs=1, batch_size=8, steps_per_epoch=2,
                      cam_loss_weight=1.0, gap_loss_weight=0.0, cam_top_k=2,
                      label_smoothing=0.05, max_shift=0.05, head_epochs=1)
    model = train(sets["train"], sets["val"], cfg, tmp_path / "run")
    assert (tmp_path / "run" / "history_head.csv").is_file()
    before = {la.name: [np.array(w) for w in la.get_weights()] for la in model.layers}
    _fit_head(model, make_dataset(sets["train"], cfg, training=True),
              make_dataset(sets["val"], cfg, training=False), cfg, tmp_path / "run",
              tmp_path / "run" / "head.weights.h5", 2, class_weights(sets["train"].labels))
    for layer in model.layers:
        after = layer.get_weights()
        same = all(np.array_equal(a, b) for a, b in zip(before[layer.name], after,
                                                          strict=True))
        assert same == (layer.name != "head"), layer.name
        assert layer.trainable
    x = to_inputs(sets["val"].images[:2])
    probs, cam = build_export_model(model).predict(x, verbose=0)
    assert np.allclose(softmax(cam.mean(axis=(1, 2))), probs, atol=1e-5)


def test_cam_cells_sit_at_their_receptive_field_centres() -> None:
    """CAM_CELL_SHIFT, measured: the input pixels that reach an ``out_relu`` cell (its
    gradient's support) are centred on pixel 32 i + 31, not on its block's centre."""
    import tensorflow as tf

    from cxrd.preprocess import CAM_CELL_SHIFT, CAM_STRIDE

    model = build_classifier(1024, "none")
    backbone = tf.keras.Model(model.input, model.get_layer("out_relu").output)
    x = tf.constant(np.random.default_rng(0).normal(size=(1, 1024, 1024, 3)), tf.float32)
    for cell in ((16, 16), (15, 18)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = backbone(x, training=False)[0, cell[0], cell[1], :]
            value = tf.reduce_sum(out * tf.range(1.0, out.shape[0] + 1.0))
        grad = np.abs(tape.gradient(value, x).numpy()[0]).sum(axis=-1)
        rows, cols = np.flatnonzero(grad.any(axis=1)), np.flatnonzero(grad.any(axis=0))
        assert rows[0] > 0 and rows[-1] < 1023 and cols[0] > 0 and cols[-1] < 1023  # inside
        centre = ((rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2)
        expected = tuple((i + 0.5 + CAM_CELL_SHIFT) * CAM_STRIDE - 0.5 for i in cell)
        assert expected == (32 * cell[0] + 31, 32 * cell[1] + 31)
        assert np.allclose(centre, expected, atol=0.5), (cell, centre, expected)


def test_erase_twin_replaces_the_cam_peak_with_the_mirror_image() -> None:
    """The erase-consistency twin: for abnormal images flagged "on peak", the square
    replaced by the mirror image is centred on the true class's CAM peak (the cell's
    receptive-field centre); never for NORM; pixels outside the square are untouched; no
    weight of its own."""
    from cxrd.preprocess import CAM_CELL_SHIFT, CAM_STRIDE
    from training.train import TrainConfig, _erase_layer, build_training_model

    size, n = 128, 40  # 4 x 4 cells
    cfg = TrainConfig(input_size=size, erase_loss_weight=1.0, erase_size=0.25, seed=5)
    model = build_classifier(size, "none")
    twin = build_training_model(model, cfg)
    assert {id(w) for w in twin.weights} == {id(w) for w in model.weights}

    head = model.get_layer("head")
    kernel = np.zeros(head.kernel.shape, np.float32)
    kernel[0, :] = [1.0, 2.0, 0.5]  # every class's CAM is a multiple of feature 0
    head.set_weights([kernel, np.zeros(3, np.float32)])
    features = np.zeros((n, 4, 4, kernel.shape[0]), np.float32)
    features[:, 1, 2, 0] = 5.0  # the peak: cell (row 1, column 2)
    rng = np.random.default_rng(4)
    images = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0] * (n // 4), np.int32)  # TB, NTB, NORM, TB
    erased, on_peak = (np.asarray(t) for t in _erase_layer(head, cfg)(
        [images, labels, features]))
    mirrored = images[:, :, ::-1]
    centre = [(i + 0.5 + CAM_CELL_SHIFT) * CAM_STRIDE - 0.5 for i in (1, 2)]  # 63, 95
    half = size * cfg.erase_size / 2
    assert 0 < on_peak.sum() < n and not on_peak[labels == 2].any()
    for k in range(n):
        changed = erased[k] != images[k]
        assert np.array_equal(erased[k][changed], mirrored[k][changed])
        rows, cols = np.flatnonzero(changed.any(axis=(1, 2))), np.flatnonzero(
            changed.any(axis=(0, 2)))
        if on_peak[k]:
            assert rows[0] >= centre[0] - half and rows[-1] <= centre[0] + half
            assert cols[0] >= centre[1] - half and cols[-1] <= min(centre[1] + half, size)
            assert rows[0] <= centre[0] <= rows[-1] and cols[0] <= centre[1] <= cols[-1]


def test_locality_twin_occludes_and_penalises_only_far_cam_changes() -> None:
    """The occlusion-locality twin: the second half of its batch is the images with one
    square replaced by the mirror image's; its loss is the mean squared change of the
    class-centred CAM over the cells outside the square and its margin, and nothing else;
    in inference mode it adds no loss and returns the classifier's own output."""
    from cxrd.preprocess import CAM_CELL_SHIFT, CAM_STRIDE
    from training.train import TrainConfig, _locality_layers, build_training_model

    size, n = 128, 6  # 4 x 4 cells, centres at 31, 63, 95, 127
    cfg = TrainConfig(input_size=size, locality_loss_weight=2.0, locality_size=0.25,
                      locality_margin=1.0, seed=3)
    model = build_classifier(size, "none")
    twin = build_training_model(model, cfg)
    assert {id(w) for w in twin.weights} == {id(w) for w in model.weights}
    images = np.random.default_rng(6).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    assert np.allclose(twin(images, training=False), model(images, training=False), atol=1e-6)
    assert not twin.losses

    head = model.get_layer("head")
    occlude, penalty = _locality_layers(head, cfg)
    same, _ = occlude(images, training=False)  # validation passes the images alone
    assert np.array_equal(np.asarray(same), images)
    both, centres = (np.asarray(t) for t in occlude(images, training=True))
    assert both.shape == (2 * n, size, size, 3) and np.array_equal(both[:n], images)
    half = size * cfg.locality_size / 2
    for k in range(n):
        changed = both[n + k] != images[k]
        assert np.array_equal(both[n + k][changed], images[k][:, ::-1][changed])
        rows, cols = np.flatnonzero(changed.any(axis=(1, 2))), np.flatnonzero(
            changed.any(axis=(0, 2)))
        assert rows[0] >= centres[k, 0] - half and rows[-1] <= centres[k, 0] + half
        assert cols[0] >= centres[k, 1] - half and cols[-1] <= centres[k, 1] + half

    # the penalty on made-up features: the CAM is feature 0 times (1, 2, 0.5)
    kernel = np.zeros(head.kernel.shape, np.float32)
    kernel[0, :] = [1.0, 2.0, 0.5]
    head.set_weights([kernel, np.zeros(3, np.float32)])
    square = np.array([[63.0, 63.0]], np.float32)  # on cell (1, 1): cells 0-2 are near
    assert [(i + 0.5 + CAM_CELL_SHIFT) * CAM_STRIDE - 0.5 for i in range(4)] == [31, 63, 95, 127]
    outputs = np.zeros((2, 3), np.float32)

    def loss(cell: tuple[int, int]) -> float:
        features = np.zeros((2, 4, 4, kernel.shape[0]), np.float32)
        features[1, cell[0], cell[1], 0] = 3.0  # the occluded copy changes at one cell
        layer = _locality_layers(head, cfg)[1]
        out = layer([outputs, features, square], training=True)
        assert np.asarray(out).shape == (1, 3)
        return float(layer.losses[0])

    assert loss((2, 2)) == 0.0  # 32 px from the square's edge: inside the margin
    centred = 3.0 * (np.array([1.0, 2.0, 0.5]) - 3.5 / 3)
    far = 16 - 9  # cells outside rows/columns 0-2
    assert np.isclose(loss((3, 0)), cfg.locality_loss_weight * np.mean(centred**2) / far)
    assert np.isclose(loss((0, 3)), loss((3, 3)))


def test_training_with_the_locality_loss_runs_and_validates(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """`train --locality-loss-weight` fits and validates the twin (clean and occluded
    images in training, the clean ones alone in validation) and saves the classifier's
    own weights."""
    run = tmp_path / "loc"
    assert main(["train", "--manifest", str(trained["manifest"]), "--run", str(run),
                 "--input-size", str(SIZE), "--epochs", "1", "--steps-per-epoch", "2",
                 "--batch-size", "8", "--locality-loss-weight", "1.0",
                 "--locality-margin", "0.5"]) == 0
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["locality_loss_weight"] == 1.0 and cfg["locality_margin"] == 0.5
    header, row = (run / "history.csv").read_text().splitlines()[:2]
    values = dict(zip(header.split(","), row.split(","), strict=True))
    assert float(values["val_loss"]) > 0 and float(values["loss"]) > 0
    model = build_classifier(SIZE, str(run / "checkpoint.weights.h5"))
    assert model.output_shape == (None, 3)
