"""Export a trained classifier to ONNX (tf2onnx, opset 17) with ``probs`` and ``cam``.

The exported file follows ``cxrd.modelinfo``: input ``input_image`` (NHWC float32, dynamic
batch), outputs ``probs`` [N,3] and ``cam`` [N,h,w,3], and ``metadata_props``. Two checks
guard every export: parity with Keras on real inputs (max |delta probs| <= 1e-4), and
softmax(mean(cam)) == probs inside the ONNX model itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from cxrd.modelinfo import INPUT_NAME, OUTPUT_CAM, OUTPUT_PROBS, ModelInfo, SegmentationInfo

log = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE = 1e-4
CAM_TOLERANCE = 1e-4


class ExportCheckFailed(RuntimeError):
    """The exported model does not reproduce the Keras model."""


def softmax(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    z = np.asarray(x, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def to_onnx(model: Any) -> Any:
    """Convert the Keras classifier's CAM twin to an ONNX ModelProto."""
    import tensorflow as tf
    import tf2onnx

    from training.model import build_export_model

    export_model = build_export_model(model)
    spec = (tf.TensorSpec((None, None, None, 3), tf.float32, name=INPUT_NAME),)
    onnx_model, _ = tf2onnx.convert.from_keras(export_model, input_signature=spec, opset=OPSET)
    _name_outputs(onnx_model, [OUTPUT_PROBS, OUTPUT_CAM])
    return onnx_model


def _name_outputs(onnx_model: Any, wanted: list[str]) -> None:
    """Give the graph outputs their contract names, whatever the converter called them."""
    graph = onnx_model.graph
    for out, new in zip(list(graph.output), wanted, strict=True):
        old = out.name
        if old == new:
            continue
        for node in graph.node:
            node.output[:] = [new if o == old else o for o in node.output]
            node.input[:] = [new if i == old else i for i in node.input]
        out.name = new
    if [o.name for o in graph.output] != wanted:
        raise ExportCheckFailed(f"Unexpected ONNX outputs {[o.name for o in graph.output]}.")


def set_metadata(onnx_model: Any, info: ModelInfo | SegmentationInfo,
                 description: str = "MobileNetV2-0.35 GAP softmax TB/NTB/NORM") -> None:
    """Replace the model's cxrd metadata_props with ``info``."""
    props = info.to_props()
    keep = [(p.key, p.value) for p in onnx_model.metadata_props if p.key not in props]
    del onnx_model.metadata_props[:]
    for key, value in [*keep, *props.items()]:
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx_model.producer_name = "cxrd-training"
    onnx_model.doc_string = f"{info.display_name}: {description}"


def check_export(
    onnx_path: Path, model: Any, samples: npt.NDArray[np.float32]
) -> dict[str, float]:
    """Parity and CAM checks on ``samples`` (real preprocessed inputs, NHWC).

    Parity is meaningful only for a trained model: random weights give near-constant
    outputs that agree whatever the converter did. So the spread of the Keras outputs is
    reported too, and a caller exporting a trained model can insist on it.
    """
    import onnxruntime as ort

    keras_probs = np.asarray(model.predict(samples, verbose=0), dtype=np.float64)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probs, cam = session.run([OUTPUT_PROBS, OUTPUT_CAM], {INPUT_NAME: samples})
    parity = float(np.max(np.abs(keras_probs - probs)))
    cam_gap = float(np.max(np.abs(softmax(np.mean(cam, axis=(1, 2))) - probs)))
    spread = float(np.max(keras_probs.max(axis=0) - keras_probs.min(axis=0)))
    if parity > PARITY_TOLERANCE:
        raise ExportCheckFailed(
            f"ONNX and Keras disagree: max |delta probs| = {parity:.2e} > {PARITY_TOLERANCE}."
        )
    if cam_gap > CAM_TOLERANCE:
        raise ExportCheckFailed(
            f"softmax(mean(cam)) differs from probs by {cam_gap:.2e} > {CAM_TOLERANCE}."
        )
    return {"parity_max_abs": parity, "cam_max_abs": cam_gap, "keras_output_spread": spread}


def export(
    model: Any,
    out: Path,
    info: ModelInfo,
    samples: npt.NDArray[np.float32],
    *,
    min_output_spread: float = 0.0,
) -> dict[str, float]:
    """Convert, write ``out`` with metadata, and run the checks. Returns the check figures.

    ``min_output_spread`` > 0 refuses models whose outputs hardly vary over ``samples``
    (an untrained model), where the parity check proves nothing.
    """
    import onnx

    onnx_model = to_onnx(model)
    if info.input_size != model.input_shape[1]:
        info = replace(info, input_size=int(model.input_shape[1]))
    set_metadata(onnx_model, info)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    onnx.save(onnx_model, str(tmp))
    try:
        checks = check_export(tmp, model, samples)
        if checks["keras_output_spread"] < min_output_spread:
            raise ExportCheckFailed(
                f"The model's outputs vary by only {checks['keras_output_spread']:.2e} over "
                "the check inputs: an untrained model makes the parity check meaningless."
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    log.info("exported %s (%s) parity=%.2e cam=%.2e", out, info.display_name,
             checks["parity_max_abs"], checks["cam_max_abs"])
    return checks


InfoT = TypeVar("InfoT", ModelInfo, SegmentationInfo)


def update_metadata(path: Path, updates: Mapping[str, Any], kind: type[InfoT]) -> InfoT:
    """Rewrite an exported file's ``kind`` (ModelInfo or SegmentationInfo) fields, e.g.
    the operating point or the figures after evaluation."""
    import onnx

    model = onnx.load(str(path))
    info = replace(kind.from_props({p.key: p.value for p in model.metadata_props}),
                   **dict(updates))
    set_metadata(model, info, model.doc_string.partition(": ")[2])
    tmp = path.with_suffix(path.suffix + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return info
