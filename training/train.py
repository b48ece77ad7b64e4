"""Training: class weights, mild augmentation, checkpoints, early stopping, CSV log, curves."""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cxrd.modelinfo import CLASS_NAMES
from cxrd.preprocess import OFFSET, SCALE
from training.data import ImageSet

log = logging.getLogger(__name__)

RECALIBRATION_STEPS = 20


@dataclass(frozen=True)
class TrainConfig:
    input_size: int = 224
    weights: str = "none"
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 5
    seed: int = 0
    max_rotation_deg: float = 5.0
    max_zoom: float = 0.08
    brightness: float = 0.08
    contrast: float = 0.1
    hflip: bool = False  # off by default: chest anatomy is not left-right symmetric
    max_shift: float = 0.0  # random translation, fraction of the image side (0 = off)
    # Upside-down copies (off by default: not a mild augmentation). A localisation aid: a
    # model that must classify both orientations cannot tie a class to a place in the
    # frame, nor shift its evidence by a fixed amount up or down from the lesion.
    vflip: bool = False
    label_smoothing: float = 0.0
    # Localisation aid: an extra cross-entropy on the CAM pooled by the mean of its top-k
    # positions (weight 0 = off). It trains the same weights; the classifier and its export
    # stay GAP -> Dense. With GAP alone the loss rewards spreading class evidence over as
    # many positions as possible, so from scratch the CAM's peak need not sit on the lesion.
    cam_loss_weight: float = 0.0
    cam_top_k: int = 4
    gap_loss_weight: float = 1.0  # 0: the first phase trains through the pooled CAM only
    # Localisation aid: erase consistency (weight 0 = off). Each image is passed a second
    # time with a square of ``erase_size`` (fraction of the side) replaced by the same
    # square of its mirror image (the other lung's tissue): for half of the abnormal images
    # the square sits on the true class's CAM peak and the loss asks the class's
    # probability to drop (the evidence must be where the peak is); otherwise it sits at
    # random and the label stands (a patch is not itself evidence). Neither GAP nor the
    # pooled-CAM loss cares where the evidence is relative to the lesion; this does.
    erase_loss_weight: float = 0.0
    erase_size: float = 0.25
    # Localisation aid: occlusion locality (weight 0 = off). Each batch goes through the
    # network a second time, in the same forward pass (batch norm sees one batch), with a
    # random square of ``locality_size`` (fraction of the side) replaced by the same square
    # of the mirror image. The class-centred CAM of every cell whose receptive-field centre
    # lies more than ``locality_margin`` cells outside the square must not change (mean
    # squared difference). So a cell's evidence may come only from its neighbourhood: a
    # lesion can raise only the cells near it, which is what the pointing game asks. It
    # needs no label and no box, and leaves the classifier GAP -> Dense.
    locality_loss_weight: float = 0.0
    locality_size: float = 0.25
    locality_margin: float = 1.0
    # Then this many epochs fit the head alone (backbone frozen, batch norm in inference
    # mode) with the classifier's own GAP loss, so that the shipped GAP -> Dense
    # probabilities are trained as such on the features the first phase learnt.
    head_epochs: int = 0
    # Keras's MobileNetV2 uses batch-norm momentum 0.999, tuned for ImageNet-length runs:
    # on a few thousand steps the moving statistics stay near their initial values and
    # validation (inference mode) lags far behind training. A training hyperparameter;
    # the exported graph is unchanged. None keeps Keras's value.
    bn_momentum: float | None = 0.99
    steps_per_epoch: int | None = None  # for smoke tests


