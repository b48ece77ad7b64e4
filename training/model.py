"""The classifier architecture and its CAM twin, and the lung-field segmenter (Keras).

The classifier is the project's founding architecture, unchanged: MobileNetV2 (alpha 0.35)
up to ``out_relu``, global average pooling, one Dense softmax over TB, NTB, NORM. The
segmenter is a small U-Net on the same encoder (:func:`build_segmenter`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Keep TensorFlow quiet and never let it pick XLA on the CPU (10-30x slower for this model).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")

from cxrd.modelinfo import (  # noqa: E402
    CLASS_NAMES,
    INPUT_NAME,
    LUNG_SEGMENTS,
    OUTPUT_CAM,
    OUTPUT_PROBS,
    OUTPUT_SEGMENTS,
)

HEAD = "head"  # the Dense softmax layer; its weights are shared with the CAM output
ALPHA = 0.35

WEIGHTS_HELP = (
    "'imagenet' (Keras downloads the ImageNet MobileNetV2 weights: needs internet), "
    "'none' (random initialisation), or PATH to a local weights file: either a whole-"
    "classifier '.weights.h5' saved by this package, or a MobileNetV2 alpha-0.35 "
    "no-top backbone file such as Keras's "
    "'mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5'."
)
SEGMENTER_WEIGHTS_HELP = WEIGHTS_HELP.replace("whole-classifier", "whole-segmenter")

#: The segmenter's skip connections (strides 2, 4, 8, 16) and its bottleneck (stride 32).
SEGMENTER_SKIPS = ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu",
                   "block_13_expand_relu")
SEGMENTER_BOTTLENECK = "block_16_project_BN"
#: Decoder widths, from the stride-16 stage up to stride 2, where the output is.
SEGMENTER_DECODER = (48, 32, 24, 16)


def _backbone_weights(weights: str | None) -> tuple[str | None, Path | None]:
    """(Keras ``weights=`` for the backbone, a local file to load afterwards)."""
    if weights == "imagenet":
        return "imagenet", None
    if weights in ("none", "", None):
        return None, None
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file.")
    return None, path


def _load_local_weights(model: Any, path: Path, input_size: int, what: str) -> None:
    """Load a whole-model weights file, or else a MobileNetV2 no-top backbone file."""
    import keras

    try:
        model.load_weights(str(path))
    except (ValueError, KeyError, OSError) as whole_error:
        backbone = keras.applications.MobileNetV2(
            input_shape=(input_size, input_size, 3), weights=None, include_top=False,
            alpha=ALPHA,
        )
        try:
            backbone.load_weights(str(path))
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(
                f"--weights {path} is neither a {what} weights file "
                f"({whole_error}) nor a MobileNetV2 alpha-{ALPHA} no-top file ({exc})."
            ) from exc
        for layer in backbone.layers:
            if layer.weights:
                model.get_layer(layer.name).set_weights(layer.get_weights())


def build_classifier(input_size: int = 224, weights: str = "none") -> Any:
    """The founding architecture. ``weights``: see WEIGHTS_HELP."""
    import keras
    from keras.layers import Dense, GlobalAveragePooling2D, Input

    backbone_weights, local = _backbone_weights(weights)
    inputs = Input(shape=(input_size, input_size, 3), name=INPUT_NAME)
    mobilenetv2 = keras.applications.MobileNetV2(
        input_tensor=inputs, weights=backbone_weights, include_top=False, alpha=ALPHA
    )
    x = mobilenetv2.get_layer("out_relu").output
    x = GlobalAveragePooling2D(name="gap")(x)
    output = Dense(len(CLASS_NAMES), activation="softmax", name=HEAD)(x)
    model = keras.Model(inputs, output, name="cxrd_mobilenetv2")
    if local is not None:
        _load_local_weights(model, local, input_size, "classifier")
    return model


def build_segmenter(input_size: int = 256, weights: str = "none") -> Any:
    """The lung-field segmenter: a U-Net on the classifier's encoder.

    MobileNetV2 (alpha 0.35) encodes; the decoder climbs from the stride-32 bottleneck to
    stride 2, at each stage a bilinear 2x upsampling, the encoder's skip features
    concatenated, and a depthwise-separable 3x3 convolution with batch norm and ReLU.
    A 1x1 convolution and a sigmoid give one probability per segment
    (``cxrd.modelinfo.LUNG_SEGMENTS``: left lung, right lung) at half the input size:
    serving resizes the masks to the image anyway, and a full-size output would cost a
    quarter more time for nothing. ``input_size`` must be a multiple of 32.
    ``weights``: see SEGMENTER_WEIGHTS_HELP.
    """
    import keras
    from keras.layers import (
        Activation,
        BatchNormalization,
        Concatenate,
        Conv2D,
        Input,
        ReLU,
        SeparableConv2D,
        UpSampling2D,
    )

    if input_size % 32:
        raise ValueError(f"the segmenter's input size must be a multiple of 32, not {input_size}")
    backbone_weights, local = _backbone_weights(weights)
    inputs = Input(shape=(input_size, input_size, 3), name=INPUT_NAME)
    encoder = keras.applications.MobileNetV2(
        input_tensor=inputs, weights=backbone_weights, include_top=False, alpha=ALPHA
    )
    x = encoder.get_layer(SEGMENTER_BOTTLENECK).output
    for i, (skip, width) in enumerate(zip(reversed(SEGMENTER_SKIPS), SEGMENTER_DECODER,
                                          strict=True)):
        x = UpSampling2D(2, interpolation="bilinear", name=f"dec{i}_up")(x)
        x = Concatenate(name=f"dec{i}_cat")([x, encoder.get_layer(skip).output])
        x = SeparableConv2D(width, 3, padding="same", use_bias=False, name=f"dec{i}_conv")(x)
        x = BatchNormalization(name=f"dec{i}_bn")(x)
        x = ReLU(name=f"dec{i}_relu")(x)
    x = Conv2D(len(LUNG_SEGMENTS), 1, name="seg_logits")(x)
    output = Activation("sigmoid", name=OUTPUT_SEGMENTS)(x)
    model = keras.Model(inputs, output, name="cxrd_lungseg")
    if local is not None:
        _load_local_weights(model, local, input_size, "segmenter")
    return model


def build_export_model(model: Any) -> Any:
    """A twin with outputs ``probs`` and ``cam`` sharing the classifier's weights.

    ``cam`` is the head's Dense applied at every ``out_relu`` position (logits, before
    softmax), centred over the classes: at each position the mean over the three classes
    is subtracted. That part is common to every class, and softmax ignores it, so it holds
    no evidence for one class over another; left in, it can put every class's peak at the
    same place (the place with the strongest features), whatever the lesion. The centring
    is folded into the Dense weights (kernel and bias times I - 1/3), so the graph is still
    GAP -> Dense, mean(cam) is the head's logits minus their mean, and
    softmax(mean(cam)) == probs exactly. Spatial size is dynamic.
    """
    import keras
    import numpy as np
    from keras.layers import Activation, Dense, GlobalAveragePooling2D, Input

    head = model.get_layer(HEAD)
    kernel, bias = head.get_weights()
    n = len(CLASS_NAMES)
    centre = np.eye(n, dtype=np.float32) - np.float32(1.0 / n)
    backbone = keras.Model(model.input, model.get_layer("out_relu").output)
    inputs = Input(shape=(None, None, 3), name=INPUT_NAME)
    features = backbone(inputs)
    cam_dense = Dense(n, activation=None, name="cam_dense")
    cam = cam_dense(features)
    cam_dense.set_weights([kernel @ centre, bias @ centre])
    logits = GlobalAveragePooling2D(name="gap")(cam)
    probs = Activation("softmax", name=OUTPUT_PROBS)(logits)
    cam = Activation("linear", name=OUTPUT_CAM)(cam)
    return keras.Model(inputs, [probs, cam], name="cxrd_export")
