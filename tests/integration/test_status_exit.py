"""``cxrd status`` exits non-zero when a job failed or a delivery is dead (cron/Nagios)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cxrd.config import load_config
from cxrd.db import Database, Delivery, Instance, Job, Result, Study
from cxrd.domain import DeliveryState, InstanceState, JobState, ResultKind, StudyState


def _status(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cxrd.cli", "status", "--json", "--config",
                           str(config)], capture_output=True, text=True, timeout=120)


def _instance(s: object, uid: str) -> Instance:
    inst = Instance(sop_instance_uid=uid, study_instance_uid="1.2.3",
                    series_instance_uid="1.2.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1", path="/nonexistent",
                    sha256="0" * 64, size=1, source="test", state=InstanceState.FAILED.value)
    s.add(inst)  # type: ignore[attr-defined]
    s.flush()  # type: ignore[attr-defined]
    return inst


def test_exit_codes(tmp_path: Path) -> None:
    config = tmp_path / "cxrd.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[metrics]\nlisten = ""\n')
    db = Database(load_config(config).storage.database_url_resolved)
    db.migrate()

    healthy = _status(config)
    assert healthy.returncode == 0, healthy.stderr
    assert json.loads(healthy.stdout)["healthy"] is True

    with db.session() as s:
        inst = _instance(s, "1.2.3.1")
        s.add(Job(instance_id=inst.id, study_instance_uid="1.2.3", state=JobState.FAILED.value,
                  attempts=3, error="DecodeError: broken"))
    failed = _status(config)
    assert failed.returncode == 2
    doc = json.loads(failed.stdout)
    assert doc["healthy"] is False and doc["recent_failures"][0]["error"] == "DecodeError: broken"
    assert doc["jobs_failed_unresolved"] == 1

    # `cxrd reprocess` queued the study again (a new generation): the old failure is
    # answered, the node is healthy; a failure of the retry counts again.
    with db.session() as s:
        s.add(Study(study_instance_uid="1.2.3", state=StudyState.ADMITTED.value, generation=2))
    assert _status(config).returncode == 0
    with db.session() as s:
        inst = _instance(s, "1.2.3.2")
        s.add(Job(instance_id=inst.id, study_instance_uid="1.2.3", generation=2,
                  state=JobState.FAILED.value, attempts=3, error="DecodeError: again"))
    assert _status(config).returncode == 2

    with db.session() as s:
        for job in s.query(Job).all():
            s.delete(job)
        r = Result(sop_instance_uid="1.2.3.9", study_instance_uid="1.2.3",
                   kind=ResultKind.SR.value, generation=1, path="/nonexistent")
        s.add(r)
        s.flush()
        s.add(Delivery(result_id=r.id, destination="pacs", state=DeliveryState.DEAD.value,
                       attempts=9, last_error="PERMANENT: association rejected"))
    dead = _status(config)
    assert dead.returncode == 2
    doc = json.loads(dead.stdout)
    assert doc["deliveries"]["recent_dead"][0]["last_error"].startswith("PERMANENT")
    text = subprocess.run([sys.executable, "-m", "cxrd.cli", "status", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 2 and "UNHEALTHY" in text.stdout
    db.dispose()


def test_status_shows_the_node_id(tmp_path: Path) -> None:
    """``[node] id`` in ``cxrd status`` (text and --json); the host name unless set."""
    import socket

    config = tmp_path / "cxrd.toml"
    base = f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[metrics]\nlisten = ""\n'
    config.write_text(base)
    assert json.loads(_status(config).stdout)["node"]["id"] == socket.gethostname()
    config.write_text(base + '[node]\nid = "cxr-node-7"\n')
    assert json.loads(_status(config).stdout)["node"]["id"] == "cxr-node-7"
    text = subprocess.run([sys.executable, "-m", "cxrd.cli", "status", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert text.stdout.splitlines()[0].startswith("cxrd node cxr-node-7 ae_title CXRD port"), \
        text.stdout + text.stderr