def class_weights(labels: npt.NDArray[np.int64]) -> dict[int, float]:
    """Inverse-frequency weights, normalised so that the mean weight per sample is 1."""
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).astype(np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return {i: float(w) for i, w in enumerate(weights)}


def _augmenter(cfg: TrainConfig) -> Any:
    import keras

    layers: list[Any] = [
        keras.layers.RandomRotation(
            cfg.max_rotation_deg / 360.0, fill_mode="nearest", seed=cfg.seed
        ),
        keras.layers.RandomZoom(cfg.max_zoom, fill_mode="nearest", seed=cfg.seed + 1),
        keras.layers.RandomBrightness(cfg.brightness, value_range=(0.0, 255.0), seed=cfg.seed + 2),
        keras.layers.RandomContrast(cfg.contrast, seed=cfg.seed + 3),
    ]
    if cfg.max_shift > 0:
        layers.append(
            keras.layers.RandomTranslation(
                cfg.max_shift, cfg.max_shift, fill_mode="constant", fill_value=0.0,
                seed=cfg.seed + 5,
            )
        )
    if cfg.hflip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=cfg.seed + 4))
    if cfg.vflip:
        layers.append(keras.layers.RandomFlip("vertical", seed=cfg.seed + 6))
    return keras.Sequential(layers, name="augment")


def recalibrate_batch_norm(model: Any, dataset: Any, steps: int) -> None:
    """Re-estimate every batch-norm layer's moving statistics under the current weights.

    Weights change faster than the moving averages follow in a short run from scratch, so
    inference-mode outputs (validation, export) would lag training. Forward passes in
    training mode with a short momentum bring the statistics to the data's; no weight is
    updated (there is no optimizer step).
    """
    import keras

    def walk(layer: Any) -> Any:  # the erase twin nests the classifier
        for child in getattr(layer, "layers", ()):
            yield child
            yield from walk(child)

    layers = list({id(la): la for la in walk(model)
                   if isinstance(la, keras.layers.BatchNormalization)}.values())
    saved = [la.momentum for la in layers]
    for la in layers:
        la.momentum = 0.8
    for images, _ in dataset.take(steps):
        model(images, training=True)
    for la, momentum in zip(layers, saved, strict=True):
        la.momentum = momentum
    log.info("recalibrated %d batch-norm layers on %d batches", len(layers), steps)


def _recalibration_callback(dataset: Any, steps: int) -> Any:
    import keras

    class BatchNormRecalibration(keras.callbacks.Callback):
        """Before each validation pass (and so before each checkpoint)."""

        def on_test_begin(self, logs: Any = None) -> None:
            recalibrate_batch_norm(self.model, dataset, steps)

    return BatchNormRecalibration()


def make_dataset(data: ImageSet, cfg: TrainConfig, *, training: bool) -> Any:
    """A tf.data pipeline: gray8 cache -> (augment) -> SCALE/OFFSET -> 3 channels."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((data.images, data.labels))
    if training:
        ds = ds.shuffle(len(data), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)
    augment = _augmenter(cfg) if training else None

    def prepare(images: Any, labels: Any) -> tuple[Any, Any]:
        x = tf.cast(images, tf.float32)[..., None]
        if augment is not None:
            x = tf.clip_by_value(augment(x, training=True), 0.0, 255.0)
        x = x * SCALE + OFFSET
        return tf.repeat(x, 3, axis=-1), labels

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.erase_loss_weight > 0:  # the erase twin takes the labels too
        ds = ds.map(lambda x, y: ((x, y), y))
    if training:
        ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


def _head_cam(head: Any, features: Any) -> Any:
    """The classifier's Dense head applied at every out_relu position: (N, h, w, C)."""
    from keras import ops

    return ops.matmul(features, head.kernel) + head.bias


def _cell_centres(cells: Any) -> Any:
    """Model-input position of CAM cell indices: each at its receptive field's centre."""
    from keras import ops

    from cxrd.preprocess import CAM_CELL_SHIFT, CAM_STRIDE

    return (ops.cast(cells, "float32") + 0.5 + CAM_CELL_SHIFT) * CAM_STRIDE - 0.5


