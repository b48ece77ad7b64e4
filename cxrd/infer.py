"""The infer stage: one onnxruntime session over a model file that follows the contract."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cxrd.errors import ModelError
from cxrd.modelinfo import (
    INPUT_NAME,
    OUTPUT_CAM,
    OUTPUT_PROBS,
    OUTPUT_SEGMENTS,
    ModelInfo,
    SegmentationInfo,
    demo_model_path,
    demo_segmenter_path,
    read_model_info,
    read_segmentation_info,
)

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
DEFAULT_PROVIDERS = (CUDA, "CPUExecutionProvider")


def _probe_cuda(path: str | None, providers: Sequence[str], out: Any) -> None:
    try:
        Classifier(path, providers, 1, require_cuda=True)
        out.put("")
    except Exception as exc:  # reported by the parent
        out.put(str(exc))


def check_cuda(config: Any) -> None:
    """``[model] require_cuda``: open a session in a short-lived process (the main process
    keeps no CUDA context) and raise ModelError when it does not run on CUDA."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    path = str(config.model.path) if config.model.path else None
    proc = ctx.Process(target=_probe_cuda, args=(path, list(config.model.providers), out),
                       name="cxrd-cuda-probe")
    proc.start()
    try:
        error = out.get(timeout=300)
    except Exception:
        error = f"the CUDA probe process exited with {proc.exitcode} without an answer"
    proc.join(10)
    if error:
        raise ModelError(error)


def resolve_model_path(path: str | Path | None) -> Path:
    """An empty path means the embedded demo model."""
    if not path:
        return demo_model_path()
    return Path(path)


