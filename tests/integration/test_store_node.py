"""The node's objects through ``[storage] store`` (``cxrd.store.NodeStore``): the schema 7
migration of absolute paths into keys, and each role on S3 against moto's real server
(``s3peer``): ingest (a C-STORE from dcmtk's ``storescu`` to an in-process receiver),
workers, the sender to dcmtk's ``storescp``, and retention.

On S3 an instance is acknowledged only after its PUT succeeded and its row committed: with
the server stopped the C-STORE is answered 0xA700 (Out of Resources), nothing is
recorded, and the same instance is stored once the server is back; a worker that cannot
reach the store gives its job back without spending an attempt.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pydicom
import pytest
from dicomfactory import make_dataset, part10_bytes, uid, write
from dicompeers import StoreSCP, dataset_bytes, output, storescu
from s3peer import new_bucket, object_keys, start_moto, stop
from sqlalchemy import select
from test_worker import FakeClassifier  # tests/integration is on sys.path

from cxrd.admit import admit_stable_studies
from cxrd.config import Config, load_config
from cxrd.db import (
    SCHEMA_VERSION,
    Database,
    Delivery,
    Instance,
    Job,
    Rejection,
    Result,
    Study,
    utcnow,
)
from cxrd.domain import DeliveryState, JobState, RejectReason, ResultKind
from cxrd.errors import StoreUnavailable
from cxrd.ingest import Ingestor
from cxrd.outbox import add_result
from cxrd.preflight import check_store
from cxrd.receive import Receiver
from cxrd.retention import TRIGGER_COMMAND, purge
from cxrd.send import Sender
from cxrd.space import is_resource_error
from cxrd.store import NodeStore, key_folders, open_node_store
from cxrd.worker import WorkerLoop

#: Credentials from the environment only (``fake_aws``, tests/integration/conftest.py).
pytestmark = pytest.mark.usefixtures("fake_aws")


def node_config(tmp_path: Path, *, store: str = "", endpoint: str = "",
                extra: str = "") -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_file = tmp_path / "cxrd.toml"
    config_file.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\nstore = "{store}"\n'
        f's3_endpoint_url = "{endpoint}"\n'
        '[workers]\nbatch_size = 3\n[model]\nsegmenter = "off"\n' + extra)
    return load_config(config_file, env={})


def chest(study: str, seed: int) -> pydicom.Dataset:
    ds = make_dataset("CR", study_uid=study, seed=seed, rows=40, columns=30)
    ds.PixelData = np.full((40, 30), 4000, dtype=np.uint16).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.WindowCenter, ds.WindowWidth = 2000, 4000
    return ds


def drain(loop: WorkerLoop) -> int:
    total = 0
    while claimed := loop.run_once():
        total += claimed
    return total


# ------------------------------------------------------------------------ migration


def test_schema_7_turns_absolute_paths_into_keys(tmp_path: Path) -> None:
    """A database of schema 6 (absolute paths) migrates to keys: spooled instances under
    ``spool/``, results under ``results/`` even with ``[results] folder`` outside
    ``data_dir``; the node then finds every file through its store. A path that is no file
    the node wrote there (not in the spool or ``[results] folder``) stays absolute and is
    still read as a file."""
    outside = tmp_path / "elsewhere" / "results"
    config = node_config(tmp_path, extra=f'[results]\nfolder = "{outside}"\n')
    db = Database(config.storage.database_url_resolved)
    db.migrate()
    ingestor = Ingestor(db, config.storage.spool_dir, config.storage.rejected_dir)
    study = uid()
    sources = [chest(study, i) for i in range(2)]
    for ds in sources:
        assert ingestor.store(part10_bytes(ds), "test").accepted
    sc = make_dataset("OT", study_uid=study, rows=8, columns=8, seed=9)
    sc_file = write(outside / f"{sc.SOPInstanceUID}.dcm", sc)
    odd = tmp_path / "odd place" / "report.dcm"  # not in the results folder
    odd.parent.mkdir()
    write(odd, make_dataset("OT", study_uid=study, rows=8, columns=8, seed=10))
    with db.session() as s:
        add_result(s, kind=ResultKind.SC, sop_instance_uid=str(sc.SOPInstanceUID),
                   study_instance_uid=study, generation=1, path=sc_file)
        add_result(s, kind=ResultKind.SR, sop_instance_uid=uid(), study_instance_uid=study,
                   generation=1, path=odd)
    db.dispose()
    # back to schema 6, as an older cxrd wrote it: absolute paths
    conn = sqlite3.connect(config.storage.data_dir / "cxrd.sqlite3")
    conn.execute("UPDATE instances SET path = ? || '/' || path",
                 (str(config.storage.data_dir),))
    conn.execute("DELETE FROM schema_version WHERE version >= 7")
    conn.commit()
    conn.close()

    db = Database(config.storage.database_url_resolved)
    assert db.schema_version() == 6
    assert db.migrate(key_folders(config)) == SCHEMA_VERSION
    objects = open_node_store(config)
    with db.session() as s:
        instances = {i.sop_instance_uid: i.path for i in s.scalars(select(Instance))}
        results = {r.kind: r.path for r in s.scalars(select(Result))}
    db.dispose()
    for ds in sources:
        key = f"spool/{study}/{ds.SOPInstanceUID}.dcm"
        assert instances[str(ds.SOPInstanceUID)] == key
        assert objects.get(key) == part10_bytes(ds)
    assert results[ResultKind.SC.value] == f"results/{sc.SOPInstanceUID}.dcm"
    assert objects.local_path(results[ResultKind.SC.value]) == sc_file
    assert results[ResultKind.SR.value] == str(odd)  # left as it was, still readable
    assert objects.get(str(odd)) == odd.read_bytes()


# -------------------------------------------------------------------------------- S3


def test_ingest_on_s3_puts_then_commits_and_a_stopped_server_is_a_wait(
        tmp_path: Path) -> None:
    """A C-STORE to a receiver whose store is S3: the object is in the bucket under its
    key and the row records the key; nothing is written to the local spool. With the
    server stopped the C-STORE is answered 0xA700 and nothing is recorded as stored;
    once a server answers again, the same instance is stored."""
    proc, endpoint = start_moto()
    port = int(endpoint.rsplit(":", 1)[1])
    try:
        bucket = new_bucket(endpoint)
        config = node_config(tmp_path, store=f"s3://{bucket}/site-a", endpoint=endpoint)
        config = dataclasses.replace(config, node=dataclasses.replace(
            config.node, host="127.0.0.1", port=0))
        config.storage.data_dir.mkdir(parents=True)
        db = Database(config.storage.database_url_resolved)
        db.migrate()
        objects = open_node_store(config)
        receiver = Receiver(config, Ingestor(db, config.storage.spool_dir,
                                             config.storage.rejected_dir, store=objects))
        receiver.start()
        try:
            study = uid()
            files = [write(tmp_path / "send" / f"{i}.dcm", chest(study, i)) for i in range(3)]
            done = storescu(receiver.port, files[:2])
            assert done.returncode == 0, output(done)
            assert done.stderr.count("Received Store Response (Success)") == 2, output(done)
            with db.session() as s:
                keys = sorted(s.scalars(select(Instance.path)))
            expected = sorted(f"spool/{study}/{pydicom.dcmread(f).SOPInstanceUID}.dcm"
                              for f in files[:2])
            assert keys == expected
            assert object_keys(endpoint, bucket) == [f"site-a/{k}" for k in expected]
            for f in files[:2]:  # the data set as sent, behind the receiver's file meta
                key = f"spool/{study}/{pydicom.dcmread(f).SOPInstanceUID}.dcm"
                assert objects.get(key).endswith(dataset_bytes(f))
            assert not config.storage.spool_dir.exists() or not any(
                p.is_file() for p in config.storage.spool_dir.rglob("*"))

            stop(proc)  # the object store goes away
            done = storescu(receiver.port, files[2:])
            assert "Received Store Response (Refused: OutOfResources)" in done.stderr, \
                output(done)  # 0xA700: the sender tries again later
            with db.session() as s:
                assert len(s.scalars(select(Instance)).all()) == 2
                (rejection,) = s.scalars(select(Rejection)).all()
            assert rejection.reason == RejectReason.STORAGE_FAILED.value
            assert "StoreUnavailable" in rejection.detail

            proc, _ = start_moto(port=port)  # back (empty: moto keeps nothing)
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            done = storescu(receiver.port, files[2:])
            assert "Received Store Response (Success)" in done.stderr, output(done)
            with db.session() as s:
                assert len(s.scalars(select(Instance)).all()) == 3
        finally:
            receiver.drain(timeout=5)
            db.dispose()
    finally:
        stop(proc)


@pytest.fixture
def s3_node(tmp_path: Path, moto_endpoint: str
            ) -> Iterator[tuple[Config, Database, Ingestor, WorkerLoop, str]]:
    bucket = new_bucket(moto_endpoint)
    config = node_config(tmp_path, store=f"s3://{bucket}/site", endpoint=moto_endpoint)
    config.storage.data_dir.mkdir(parents=True)
    db = Database(config.storage.database_url_resolved)
    db.migrate()
    loop = WorkerLoop(config, "test:1:w0", db, classifier=FakeClassifier())  # type: ignore[arg-type]
    ingestor = Ingestor(db, config.storage.spool_dir, config.storage.rejected_dir,
                        store=open_node_store(config))
    yield config, db, ingestor, loop, bucket
    db.dispose()


def test_a_watched_file_goes_to_s3_and_is_removed_after_the_commit(
        s3_node: tuple[Config, Database, Ingestor, WorkerLoop, str], moto_endpoint: str,
        tmp_path: Path) -> None:
    """A watched file on an S3 store: PUT (no hard link, no local spool file), row
    committed, then the file removed; a second copy is a duplicate, compared with the
    object's digest."""
    config, db, ingestor, _, bucket = s3_node
    ds = chest(uid(), 1)
    dropped = write(tmp_path / "incoming" / "x.dcm", ds)
    outcome = ingestor.ingest_file(dropped, "watch:test")
    assert outcome.accepted and not outcome.duplicate and not dropped.exists()
    key = f"spool/{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert object_keys(moto_endpoint, bucket, "site/") == [f"site/{key}"]
    assert ingestor.objects.get(key) == part10_bytes(ds)
    again = ingestor.ingest_file(write(dropped, ds), "watch:test")
    assert again.accepted and again.duplicate and not dropped.exists()
    with db.session() as s:
        (inst,) = s.scalars(select(Instance)).all()
    assert inst.path == key and len(inst.sha256) == 64  # computed from the object