def _mirror_square(images: Any, cy: Any, cx: Any, half: Any) -> Any:
    """``images`` (N, S, S, ch) with the square of half-side ``half`` centred on (cy, cx)
    (each (N,), model-input pixels) replaced by the same square of the mirror image."""
    from keras import ops

    grid = ops.cast(ops.arange(ops.shape(images)[1]), "float32")
    inside_y = ops.abs(grid[None, :] - cy[:, None]) <= half  # (N, S)
    inside_x = ops.abs(grid[None, :] - cx[:, None]) <= half
    mask = ops.logical_and(inside_y[:, :, None], inside_x[:, None, :])[..., None]
    return ops.where(mask, ops.flip(images, axis=2), images)


def _cam_pool_layer(head: Any, k: int) -> Any:
    """A layer: (out_relu features, GAP probs) -> (N, 2, C) = [GAP probs, top-k CAM probs].

    The CAM is the head's own kernel and bias applied at every position (as in the export
    twin); its per-class mean over the ``k`` highest positions goes through a softmax."""
    import keras
    from keras import ops

    class TopKCamPool(keras.layers.Layer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._shared = [head]  # a list: the head's weights stay the classifier's own

        def call(self, inputs: Any) -> Any:
            features, gap_probs = inputs
            cam = _head_cam(self._shared[0], features)  # (N, h, w, C)
            classes = ops.shape(cam)[-1]
            flat = ops.transpose(ops.reshape(cam, (ops.shape(cam)[0], -1, classes)), (0, 2, 1))
            top, _ = ops.top_k(flat, k=k, sorted=False)
            pooled = ops.softmax(ops.mean(top, axis=-1), axis=-1)
            return ops.stack([gap_probs, pooled], axis=1)

    return TopKCamPool(name="cam_topk")


def _erase_layer(head: Any, cfg: TrainConfig) -> Any:
    """A layer: (images, labels, out_relu features) -> (erased images, peak flag)."""
    import keras
    from keras import ops

    norm = CLASS_NAMES.index("NORM")
    seeds = keras.random.SeedGenerator(cfg.seed + 11)

    class EraseSquare(keras.layers.Layer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._shared = [head]
            self._seeds = seeds

        def call(self, inputs: Any) -> Any:
            images, labels, features = inputs
            cam = _head_cam(self._shared[0], features)  # (N, h, w, C)
            labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
            onehot = ops.one_hot(labels, len(CLASS_NAMES))
            cam_y = ops.sum(cam * onehot[:, None, None, :], axis=-1)  # (N, h, w)
            n, w = ops.shape(cam_y)[0], ops.shape(cam_y)[2]
            peak = ops.argmax(ops.reshape(cam_y, (n, -1)), axis=-1)
            size = ops.cast(ops.shape(images)[1], "float32")
            py, px = _cell_centres(peak // w), _cell_centres(peak % w)
            ry = keras.random.uniform((n,), 0.0, 1.0, seed=self._seeds) * size
            rx = keras.random.uniform((n,), 0.0, 1.0, seed=self._seeds) * size
            coin = keras.random.uniform((n,), 0.0, 1.0, seed=self._seeds)
            on_peak = ops.logical_and(ops.not_equal(labels, norm), coin < 0.5)
            cy, cx = ops.where(on_peak, py, ry), ops.where(on_peak, px, rx)
            erased = _mirror_square(images, cy, cx, size * cfg.erase_size / 2.0)
            return erased, ops.cast(on_peak, "float32")

    return EraseSquare(name="erase_square")


def far_cells(centres: Any, half: float, h: int, w: int) -> Any:
    """(N, h, w) float mask: 1 where a CAM cell's receptive-field centre (model-input
    pixels) lies more than ``half`` from the square centred on ``centres`` (N, 2: y, x),
    along either axis."""
    from keras import ops

    def axis(cells: int, c: Any) -> Any:
        return ops.abs(_cell_centres(ops.arange(cells))[None, :] - c[:, None]) > half

    far_y, far_x = axis(h, centres[:, 0]), axis(w, centres[:, 1])
    return ops.cast(ops.logical_or(far_y[:, :, None], far_x[:, None, :]), "float32")


def _locality_layers(head: Any, cfg: TrainConfig) -> tuple[Any, Any]:
    """Two layers: images -> (images and their occluded copies stacked on the batch axis,
    square centres; in inference mode the images alone); and (stacked outputs, stacked
    out_relu features, centres) -> the clean half of the outputs, adding
    ``locality_loss_weight`` times the CAM change far from the square as a training
    loss."""
    import keras
    from keras import ops

    from cxrd.preprocess import CAM_STRIDE

    seeds = keras.random.SeedGenerator(cfg.seed + 13)

    class OccludeSquare(keras.layers.Layer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._seeds = seeds

        def call(self, images: Any, training: bool | None = None) -> Any:
            n, size = ops.shape(images)[0], ops.shape(images)[1]
            centres = keras.random.uniform((n, 2), 0.0, 1.0, seed=self._seeds) * ops.cast(
                size, "float32")
            if not training:  # validation: no loss to compute, the clean images alone
                return images, centres
            half = ops.cast(size, "float32") * cfg.locality_size / 2.0
            occluded = _mirror_square(images, centres[:, 0], centres[:, 1], half)
            return ops.concatenate([images, occluded], axis=0), centres

    class LocalityPenalty(keras.layers.Layer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._shared = [head]

        def call(self, inputs: Any, training: bool | None = None) -> Any:
            outputs, features, centres = inputs
            n = ops.shape(centres)[0]
            if training:
                cam = _head_cam(self._shared[0], features)
                cam = cam - ops.mean(cam, axis=-1, keepdims=True)  # as exported
                change = ops.mean(ops.square(cam[:n] - cam[n:]), axis=-1)  # (N, h, w)
                size = ops.cast(ops.shape(features)[1] * CAM_STRIDE, "float32")
                half = size * cfg.locality_size / 2.0 + cfg.locality_margin * CAM_STRIDE
                far = far_cells(centres, half, ops.shape(cam)[1], ops.shape(cam)[2])
                penalty = ops.sum(change * far) / ops.maximum(ops.sum(far), 1.0)
                self.add_loss(cfg.locality_loss_weight * penalty)
            return outputs[:n]

    return OccludeSquare(name="occlude_square"), LocalityPenalty(name="cam_locality")


def build_training_model(model: Any, cfg: TrainConfig) -> Any:
    """What ``fit`` trains: the classifier itself, or with ``cam_loss_weight`` a twin whose
    output stacks the classifier's probabilities and the top-k pooled CAM's; both share
    every weight, so training the twin trains the classifier. With ``erase_loss_weight``
    the twin takes (image, label) and also stacks the probabilities of the erased image
    and the on-peak flag (``_erase_layer``). With ``locality_loss_weight`` the twin runs
    each batch with its occluded copies and adds the locality loss (``_locality_layers``);
    its output is the clean half's, as without it."""
    import keras
    from keras import ops

    from training.model import HEAD

    features = model.get_layer("out_relu").output
    if cfg.cam_loss_weight > 0 or cfg.erase_loss_weight > 0:
        stacked = _cam_pool_layer(model.get_layer(HEAD), max(1, cfg.cam_top_k))(
            [features, model.output])
    else:
        stacked = model.output
    if cfg.locality_loss_weight > 0:
        occlude, penalty = _locality_layers(model.get_layer(HEAD), cfg)
        images = keras.Input(shape=model.input_shape[1:], name="twin_image")
        both, centres = occlude(images)
        outputs, feats = keras.Model(model.input, [stacked, features], name="cxrd_inner")(both)
        return keras.Model(images, penalty([outputs, feats, centres]), name="cxrd_local_twin")
    if cfg.cam_loss_weight <= 0 and cfg.erase_loss_weight <= 0:
        return model
    if cfg.erase_loss_weight <= 0:
        return keras.Model(model.input, stacked, name="cxrd_train_twin")

    images = keras.Input(shape=model.input_shape[1:], name="twin_image")
    labels = keras.Input(shape=(), dtype="int32", name="twin_label")
    inner = keras.Model(model.input, [stacked, features], name="cxrd_inner")
    first, feats = inner(images)
    erased, on_peak = _erase_layer(model.get_layer(HEAD), cfg)([images, labels, feats])
    erased_probs = model(erased)
    flag = ops.repeat(on_peak[:, None, None], len(CLASS_NAMES), axis=-1)
    out = ops.concatenate([first, erased_probs[:, None, :], flag], axis=1)  # (N, 4, C)
    return keras.Model([images, labels], out, name="cxrd_erase_twin")


def _loss_and_accuracy(cfg: TrainConfig) -> tuple[Any, Any]:
    """Cross-entropy on the classifier's probabilities (with label smoothing), plus
    ``cam_loss_weight`` times that on the pooled CAM's when the twin is trained."""
    from keras import ops

    n = len(CLASS_NAMES)
    smooth, weight = cfg.label_smoothing, cfg.cam_loss_weight
    gap_weight = cfg.gap_loss_weight

    def _ce(target: Any, probs: Any) -> Any:
        return -ops.sum(target * ops.log(ops.clip(probs, 1e-7, 1.0)), axis=-1)

    erase = cfg.erase_loss_weight

    def loss(y_true: Any, y_pred: Any) -> Any:
        hard = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), n)
        target = hard * (1.0 - smooth) + smooth / n if smooth > 0 else hard
        if weight <= 0 and erase <= 0:
            return _ce(target, y_pred)
        total = gap_weight * _ce(target, y_pred[:, 0]) + weight * _ce(target, y_pred[:, 1])
        if erase <= 0:
            return total
        erased, on_peak = y_pred[:, 2], y_pred[:, 3, 0]
        # on the peak: the true class's probability must drop; elsewhere: unchanged
        p_true = ops.sum(erased * hard, axis=-1)
        dropped = -ops.log(ops.clip(1.0 - p_true, 1e-7, 1.0))
        return total + erase * (on_peak * dropped + (1.0 - on_peak) * _ce(target, erased))

    def accuracy(y_true: Any, y_pred: Any) -> Any:
        # the pooled CAM's when only it is trained, else the classifier's
        twin = weight > 0 or erase > 0
        probs = (y_pred[:, 1] if gap_weight <= 0 else y_pred[:, 0]) if twin else y_pred
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        return ops.cast(ops.equal(ops.cast(ops.argmax(probs, axis=-1), "int32"), labels),
                        "float32")

    return loss, accuracy


def _checkpoint_callback(model: Any, path: Path) -> Any:
    """Save the classifier's weights whenever the validation loss improves."""
    import keras

    class BestClassifier(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best = float("inf")

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            value = (logs or {}).get("val_loss")
            if value is not None and float(value) < self.best:
                self.best = float(value)
                # beside it, then renamed: a crash (or a reader holding the HDF5 file
                # lock) never leaves a truncated checkpoint, and never stops the run
                tmp = path.with_name(path.name.removesuffix(".weights.h5") + ".tmp.weights.h5")
                model.save_weights(str(tmp))
                os.replace(tmp, path)
                log.info("epoch %d: val_loss %.4f, saved %s", epoch + 1, self.best, path)

    return BestClassifier()


def train(train_set: ImageSet, val_set: ImageSet, cfg: TrainConfig, out_dir: Path) -> Any:
    """Train and return the Keras model with the best validation loss.

    Writes into ``out_dir``: ``checkpoint.weights.h5`` (best), ``history.csv``,
    ``curves.png`` and ``train_config.json``.
    """
    import keras

    from training.model import build_classifier

    if cfg.erase_loss_weight > 0 and cfg.head_epochs > 0:
        raise ValueError("--erase-loss-weight and --head-epochs cannot be combined")
    if cfg.erase_loss_weight > 0 and cfg.locality_loss_weight > 0:
        raise ValueError("--erase-loss-weight and --locality-loss-weight cannot be combined")
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    model = build_classifier(cfg.input_size, cfg.weights)
    if cfg.bn_momentum is not None:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = cfg.bn_momentum
    fitted = build_training_model(model, cfg)
    loss, accuracy = _loss_and_accuracy(cfg)
    fitted.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=loss,
        metrics=[accuracy],
        jit_compile=False,  # XLA is 10-30x slower on the CPU for this model
    )
    steps = cfg.steps_per_epoch or max(1, int(np.ceil(len(train_set) / cfg.batch_size)))
    weights = class_weights(train_set.labels)
    (out_dir / "train_config.json").write_text(
        json.dumps(
            {
                **asdict(cfg),
                "class_weights": weights,
                "n_train": len(train_set),
                "n_val": len(val_set),
            },
            indent=2,
        )
    )
    checkpoint = out_dir / "checkpoint.weights.h5"
    calibration = make_dataset(train_set, cfg, training=False).shuffle(64, seed=cfg.seed)
    callbacks = [
        _recalibration_callback(calibration.repeat(), RECALIBRATION_STEPS),
        _checkpoint_callback(model, checkpoint),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.patience, restore_best_weights=True
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.3, patience=max(1, cfg.patience // 2)
        ),
        keras.callbacks.CSVLogger(str(out_dir / "history.csv")),
    ]
    log.info(
        "training on %d images, validating on %d, %d steps/epoch, class weights %s",
        len(train_set),
        len(val_set),
        steps,
        weights,
    )
    train_ds = make_dataset(train_set, cfg, training=True)
    val_ds = make_dataset(val_set, cfg, training=False)
    fitted.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.epochs,
        steps_per_epoch=steps,
        class_weight=weights,
        callbacks=callbacks,
        verbose=2,
    )
    if checkpoint.exists():
        model.load_weights(str(checkpoint))
    if cfg.head_epochs > 0:
        _fit_head(model, train_ds, val_ds, cfg, out_dir, checkpoint, steps, weights)
    plot_curves(out_dir / "history.csv", out_dir / "curves.png")
    return model


def _fit_head(model: Any, train_ds: Any, val_ds: Any, cfg: TrainConfig, out_dir: Path,
              checkpoint: Path, steps: int, weights: dict[int, float]) -> None:
    """Second phase: the Dense head alone, under the classifier's own GAP loss, on the
    first phase's datasets (``make_dataset``)."""
    import dataclasses

    import keras

    from training.model import HEAD

    for layer in model.layers:
        layer.trainable = layer.name == HEAD
    head_cfg = dataclasses.replace(cfg, cam_loss_weight=0.0)
    loss, accuracy = _loss_and_accuracy(head_cfg)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=loss,
                  metrics=[accuracy], jit_compile=False)
    log.info("fitting the head alone for %d epochs (backbone frozen)", cfg.head_epochs)
    checkpoint.unlink(missing_ok=True)  # the best of this phase is what ships
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.head_epochs,
        steps_per_epoch=steps,
        class_weight=weights,
        callbacks=[
            _checkpoint_callback(model, checkpoint),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience,
                                          restore_best_weights=True),
            keras.callbacks.CSVLogger(str(out_dir / "history_head.csv")),
        ],
        verbose=2,
    )
    for layer in model.layers:
        layer.trainable = True
    if checkpoint.exists():
        model.load_weights(str(checkpoint))


def plot_curves(history_csv: Path, out: Path, metric: str = "accuracy") -> None:
    """Loss and ``metric`` per epoch, train and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with history_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("loss", metric), strict=True):
        ax.plot(epochs, [float(r[name]) for r in rows], label="train")
        ax.plot(epochs, [float(r["val_" + name]) for r in rows], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
