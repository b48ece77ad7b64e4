"""Worker processes: claim jobs with a lease and do them.

* classify jobs, batched across studies: decode and preprocess, one classifier run and one
  lung-field segmenter run per batch (the segmenter from the same decoded image), the
  lung-field gate (``no-lung-fields``), then per image its heatmap SC, its lung SEG and
  its findings record (``Job.record``);
* report jobs, one per study generation, enqueued by the transaction that ends the study's
  last classify job (``cxrd.queue``): the study's SR, built from those records alone.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from threadpoolctl import threadpool_limits

from cxrd import queue
from cxrd.config import Config, worker_threads
from cxrd.db import Database, unavailable
from cxrd.dicom import CR
from cxrd.domain import JobKind, SkipReason
from cxrd.errors import DecodeError, ObjectMissing, UnsupportedImage
from cxrd.findings import ImageFindings, decide_class, study_finding
from cxrd.infer import Classifier, Segmenter
from cxrd.lungs import lung_gate, lung_masks
from cxrd.metrics import metrics, observe_stages
from cxrd.modelinfo import CLASS_NAMES, ModelInfo, SegmentationInfo
from cxrd.preprocess import (
    Reduced,
    contract,
    dataset_to_gray8,
    decode_min_side,
    decode_pixels,
    gray8_to_model_input,
    read_dicom,
    resize_gray8,
    to_model_input,
)
from cxrd.seg import LungSegEncoder
from cxrd.space import is_resource_error
from cxrd.store import NodeStore, open_node_store, result_key
from cxrd.uids import derived_uid, validate_uid

log = logging.getLogger(__name__)

IDLE_SLEEP_SECONDS = 0.25
#: A worker whose round failed on a full disk outside any one job waits this long before
#: it tries again, doubling up to the maximum (a database outage: ``wait_for_database``).
RESOURCE_PAUSE_SECONDS = 1.0
RESOURCE_PAUSE_MAX_SECONDS = 10.0
#: While the database is unreachable, a worker looks again this often.
DATABASE_RETRY_SECONDS = 1.0
HEARTBEAT_SECONDS = 10.0
WORKER_NICENESS = 5
#: Threads that write a worker's result objects (an image's SC and SEG at once).
WRITER_THREADS = 2


@dataclass
class Prepared:
    """One decoded, preprocessed image, ready for the model."""

    dataset: Dataset  # header; PixelData removed
    display: npt.NDArray[np.uint8]  # the decoded image, 8-bit; the SC downscales it
    model_input: npt.NDArray[np.float32]
    timings: dict[str, float] = field(default_factory=dict)
    #: ``display`` box-averaged by the model's contract (v2), for the SC to start from;
    #: None when the contract did not reduce it.
    reduced: Reduced | None = None
    #: Both lung fields (the segmenter's channels thresholded and OR-ed) over the
    #: segmenter's output grid, which covers the model's square input geometry (the
    #: image stretched); None without a segmenter.
    lung_grid: npt.NDArray[np.bool_] | None = None


def prepare(path: str | Path | bytes, model: ModelInfo) -> Prepared:
    """Read, decode, run the shared preprocessing under the model's contract;
    DecodeError / UnsupportedImage.

    JPEG 2000 is decoded at the reduced resolution ``decode_min_side(input_size)`` allows
    (training uses the same rule), which still covers the SC's default size. The 8-bit
    image is kept as it is for the SC, which downscales it to ``heatmap_max_side``; when
    the contract box-averages it first (``cxrd-gray8-stretch-v2``), that reduced image is
    kept too, and the SC starts from it when its own downscale would make the same one.
    ``path`` is the spooled file, or the object's bytes (a store without local files).
    """
    size = model.input_size
    t0 = time.perf_counter()
    try:
        ds = read_dicom(path)
    except Exception as exc:
        raise DecodeError(f"cannot read the spooled file: {exc}") from exc
    pixels = decode_pixels(ds, min_side=decode_min_side(size))
    t1 = time.perf_counter()
    gray = dataset_to_gray8(ds, pixels)
    del pixels
    reduced = contract(model.preprocessing).reduce(gray, size)
    model_input = to_model_input(resize_gray8(reduced.image, size))
    t2 = time.perf_counter()
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return Prepared(ds, gray, model_input, {"decode": t1 - t0, "preprocess": t2 - t1},
                    reduced if reduced.factor > 1 else None)


def heatmap_uids(source_sop_uid: str, study_uid: str, generation: int,
                 model: ModelInfo) -> tuple[str, str]:
    """(series, instance) UIDs of an SC: functions of their inputs, so a redo after a
    crash rewrites the same object instead of adding one."""
    return (derived_uid("sc-series", study_uid, generation, model.device_uid),
            derived_uid("sc", source_sop_uid, generation, model.device_uid))


def sr_series_uid(study_uid: str, model: ModelInfo) -> str:
    """The series of a study's SRs (every generation's, each superseding the last): a
    function of the study and the model, so that an SC names it before the SR exists."""
    return derived_uid("sr-series", study_uid, model.device_uid)


def seg_uids(source_sop_uid: str, study_uid: str, generation: int,
             model: SegmentationInfo) -> tuple[str, str]:
    """(series, instance) UIDs of a lung SEG (``cxrd.seg``), made as :func:`heatmap_uids`
    makes the SC's, from the segmenter's device UID."""
    return (derived_uid("seg-series", study_uid, generation, model.device_uid),
            derived_uid("seg", source_sop_uid, generation, model.device_uid))


def put_result(target: Path | NodeStore, sop_uid: str,
               content: bytes | Callable[[BinaryIO], object]) -> str | Path:
    """Write a result durably: into the folder ``target`` as ``<SOP UID>.dcm``
    (``cxrd.durable.write_file``; returns the file), or into the node's store under
    ``results/<SOP UID>.dcm`` (returns the key, which the result row records). A local
    store without an export folder is written with ``cxrd.durable`` directly, its errors
    as they come, as the single node always wrote. InvalidUID for a bad UID."""
    from cxrd.durable import write_file

    uid = validate_uid(sop_uid)
    if isinstance(target, Path):
        path = target / f"{uid}.dcm"
        write_file(path, content)
        return path
    key = result_key(uid)
    local = target.local_path(key)
    if local is not None and target.export is None:
        write_file(local, content)
        return key
    target.put(key, content)
    return key


def save_result(ds: Dataset, target: Path | NodeStore) -> str | Path:
    """``put_result`` of a data set as a Part 10 file (``cxrd.srencode.part10_bytes``:
    pydicom's encoding, a heatmap's pixels joined in one copy; the bytes then go to the
    device past the page cache, ``cxrd.durable``)."""
    from cxrd.srencode import part10_bytes

    return put_result(target, str(ds.get("SOPInstanceUID", "")), part10_bytes(ds))


def heatmap_object(prep: Prepared, probs: npt.NDArray[np.float32],
                   cam: npt.NDArray[np.float32], model: ModelInfo, generation: int, *,
                   max_side: int = 1024, compression: str = "none",
                   region: tuple[float, float, float, float] | None = None,
                   report_series_uid: str | None = None) -> tuple[str, bytes]:
    """The heatmap SC of one image, built and encoded as a Part 10 file
    (``cxrd.srencode.part10_bytes``; timed as ``sc``): its SOP Instance UID and bytes.
    ``max_side`` and ``compression`` are ``[results] heatmap_max_side`` and
    ``heatmap_compression`` (see ``cxrd.heatmap``); ``region`` is the one the SR reports
    (``ImageFindings.region``), which the SC outlines. ``report_series_uid``: the series
    of the study's SR (``sr_series_uid``; when ``[results] structured_report``), which the
    SC names."""
    from cxrd.heatmap import ImageResult, build_heatmap_sc
    from cxrd.srencode import part10_bytes

    series_uid, sop_uid = heatmap_uids(str(prep.dataset.SOPInstanceUID),
                                       str(prep.dataset.StudyInstanceUID), generation, model)
    t0 = time.perf_counter()
    sc = build_heatmap_sc(ImageResult(prep.dataset, prep.display, probs, cam, prep.reduced,
                                      region),
                          model,
                          series_instance_uid=series_uid, sop_instance_uid=sop_uid,
                          instance_number=int(prep.dataset.get("InstanceNumber", 1) or 1),
                          max_side=max_side, compression=compression,
                          report_series_uid=report_series_uid)
    data = part10_bytes(sc)
    prep.timings["sc"] = time.perf_counter() - t0
    return sop_uid, data


def write_heatmap(prep: Prepared, probs: npt.NDArray[np.float32], cam: npt.NDArray[np.float32],
                  model: ModelInfo, results_dir: Path | NodeStore, generation: int, *,
                  max_side: int = 1024, compression: str = "none",
                  region: tuple[float, float, float, float] | None = None,
                  report_series_uid: str | None = None) -> tuple[str, str | Path]:
    """``heatmap_object``, saved (``put_result``: a folder, or the node's store; timed as
    ``write``); returns its SOP Instance UID and its path or key."""
    sop_uid, data = heatmap_object(prep, probs, cam, model, generation, max_side=max_side,
                                   compression=compression, region=region,
                                   report_series_uid=report_series_uid)
    t0 = time.perf_counter()
    path = put_result(results_dir, sop_uid, data)
    prep.timings["write"] = time.perf_counter() - t0
    return sop_uid, path


def segmenter_input(prep: Prepared, model: ModelInfo,
                    segmenter: SegmentationInfo) -> npt.NDArray[np.float32]:
    """The segmenter's input for an image ``prepare`` made for ``model``: the classifier's
    own input when both models take the same size under the same contract (the same
    function of the same image, so the very same array), else made from the decoded image
    under the segmenter's contract (from the box average ``prepare`` made, when that
    contract wants the same one)."""
    if (segmenter.input_size == model.input_size
            and segmenter.preprocessing == model.preprocessing):
        return prep.model_input
    return gray8_to_model_input(prep.display, segmenter.input_size, segmenter.preprocessing,
                                prep.reduced)


def lung_fields(probs: npt.NDArray[np.float32], model: SegmentationInfo
                ) -> npt.NDArray[np.bool_]:
    """Both lung fields over the segmenter's grid: each channel of its (h, w, 2) output
    thresholded at ``model.threshold``, OR-ed."""
    return np.asarray((probs >= model.threshold).any(axis=-1), dtype=np.bool_)


def seg_object(prep: Prepared, probs: npt.NDArray[np.float32], encoder: LungSegEncoder,
               generation: int, *, report_series_uid: str | None = None) -> tuple[str, bytes]:
    """The lung-field SEG (``cxrd.seg``) of one image from the segmenter's (h, w, 2)
    ``probs``, encoded (timed as ``seg``): its SOP Instance UID and bytes. The masks are at
    the source's Rows x Columns (``lung_masks``: thresholded on their grid, packed from
    it); the SEG comes from ``encoder``'s template for the kind of source
    (``LungSegEncoder``). ``report_series_uid``: the series of the study's SR
    (``sr_series_uid``), which the SEG names, as the SC does."""
    model = encoder.model
    series_uid, sop_uid = seg_uids(str(prep.dataset.SOPInstanceUID),
                                   str(prep.dataset.StudyInstanceUID), generation, model)
    t0 = time.perf_counter()
    masks = lung_masks(probs, int(prep.dataset.Rows), int(prep.dataset.Columns),
                       model.threshold)
    encoded = encoder.encode(prep.dataset, masks, series_instance_uid=series_uid,
                             sop_instance_uid=sop_uid,
                             instance_number=int(prep.dataset.get("InstanceNumber", 1) or 1),
                             report_series_uid=report_series_uid)
    prep.timings["seg"] = time.perf_counter() - t0
    return sop_uid, encoded


def write_seg(prep: Prepared, probs: npt.NDArray[np.float32], encoder: LungSegEncoder,
              results_dir: Path | NodeStore, generation: int, *,
              report_series_uid: str | None = None) -> tuple[str, str | Path]:
    """``seg_object``, saved (``put_result``; its time added to ``seg``); returns its SOP
    Instance UID and its path or key."""
    sop_uid, encoded = seg_object(prep, probs, encoder, generation,
                                  report_series_uid=report_series_uid)
    t0 = time.perf_counter()
    path = put_result(results_dir, sop_uid, encoded)
    prep.timings["seg"] += time.perf_counter() - t0
    return sop_uid, path


def warm_up_results(model: ModelInfo, segmenter: SegmentationInfo | None = None) -> float:
    """Build one SC and a few SRs in memory from tiny synthetic images; returns the seconds.

    highdicom loads its tables and pydicom its dictionaries on first use (about 0.4 s), and
    ``cxrd.sr`` builds its content templates once per character set and kind of image
    (about 70 ms and 25 ms each): paying that at a worker's start keeps it off the first
    studies' latency. The SRs cover each reported class in the character sets most
    archives send (none, Latin-1, UTF-8); others are built when first met. With a
    ``segmenter``, one lung SEG is built too (highdicom's Segmentation, its first use).
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    from cxrd.heatmap import ImageResult, build_heatmap_sc
    from cxrd.sr import build_sr

    t0 = time.perf_counter()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(CR)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "WARM^UP", "0", "", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20000101", "000000", "", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = 16, 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    cam = np.zeros((2, 2, 3), dtype=np.float32)
    probs = np.full(3, 1 / 3, dtype=np.float32)
    build_heatmap_sc(ImageResult(ds, np.zeros((16, 16), dtype=np.uint8), probs, cam), model,
                     series_instance_uid=generate_uid())
    if segmenter is not None:
        from cxrd.seg import build_lung_seg

        left = np.zeros((16, 16), dtype=bool)
        left[4:12, 9:14] = True
        build_lung_seg(ds, [left, left[:, ::-1]], segmenter,
                       series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                       instance_number=1)
    cam[0, 0] = 1.0  # a hottest region for the abnormal outcomes
    per_class = np.full((3, 3), 0.01, dtype=np.float32) + np.eye(3, dtype=np.float32) * 0.98
    for charset in (None, "ISO_IR 100", "ISO_IR 192"):
        images = []
        for i, p in enumerate(per_class):  # TB, NTB and NORM: each kind of image
            image = copy.deepcopy(ds)
            image.SOPInstanceUID = generate_uid()
            if i == 0:  # the image library's CR/DX descriptors (highdicom's first use)
                image.PatientOrientation, image.ImagerPixelSpacing = ["A", "F"], [0.1, 0.1]
            if charset is not None:
                image.SpecificCharacterSet = charset
            images.append(ImageFindings.of(image, p, cam, model.operating_point.tb_threshold))
        build_sr(images, model)
    return time.perf_counter() - t0


@dataclass
class _Written:
    """One image of a batch whose result objects are on their way to the disk: each a SOP
    Instance UID and the writer's future of its path or key."""

    job: queue.ClaimedJob
    prep: Prepared
    probs: list[float]
    record: dict[str, Any]
    sc: tuple[str, Future[str | Path]] | None = None
    seg: tuple[str, Future[str | Path]] | None = None

    def completion(self) -> queue.Completion:
        """The job's ``queue.Completion``, once every object is written (the first
        writer's error, if one failed)."""
        sc = (self.sc[0], self.sc[1].result()) if self.sc is not None else None
        seg = (self.seg[0], self.seg[1].result()) if self.seg is not None else None
        return queue.Completion(self.job, self.probs, self.record, self.prep.timings, sc, seg)


class WorkerLoop:
    """The body of one worker process (also used in-process by tests and benchmarks).

    It claims jobs of both kinds: a study's report job first, then classify jobs batched
    across studies. ``classifier`` may be injected (a test's fake, or a session opened by
    the caller); by default one is opened from ``[model]``.
    """

    def __init__(self, config: Config, worker_id: str, db: Database | None = None,
                 classifier: Classifier | None = None,
                 segmenter: Segmenter | None = None) -> None:
        self.config = config
        self.worker_id = worker_id
        self.db = db or Database(config.storage.database_url_resolved)
        m = config.model
        self.classifier = classifier or Classifier(
            m.path, m.providers, worker_threads(config),
            require_cuda=m.require_cuda, max_batch=config.workers.batch_size)
        self.model = self.classifier.info
        #: The lung-field segmenter (``[model] segmenter``); None when it is "off" (no
        #: SEG, no lung-field gate).
        self.segmenter = segmenter if segmenter is not None or not m.uses_segmenter else (
            Segmenter(m.segmenter, m.providers, worker_threads(config),
                      require_cuda=m.require_cuda, max_batch=config.workers.batch_size))
        self.segmentation = self.segmenter.info if self.segmenter is not None else None
        self.seg_encoder = (LungSegEncoder(self.segmentation)
                            if self.segmentation is not None else None)
        self.processed = 0
        #: The spool and the results (``[storage] store``), opened in this process.
        self.objects = open_node_store(config)
        #: ``[results] folder``: the results' files with the default store, a local
        #: export (when set) with an S3 or folder store.
        self.results_dir = config.results.results_dir
        self.destinations = [d.name for d in config.destinations]
        #: Writes the SCs and SEGs of a batch (``_put``); the batch's jobs end after all of
        #: them are written.
        self.writer = ThreadPoolExecutor(max_workers=WRITER_THREADS,
                                         thread_name_prefix="cxrd-write")
        #: ``[[notifications]]``: each SR is queued for those urgent for its finding.
        self.notifications = config.notifications
        seg = self.segmentation
        log.info("action=worker-start worker=%s model=%s device_uid=%s providers=%s demo=%s "
                 "segmenter=%s segmenter_device_uid=%s segmenter_demo=%s",
                 worker_id, self.model.display_name, self.model.device_uid,
                 ",".join(self.classifier.providers), self.model.demo,
                 seg.display_name if seg else "off", seg.device_uid if seg else None,
                 seg.demo if seg else None)
        if "CUDAExecutionProvider" in config.model.providers and (
                "CUDAExecutionProvider" not in self.classifier.providers):
            log.warning("action=provider-fallback worker=%s wanted=CUDAExecutionProvider "
                        "in_use=%s", worker_id, ",".join(self.classifier.providers))
        # Every batch shape once (CUDA: cuDNN's algorithm search), and highdicom's first
        # use (~0.5 s; the SEG's too): none of it lands on the first study.
        self.classifier.warm_up()
        if self.segmenter is not None:
            self.segmenter.warm_up()
        warm_up_results(self.model, seg if config.results.segmentation else None)
        #: The jobs of the batch in hand: given back if the database goes away meanwhile.
        self.held: list[queue.ClaimedJob] = []
        try:
            queue.heartbeat(self.db, worker_id, model=self.model.display_name,
                            device_uid=self.model.device_uid, demo=self.model.demo,
                            providers=self.classifier.providers)
        except Exception as exc:
            if not unavailable(exc):
                raise
            log.warning("action=database-unavailable worker=%s held_jobs=0 error_type=%s",
                        worker_id, type(exc).__name__)
        self._last_beat = time.monotonic()

    def run_once(self) -> int:
        """Claim and process one batch; returns the number of jobs claimed."""
        w = self.config.workers
        jobs = queue.claim(self.db, self.worker_id, w.batch_size, w.lease_seconds,
                           w.max_attempts)
        self.held = jobs
        if time.monotonic() - self._last_beat > HEARTBEAT_SECONDS:
            queue.heartbeat(self.db, self.worker_id, processed=self.processed)
            self._last_beat = time.monotonic()
        reports = [j for j in jobs if j.kind == JobKind.REPORT]
        for job in reports:
            self.report(job)
        classify = [j for j in jobs if j.kind == JobKind.CLASSIFY]
        if classify:
            self.process(classify)
        self.held = []
        return len(jobs)

    def wait_for_database(self, exc: BaseException, keep_waiting: Callable[[], bool]) -> bool:
        """The database went away (``exc``): wait until it answers again, then give back
        the jobs in hand without spending their attempts, and go on. Nothing is failed and
        the process does not exit: an outage is a reason to wait. Returns False when
        ``keep_waiting`` said stop first (their leases then expire as after a crash)."""
        log.warning("action=database-unavailable worker=%s held_jobs=%d error_type=%s",
                    self.worker_id, len(self.held), type(exc).__name__)
        log.debug("action=database-unavailable worker=%s detail=%s", self.worker_id, exc)
        t0 = time.monotonic()
        while keep_waiting():
            try:
                self.db.ping()
                released = queue.release(self.db, self.held, self.worker_id,
                                         "database-unavailable")
            except Exception as again:
                if not unavailable(again):
                    raise
                time.sleep(DATABASE_RETRY_SECONDS)
                continue
            log.info("action=database-back worker=%s waited_s=%.1f released=%d",
                     self.worker_id, time.monotonic() - t0, released)
            self.held = []
            return True
        return False

    def process(self, jobs: list[queue.ClaimedJob]) -> None:
        """Classify a batch: decode and preprocess each, one classifier run and one
        segmenter run, the lung-field gate, then per image its heatmap SC, its lung SEG
        and the job's completion with its findings record."""
        ready: list[tuple[queue.ClaimedJob, Prepared]] = []
        for job in jobs:
            try:
                ready.append((job, prepare(self._source(job), self.model)))
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
            infer = (time.perf_counter() - t0) / len(ready)
            lungs = self._segment([p for _, p in ready])
        except Exception as exc:
            for job, _ in ready:
                self._retry(job, exc)
            return
        threshold = self.model.operating_point.tb_threshold
        written: list[_Written] = []
        for i, (job, prep) in enumerate(ready):
            try:
                prep.timings["infer"] = infer
                if lungs is not None and self._no_lung_fields(job, prep):
                    continue
                # The findings first: the SC outlines the region the SR will report, both
                # kept inside the lung fields (with [results] lung_margin) when they are known.
                t1 = time.perf_counter()
                findings = ImageFindings.of(prep.dataset, probs[i], cams[i], threshold,
                                            lungs=prep.lung_grid,
                                            margin=self.config.results.lung_margin)
                record = findings.record()
                prep.timings["record"] = time.perf_counter() - t1
                results = _Written(job, prep, probs[i].tolist(), record)
                # The SC and the SEG name the series of the SR the study's report job writes.
                report = (sr_series_uid(job.study_instance_uid, self.model)
                          if self.config.results.structured_report else None)
                if self.config.results.heatmap_secondary_capture:
                    results.sc = self._put(prep.timings, "write", *heatmap_object(
                        prep, probs[i], cams[i], self.model, job.generation,
                        max_side=self.config.results.heatmap_max_side,
                        compression=self.config.results.heatmap_compression,
                        region=findings.region, report_series_uid=report))
                if (lungs is not None and self.seg_encoder is not None
                        and self.config.results.segmentation):
                    results.seg = self._put(prep.timings, "seg", *seg_object(
                        prep, lungs[i], self.seg_encoder, job.generation,
                        report_series_uid=report))
            except Exception as exc:
                self._retry(job, exc)
                continue
            written.append(results)
        finished: list[queue.Completion] = []
        for results in written:  # each job ends once its objects are on disk
            try:
                finished.append(results.completion())
            except Exception as exc:
                self._retry(results.job, exc)
        self._complete(finished)

    def _put(self, timings: dict[str, float], stage: str, sop_uid: str,
             data: bytes) -> tuple[str, Future[str | Path]]:
        """``put_result`` of one object on the writer threads (``self.writer``), its time
        added to ``timings[stage]``: the worker builds the next image's objects while this
        one's bytes and fsyncs reach the disk (about 6 ms of waiting per object, a tenth of
        an image's time, otherwise spent idle)."""
        def put() -> str | Path:
            t0 = time.perf_counter()
            path = put_result(self.objects, sop_uid, data)
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
            return path

        return sop_uid, self.writer.submit(put)

    def _complete(self, finished: list[queue.Completion]) -> None:
        """End the batch's classify jobs whose results are written, in one transaction
        (``queue.complete_batch``); when it fails, each job is retried as a failure of its
        own would be."""
        if not finished:
            return
        threshold = self.model.operating_point.tb_threshold
        try:
            done = queue.complete_batch(self.db, finished, self.worker_id,
                                        self.model.device_uid, destinations=self.destinations)
        except Exception as exc:
            for c in finished:
                self._retry(c.job, exc)
            return
        for c, ok in zip(finished, done, strict=True):
            if not ok:
                continue
            self.processed += 1
            observe_stages(c.timings)
            k = decide_class(np.asarray(c.probs, dtype=np.float32), threshold)
            metrics().images_classified.labels(CLASS_NAMES[k]).inc()
            log.info("action=classified sop_instance_uid=%s study_instance_uid=%s "
                     "p_tb=%.3f p_ntb=%.3f p_norm=%.3f model=%s",
                     c.job.sop_instance_uid, c.job.study_instance_uid, *c.probs,
                     self.model.display_name)

    def _source(self, job: queue.ClaimedJob) -> Path | bytes:
        """The spooled instance of a classify job: its local file (mapped by
        ``read_dicom``), or the object's bytes. An object that is gone is a DecodeError
        (skipped, as a spool file removed outside cxrd always was); a store that cannot
        be reached raises StoreUnavailable (the job waits, ``is_resource_error``)."""
        path = self.objects.local_path(job.path)
        if path is not None:
            return path
        try:
            return self.objects.get(job.path)
        except ObjectMissing as exc:
            raise DecodeError(f"cannot read the spooled object: {exc}") from exc

    def _segment(self, batch: list[Prepared]) -> npt.NDArray[np.float32] | None:
        """The segmenter's run over the batch the classifier ran, each input from the
        image ``prepare`` made (``segmenter_input``). Sets each image's ``lung_grid`` and
        its ``segment`` time (preprocessing plus its share of the run); returns the
        (N, h, w, 2) probabilities, or None without a segmenter."""
        if self.segmenter is None or self.segmentation is None:
            return None
        info = self.segmentation
        inputs = []
        for prep in batch:
            t0 = time.perf_counter()
            inputs.append(segmenter_input(prep, self.model, info))
            prep.timings["segment"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        probs = self.segmenter.run(np.stack(inputs))
        share = (time.perf_counter() - t0) / len(batch)
        for prep, p in zip(batch, probs, strict=True):
            prep.timings["segment"] += share
            prep.lung_grid = lung_fields(p, info)
        return probs

    def _no_lung_fields(self, job: queue.ClaimedJob, prep: Prepared) -> bool:
        """The lung-field gate (``cxrd.lungs.lung_gate``): skip (``no-lung-fields``) an
        image whose lung fields cover less than ``[model] min_lung_fraction`` of it."""
        if prep.lung_grid is None:
            return False
        why = lung_gate(prep.lung_grid, self.config.model.min_lung_fraction)
        if why is None:
            return False
        queue.skip(self.db, job, self.worker_id, SkipReason.NO_LUNG_FIELDS, why)
        return True

    def report(self, job: queue.ClaimedJob) -> None:
        """A report job: the study's SR from its classify jobs' records (no spool reads).

        The SR's UID is a function of the study, the generation, the newest classify job
        it covers and the model, so a redo after a crash rewrites the same object."""
        t0 = time.perf_counter()
        try:
            sr = None
            summary = None
            findings = queue.study_findings(self.db, job.study_instance_uid)
            latest = findings.latest_job
            if latest is not None and self.config.results.structured_report:
                sr_uid = derived_uid("sr", job.study_instance_uid, findings.generation, latest,
                                     self.model.device_uid)
                if sr_uid != findings.current_sr:
                    sr = (sr_uid, self._write_sr(findings, sr_uid))
                    summary = self._summary(findings)
            seconds = time.perf_counter() - t0
            outcome = queue.complete_report(self.db, job, self.worker_id, findings, sr=sr,
                                            seconds=seconds, destinations=self.destinations,
                                            summary=summary,
                                            notifications=self.notifications)
            if outcome == "stale" and sr is not None:
                self.objects.delete(str(sr[1]))  # recorded nowhere; the rebuild supersedes it
        except Exception as exc:
            self._retry(job, exc)
            return
        if outcome == "done":
            observe_stages({"report": seconds})
            log.info("action=study-reported study_instance_uid=%s sr_sop_instance_uid=%s "
                     "images=%d supersedes=%s model=%s", job.study_instance_uid,
                     sr[0] if sr else None, len(findings.jobs),
                     findings.current_sr if sr else None, self.model.display_name)

    def _summary(self, findings: queue.StudyFindings) -> dict[str, object]:
        """The study-level finding of the SR written from ``findings``
        (``cxrd.db.Result.summary``): what its notifications say, no patient data."""
        threshold = self.model.operating_point.tb_threshold
        k, probability = study_finding([json.loads(probs) for _, probs, _ in findings.jobs],
                                       threshold)
        # As the SR writes it: the shortest decimal that reads back as the same float32.
        return {"finding": CLASS_NAMES[k], "probability": float(str(np.float32(probability))),
                "threshold": threshold, "images": len(findings.jobs),
                "model": {"name": self.model.name, "version": self.model.version,
                          "demo": self.model.demo, "device_uid": self.model.device_uid}}

    def _write_sr(self, findings: queue.StudyFindings, sr_uid: str) -> str | Path:
        from cxrd.sr import build_sr

        images = []
        for job_id, probs, record in findings.jobs:
            if not record:  # done before schema 2 recorded findings: classify it again
                raise ValueError(f"classify job {job_id} has no findings record (done before "
                                 "schema 2); run `cxrd reprocess --study` for this study")
            images.append(ImageFindings.from_record(json.loads(probs), json.loads(record)))
        predecessor = self._previous_sr(findings.current_sr_path)
        sr = build_sr(images, self.model, sop_class=self.config.results.sr_sop_class.value,
                      predecessor=predecessor, sop_instance_uid=sr_uid,
                      series_instance_uid=sr_series_uid(findings.study_instance_uid,
                                                        self.model),
                      related=self._related(images, findings))
        return save_result(sr, self.objects)

    def _related(self, images: list[ImageFindings], findings: queue.StudyFindings
                 ) -> list[tuple[str, str, str]]:
        """The heatmap SCs and lung SEGs the classify jobs of ``images`` wrote, which the
        SR lists as evidence: their UIDs are functions of the source, the study's
        generation (that of every job an SR reports) and the model (``heatmap_uids``,
        ``seg_uids``), named when this node's configuration writes them."""
        from cxrd.dicom import SECONDARY_CAPTURE, SEGMENTATION

        related: list[tuple[str, str, str]] = []
        study, generation = findings.study_instance_uid, findings.generation
        for image in images:
            source = str(image.header.SOPInstanceUID)
            if self.config.results.heatmap_secondary_capture:
                related.append((SECONDARY_CAPTURE,
                                *heatmap_uids(source, study, generation, self.model)))
            if self.seg_encoder is not None and self.config.results.segmentation:
                related.append((SEGMENTATION, *seg_uids(source, study, generation,
                                                        self.seg_encoder.model)))
        return related

    def _previous_sr(self, key: str | None) -> Dataset | None:
        """The header of the study's current SR (its key), which the new SR names as its
        predecessor; None when there is none or its object is gone (purged)."""
        if not key:
            return None
        path = self.objects.local_path(key)
        if path is not None:
            return pydicom.dcmread(path, stop_before_pixels=True) if path.exists() else None
        try:
            data = self.objects.get(key)
        except ObjectMissing:
            return None
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)

    def _retry(self, job: queue.ClaimedJob, exc: BaseException) -> None:
        """Back to the queue: with backoff, counting the attempt; or, when the disk is
        full, to wait without counting it (``retry_or_fail(resource=True)``). When the
        database itself is unreachable (``exc``, or while this is recorded), the error
        goes up to ``worker_main``, which waits for the database and then gives back every
        job in hand without spending its attempt (``WorkerLoop.wait_for_database``)."""
        if unavailable(exc):
            raise exc  # not the job's fault: the batch waits for the database (worker_main)
        w = self.config.workers
        queue.retry_or_fail(self.db, job, self.worker_id, f"{type(exc).__name__}: {exc}",
                            w.max_attempts, w.retry_backoff_seconds,
                            resource=is_resource_error(exc))


def worker_id_prefix(node_id: str) -> str:
    """Lease owners of this node (``[node] id``) start with this; a restarted node reclaims
    them."""
    return f"{node_id}:"


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


def limit_native_threads() -> None:
    """One thread for numpy's BLAS in a worker process.

    The CAM upsampling's small matrix products would otherwise start one BLAS thread per
    core, which keep spinning after every call: a fifth of a worker's CPU, taken from the
    other workers. A worker's parallelism is the worker processes (and onnxruntime's own
    threads, ``worker_threads``)."""
    threadpool_limits(limits=1, user_api="blas")


#: Allocations between young-generation collections (CPython's default is 700). An SR
#: builds tens of thousands of small objects, so the default ran a collection every few
#: content items.
GC_YOUNG_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """Keep the cyclic garbage collector off what a long-lived process (a worker, the
    node, a receiver) loaded at start.

    The modules, the model session and the warm-up's objects live as long as the process,
    yet every full collection walked them again: a tenth of a worker's CPU went to
    ``gc`` while it built SRs, and the node's first admission after a burst of ingest took
    60 ms of CPU, most of it a full collection. They are moved to the permanent generation
    (``gc.freeze``) and young collections run less often; garbage still goes.
    """
    gc.collect()
    gc.freeze()
    _, mid, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, mid, old)


