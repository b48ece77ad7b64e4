"""One receiving node and two worker nodes on one PostgreSQL database, sharing their
objects through one data folder or through S3 (moto's server); one worker node is killed
with its whole process group in mid-batch.

The receiving node runs ``cxrd serve`` with ``[workers] processes = 0`` (receiver,
scheduler, sender, no worker); two ``cxrd worker`` nodes with their own ``[node] id`` do
every classify and report job. With a shared folder they mount the receiving node's data
folder (the same path, ``[storage] store = ""``); with S3 every node has a data folder of
its own and ``[storage] store = "s3://bucket/site"`` (credentials in the environment
only). 200 small frontal images in 50 studies arrive over 4 parallel ``storescu``
associations. While worker node A holds leased jobs, its process group is stopped
(SIGSTOP: it cannot end its batch between the look and the kill) and killed with
SIGKILL; nothing is restarted, so its jobs come back only when their (5 s) leases expire,
and node B does them. Counted from the database and from what ``storescp`` received:
every instance has exactly one SC, every study exactly one current SR, every result is
stored by the destination exactly once; the jobs A held were redone by B; ``cxrd status``
names both worker nodes' workers. On S3 the bucket holds exactly the spooled instances and
the results, under the keys the database records, and no node spooled a local file.

Each worker node runs as a host of its own where the machine allows it (root and ``ip
netns``; ``netns.Hosts``): in a network namespace joined by a veth pair, where PostgreSQL
and moto's server, which listen on this machine's loopback, are reached only through
relays on the host side of the link (shown: the loopback port does not answer there, and
each relay carried the node's connections). The receiving node, ``storescu`` and
``storescp`` stay in this machine's namespace; the shared folder is shared through the
file system, as a mount would be. Elsewhere the worker nodes are separate processes of
this machine with their own ``[node] id``; the test prints which (``worker_hosts=``),
warns when it falls back to processes, and records it as the property ``worker_hosts``.
"""

from __future__ import annotations

import os
import re
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import pytest
from dicompeers import StoreSCP, free_port, listening, start_dcmtk, storescu_args
from netns import Host, Hosts
from nodehelpers import (
    LEASE_SECONDS,
    NodeDirs,
    NodeProcess,
    Nodes,
    PhantomSet,
    cli_env,
    cmdline,
    frontal_set,
    node_port,
    run_cli,
    shared_node_config,
    status_json,
    wait_until,
    write_config,
)
from pagehelpers import page_keys, status_page
from s3peer import aws_environ, new_bucket, object_keys, start_moto, stop
from sqlalchemy import func, select

from cxrd.db import SCHEMA_VERSION, Database, Delivery, Instance, Job, Result, Study
from cxrd.domain import DeliveryState, InstanceState, JobKind, JobState, ResultKind, StudyState

pytestmark = pytest.mark.slow

N_STUDIES, PER_STUDY, ASSOCIATIONS = 50, 4, 4


@pytest.fixture(scope="module")
def two_hundred(tmp_path_factory: pytest.TempPathFactory) -> PhantomSet:
    """200 frontal chest CR images, 4 in each of 50 studies (every one is classified)."""
    return frontal_set(tmp_path_factory.mktemp("two-hundred"), n_studies=N_STUDIES,
                       per_study=PER_STUDY)


@dataclass
class Sharing:
    """How the nodes share their objects: ``storage(recv, host)`` is the ``[storage]``
    lines of a worker node on ``host`` (the receiving node's are ``receiving``), ``env``
    the environment every node gets."""

    kind: str
    env: dict[str, str] = field(default_factory=dict)
    endpoint: str = ""
    bucket: str = ""

    @property
    def receiving(self) -> str:
        if self.kind == "folder":
            return ""
        return f'store = "s3://{self.bucket}/site"\ns3_endpoint_url = "{self.endpoint}"'

    def storage(self, recv: NodeDirs, host: Host) -> str:
        if self.kind == "folder":
            return f'data_dir = "{recv.data_dir}"'  # the receiving node's, mounted
        return (f'store = "s3://{self.bucket}/site"\n'
                f's3_endpoint_url = "{host.reach(self.endpoint)}"')


