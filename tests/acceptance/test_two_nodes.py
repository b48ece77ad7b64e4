"""Two ``cxrd serve`` nodes on one PostgreSQL database, one real ``storescp`` destination.

Each node has its own ``[node] id``, data folder, watched folder and metrics endpoint, and
both keep their objects in one store folder (``[storage] store``, as a shared mount would
be); half of a dozen frontal images is dropped into each node's folder. Both nodes' workers and
senders share the queue and the outbox: every study is reported once, every result is
stored by the destination exactly once (unique file names, so a second copy would show),
the work's lease owners name the nodes, the gauges read from the database are exported by
exactly one node, ``cxrd status`` shows each node's id, and each node's status page shows
the cluster's counts and its own id.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pydicom
import pytest
from dicompeers import StoreSCP, free_port
from nodehelpers import (
    NodeDirs,
    Nodes,
    PhantomSet,
    shared_node_config,
    status_json,
    wait_until,
)
from pagehelpers import check_page_matches, status_page
from sqlalchemy import func, select

from cxrd.db import Database, Delivery, Result, Study
from cxrd.domain import DeliveryState, StudyState

pytestmark = pytest.mark.slow

def node_dirs(root: Path, node_id: str, url: str, scp_port: int,
              store: Path) -> tuple[NodeDirs, int]:
    """A node of its own data folder and metrics endpoint, on the shared database and
    the shared store folder ``store`` (the database records keys, which every node must
    find in the same store)."""
    metrics_port = free_port()
    dirs = shared_node_config(root, node_id, url, scp_port, storage=f'store = "{store}"',
                              processes=1)
    text = dirs.config.read_text()
    text = text.replace('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"')
    dirs.config.write_text(text)
    return dirs, metrics_port


def scrape(port: int) -> dict[str, float]:
    """Unlabelled samples of a node's /metrics (the name, then its value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+) ([0-9.e+-]+)$", body, re.M)}


def test_two_nodes_share_the_queue_and_deliver_each_result_once(
        tmp_path: Path, nodes: Nodes, dozen: PhantomSet, shared_url: str):
    scp = StoreSCP(tmp_path / "pacs", options=["+uf"])
    db = Database(shared_url)
    try:
        store = tmp_path / "store"  # a folder both nodes mount
        store.mkdir()
        a, a_metrics = node_dirs(tmp_path / "a", "node-a", shared_url, scp.port, store)
        b, b_metrics = node_dirs(tmp_path / "b", "node-b", shared_url, scp.port, store)
        nodes.start(a)
        nodes.start(b)
        half = len(dozen.files) // 2
        dozen.drop(a.incoming, dozen.files[:half])
        dozen.drop(b.incoming, dozen.files[half:])

        def finished() -> bool:
            with db.session() as s:
                reported = s.scalar(select(func.count()).select_from(Study).where(
                    Study.state == StudyState.REPORTED.value))
                pending = s.scalar(select(func.count()).select_from(Delivery).where(
                    Delivery.state != DeliveryState.DONE.value))
            return reported == len(dozen.studies()) and pending == 0

        wait_until(finished, 240, "every study reported and every result delivered")
        with db.session() as s:
            results = sorted(s.scalars(select(Result.sop_instance_uid)))
            deliveries = s.execute(select(Delivery.state, Delivery.attempts,
                                          Delivery.lease_owner)).all()
        # an SC and a lung SEG per image, an SR per study
        assert len(results) == 2 * len(dozen.files) + len(dozen.studies())
        stored = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                        for p in scp.received())
        assert stored == results, scp.log()[-3000:]  # each result once, none twice
        assert set(deliveries) == {(DeliveryState.DONE.value, 1, None)}

        logs = [node.log() for node in nodes.started]
        for node_id, log in zip(("node-a", "node-b"), logs, strict=True):
            assert f"action=node-start node_id={node_id}" in log
            assert re.search(rf"action=worker-start worker={node_id}:\d+:w0", log), log[-3000:]
        gauges = [scrape(a_metrics), scrape(b_metrics)]
        assert sorted(g["cxrd_database_gauges_exporter"] for g in gauges) == [0.0, 1.0]
        exporter = max(gauges, key=lambda g: g["cxrd_database_gauges_exporter"])
        assert exporter["cxrd_queue_depth"] == 0 and exporter["cxrd_deliveries_pending"] == 0
        assert [g for g in gauges if "cxrd_queue_depth" in g] == [exporter]
        assert [status_json(d)["node"]["id"] for d in (a, b)] == ["node-a", "node-b"]
        # Each node's status page: the cluster's counts (the same on both, those of
        # `cxrd status --json`), and the id of the node that served it.
        for dirs, port, node_id in ((a, a_metrics, "node-a"), (b, b_metrics, "node-b")):
            html = status_page(port)
            assert check_page_matches(html, status_json(dirs)).node_id == node_id
    finally:
        db.dispose()
        scp.stop()