# Batch sizes a session runs: a batch is padded up to the next one. On CUDA each new input
# shape costs a cuDNN algorithm search (and memory), so the shapes are few and all warmed
# up at start (:meth:`Classifier.warm_up`); on the CPU the padding costs a few
# milliseconds at most.
def batch_buckets(batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``batch_size`` (which is always the last bucket)."""
    sizes = []
    n = 1
    while n < batch_size:
        sizes.append(n)
        n *= 2
    sizes.append(batch_size)
    return tuple(sizes)


def open_session(path: Path, providers: Sequence[str], intra_op_threads: int, *,
                 require_cuda: bool = False) -> tuple[Any, list[str]]:
    """An onnxruntime session over ``path`` and the providers it actually uses; the one
    set of session options for every model a worker runs (the classifier, the segmenter).

    onnxruntime-gpu silently falls back to the CPU when CUDA cannot start, so the providers
    in use are read back from the session, not assumed. With ``require_cuda`` a session
    that does not run on CUDA is refused (ModelError)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if CUDA in providers and CUDA in available:
        # onnxruntime-gpu >= 1.21 can load the CUDA and cuDNN libraries of the
        # nvidia-* wheels itself; without it a missing library means a CPU fallback.
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            try:
                preload()
            except Exception as exc:  # reported through the providers check below
                log.warning("action=preload-dlls-failed error=%s", exc)
    wanted = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    # After a run, onnxruntime's pool threads spin waiting for more work; on a small
    # machine they take the cores the worker's SC and write need next (measured on 2
    # cores: the two SCs after each batch took 15-25 ms instead of 8). Without the
    # spin a run costs about 0.1 ms more per image.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot load {path}: {exc}") from exc
    in_use: list[str] = list(session.get_providers())
    if require_cuda and CUDA not in in_use:
        why = ("onnxruntime has no CUDA provider (install the [gpu] extra)"
               if CUDA not in available else "CUDA could not start (driver, CUDA or "
               "cuDNN libraries; see onnxruntime's log)")
        raise ModelError(f"[model] require_cuda is set but onnxruntime runs on "
                         f"{','.join(in_use)}: {why}.")
    return session, in_use


def _pad_to_bucket(batch: npt.NDArray[np.float32],
                   buckets: Sequence[int]) -> npt.NDArray[np.float32]:
    """``batch`` padded with zeros to the next bucket size (as it is above the largest)."""
    n = batch.shape[0]
    bucket = next((b for b in buckets if b >= n), n)
    if bucket > n:
        pad = np.zeros((bucket - n, *batch.shape[1:]), dtype=batch.dtype)
        batch = np.concatenate([batch, pad])
    return batch


class _ModelSession:
    """What the classifier's and the segmenter's sessions share: the input size from the
    model's metadata, and the warm-up over the batch buckets."""

    info: ModelInfo | SegmentationInfo
    buckets: tuple[int, ...]

    def run(self, batch: npt.NDArray[np.float32]) -> object:
        raise NotImplementedError

    @property
    def input_size(self) -> int:
        return self.info.input_size

    def warm_up(self) -> float:
        """Run every bucket's shape once (CUDA kernels, cuDNN's search); returns seconds."""
        import time

        t0 = time.perf_counter()
        size = self.input_size
        for n in self.buckets:
            self.run(np.zeros((n, size, size, 3), dtype=np.float32))
        return time.perf_counter() - t0


class Classifier(_ModelSession):
    """An onnxruntime session plus the classifier's metadata (``open_session``: the
    providers actually in use are in ``providers``; with ``require_cuda`` a session that
    does not run on CUDA is refused with ModelError).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_threads: int = 0,
        *,
        require_cuda: bool = False,
        max_batch: int = 1,
    ) -> None:
        self.path = resolve_model_path(path)
        if not self.path.is_file():
            raise ModelError(f"Model file {self.path} does not exist.")
        self.info: ModelInfo = read_model_info(self.path)
        self.session, self.providers = open_session(self.path, providers, intra_op_threads,
                                                    require_cuda=require_cuda)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or set(outputs) != {OUTPUT_PROBS, OUTPUT_CAM}:
            raise ModelError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; the contract is "
                f"[{INPUT_NAME}] -> [{OUTPUT_PROBS}, {OUTPUT_CAM}]."
            )
        self.buckets = batch_buckets(max(1, max_batch))

    def run(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Run a (N, size, size, 3) float32 batch; returns probs (N, 3) and cam (N, h, w, 3).

        The batch is padded with zeros to the next bucket size, so a session sees only the
        shapes warmed up at start; batches above the largest bucket run as they are."""
        n = batch.shape[0]
        batch = _pad_to_bucket(batch, self.buckets)
        probs, cam = self.session.run([OUTPUT_PROBS, OUTPUT_CAM], {INPUT_NAME: batch})
        return (np.asarray(probs[:n], dtype=np.float32),
                np.asarray(cam[:n], dtype=np.float32))


def resolve_segmenter_path(path: str | Path | None) -> Path:
    """An empty path means the embedded demo segmenter."""
    if not path:
        return demo_segmenter_path()
    return Path(path)


class Segmenter(_ModelSession):
    """The lung-field segmenter's session beside the :class:`Classifier`: the same
    session options, providers, thread count and (on CUDA) batch buckets, with
    ``SegmentationInfo`` for its metadata. A model file that is not a segmentation model
    (``cxrd.kind``) is refused with ModelError, as is one whose inputs and outputs are
    not the segmenter's contract."""

    def __init__(
        self,
        path: str | Path | None = None,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_threads: int = 0,
        *,
        require_cuda: bool = False,
        max_batch: int = 1,
    ) -> None:
        self.path = resolve_segmenter_path(path)
        if not self.path.is_file():
            raise ModelError(f"Segmenter file {self.path} does not exist.")
        try:
            self.info: SegmentationInfo = read_segmentation_info(self.path)
        except ModelError as exc:
            raise ModelError(f"[model] segmenter {self.path} cannot be used: {exc} "
                             "Name a file exported by `python -m training export-seg`, \"\" "
                             "for the embedded demo segmenter, or \"off\".") from exc
        self.session, self.providers = open_session(self.path, providers, intra_op_threads,
                                                    require_cuda=require_cuda)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs != [OUTPUT_SEGMENTS]:
            raise ModelError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; the segmenter's "
                f"contract is [{INPUT_NAME}] -> [{OUTPUT_SEGMENTS}]."
            )
        #: On the CPU the segmenter runs a batch image by image: its decoder's activations
        #: (up to half its input a side at every level) fall out of the caches at larger
        #: batches. With one intra-op thread (a worker per core, the default) the 256 px
        #: demo segmenter 1.0.0 cost 5.5 ms of CPU per image at batch 1, 6.1 at 2 and 7.8 at
        #: 4 (process CPU time, medians of 5 rounds of 40 images, the 2-core development
        #: machine); with two threads about 7.4 at any batch size. On CUDA the batch runs
        #: whole, padded to its bucket.
        self.image_by_image = CUDA not in self.providers
        self.buckets = (1,) if self.image_by_image else batch_buckets(max(1, max_batch))

    def run(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Run a (N, size, size, 3) float32 batch; returns (N, size/2, size/2, segments)
        probabilities, channel order ``info.segments`` (padded as :meth:`Classifier.run`;
        image by image on the CPU, see ``image_by_image``)."""
        n = batch.shape[0]
        if self.image_by_image and n > 1:
            return np.concatenate([self.run(batch[i:i + 1]) for i in range(n)])
        (probs,) = self.session.run([OUTPUT_SEGMENTS],
                                    {INPUT_NAME: _pad_to_bucket(batch, self.buckets)})
        return np.asarray(probs[:n], dtype=np.float32)