@pytest.fixture(params=["folder", "s3"])
def sharing(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Sharing]:
    if request.param == "folder":
        yield Sharing("folder")
        return
    env = aws_environ(tmp_path)
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():  # this process's boto3 reads the bucket
        monkeypatch.setenv(name, value)
    proc, endpoint = start_moto()
    try:
        bucket = new_bucket(endpoint)
        yield Sharing("s3", env, endpoint, bucket)
    finally:
        stop(proc)


def node_config(root: Path, node_id: str, url: str, scp_port: int, *, processes: int,
                storage: str = "") -> tuple[NodeDirs, int]:
    """A node's config (``nodehelpers.shared_node_config``) without a segmenter: SCs and
    SRs are what is counted here. Returns the dirs and the DICOM port."""
    dirs = shared_node_config(root, node_id, url, scp_port, processes=processes,
                              storage=storage)
    dirs.config.write_text(dirs.config.read_text().replace(
        "[model]\n", '[model]\nsegmenter = "off"\n', 1))
    return dirs, node_port(dirs)


def test_worker_nodes_share_the_queue_and_a_killed_one_loses_nothing(
        tmp_path: Path, nodes: Nodes, hosts: Hosts, two_hundred: PhantomSet, shared_url: str,
        sharing: Sharing, record_property: Callable[[str, object], None]) -> None:
    record_property("worker_hosts", hosts.mode)
    how = ("in network namespaces of their own" if hosts.mode == "netns" else
           "as separate processes of this machine (no network namespaces: they need root "
           "and ip netns, and CXRD_TEST_NETNS=0 turns them off)")
    mode = f"worker_hosts={hosts.mode}: the worker nodes run {how}"
    print(f"\n{mode}")
    if hosts.mode == "processes":  # in pytest's summary too, not only with -s
        warnings.warn(mode, stacklevel=1)
    t0 = time.monotonic()
    scp = StoreSCP(tmp_path / "pacs", options=["+uf"])
    db = Database(shared_url)
    try:
        recv, dicom_port = node_config(tmp_path / "recv", "recv", shared_url, scp.port,
                                       processes=0, storage=sharing.receiving)
        # migrates the database, makes the data folder
        nodes.start(recv, processes=0, env=sharing.env)
        assert listening(dicom_port)
        workers, where = {}, {}
        for node_id in ("wk-a", "wk-b"):
            host = where[node_id] = hosts.new(node_id)
            dirs, _ = node_config(tmp_path / node_id, node_id, host.reach(shared_url),
                                  scp.port, processes=1, storage=sharing.storage(recv, host))
            if hosts.mode == "netns":  # a host of its own: this machine's loopback is not its
                assert urlsplit(shared_url).port in host.relays, host.relays
                for port in host.relays:  # PostgreSQL, and moto's server on S3
                    assert not host.can_connect("127.0.0.1", port), (node_id, port)
                    assert host.can_connect(host.address, port), (node_id, port)
            workers[node_id] = nodes.start(dirs, processes=1, command="worker",
                                           env=sharing.env, prefix=host.prefix)
        victim = workers["wk-a"]
        # ip netns exec execs the node: the pid signalled below is cxrd's own
        assert "cxrd.cli worker" in cmdline(victim.pid), cmdline(victim.pid)
        started = time.monotonic() - t0

        studies = two_hundred.studies()
        senders = []
        for k in range(ASSOCIATIONS):  # each association carries whole studies
            mine = set(studies[k::ASSOCIATIONS])
            files = [two_hundred.folder / f.path for f in two_hundred.files
                     if f.study_instance_uid in mine]
            senders.append(start_dcmtk("storescu", *storescu_args(dicom_port, files)))

        def running_of_a() -> list[int]:
            with db.session() as s:
                return list(s.scalars(select(Job.id).where(
                    Job.state == JobState.RUNNING.value, Job.lease_owner.startswith("wk-a:"))))

        def stopped_holding() -> bool:
            """Worker node A stopped (SIGSTOP, its whole group) while it holds leased jobs,
            after its first batch. Frozen, it cannot finish its batch between the look and
            the kill (with an empty queue it would then hold nothing); it stays frozen only
            well within its lease, and is let go again when it held nothing."""
            if "action=classified" not in victim.log():
                return False
            os.killpg(victim.pid, signal.SIGSTOP)
            time.sleep(0.2)  # what it had already sent (a commit) reaches the database
            if running_of_a():
                return True
            os.killpg(victim.pid, signal.SIGCONT)
            return False

        wait_until(stopped_holding, 120, "worker node A to hold leased jobs", interval=0.05)
        os.killpg(victim.pid, signal.SIGKILL)  # the node and its worker: nothing drains
        killed_at = time.monotonic() - t0
        victim.proc.wait(10)
        wait_until(lambda: not where["wk-a"].pids(), 10,
                   "nothing of worker node A left in its namespace")
        held = running_of_a()  # what it held when it died
        assert held, "worker node A held no job when it was killed"
        for proc in senders:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out[-3000:]

        def finished() -> bool:
            with db.session() as s:
                reported = s.scalar(select(func.count()).select_from(Study).where(
                    Study.state == StudyState.REPORTED.value))
                pending = s.scalar(select(func.count()).select_from(Delivery).where(
                    Delivery.state != DeliveryState.DONE.value))
            return reported == N_STUDIES and pending == 0

        wait_until(finished, 180, "every study reported and every result delivered",
                   interval=0.2)
        done_at = time.monotonic() - t0

        with db.session() as s:
            instances = s.execute(select(Instance.sop_instance_uid, Instance.state)).all()
            results = s.execute(select(Result.kind, Result.sop_instance_uid,
                                       Result.source_sop_instance_uid,
                                       Result.study_instance_uid, Result.supersedes)).all()
            studies_rows = s.execute(select(Study.study_instance_uid,
                                            Study.sr_sop_instance_uid)).all()
            deliveries = s.execute(select(Delivery.state, Delivery.attempts)).all()
            redone = s.execute(select(Job.id, Job.state, Job.kind, Job.attempts).where(
                Job.id.in_(held))).all()
            owners = set(s.scalars(select(Job.lease_owner).where(
                Job.lease_owner.is_not(None))))

        # every instance: exactly one SC
        expected = {f.sop_instance_uid for f in two_hundred.files}
        assert {uid for uid, _ in instances} == expected and len(instances) == len(expected)
        assert {state for _, state in instances} == {InstanceState.DONE.value}
        scs = [r for r in results if r.kind == ResultKind.SC.value]
        assert sorted(r.source_sop_instance_uid for r in scs) == sorted(expected)
        # every study: exactly one current SR, the one the study names
        srs = [r for r in results if r.kind == ResultKind.SR.value]
        superseded = {r.supersedes for r in srs if r.supersedes}
        heads: dict[str, list[str]] = {}
        for r in srs:
            if r.sop_instance_uid not in superseded:
                heads.setdefault(r.study_instance_uid, []).append(r.sop_instance_uid)
        assert {uid: [sr] for uid, sr in studies_rows} == heads
        assert len(heads) == N_STUDIES
        # each result stored by the destination exactly once (+uf: a copy would show)
        stored = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                        for p in scp.received())
        assert stored == sorted(r.sop_instance_uid for r in results), scp.log()[-3000:]
        assert set(deliveries) == {(DeliveryState.DONE.value, 1)}
        # the jobs the dead node held came back by expiry and were done again
        assert held and all(j.state == JobState.DONE.value for j in redone), redone
        assert all(j.attempts >= 2 for j in redone), redone
        assert {j.kind for j in redone} <= {JobKind.CLASSIFY.value, JobKind.REPORT.value}
        assert not owners, owners  # no lease left behind
        if hosts.mode == "netns":  # each worker node came through its link
            relayed = {node_id: {port: relay.accepted for port, relay in h.relays.items()}
                       for node_id, h in where.items()}
            assert all(counts and all(counts.values()) for counts in relayed.values()), relayed
        if sharing.kind == "s3":  # the bucket holds what the rows name, and nothing else
            with db.session() as s:
                keys = sorted([*s.scalars(select(Instance.path)),
                               *s.scalars(select(Result.path))])
            assert object_keys(sharing.endpoint, sharing.bucket) == [
                f"site/{k}" for k in keys]
            assert all(k.startswith(("spool/", "results/")) for k in keys)
            for node in (recv, *(w.dirs for w in workers.values())):
                assert not [p for p in node.data_dir.rglob("*.dcm")], node.data_dir
        logs = {node_id: node.log() for node_id, node in workers.items()}
        assert re.search(r"action=lease-expired job_id=\d+ .*owner=wk-a:", logs["wk-b"]), \
            logs["wk-b"][-3000:]
        assert "action=node-start role=worker node_id=wk-b" in logs["wk-b"]
        recv_log = nodes.started[0].log()
        assert "action=node-start node_id=recv" in recv_log and "workers=0" in recv_log
        assert "action=worker-start" not in recv_log  # the receiving node ran no worker

        doc = status_json(recv)
        assert {w["node"] for w in doc["workers"]} == {"wk-a", "wk-b"}
        alive = {w["node"]: w["alive"] for w in doc["workers"]}
        assert alive["wk-b"]
        text = run_cli("status", "--config", str(recv.config)).stdout
        assert re.search(r"worker wk-b:\d+:w0 \(node wk-b\)", text), text

        # SIGTERM drains the surviving worker node: exit 0
        assert workers["wk-b"].stop() == 0
        assert "action=drain-done role=worker node_id=wk-b" in workers["wk-b"].log()
        print(f"\n{sharing.kind} ({hosts.mode}): started {started:.1f}s, killed wk-a at "
              f"{killed_at:.1f}s holding {len(held)} jobs (lease {LEASE_SECONDS}s), all "
              f"delivered at {done_at:.1f}s")
    finally:
        db.dispose()
        scp.stop()


