"""The lung-field segmenter: data, training, ONNX export and Dice evaluation.

Images go through the serving preprocessing (``training.data.load_images``, at the
segmenter's input size, under the current contract for training and the model's own for
evaluation); targets are the records' lung masks (``training.masks``)
stretched the same way to the output grid (half the input size), in
``LUNG_SEGMENTS`` order (left lung, right lung; the patient's sides). Only records with
``lung_masks`` take part. The loss is binary cross-entropy plus (1 - soft Dice) per
channel. The exported file follows ``cxrd.modelinfo``: input ``input_image``
[N, S, S, 3], output ``segments`` [N, S/2, S/2, 2], and a ``SegmentationInfo`` in
``metadata_props``.

Dice is measured on each image's own grid: the output probabilities are stretched back to
the mask's size (bilinear) and thresholded, as serving will do, and compared with the
mask as annotated. Images without lung fields (empty masks) have no Dice; for them the
evaluation reports how often the model still finds a lung (``no_lung_false_positive``: a
predicted lung covering at least ``FALSE_POSITIVE_AREA`` of the image).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cxrd.lungs import probs_to_masks
from cxrd.modelinfo import (
    INPUT_NAME,
    LUNG_SEGMENTS,
    OUTPUT_SEGMENTS,
    SegmentationInfo,
)
from cxrd.preprocess import OFFSET, SCALE
from training.data import load_images, to_inputs
from training.masks import dice, masks_to_target, read_lung_masks
from training.sources import Record

log = logging.getLogger(__name__)

OUTPUT_STRIDE = 2
FALSE_POSITIVE_AREA = 0.01
SIDES = tuple(s.label.split()[0].lower() for s in LUNG_SEGMENTS)  # ("left", "right")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class MaskSet:
    """Preprocessed images and their lung-mask targets."""

    images: npt.NDArray[np.uint8]  # (N, S, S) gray8
    targets: npt.NDArray[np.uint8]  # (N, S/2, S/2, 2) 0/1
    records: tuple[Record, ...]

    def __len__(self) -> int:
        return len(self.records)


def with_masks(records: Sequence[Record], split: str) -> list[Record]:
    return [r for r in records if r.split == split and r.lung_masks]


def load_mask_set(records: Sequence[Record], size: int, *, cache_dir: Path | None = None,
                  progress: bool = False, desc: str = "images") -> MaskSet:
    """Images (cached by ``load_images``) and targets (cached here, by mask spec)."""
    images = load_images(records, size, cache_dir=cache_dir, progress=progress,
                         desc=f"seg-{desc}").images
    grid = size // OUTPUT_STRIDE
    key = hashlib.sha256(json.dumps([grid, [r.lung_masks for r in records]]).encode()
                         ).hexdigest()[:16]
    cache = cache_dir / f"masks-{desc}-{grid}-{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return MaskSet(images, np.load(cache), tuple(records))
    targets = np.zeros((len(records), grid, grid, len(LUNG_SEGMENTS)), dtype=np.uint8)
    for i, r in enumerate(records):
        targets[i] = masks_to_target(*read_lung_masks(r.lung_masks), grid)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npy")
        np.save(tmp, targets)
        tmp.replace(cache)
    return MaskSet(images, targets, tuple(records))


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class SegTrainConfig:
    input_size: int = 256
    weights: str = "none"
    epochs: int = 20
    batch_size: int = 16
    learning_rate: float = 1e-3
    patience: int = 5
    seed: int = 0
    brightness: float = 0.08  # photometric only: a geometric change would move the masks
    contrast: float = 0.1
    steps_per_epoch: int | None = None


def _dataset(data: MaskSet, cfg: SegTrainConfig, *, training: bool) -> Any:
    import keras
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((data.images, data.targets))
    if training:
        ds = ds.shuffle(len(data), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)
    augment = keras.Sequential([
        keras.layers.RandomBrightness(cfg.brightness, value_range=(0.0, 255.0), seed=cfg.seed),
        keras.layers.RandomContrast(cfg.contrast, seed=cfg.seed + 1),
    ]) if training else None

    def prepare(images: Any, targets: Any) -> tuple[Any, Any]:
        x = tf.cast(images, tf.float32)[..., None]
        if augment is not None:
            x = tf.clip_by_value(augment(x, training=True), 0.0, 255.0)
        x = x * SCALE + OFFSET
        return tf.repeat(x, 3, axis=-1), tf.cast(targets, tf.float32)

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


def _soft_dice(y_true: Any, y_pred: Any) -> Any:
    """Soft Dice per image and channel, (N, C)."""
    import tensorflow as tf

    inter = tf.reduce_sum(y_true * y_pred, axis=(1, 2))
    total = tf.reduce_sum(y_true + y_pred, axis=(1, 2))
    return (2.0 * inter + 1.0) / (total + 1.0)


def seg_loss(y_true: Any, y_pred: Any) -> Any:
    """Binary cross-entropy plus 1 - soft Dice (the +1 smoothing makes an empty target
    with an empty prediction a perfect score)."""
    import keras
    import tensorflow as tf

    bce = tf.reduce_mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
    return bce + tf.reduce_mean(1.0 - _soft_dice(y_true, y_pred), axis=-1)


def _dice_metric(channel: int) -> Any:
    import tensorflow as tf

    def metric(y_true: Any, y_pred: Any) -> Any:
        hard = tf.cast(y_pred[..., channel:channel + 1] >= 0.5, tf.float32)
        return tf.reduce_mean(_soft_dice(y_true[..., channel:channel + 1], hard))

    metric.__name__ = f"dice_{SIDES[channel]}"
    return metric


def train_segmenter(train_set: MaskSet, val_set: MaskSet, cfg: SegTrainConfig,
                    out_dir: Path) -> Any:
    """Train and return the Keras segmenter with the best validation loss.

    Writes ``checkpoint.weights.h5`` (best), ``history.csv``, ``curves.png`` and
    ``train_config.json`` into ``out_dir``.
    """
    import keras

    from training.model import build_segmenter
    from training.train import (
        RECALIBRATION_STEPS,
        _checkpoint_callback,
        _recalibration_callback,
        plot_curves,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    model = build_segmenter(cfg.input_size, cfg.weights)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=seg_loss,
                  metrics=[_dice_metric(c) for c in range(len(LUNG_SEGMENTS))],
                  jit_compile=False)
    steps = cfg.steps_per_epoch or max(1, int(np.ceil(len(train_set) / cfg.batch_size)))
    (out_dir / "train_config.json").write_text(json.dumps(
        {**asdict(cfg), "n_train": len(train_set), "n_val": len(val_set)}, indent=2))
    checkpoint = out_dir / "checkpoint.weights.h5"
    calibration = _dataset(train_set, cfg, training=False).shuffle(64, seed=cfg.seed)
    callbacks = [
        _recalibration_callback(calibration.repeat(), RECALIBRATION_STEPS),
        _checkpoint_callback(model, checkpoint),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3,
                                          patience=max(1, cfg.patience // 2)),
        keras.callbacks.CSVLogger(str(out_dir / "history.csv")),
    ]
    log.info("segmenter: training on %d images, validating on %d, %d steps/epoch",
             len(train_set), len(val_set), steps)
    model.fit(_dataset(train_set, cfg, training=True),
              validation_data=_dataset(val_set, cfg, training=False),
              epochs=cfg.epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=2)
    if checkpoint.exists():
        model.load_weights(str(checkpoint))
    plot_curves(out_dir / "history.csv", out_dir / "curves.png", metric="dice_left")
    return model


# --------------------------------------------------------------------------- export


def export_segmenter(model: Any, out: Path, info: SegmentationInfo,
                     samples: npt.NDArray[np.float32], *,
                     min_output_spread: float = 0.0) -> dict[str, float]:
    """Convert with tf2onnx, write ``out`` with ``info``, check parity with Keras on
    ``samples`` (max |delta probability| <= ``training.export.PARITY_TOLERANCE``)."""
    import onnx
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    from training.export import (
        OPSET,
        PARITY_TOLERANCE,
        ExportCheckFailed,
        _name_outputs,
        set_metadata,
    )

    size = int(model.input_shape[1])
    info = replace(info, input_size=size)
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    _name_outputs(onnx_model, [OUTPUT_SEGMENTS])
    set_metadata(onnx_model, info, "MobileNetV2-0.35 U-Net lung fields (left, right)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    onnx.save(onnx_model, str(tmp))
    try:
        keras_out = np.asarray(model.predict(samples, verbose=0), dtype=np.float64)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        (onnx_out,) = session.run([OUTPUT_SEGMENTS], {INPUT_NAME: samples})
        parity = float(np.max(np.abs(keras_out - onnx_out)))
        spread = float(np.max(keras_out.max(axis=0) - keras_out.min(axis=0)))
        if parity > PARITY_TOLERANCE:
            raise ExportCheckFailed(
                f"ONNX and Keras disagree: max |delta p| = {parity:.2e} > {PARITY_TOLERANCE}.")
        if spread < min_output_spread:
            raise ExportCheckFailed(
                f"The model's outputs vary by only {spread:.2e} over the check inputs: an "
                "untrained model makes the parity check meaningless.")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    log.info("exported %s (%s) parity=%.2e", out, info.display_name, parity)
    return {"parity_max_abs": parity, "keras_output_spread": spread}


# --------------------------------------------------------------------------- evaluation


def _summary(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if not a.size:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)),
            "p05": float(np.percentile(a, 5)), "min": float(a.min())}


def evaluate_segmenter(model_path: Path, records: Sequence[Record], *,
                       splits: Sequence[str] = ("val", "test"), cache_dir: Path | None = None,
                       batch_size: int = 16) -> dict[str, Any]:
    """Dice per lung on each split's records with masks; see the module docstring."""
    import onnxruntime as ort

    from cxrd.modelinfo import read_segmentation_info

    info = read_segmentation_info(model_path)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    report: dict[str, Any] = {"model": info.display_name, "threshold": info.threshold,
                              "splits": {}}
    for split in splits:
        chosen = with_masks(records, split)
        if not chosen:
            continue
        gray = load_images(chosen, info.input_size, preprocessing=info.preprocessing,
                           cache_dir=cache_dir, desc=f"seg-{split}")
        scores: dict[str, list[float]] = {side: [] for side in SIDES}
        no_lung = false_pos = 0
        for start in range(0, len(chosen), batch_size):
            x = to_inputs(gray.images[start:start + batch_size])
            (probs,) = session.run([OUTPUT_SEGMENTS], {INPUT_NAME: x})
            for r, p in zip(chosen[start:start + batch_size], probs, strict=True):
                truth = read_lung_masks(r.lung_masks)
                rows, cols = truth[0].shape
                pred = probs_to_masks(p, rows, cols, info.threshold)
                if not any(t.any() for t in truth):
                    no_lung += 1
                    false_pos += any(m.mean() >= FALSE_POSITIVE_AREA for m in pred)
                    continue
                for side, pm, tm in zip(SIDES, pred, truth, strict=True):
                    if tm.any():
                        scores[side].append(dice(pm, tm))
        rep: dict[str, Any] = {f"dice_{side}": _summary(v) for side, v in scores.items()}
        rep["images"] = len(chosen)
        rep["no_lung_images"] = no_lung
        rep["no_lung_false_positive"] = false_pos / no_lung if no_lung else None
        report["splits"][split] = rep
    headline: dict[str, float] = {}
    for split, rep in report["splits"].items():
        for side in SIDES:
            if rep[f"dice_{side}"]["n"]:
                headline[f"{split}_dice_{side}"] = round(rep[f"dice_{side}"]["mean"], 4)
                headline[f"{split}_dice_{side}_p05"] = round(rep[f"dice_{side}"]["p05"], 4)
        headline[f"{split}_images"] = rep["images"]
        if rep["no_lung_false_positive"] is not None:
            headline[f"{split}_no_lung_false_positive"] = round(rep["no_lung_false_positive"], 4)
    report["headline"] = headline
    return report
