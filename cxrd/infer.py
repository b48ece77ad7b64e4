"""The infer stage: one onnxruntime session over a model file that follows the contract."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cxrd.errors import ModelError
from cxrd.modelinfo import (
    INPUT_NAME,
    OUTPUT_CAM,
    OUTPUT_PROBS,
    ModelInfo,
    demo_model_path,
    read_model_info,
)

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class Prediction:
    """The model's outputs for one image."""

    probs: npt.NDArray[np.float32]  # (3,) TB, NTB, NORM
    cam: npt.NDArray[np.float32]  # (h, w, 3) class activation logits (centred: see export)


def resolve_model_path(path: str | Path | None) -> Path:
    """An empty path means the embedded demo model."""
    if not path:
        return demo_model_path()
    return Path(path)


class Classifier:
    """An onnxruntime session plus the model's metadata.

    onnxruntime-gpu silently falls back to the CPU when CUDA cannot start, so the providers
    actually in use are read back from the session (``providers``), not assumed.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.path = resolve_model_path(path)
        if not self.path.is_file():
            raise ModelError(f"Model file {self.path} does not exist.")
        self.info: ModelInfo = read_model_info(self.path)
        available = set(ort.get_available_providers())
        wanted = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        self.providers: list[str] = list(self.session.get_providers())
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or set(outputs) != {OUTPUT_PROBS, OUTPUT_CAM}:
            raise ModelError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; the contract is "
                f"[{INPUT_NAME}] -> [{OUTPUT_PROBS}, {OUTPUT_CAM}]."
            )

    @property
    def input_size(self) -> int:
        return self.info.input_size

    def run(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Run a (N, size, size, 3) float32 batch; returns probs (N, 3) and cam (N, h, w, 3)."""
        probs, cam = self.session.run([OUTPUT_PROBS, OUTPUT_CAM], {INPUT_NAME: batch})
        return np.asarray(probs, dtype=np.float32), np.asarray(cam, dtype=np.float32)

    def predict(self, inputs: Sequence[npt.NDArray[np.float32]]) -> list[Prediction]:
        """Classify preprocessed inputs, one Prediction each."""
        if not inputs:
            return []
        probs, cam = self.run(np.stack(inputs).astype(np.float32, copy=False))
        return [Prediction(probs=probs[i], cam=cam[i]) for i in range(len(inputs))]
