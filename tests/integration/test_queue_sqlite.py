"""The queue on a real SQLite file shared by several worker processes, as ``cxrd serve``
runs it: every job is claimed exactly once, and the end-to-end ingest → admit → claim →
complete path leaves consistent rows."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from dicomfactory import make_dataset, part10_bytes, uid
from queuehelpers import make_jobs
from sqlalchemy import select

from cxrd import queue
from cxrd.admit import admit_stable_studies
from cxrd.db import Database, Instance, Job, Study
from cxrd.domain import InstanceState, JobState, StudyState
from cxrd.ingest import Ingestor


def claim_until_empty(url: str, owner: str, start: mp.synchronize.Event,  # type: ignore
                      out: mp.Queue) -> None:  # type: ignore[type-arg]
    db = Database(url)
    start.wait(30)
    got: list[int] = []
    while batch := queue.claim(db, owner, 2, 300, 3):
        got.extend(j.job_id for j in batch)
    db.dispose()
    out.put((owner, got))


def test_worker_processes_claim_each_job_once(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    db = Database(url)
    db.migrate()
    ids = make_jobs(db, studies=8, per_study=3)
    ctx = mp.get_context("spawn")  # as cxrd.worker starts them
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=claim_until_empty, args=(url, f"p{i}", start, out))
             for i in range(2)]
    for p in procs:
        p.start()
    start.set()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    flat = [j for got in results.values() for j in got]
    assert sorted(flat) == ids and len(flat) == len(set(flat))
    with db.session() as s:
        for job in s.scalars(select(Job)):
            assert job.lease_owner == next(o for o, got in results.items() if job.id in got)
    db.dispose()


def test_ingest_admit_claim_complete(db: Database, dirs):
    ingestor = Ingestor(db, dirs.spool, dirs.rejected)
    studies = [uid(), uid()]
    for n, study_uid in enumerate(studies):
        for k in range(2):
            ds = make_dataset("DX", study_uid=study_uid, seed=10 * n + k)
            assert ingestor.store(part10_bytes(ds), "t").accepted
    assert admit_stable_studies(db, 5) == 0  # not yet stable
    assert admit_stable_studies(db, 0) == 2
    batch = queue.claim(db, "w", 8, 60, 3)
    assert len(batch) == 4 and {c.study_instance_uid for c in batch} == set(studies)
    for c in batch:
        assert dirs.file(c.path).is_file()
        assert queue.complete(db, c, "w", [0.2, 0.3, 0.5], None, "1.2.3", {})
    with db.session() as s:
        assert set(s.scalars(select(Instance.state))) == {InstanceState.DONE.value}
        states = s.execute(select(Job.kind, Job.state)).all()
        # every classify job done, and each study's report job queued
        assert sorted(states) == [("classify", JobState.DONE.value)] * 4 + [
            ("report", JobState.PENDING.value)] * 2
        assert set(s.scalars(select(Study.state))) == {StudyState.ADMITTED.value}
