"""The classifier architecture and its CAM twin (TensorFlow / Keras).

The architecture is the project's founding one, unchanged: MobileNetV2 (alpha 0.35) up to
``out_relu``, global average pooling, one Dense softmax over TB, NTB, NORM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Keep TensorFlow quiet and never let it pick XLA on the CPU (10-30x slower for this model).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")

from cxrd.modelinfo import CLASS_NAMES, INPUT_NAME, OUTPUT_CAM, OUTPUT_PROBS  # noqa: E402

HEAD = "head"  # the Dense softmax layer; its weights are shared with the CAM output
ALPHA = 0.35

WEIGHTS_HELP = (
    "'imagenet' (Keras downloads the ImageNet MobileNetV2 weights: needs internet), "
    "'none' (random initialisation), or PATH to a local weights file: either a whole-"
    "classifier '.weights.h5' saved by this package, or a MobileNetV2 alpha-0.35 "
    "no-top backbone file such as Keras's "
    "'mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5'."
)


def build_classifier(input_size: int = 224, weights: str = "none") -> Any:
    """The founding architecture. ``weights``: see WEIGHTS_HELP."""
    import keras
    from keras.layers import Dense, GlobalAveragePooling2D, Input

    backbone_weights: str | None
    whole_model_weights: Path | None = None
    if weights == "imagenet":
        backbone_weights = "imagenet"
    elif weights in ("none", "", None):
        backbone_weights = None
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--weights {weights}: no such file.")
        backbone_weights = None
        whole_model_weights = path

    inputs = Input(shape=(input_size, input_size, 3), name=INPUT_NAME)
    mobilenetv2 = keras.applications.MobileNetV2(
        input_tensor=inputs, weights=backbone_weights, include_top=False, alpha=ALPHA
    )
    x = mobilenetv2.get_layer("out_relu").output
    x = GlobalAveragePooling2D(name="gap")(x)
    output = Dense(len(CLASS_NAMES), activation="softmax", name=HEAD)(x)
    model = keras.Model(inputs, output, name="cxrd_mobilenetv2")

    if whole_model_weights is not None:
        try:
            model.load_weights(str(whole_model_weights))
        except (ValueError, KeyError, OSError) as whole_error:
            # Not a whole-classifier file: try it as a no-top backbone file.
            backbone = keras.applications.MobileNetV2(
                input_shape=(input_size, input_size, 3), weights=None, include_top=False,
                alpha=ALPHA,
            )
            try:
                backbone.load_weights(str(whole_model_weights))
            except (ValueError, KeyError, OSError) as exc:
                raise ValueError(
                    f"--weights {whole_model_weights} is neither a classifier weights file "
                    f"({whole_error}) nor a MobileNetV2 alpha-{ALPHA} no-top file ({exc})."
                ) from exc
            for layer in backbone.layers:
                if layer.weights:
                    model.get_layer(layer.name).set_weights(layer.get_weights())
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