def test_worker_node_refuses_sqlite_another_schema_and_a_missing_data_folder(
        tmp_path: Path, shared_url: str) -> None:
    """``cxrd worker`` exits 1 with one line: SQLite cannot be shared; a database at an
    older schema is not migrated by a worker node, and one at a newer schema is refused;
    a data folder that does not exist is not created."""
    (tmp_path / "sqlite").mkdir()
    sqlite = write_config(tmp_path / "sqlite")
    sqlite.data_dir.mkdir(parents=True)
    done = run_cli("worker", "--config", str(sqlite.config))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs PostgreSQL" in lines[0], done.stderr

    dirs, _ = node_config(tmp_path / "fresh", "wk", shared_url, 1, processes=1)
    dirs.data_dir.mkdir(parents=True)
    done = run_cli("worker", "--config", str(dirs.config))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "schema version 0" in lines[0], done.stderr
    assert "never migrates" in lines[0]
    db = Database(shared_url)
    try:
        assert db.schema_version() == 0  # still: nothing migrated it
        db.migrate()  # as the receiving node would; then a newer cxrd migrates further
        with db.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO schema_version (version, applied_at) VALUES "
                                 f"({SCHEMA_VERSION + 1}, now())")
    finally:
        db.dispose()
    done = run_cli("worker", "--config", str(dirs.config))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"newer than this cxrd's {SCHEMA_VERSION}" in lines[0], \
        done.stderr

    # the shared folder not mounted: no local one is made in its place
    dirs.data_dir.rmdir()
    done = run_cli("worker", "--config", str(dirs.config))
    assert done.returncode == 1
    assert "[storage] data_dir" in done.stderr and "does not exist" in done.stderr
    assert not dirs.data_dir.exists()