def wait_for_work(stop: threading.Event, doorbell: Connection | None,
                  timeout: float = IDLE_SLEEP_SECONDS) -> None:
    """An idle worker's pause: ``timeout``, or until the node rings ``doorbell`` (it has
    just queued jobs: ``Node.ring``), or until ``stop``. Rings that came meanwhile are
    drained, so a busy spell leaves no backlog. Without a doorbell (tests, a worker whose
    node is gone) it sleeps the whole timeout; other nodes' jobs are found by polling."""
    if doorbell is None:
        stop.wait(timeout)
        return
    try:
        if doorbell.poll(timeout):
            while doorbell.poll(0):
                doorbell.recv_bytes()
    except (EOFError, OSError):  # the node closed its end: the orphan check follows
        stop.wait(timeout)


def worker_main(config: Config, index: int, parent_pid: int,
                setup_logging: Callable[[Config], None] | None = None,
                doorbell: Connection | None = None) -> None:
    """Entry point of a worker process. Exits on SIGTERM or when the parent dies."""
    stop = stop_on_signals()
    # Below the main process: under load the receiver, the watcher and the scheduler
    # (which answer the PACS and feed the queue) go first; idle cores still go to workers.
    os.nice(WORKER_NICENESS)
    limit_native_threads()
    if setup_logging is not None:
        setup_logging(config)
    worker_id = f"{worker_id_prefix(config.node.id)}{os.getpid()}:w{index}"
    loop = WorkerLoop(config, worker_id)
    settle_garbage_collector()
    pause = RESOURCE_PAUSE_SECONDS

    def keep_waiting() -> bool:
        return not stop.is_set() and os.getppid() == parent_pid

    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("action=worker-orphaned worker=%s", worker_id)
            return
        try:
            claimed = loop.run_once()
        except Exception as exc:
            if unavailable(exc):
                loop.wait_for_database(exc, keep_waiting)
                continue
            if not is_resource_error(exc):
                raise
            # The disk is full: wait here, not in a restart loop.
            log.warning("action=worker-wait worker=%s error_type=%s retry_in_s=%.0f",
                        worker_id, type(exc).__name__, pause)
            stop.wait(pause)
            pause = min(pause * 2, RESOURCE_PAUSE_MAX_SECONDS)
            continue
        pause = RESOURCE_PAUSE_SECONDS
        if claimed == 0:
            wait_for_work(stop, doorbell)
    log.info("action=worker-stop worker=%s processed=%d", worker_id, loop.processed)


def spawn_context() -> Any:
    """Workers are spawned, not forked: the parent has threads (watcher, receiver)."""
    return mp.get_context("spawn")
