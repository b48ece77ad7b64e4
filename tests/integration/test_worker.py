"""WorkerLoop in-process: claim -> infer -> complete -> report, with a small fake classifier
(the real model's path is tested by the acceptance tests and bench/)."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from dicomfactory import make_dataset, part10_bytes, uid
from pydicom.uid import generate_uid
from sqlalchemy import select

from cxrd.admit import admit_stable_studies, requeue_study
from cxrd.config import load_config
from cxrd.db import Database, Job, Result, Study
from cxrd.dicom import CR, SECONDARY_CAPTURE
from cxrd.domain import JobKind, JobState, ResultKind, StudyState
from cxrd.ingest import Ingestor
from cxrd.modelinfo import ModelInfo, OperatingPoint
from cxrd.worker import WorkerLoop, heatmap_uids

F32 = npt.NDArray[np.float32]


class FakeClassifier:
    """Answers by the image's mean: bright images are TB, dark ones NORM; its CAM is hot
    in one corner cell. Records the batch sizes it was given."""

    def __init__(self) -> None:
        self.info = ModelInfo(name="fake", version="1", device_uid=generate_uid(),
                              demo=True, input_size=32,
                              operating_point=OperatingPoint(tb_threshold=0.5))
        self.providers = ["CPUExecutionProvider"]
        self.input_size = 32
        self.batches: list[int] = []

    def warm_up(self) -> float:
        return 0.0

    def run(self, batch: F32) -> tuple[F32, F32]:
        self.batches.append(batch.shape[0])
        bright = batch.reshape(batch.shape[0], -1).mean(axis=1) > 0
        probs = np.where(bright[:, None], [[0.8, 0.1, 0.1]], [[0.05, 0.15, 0.8]])
        cam = np.zeros((batch.shape[0], 2, 2, 3), dtype=np.float32)
        cam[:, 0, 1, :] = 3.0
        return probs.astype(np.float32), cam


@pytest.fixture
def node(tmp_path: Path) -> tuple[WorkerLoop, Ingestor, Database, FakeClassifier]:
    config_file = tmp_path / "cxrd.toml"
    config_file.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
                           '[workers]\nbatch_size = 3\n'
                           # the fake classifier's uniform images have no lungs to find
                           '[model]\nsegmenter = "off"\n')
    config = load_config(config_file, env={})
    db = Database(config.storage.database_url_resolved)
    db.migrate()
    fake = FakeClassifier()
    loop = WorkerLoop(config, "test:1:w0", db, classifier=fake)  # type: ignore[arg-type]
    ingestor = Ingestor(db, config.storage.spool_dir, config.storage.rejected_dir)
    yield loop, ingestor, db, fake
    db.dispose()


def _store_study(ingestor: Ingestor, n: int, bright: bool) -> str:
    study = uid()
    for i in range(n):
        ds = make_dataset("CR", study_uid=study, seed=i, rows=40, columns=30,
                          PatientName="Doe^Jane", PatientID="P-42", AccessionNumber="A1")
        ds.PixelData = np.full((40, 30), 4000 if bright else 10, dtype=np.uint16).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.WindowCenter, ds.WindowWidth = 2000, 4000
        assert ingestor.store(part10_bytes(ds), "test").accepted
    return study


def _drain(loop: WorkerLoop) -> int:
    total = 0
    while claimed := loop.run_once():
        total += claimed
    return total


def _results(db: Database, study: str) -> list[Result]:
    with db.session() as s:
        return list(s.scalars(select(Result).where(Result.study_instance_uid == study)
                              .order_by(Result.id)))


def test_claim_infer_complete_report_in_process(node) -> None:
    loop, ingestor, db, fake = node
    tb_study = _store_study(ingestor, 2, bright=True)
    norm_study = _store_study(ingestor, 2, bright=False)
    assert admit_stable_studies(db, 0) == 2
    assert _drain(loop) == 6  # 4 classify jobs, 2 report jobs
    assert max(fake.batches) == 3  # batches span studies, up to batch_size
    with db.session() as s:
        studies = {st.study_instance_uid: st for st in s.scalars(select(Study))}
        jobs = s.execute(select(Job.kind, Job.state)).all()
    assert sorted(jobs) == [("classify", "done")] * 4 + [("report", "done")] * 2
    for study, expected in ((tb_study, 0.8), (norm_study, 0.05)):
        assert studies[study].state == StudyState.REPORTED.value
        results = _results(db, study)
        assert sorted(r.kind for r in results) == ["sc", "sc", "sr"]
        (sr_row,) = [r for r in results if r.kind == ResultKind.SR.value]
        assert studies[study].sr_sop_instance_uid == sr_row.sop_instance_uid
        sr = hd.sr.srread(loop.objects.local_path(sr_row.path))
        # the SR holds the classifier's probabilities and the sources' patient data, all
        # from the recorded findings (no spool read: see the next test)
        assert sr.PatientID == "P-42" and sr.AccessionNumber == "A1"
        values = [float(m.value) for g in sr.content.get_image_measurement_groups()
                  for m in g.get_measurements()]
        assert len(values) == 6 and values.count(pytest.approx(expected, abs=1e-6)) == 2
        rois = sr.content.get_planar_roi_measurement_groups()
        assert len(rois) == (2 if expected > 0.5 else 0)  # NORM images get no region


def test_the_report_job_reads_no_spool_file(node) -> None:
    loop, ingestor, db, _ = node
    study = _store_study(ingestor, 2, bright=True)
    admit_stable_studies(db, 0)
    w = loop.config.workers
    from cxrd import queue

    for job in queue.claim(db, loop.worker_id, 8, w.lease_seconds, w.max_attempts):
        assert job.kind == JobKind.CLASSIFY
        loop.process([job])
    for path in Path(loop.config.storage.spool_dir).rglob("*.dcm"):
        path.unlink()  # the report job must not need them
    assert _drain(loop) == 1
    (sr_row,) = [r for r in _results(db, study) if r.kind == ResultKind.SR.value]
    assert pydicom.dcmread(loop.objects.local_path(sr_row.path)).Modality == "SR"


def test_reprocess_supersedes_and_a_redone_report_rewrites_the_same_sr(node) -> None:
    loop, ingestor, db, _ = node
    study = _store_study(ingestor, 1, bright=True)
    admit_stable_studies(db, 0)
    _drain(loop)
    (first,) = [r for r in _results(db, study) if r.kind == ResultKind.SR.value]
    assert requeue_study(db, study) == 1
    _drain(loop)
    srs = [r for r in _results(db, study) if r.kind == ResultKind.SR.value]
    assert len(srs) == 2 and srs[1].supersedes == first.sop_instance_uid
    second = pydicom.dcmread(loop.objects.local_path(srs[1].path))
    assert second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.sop_instance_uid
    # A report job done again (a worker died after writing, before recording) makes the
    # same SR UID and no new result row.
    with db.session() as s:
        report = s.scalars(select(Job).where(Job.kind == JobKind.REPORT.value,
                                             Job.generation == 2)).one()
        report.state = JobState.PENDING.value
        st = s.scalars(select(Study)).one()
        st.state, st.sr_sop_instance_uid = StudyState.ADMITTED.value, first.sop_instance_uid
    _drain(loop)
    assert [r.sop_instance_uid for r in _results(db, study) if r.kind == "sr"] == [
        first.sop_instance_uid, srs[1].sop_instance_uid]


def test_after_a_reprocess_the_sr_reports_only_that_generation(node) -> None:
    """An image whose new-generation job fails is not reported with the previous
    generation's finding: the new SR names only what the new generation classified."""
    loop, ingestor, db, _ = node
    study = _store_study(ingestor, 2, bright=True)
    admit_stable_studies(db, 0)
    _drain(loop)
    with db.session() as s:
        from cxrd.db import Instance

        a, b = s.scalars(select(Instance).order_by(Instance.id)).all()
    loop.objects.delete(b.path)  # b cannot be decoded in generation 2
    assert requeue_study(db, study) == 2
    _drain(loop)
    srs = [r for r in _results(db, study) if r.kind == ResultKind.SR.value]
    assert len(srs) == 2
    second = pydicom.dcmread(loop.objects.local_path(srs[1].path))
    refs = {(str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
            for series in second.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    # the source and the heatmap SC of its generation-2 job (IHE AIR), nothing of b's
    (sc_row,) = [r for r in _results(db, study)
                 if r.kind == ResultKind.SC.value and r.generation == 2]
    assert sc_row.sop_instance_uid == heatmap_uids(a.sop_instance_uid, study, 2, loop.model)[1]
    assert refs == {(CR, a.sop_instance_uid), (SECONDARY_CAPTURE, sc_row.sop_instance_uid)}


def test_a_findings_record_is_checked_like_the_results_it_feeds() -> None:
    """A record read back from the database is refused when it could not make an SR."""
    from cxrd.findings import ImageFindings

    header = make_dataset("CR", rows=40, columns=30)
    del header.PixelData
    with pytest.raises(ValueError, match=r"ImageFindings.probs must lie in \[0, 1\]"):
        ImageFindings(header, np.array([1.2, 0.0, 0.0], np.float32), None)
    del header.SOPInstanceUID
    with pytest.raises(ValueError, match="ImageFindings.header has no SOPInstanceUID"):
        ImageFindings(header, np.array([0.2, 0.3, 0.5], np.float32), None)


def test_a_worker_process_runs_numpy_blas_on_one_thread() -> None:
    """In a fresh interpreter (as a spawned worker is): BLAS threads per core before, one
    after ``limit_native_threads``, and a matrix product still works."""
    import subprocess
    import sys
    code = (
        "import numpy as np\n"
        "from threadpoolctl import threadpool_info\n"
        "from cxrd.worker import limit_native_threads\n"
        "blas = lambda: [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
        "before = blas()\n"
        "limit_native_threads()\n"
        "a = np.ones((64, 64), dtype=np.float32)\n"
        "assert float((a @ a)[0, 0]) == 64.0\n"
        "print(before, blas())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("] [")
    before, after = (list(map(int, filter(None, part.strip("[]\n ").split(","))))
                     for part in out)
    assert after and all(n == 1 for n in after), out
    assert len(before) == len(after)


def test_a_worker_keeps_the_garbage_collector_off_what_it_loaded_at_start() -> None:
    """After ``settle_garbage_collector`` what was alive is frozen (not walked again), young
    collections are rarer, and new cyclic garbage is still collected."""
    import subprocess
    import sys
    code = (
        "import gc, weakref\n"
        "from cxrd.worker import GC_YOUNG_THRESHOLD, settle_garbage_collector\n"
        "settle_garbage_collector()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
        "assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD > 700\n"
        "class Node: pass\n"
        "a, b = Node(), Node(); a.other, b.other = b, a\n"
        "ref = weakref.ref(a); del a, b\n"
        "gc.collect()\n"
        "assert ref() is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_idle_worker_wakes_when_the_node_rings_not_at_the_end_of_its_sleep() -> None:
    import multiprocessing as mp
    import threading
    import time

    from cxrd.worker import wait_for_work

    bell_in, bell_out = mp.Pipe(duplex=False)
    stop = threading.Event()
    threading.Timer(0.2, lambda: bell_out.send_bytes(b"")).start()
    t0 = time.monotonic()
    wait_for_work(stop, bell_in, timeout=30.0)
    assert time.monotonic() - t0 < 10.0  # woken by the ring, not after 30 s
    # rings that piled up while the worker was busy are drained: the next wait sleeps
    for _ in range(5):
        bell_out.send_bytes(b"")
    wait_for_work(stop, bell_in, timeout=0.01)
    t0 = time.monotonic()
    wait_for_work(stop, bell_in, timeout=0.5)
    assert time.monotonic() - t0 >= 0.4
    # the node gone (its end closed): a plain sleep, no busy loop
    bell_out.close()
    t0 = time.monotonic()
    wait_for_work(stop, bell_in, timeout=0.3)
    assert time.monotonic() - t0 >= 0.25


def test_a_ring_never_blocks_the_scheduler_on_a_busy_worker(tmp_path) -> None:
    """A worker busy for long does not read its doorbell; the node's write end is
    non-blocking, so a full pipe is skipped instead of stopping the scheduler."""
    import multiprocessing as mp
    import os
    import threading

    from cxrd.pool import WorkerPool

    node = WorkerPool.__new__(WorkerPool)  # only the doorbells are needed
    bell_in, bell_out = mp.Pipe(duplex=False)
    os.set_blocking(bell_out.fileno(), False)
    node._doorbells = {0: bell_out}
    done = threading.Event()

    def ring_a_lot() -> None:
        for _ in range(100_000):  # far more than a pipe holds
            node.ring()
        done.set()

    threading.Thread(target=ring_a_lot, daemon=True).start()
    assert done.wait(30), "ring() blocked on a full pipe"
    assert bell_in.poll(0)


def test_a_failed_write_retries_its_own_job_and_the_batch_ends_without_it(node) -> None:
    """The SCs of a batch are written on the writer threads and the batch's jobs end in
    one transaction after them: an object that cannot be written (here its final path is
    a folder) sends its job back to the queue; the others end with their results."""
    from cxrd.db import Instance, utcnow
    from cxrd.store import result_key
    from cxrd.worker import heatmap_uids

    loop, ingestor, db, _ = node
    study = _store_study(ingestor, 3, bright=True)
    assert admit_stable_studies(db, 0) == 1
    with db.session() as s:
        sops = list(s.scalars(select(Instance.sop_instance_uid).order_by(Instance.id)))
    _, blocked_sc = heatmap_uids(sops[1], study, 1, loop.model)
    blocker = loop.objects.local_path(result_key(blocked_sc))
    assert blocker is not None
    blocker.mkdir(parents=True)

    assert loop.run_once() == 3

    with db.session() as s:
        jobs = {j.instance_id: j for j in s.scalars(select(Job).where(
            Job.kind == JobKind.CLASSIFY.value))}
        by_sop = {i.sop_instance_uid: jobs[i.id] for i in s.scalars(select(Instance))}
        assert [by_sop[sop].state for sop in sops] == ["done", "pending", "done"]
        assert "IsADirectoryError" in (by_sop[sops[1]].error or "")
    assert sorted(r.source_sop_instance_uid for r in _results(db, study)) == sorted(
        [sops[0], sops[2]])
    blocker.rmdir()
    with db.session() as s:
        s.get(Job, by_sop[sops[1]].id).not_before = utcnow()
    _drain(loop)
    results = _results(db, study)
    assert sorted(r.kind for r in results) == ["sc", "sc", "sc", "sr"]