def test_a_restarted_worker_node_frees_its_own_leases_and_sigterm_drains(
        tmp_path: Path, nodes: Nodes, two_hundred: PhantomSet, shared_url: str) -> None:
    """With a lease far longer than the test, a worker node killed with SIGKILL and started
    again with the same ``[node] id`` takes its dead processes' jobs back at once (their
    attempt given back); SIGTERM while it holds a batch lets the batch finish, then the
    node exits 0."""
    scp = StoreSCP(tmp_path / "pacs", options=["+uf"])
    db = Database(shared_url)
    try:
        recv, dicom_port = node_config(tmp_path / "recv", "recv", shared_url, scp.port,
                                       processes=0)
        nodes.start(recv, processes=0)
        wk, _ = node_config(tmp_path / "wk-a", "wk-a", shared_url, scp.port, processes=1,
                            storage=f'data_dir = "{recv.data_dir}"')
        page_port = free_port()  # a worker node serves the status page too
        wk.config.write_text(wk.config.read_text().replace(
            f"lease_seconds = {LEASE_SECONDS}\n", "lease_seconds = 600\n").replace(
            'listen = ""', f'listen = "127.0.0.1:{page_port}"'))
        first = nodes.start(wk, processes=1, command="worker")
        studies = two_hundred.studies()

        def send(uids: list[str]) -> None:
            files = [two_hundred.folder / f.path for f in two_hundred.files
                     if f.study_instance_uid in set(uids)]
            proc = start_dcmtk("storescu", *storescu_args(dicom_port, files))
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out[-3000:]

        def running_of_a() -> list[int]:
            with db.session() as s:
                return list(s.scalars(select(Job.id).where(
                    Job.state == JobState.RUNNING.value, Job.lease_owner.startswith("wk-a:"))))

        def held_by(node: NodeProcess) -> Callable[[], list[int]]:
            def held() -> list[int]:
                return running_of_a() if "action=classified" in node.log() else []
            return held

        def jobs(ids: list[int]) -> list[tuple[str, int]]:
            with db.session() as s:
                return [(j.state, j.attempts) for j in s.execute(
                    select(Job.state, Job.attempts).where(Job.id.in_(ids))).all()]

        send(studies[:10])
        wait_until(held_by(first), 120, "worker node A to hold leased jobs", interval=0.05)
        # Killed while it holds jobs: frozen first (SIGSTOP), so that what the database
        # says it holds cannot change before the SIGKILL (between two batches it holds
        # none for a moment: then it runs on and is frozen again).
        held: list[int] = []
        deadline = time.monotonic() + 60
        while not held and time.monotonic() < deadline:
            os.killpg(first.pid, signal.SIGSTOP)
            held = running_of_a()
            if not held:
                os.killpg(first.pid, signal.SIGCONT)
                time.sleep(0.02)
        os.killpg(first.pid, signal.SIGKILL)
        first.proc.wait(10)
        assert held, "worker node A held no job when it was killed"
        assert sorted(running_of_a()) == sorted(held)  # what it held when it died

        second = nodes.start(wk, processes=1, command="worker")
        assert re.search(r"action=released-leases reason=node-restart count=[1-9]",
                         second.log()), second.log()[-3000:]

        def reported() -> bool:
            with db.session() as s:
                return s.scalar(select(func.count()).select_from(Study).where(
                    Study.state == StudyState.REPORTED.value)) == 10
        wait_until(reported, 120, "the first 10 studies reported (not by lease expiry)")
        assert jobs(held) == [(JobState.DONE.value, 1)] * len(held)  # the attempt given back
        keys = page_keys(status_page(page_port))  # the database's counts, this node's id
        assert keys.values["studies.reported"] == "10" and keys.node_id == "wk-a"

        send(studies[10:20])
        held = wait_until(held_by(second), 120, "the restarted node to hold a batch",
                          interval=0.02)
        assert second.stop() == 0  # SIGTERM: the batch in hand finishes first
        assert jobs(held) == [(JobState.DONE.value, 1)] * len(held)
        assert running_of_a() == []  # the batch in hand at the signal finished too
        assert "action=drain-done role=worker node_id=wk-a" in second.log()
    finally:
        db.dispose()
        scp.stop()


def test_worker_node_refuses_an_s3_store_it_cannot_use(tmp_path: Path, shared_url: str
                                                      ) -> None:
    """``cxrd worker`` with an S3 store that does not answer exits 1 with one line naming
    the store and its endpoint and saying what to do, never the secret; its data folder
    is its own, so its absence is no problem."""
    db = Database(shared_url)
    try:
        db.migrate()  # as the receiving node would
    finally:
        db.dispose()
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    dirs, _ = node_config(tmp_path / "wk", "wk", shared_url, 1, processes=1,
                          storage=f'store = "s3://cxrd-nowhere/site"\n'
                                  f's3_endpoint_url = "{endpoint}"')
    env = {**cli_env(), **aws_environ(tmp_path),
           "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-printed"}
    done = run_cli("worker", "--config", str(dirs.config), env=env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "store s3://cxrd-nowhere/site cannot be used" in lines[0] and endpoint in lines[0]
    assert "start the object store" in lines[0]
    assert "s3cr3t-never-printed" not in done.stderr + done.stdout