def test_workers_read_and_write_through_s3(
        s3_node: tuple[Config, Database, Ingestor, WorkerLoop, str], moto_endpoint: str
        ) -> None:
    """A worker reads each spooled instance from the bucket (no local file exists) and
    writes the SCs and the SR there under ``results/``; the rows record their keys."""
    config, db, ingestor, loop, bucket = s3_node
    study = uid()
    for i in range(2):
        assert ingestor.store(part10_bytes(chest(study, i)), "test").accepted
    assert loop.objects.local_path(f"spool/{study}/x.dcm") is None
    assert admit_stable_studies(db, 0) == 1
    assert drain(loop) == 3  # 2 classify jobs, 1 report job
    with db.session() as s:
        results = list(s.scalars(select(Result).order_by(Result.id)))
        study_row = s.scalars(select(Study)).one()
    assert sorted(r.kind for r in results) == ["sc", "sc", "sr"]
    keys = object_keys(moto_endpoint, bucket, "site/results/")
    assert keys == sorted(f"site/results/{r.sop_instance_uid}.dcm" for r in results)
    for r in results:
        assert r.path == f"results/{r.sop_instance_uid}.dcm"
        ds = pydicom.dcmread(io.BytesIO(loop.objects.get(r.path)))
        assert ds.SOPInstanceUID == r.sop_instance_uid
    assert study_row.sr_sop_instance_uid in {r.sop_instance_uid for r in results}
    assert not list(config.results.results_dir.glob("*.dcm"))  # no export configured


