"""SIGTERM while a PACS is sending: the association in flight completes (every C-STORE
is answered Success after it is durable), no new association is accepted, exit 0."""

from __future__ import annotations

import signal
import tomllib
from pathlib import Path

from dicomfactory import make_dataset, write
from dicompeers import echoscu, start_dcmtk, storescu_args
from nodehelpers import DbView, Nodes, wait_until, write_config

from cxrd.db import Instance

N_FILES = 400


def test_sigterm_lets_the_association_in_flight_finish(tmp_path: Path, nodes: Nodes) -> None:
    dirs = write_config(tmp_path)
    port = tomllib.loads(dirs.config.read_text())["node"]["port"]
    files = []
    study = "1.2.826.0.1.3680043.10.511.9.1"
    for i in range(N_FILES):
        ds = make_dataset("CR", rows=256, columns=256, study_uid=study, seed=i)
        files.append(write(tmp_path / "send" / f"{i:04d}.dcm", ds))
    node = nodes.start(dirs)
    db = DbView(dirs.database)
    sender = start_dcmtk("storescu", *storescu_args(port, files, aet="PACS"))
    wait_until(lambda: db.count(Instance) >= 20 or sender.poll() is not None, 60,
               "the first instances of the association")
    assert sender.poll() is None, "the association ended before SIGTERM; raise N_FILES"
    stored_at_signal = db.count(Instance)
    assert stored_at_signal < N_FILES
    node.signal(signal.SIGTERM)
    out, _ = sender.communicate(timeout=120)
    assert sender.returncode == 0, out  # every C-STORE on the association answered Success
    assert "Failed" not in out and "Abort" not in out, out
    late = echoscu(port, aet="PACS")  # the listener is closed: no new association
    assert late.returncode != 0
    assert node.wait(120) == 0, node.log()[-3000:]
    assert db.count(Instance) == N_FILES  # nothing acknowledged was lost
    assert "action=drain-done" in node.log()
    db.dispose()
