"""Operations on the real process: sd_notify over a real socket, the Prometheus endpoint
against ``cxrd status``, SIGHUP reload, JSON logs."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from nodehelpers import (
    DbView,
    NodeDirs,
    Nodes,
    PhantomSet,
    free_port,
    settled,
    status_json,
    wait_until,
    write_config,
)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_notify_metrics_reload_json_logs(tmp_path: Path, nodes: Nodes, dozen: PhantomSet,
                                         db_of: Callable[[NodeDirs], DbView],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    metrics_port = free_port()
    dirs = write_config(tmp_path, extra="")
    text = dirs.config.read_text().replace('listen = ""', f'listen = "127.0.0.1:{metrics_port}"')
    text = text.replace('level = "INFO"', 'level = "INFO"\nformat = "json"')
    dirs.config.write_text(text)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    node = nodes.start(dirs)

    first = sock.recv(4096).decode().split("\n")
    assert "READY=1" in first and any(m.startswith("STATUS=queue depth") for m in first)
    assert f"MAINPID={node.pid}" in first

    db = db_of(dirs)
    dozen.drop(dirs.incoming)
    wait_until(lambda: settled(dirs, db), 180, "the dozen to be processed")

    messages: list[str] = []
    sock.settimeout(3)
    try:
        while len(messages) < 50:
            messages.append(sock.recv(4096).decode())
    except TimeoutError:
        pass
    assert "WATCHDOG=1" in messages

    metrics = _scrape(metrics_port)
    status = status_json(dirs)
    assert metrics['cxrd_instances{state="done"}'] == status["instances"]["done"] == 12
    assert metrics["cxrd_queue_depth"] == status["queue_depth"] == 0
    assert metrics['cxrd_instances_received_total{outcome="stored"}'] == 12
    assert metrics['cxrd_stage_seconds_count{stage="infer"}'] == 12  # from the worker process
    assert metrics['cxrd_stage_seconds_count{stage="report"}'] == len(dozen.studies())
    assert metrics["cxrd_deliveries_pending"] == 0 and metrics["cxrd_deliveries_dead"] == 0
    info = [k for k in metrics if k.startswith("cxrd_model_info{")]
    assert info and 'providers="CPUExecutionProvider"' in info[0]

    # SIGHUP: the allow-list applies live; stable_seconds needs a restart and says so.
    dirs.config.write_text(dirs.config.read_text()
                           .replace("[node]\n", '[node]\nallowed_callers = ["PACS"]\n')
                           .replace("stable_seconds = 1", "stable_seconds = 2"))
    node.signal(signal.SIGHUP)
    wait_until(lambda: "action=reloaded" in node.log(), 30, "the reload")
    line = next(ln for ln in node.log().splitlines() if "action=reloaded" in ln)
    record = json.loads(line)
    assert record["action"] == "reloaded" and "study" in record["restart_needed_for"]

    assert node.stop(90) == 0
    # Every line of the node's output (main process and workers) is one JSON object, and
    # no field is cut: the model's name holds spaces ("DEMO cxrd-demo-phantom 1.1.0").
    lines = node.log().splitlines()
    assert len(lines) > 20
    records = [json.loads(ln) for ln in lines]
    actions = {r.get("action") for r in records}
    assert {"node-start", "stored", "classified", "study-reported", "drain-done"} <= actions
    display_name = status["model"]["display_name"]
    assert " " in display_name
    by_action = {r.get("action"): r for r in records}
    assert by_action["node-start"]["model"] == display_name
    assert by_action["node-start"]["node_id"] == status["node"]["id"] == socket.gethostname()
    assert by_action["worker-start"]["model"] == display_name
    assert isinstance(by_action["node-start"]["workers"], int)
    assert isinstance(by_action["classified"]["p_tb"], float)
    rest: list[str] = []
    sock.settimeout(1)
    try:
        while True:
            rest.append(sock.recv(4096).decode())
    except TimeoutError:
        pass
    assert any(m.startswith("STOPPING=1") for m in rest), rest