def test_results_folder_is_a_local_export_beside_s3(tmp_path: Path, moto_endpoint: str
                                                    ) -> None:
    """With S3, ``[results] folder`` (when set) gets a copy of each result; the object in
    the bucket is the one the node reads; ``delete`` leaves the export alone."""
    bucket = new_bucket(moto_endpoint)
    export = tmp_path / "export"
    config = node_config(tmp_path, store=f"s3://{bucket}", endpoint=moto_endpoint,
                         extra=f'[results]\nfolder = "{export}"\n')
    objects = open_node_store(config)
    ds = make_dataset("OT", rows=8, columns=8, seed=3)
    key = f"results/{ds.SOPInstanceUID}.dcm"
    objects.put(key, lambda fh: fh.write(part10_bytes(ds)))
    assert objects.local_path(key) is None
    assert objects.get(key) == part10_bytes(ds)
    assert (export / f"{ds.SOPInstanceUID}.dcm").read_bytes() == part10_bytes(ds)
    objects.put("spool/1.2/3.4.dcm", b"not exported")
    assert sorted(p.name for p in export.iterdir()) == [f"{ds.SOPInstanceUID}.dcm"]
    objects.delete(key)
    assert objects.head(key) is None and (export / f"{ds.SOPInstanceUID}.dcm").exists()
    assert object_keys(moto_endpoint, bucket) == ["spool/1.2/3.4.dcm"]


