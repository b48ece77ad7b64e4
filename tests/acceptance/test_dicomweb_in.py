"""``cxrd serve`` with its STOW-RS receiver on (``[dicomweb] listen``): a chest study posted
with dicomweb-client's STOW client is stored, classified, and its SR, heatmap SCs and
lung-field SEGs reach a real C-STORE destination (dcmtk's ``storescp``) in the same study;
then SIGTERM drains the node, exit 0.

And fail fast: with ``listen`` set and the token file missing or empty, ``cxrd
check-config`` fails and ``cxrd serve`` exits non-zero with one line naming the file,
before anything listens.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicompeers import StoreSCP, free_port, phantom_study, wait_for
from dicomweb_client import DICOMwebClient
from nodehelpers import (
    IMAGE_SIZE,
    DbView,
    Nodes,
    cli_env,
    node_port,
    run_cli,
    status_json,
    write_config,
)

from cxrd.db import Instance

pytestmark = pytest.mark.slow

TOKEN = "acceptance-stow-token"
TIMEOUT = 120.0
SC = "1.2.840.10008.5.1.4.1.1.7"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"


def dicomweb_node(root: Path, scp_port: int, token_file: Path) -> tuple[Any, int]:
    port = free_port()
    while port == scp_port:
        port = free_port()
    dirs = write_config(root, extra=f"""
[dicomweb]
listen = "127.0.0.1:{port}"
token_file = "{token_file}"

[sender]
initial_backoff_seconds = 0.5
max_backoff_seconds = 2

[[destinations]]
name = "pacs"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {scp_port}
""")
    if node_port(dirs) == port:  # free_port() twice gave the same port: try again
        return dicomweb_node(root, scp_port, token_file)
    return dirs, port


def received_by_class(scp: StoreSCP) -> dict[str, list[pydicom.Dataset]]:
    found: dict[str, list[pydicom.Dataset]] = {}
    for path in scp.received():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.setdefault(str(ds.SOPClassUID), []).append(ds)
    return found


def test_a_study_posted_by_stow_rs_is_classified_and_its_results_delivered(
        tmp_path: Path, nodes: Nodes, db_of: Any) -> None:
    scp = StoreSCP(tmp_path / "pacs")
    token_file = tmp_path / "stow.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    (tmp_path / "node").mkdir()
    dirs, port = dicomweb_node(tmp_path / "node", scp.port, token_file)
    try:
        node = nodes.start(dirs)
        study = phantom_study(tmp_path / "study", 2, seed=41, size=IMAGE_SIZE)
        study_uid = study[0].study_instance_uid
        client = DICOMwebClient(url=f"http://127.0.0.1:{port}",
                                headers={"Authorization": f"Bearer {TOKEN}"})
        client.set_http_retry_params(retry=False)
        answer = client.store_instances([pydicom.dcmread(f.path) for f in study],
                                        study_instance_uid=study_uid)
        assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [
            f.sop_instance_uid for f in study]
        assert "FailedSOPSequence" not in answer

        # without the token: refused, nothing more stored
        refused = requests.post(f"http://127.0.0.1:{port}/studies", data=b"", timeout=30,
                                headers={"Content-Type": 'multipart/related; '
                                         'type="application/dicom"; boundary=x'})
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"]

        def delivered() -> dict[str, list[pydicom.Dataset]] | None:
            found = received_by_class(scp)
            done = (len(found.get(SR_3D, [])) == 1 and len(found.get(SC, [])) == 2
                    and len(found.get(SEG, [])) == 2)
            return found if done else None

        found = wait_for(delivered, TIMEOUT, "the SR, 2 SCs and 2 SEGs at storescp")
        results = [ds for group in found.values() for ds in group]
        assert {str(ds.StudyInstanceUID) for ds in results} == {study_uid}
        for group in (found[SC], found[SEG]):  # one per posted image, naming it
            sources = [{str(e.value) for e in ds.iterall()
                        if e.keyword == "ReferencedSOPInstanceUID"} for ds in group]
            assert set().union(*sources) >= {f.sop_instance_uid for f in study}

        assert status_json(dirs)["node"]["dicomweb"] == f"127.0.0.1:{port}"
        db: DbView = db_of(dirs)
        assert db.count(Instance, Instance.source == "dicomweb:127.0.0.1") == 2
        log = node.log()
        assert "action=dicomweb-start" in log
        assert "action=stow-rs-request route=/studies/{study}" in log
        assert "status=200 instances=2 stored=2" in log
        assert "status=401" in log
        assert TOKEN not in log
        assert node.stop() == 0
        assert "action=dicomweb-stop stored=2" in node.log()
    finally:
        scp.stop()


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("token", [None, "", "\n"])
def test_a_missing_or_empty_token_file_stops_the_node_before_it_listens(
        tmp_path: Path, token: str | None) -> None:
    token_file = tmp_path / "stow.token"
    if token is not None:
        token_file.write_text(token)
    dirs, port = dicomweb_node(tmp_path, free_port(), token_file)

    checked = run_cli("check-config", "--config", str(dirs.config))
    assert checked.returncode == 1
    assert f"problem: [dicomweb] token_file {token_file}" in checked.stderr

    served = run_cli("serve", "--config", str(dirs.config), env=cli_env(), timeout=60)
    assert served.returncode == 1, served.stderr
    lines = [ln for ln in served.stderr.splitlines() if ln.startswith("cxrd: ")]
    assert len(lines) == 1, served.stderr
    assert f"[dicomweb] token_file {token_file}" in lines[0]
    assert ("is empty" if token is not None else "cannot be read") in lines[0]
    assert _refused(port)
    assert "action=node-start" not in served.stderr + served.stdout
