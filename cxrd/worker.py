"""Worker processes: claim jobs, decode and preprocess, infer in batches across studies,
write one heatmap SC per image. The SR per study is written by ``cxrd.results`` once every
job of the study has ended."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from cxrd import queue
from cxrd.config import Config
from cxrd.db import Database
from cxrd.domain import SkipReason
from cxrd.errors import DecodeError, UnsupportedImage
from cxrd.infer import Classifier
from cxrd.metrics import metrics, observe_stages
from cxrd.modelinfo import CLASS_NAMES, ModelInfo
from cxrd.preprocess import (
    dataset_to_gray8,
    decode_min_side,
    decode_pixels,
    resize_gray8,
    to_model_input,
)
from cxrd.report import decide_class
from cxrd.uids import derived_uid

log = logging.getLogger(__name__)

IDLE_SLEEP_SECONDS = 0.25
HEARTBEAT_SECONDS = 10.0


@dataclass
class Prepared:
    """One decoded, preprocessed image, ready for the model."""

    dataset: Dataset  # header; PixelData removed
    display: npt.NDArray[np.uint8]  # <= 1024 px on the long side, for the SC
    model_input: npt.NDArray[np.float32]
    timings: dict[str, float] = field(default_factory=dict)


def prepare(path: str | Path, input_size: int) -> Prepared:
    """Read, decode, run the shared preprocessing; DecodeError / UnsupportedImage.

    JPEG 2000 is decoded at the reduced resolution ``decode_min_side(input_size)`` allows
    (training uses the same rule), which still covers the display image of the SC.
    """
    from cxrd.report import downscale_for_display

    t0 = time.perf_counter()
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DecodeError(f"cannot read the spooled file: {exc}") from exc
    pixels = decode_pixels(ds, min_side=decode_min_side(input_size))
    t1 = time.perf_counter()
    gray = dataset_to_gray8(ds, pixels)
    del pixels
    model_input = to_model_input(resize_gray8(gray, input_size))
    display = downscale_for_display(gray)
    del gray
    t2 = time.perf_counter()
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return Prepared(ds, display, model_input, {"decode": t1 - t0, "preprocess": t2 - t1})


def heatmap_uids(source_sop_uid: str, study_uid: str, generation: int,
                 model: ModelInfo) -> tuple[str, str]:
    """(series, instance) UIDs of an SC: functions of their inputs, so a redo after a
    crash rewrites the same object instead of adding one."""
    return (derived_uid("sc-series", study_uid, generation, model.device_uid),
            derived_uid("sc", source_sop_uid, generation, model.device_uid))


def write_heatmap(prep: Prepared, probs: npt.NDArray[np.float32], cam: npt.NDArray[np.float32],
                  model: ModelInfo, results_dir: Path, generation: int) -> tuple[str, Path]:
    """Build and save the heatmap SC; returns its SOP Instance UID and path."""
    from cxrd.report import ImageResult, build_heatmap_sc, save_dataset

    series_uid, sop_uid = heatmap_uids(str(prep.dataset.SOPInstanceUID),
                                       str(prep.dataset.StudyInstanceUID), generation, model)
    t0 = time.perf_counter()
    sc = build_heatmap_sc(ImageResult(prep.dataset, prep.display, probs, cam), model,
                          series_instance_uid=series_uid, sop_instance_uid=sop_uid,
                          instance_number=int(prep.dataset.get("InstanceNumber", 1) or 1))
    t1 = time.perf_counter()
    path = save_dataset(sc, results_dir)
    prep.timings["sc"] = t1 - t0
    prep.timings["write"] = time.perf_counter() - t1
    return sop_uid, path


class WorkerLoop:
    """The body of one worker process (also used in-process by tests and benchmarks)."""

    def __init__(self, config: Config, worker_id: str, db: Database | None = None) -> None:
        self.config = config
        self.worker_id = worker_id
        self.db = db or Database(config.storage.database_url_resolved)
        self.classifier = Classifier(config.model.path, config.model.providers,
                                     config.model.intra_op_threads)
        self.model = self.classifier.info
        self.processed = 0
        self.results_dir = config.results.results_dir
        self.destinations = [d.name for d in config.destinations]
        log.info("action=worker-start worker=%s model=%s device_uid=%s providers=%s demo=%s",
                 worker_id, self.model.display_name, self.model.device_uid,
                 ",".join(self.classifier.providers), self.model.demo)
        if "CUDAExecutionProvider" in config.model.providers and (
                "CUDAExecutionProvider" not in self.classifier.providers):
            log.warning("action=provider-fallback worker=%s wanted=CUDAExecutionProvider "
                        "in_use=%s", worker_id, ",".join(self.classifier.providers))
        from cxrd.report import warm_up

        warm_up(self.model)  # highdicom's first use costs ~0.5 s: not on the first image
        queue.heartbeat(self.db, worker_id, model=self.model.display_name,
                        device_uid=self.model.device_uid, demo=self.model.demo,
                        providers=self.classifier.providers)
        self._last_beat = time.monotonic()

    def run_once(self) -> int:
        """Claim and process one batch; returns the number of jobs claimed."""
        w = self.config.workers
        jobs = queue.claim(self.db, self.worker_id, w.batch_size, w.lease_seconds,
                           w.max_attempts)
        if time.monotonic() - self._last_beat > HEARTBEAT_SECONDS:
            queue.heartbeat(self.db, self.worker_id, processed=self.processed)
            self._last_beat = time.monotonic()
        if jobs:
            self.process(jobs)
        return len(jobs)

    def process(self, jobs: list[queue.ClaimedJob]) -> None:
        ready: list[tuple[queue.ClaimedJob, Prepared]] = []
        for job in jobs:
            try:
                ready.append((job, prepare(job.path, self.classifier.input_size)))
            except UnsupportedImage as exc:
                queue.skip(self.db, job, self.worker_id, SkipReason.UNSUPPORTED_PHOTOMETRIC,
                           str(exc))
            except DecodeError as exc:
                queue.skip(self.db, job, self.worker_id, SkipReason.DECODE_FAILED, str(exc))
            except Exception as exc:  # unexpected: retry with backoff
                self._retry(job, exc)
        if not ready:
            return
        t0 = time.perf_counter()
        try:
            probs, cams = self.classifier.run(np.stack([p.model_input for _, p in ready]))
        except Exception as exc:
            for job, _ in ready:
                self._retry(job, exc)
            return
        infer = (time.perf_counter() - t0) / len(ready)
        for i, (job, prep) in enumerate(ready):
            try:
                prep.timings["infer"] = infer
                sc = (write_heatmap(prep, probs[i], cams[i], self.model, self.results_dir,
                                    job.generation)
                      if self.config.results.heatmap_secondary_capture else None)
                done = queue.complete(self.db, job, self.worker_id, probs[i].tolist(),
                                      np.round(cams[i], 5).tolist(), self.model.device_uid,
                                      prep.timings, sc=sc, destinations=self.destinations)
            except Exception as exc:
                self._retry(job, exc)
                continue
            if done:
                self.processed += 1
                observe_stages(prep.timings)
                metrics().images_classified.labels(
                    CLASS_NAMES[decide_class(probs[i], self.model.operating_point.tb_threshold)]
                ).inc()
                log.info("action=classified sop_instance_uid=%s study_instance_uid=%s "
                         "p_tb=%.3f p_ntb=%.3f p_norm=%.3f model=%s",
                         job.sop_instance_uid, job.study_instance_uid, *probs[i].tolist(),
                         self.model.display_name)

    def _retry(self, job: queue.ClaimedJob, exc: BaseException) -> None:
        w = self.config.workers
        queue.retry_or_fail(self.db, job, self.worker_id, f"{type(exc).__name__}: {exc}",
                            w.max_attempts, w.retry_backoff_seconds)


def worker_id_prefix() -> str:
    """Lease owners on this host start with this; a restarted node reclaims them."""
    return f"{socket.gethostname()}:"


def stop_on_signals() -> threading.Event:
    """A child process stops on SIGTERM/SIGINT after its current batch.

    The parent stops children by signalling them (systemd's default KillMode signals the
    whole cgroup anyway). No shared multiprocessing primitive is used: one held by a
    process killed with SIGKILL would hang the others.
    """
    stop = threading.Event()

    def handler(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def worker_main(config: Config, index: int, parent_pid: int,
                setup_logging: Callable[[Config], None] | None = None) -> None:
    """Entry point of a worker process. Exits on SIGTERM or when the parent dies."""
    stop = stop_on_signals()
    if setup_logging is not None:
        setup_logging(config)
    worker_id = f"{worker_id_prefix()}{os.getpid()}:w{index}"
    loop = WorkerLoop(config, worker_id)
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("action=worker-orphaned worker=%s", worker_id)
            return
        if loop.run_once() == 0:
            stop.wait(IDLE_SLEEP_SECONDS)
    log.info("action=worker-stop worker=%s processed=%d", worker_id, loop.processed)


def spawn_context() -> Any:
    """Workers are spawned, not forked: the parent has threads (watcher, receiver)."""
    return mp.get_context("spawn")