def test_a_worker_that_cannot_reach_the_store_waits_without_spending_an_attempt(
        tmp_path: Path) -> None:
    """The server stops after the instance was stored: the worker's read meets
    StoreUnavailable, a resource error, so the job goes back to pending with its attempt
    given back (as for a full disk or a database that is down), not towards failing."""
    proc, endpoint = start_moto()
    try:
        bucket = new_bucket(endpoint)
        config = node_config(tmp_path, store=f"s3://{bucket}", endpoint=endpoint)
        config.storage.data_dir.mkdir(parents=True)
        db = Database(config.storage.database_url_resolved)
        db.migrate()
        ingestor = Ingestor(db, config.storage.spool_dir, config.storage.rejected_dir,
                            store=open_node_store(config))
        assert ingestor.store(part10_bytes(chest(uid(), 1)), "test").accepted
        assert admit_stable_studies(db, 0) == 1
        loop = WorkerLoop(config, "test:1:w0", db, classifier=FakeClassifier())  # type: ignore[arg-type]
        stop(proc)
        with pytest.raises(StoreUnavailable) as down:
            loop.objects.get("spool/x/y.dcm")
        assert is_resource_error(down.value)
        assert loop.run_once() == 1
        with db.session() as s:
            job = s.scalars(select(Job)).one()
        assert job.state == JobState.PENDING.value and job.attempts == 0
        assert "waiting for a resource" in (job.error or "")
        db.dispose()
    finally:
        stop(proc)


def test_the_sender_and_retention_work_from_s3(
        s3_node: tuple[Config, Database, Ingestor, WorkerLoop, str], moto_endpoint: str,
        tmp_path: Path) -> None:
    """The sender fetches each result from the bucket and storescp stores it whole; the
    purge then deletes the spooled objects and the delivered results from the bucket."""
    config, db, ingestor, loop, bucket = s3_node
    scp = StoreSCP(tmp_path / "pacs")
    try:
        config = node_config(tmp_path / "sender", store=config.storage.store,
                             endpoint=moto_endpoint, extra=f"""
[[destinations]]
name = "pacs"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {scp.port}
""")
        loop.destinations = ["pacs"]
        study = uid()
        for i in range(2):
            assert ingestor.store(part10_bytes(chest(study, i)), "test").accepted
        admit_stable_studies(db, 0)
        drain(loop)
        sender = Sender(config, db)
        assert sender.run_once() == 3
        with db.session() as s:
            states = s.scalars(select(Delivery.state)).all()
            results = {r.sop_instance_uid: r.path for r in s.scalars(select(Result))}
        assert states == [DeliveryState.DONE.value] * 3
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                    for p in scp.received()}
        assert set(received) == set(results)
        for sop_uid, key in results.items():  # the data set as stored, byte for byte
            stored = write(tmp_path / "stored" / f"{sop_uid}.dcm", loop.objects.get(key))
            assert dataset_bytes(received[sop_uid]) == dataset_bytes(stored)
        assert not list(Path(tempfile.gettempdir()).glob(".cxrd-send-*"))  # removed

        with db.session() as s:  # every study reported, every delivery done: may go
            for row in s.scalars(select(Study)):
                row.last_received_at = row.stable_at = row.reported_at = utcnow()
        report = purge(db, config, utcnow() + dt.timedelta(hours=1), trigger=TRIGGER_COMMAND)
        assert (report.instances, report.results, report.errors) == (2, 3, 0)
        assert report.spool_bytes > 0 and report.result_bytes > 0
        assert object_keys(moto_endpoint, bucket, "site/") == []
        with db.session() as s:
            assert all(i.purged_at for i in s.scalars(select(Instance)))
            assert all(r.purged_at for r in s.scalars(select(Result)))
    finally:
        scp.stop()


def test_preflight_names_the_store_never_a_credential(
        tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_store``: a bucket that does not exist is a problem naming the bucket and
    what to do; an endpoint that is down one saying to start it; the secret is never in
    either."""
    secret = "s3cr3t-never-in-a-message"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto takes any
    config = node_config(tmp_path, store="s3://no-such-bucket-here", endpoint=moto_endpoint)
    problem = check_store(config)
    assert problem is not None and "no-such-bucket-here" in problem.cause
    assert "create the bucket" in problem.fix
    down = node_config(tmp_path, store="s3://whatever", endpoint="http://127.0.0.1:9")
    problem = check_store(down)
    assert problem is not None and "start the object store" in problem.fix
    for p in (check_store(config), check_store(down)):
        assert p is not None and secret not in f"{p.cause} {p.fix}"
    bucket = new_bucket(moto_endpoint)
    assert check_store(node_config(tmp_path, store=f"s3://{bucket}/x",
                                   endpoint=moto_endpoint)) is None
    assert isinstance(open_node_store(node_config(tmp_path)), NodeStore)
