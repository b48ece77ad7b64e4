"""Fail fast: a ``cxrd serve`` that cannot do its job exits non-zero within seconds with
one line naming the cause and the fix, leaves nothing listening and no process behind;
``cxrd check-config`` reports the same problems, all at once.

Each cause is real: a port held by a listening socket of the test, a PostgreSQL URL to a
port nothing listens on, an SQLite path under a regular file, a missing or damaged model
file, and an onnxruntime that cannot be imported (a ``sitecustomize`` on the node's
``PYTHONPATH`` that refuses the import, as a missing package does).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nodehelpers import (
    NodeDirs,
    NodeProcess,
    Nodes,
    cli_env,
    free_port,
    run_cli,
    session_members,
    wait_until,
    write_config,
)

#: Preflight failures take an interpreter start and the imports (about 2 s); the node that
#: fails after it began listening also waits for its receiver process to end.
EXIT_BOUND_SECONDS = 30.0
#: A log line of the text format at the default level (nodehelpers' configs).
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR|CRITICAL) ")

NO_ONNXRUNTIME = '''\
import importlib.abc
import sys


class _NoOnnxruntime(importlib.abc.MetaPathFinder):
    """As if onnxruntime were not installed (a plain `pip install .`)."""

    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoOnnxruntime())
'''


@contextlib.contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    """Another program listening on ``port`` (loopback)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield sock


def port_of(dirs: NodeDirs) -> int:
    return int(dirs.config.read_text().split("port = ", 1)[1].split()[0])


def can_bind(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def nothing_listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def no_onnxruntime_env(tmp_path: Path) -> dict[str, str]:
    shim = tmp_path / "no-onnxruntime"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(NO_ONNXRUNTIME)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH")) if p)
    return env


def set_key(dirs: NodeDirs, section: str, line: str) -> None:
    text = dirs.config.read_text()
    assert f"[{section}]\n" in text
    dirs.config.write_text(text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1))


@dataclass
class Refusal:
    node: NodeProcess
    code: int
    seconds: float
    line: str


def refused(nodes: Nodes, dirs: NodeDirs, env: dict[str, str] | None = None) -> Refusal:
    """Start ``cxrd serve`` and expect it to exit non-zero, within the bound, with exactly
    one ``cxrd:`` line and no traceback; then nothing of it may be left running."""
    t0 = time.monotonic()
    node = NodeProcess(dirs, "serve", env=env)
    nodes.started.append(node)  # teardown kills its process group whatever happens
    code = node.wait(EXIT_BOUND_SECONDS)
    seconds = time.monotonic() - t0
    out = node.log()
    assert code != 0, out
    assert "Traceback" not in out, out
    # the log lines of what did start, if anything; then exactly one line of its own
    lines = [ln for ln in out.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("cxrd: "), out
    # children are reparented when the node exits, but stay in its session
    wait_until(lambda: not session_members(node.pid), 10,
               "the node's processes (workers, receivers, resource tracker) to end")
    return Refusal(node, code, seconds, lines[0])


def assert_port_free(port: int) -> None:
    assert nothing_listens(port)
    assert can_bind(port)


def test_dicom_port_in_use(tmp_path: Path, nodes: Nodes) -> None:
    dirs = write_config(tmp_path)
    port = port_of(dirs)
    with listening(port):
        r = refused(nodes, dirs)
    assert "DICOM port" in r.line and f"127.0.0.1:{port}" in r.line, r.line
    assert "already in use" in r.line and "[node] host/port" in r.line, r.line
    assert "action=receive-start" not in r.node.log()
    assert_port_free(port)


def test_metrics_port_in_use(tmp_path: Path, nodes: Nodes) -> None:
    metrics_port = free_port()
    dirs = write_config(tmp_path)
    dirs.config.write_text(dirs.config.read_text().replace(
        'listen = ""', f'listen = "127.0.0.1:{metrics_port}"'))
    with listening(metrics_port):
        r = refused(nodes, dirs)
    assert "metrics port" in r.line and f"127.0.0.1:{metrics_port}" in r.line, r.line
    assert "already in use" in r.line and "[metrics] listen" in r.line, r.line
    assert "action=receive-start" not in r.node.log()
    assert_port_free(port_of(dirs))
    assert_port_free(metrics_port)


def _postgres_closed_port(dirs: NodeDirs) -> str:
    closed = free_port()
    set_key(dirs, "storage", f'database_url = "postgresql://cxrd@127.0.0.1:{closed}/cxrd"')
    return f"127.0.0.1:{closed}"


def _sqlite_under_a_file(dirs: NodeDirs) -> str:
    blocker = dirs.root / "not-a-folder"
    blocker.write_text("a regular file where the database's folder should be\n")
    set_key(dirs, "storage", f'database_url = "sqlite:///{blocker}/cxrd.sqlite3"')
    return str(blocker)


@pytest.mark.parametrize("make_url", [_postgres_closed_port, _sqlite_under_a_file],
                         ids=["postgresql-closed-port", "sqlite-under-a-file"])
def test_database_unreachable(tmp_path: Path, nodes: Nodes,
                              make_url: Callable[[NodeDirs], str]) -> None:
    dirs = write_config(tmp_path)
    where = make_url(dirs)
    r = refused(nodes, dirs)
    assert "database" in r.line and "cannot be reached or migrated" in r.line, r.line
    assert where in r.line and "[storage] database_url" in r.line, r.line
    assert_port_free(port_of(dirs))


def _damaged(dirs: NodeDirs) -> Path:
    path = dirs.root / "damaged.onnx"
    path.write_bytes(b"this is not an ONNX protobuf\x00\xff" * 64)
    return path


def _without_metadata(dirs: NodeDirs) -> Path:
    """A loadable ONNX graph (the demo model's) whose metadata were stripped."""
    import onnx

    from cxrd.modelinfo import demo_model_path

    model = onnx.load(str(demo_model_path()))
    del model.metadata_props[:]
    path = dirs.root / "no-metadata.onnx"
    onnx.save(model, str(path))
    return path


# A model path that does not exist is refused by the configuration itself (model.path).
@pytest.mark.parametrize("make_model", [_damaged, _without_metadata],
                         ids=["damaged", "no-metadata"])
def test_model_invalid(tmp_path: Path, nodes: Nodes,
                       make_model: Callable[[NodeDirs], Path]) -> None:
    dirs = write_config(tmp_path)
    path = make_model(dirs)
    set_key(dirs, "model", f'path = "{path}"')
    r = refused(nodes, dirs)
    assert f"model file {path}" in r.line and "cannot be used" in r.line, r.line
    assert "set [model] path" in r.line, r.line
    assert_port_free(port_of(dirs))


def test_onnxruntime_missing(tmp_path: Path, nodes: Nodes) -> None:
    dirs = write_config(tmp_path)
    r = refused(nodes, dirs, env=no_onnxruntime_env(tmp_path))
    assert "onnxruntime is not installed" in r.line, r.line
    assert "pip install '.[cpu]'" in r.line and "'.[gpu]'" in r.line, r.line
    assert "action=worker-spawned" not in r.node.log()
    assert_port_free(port_of(dirs))


def test_a_failure_after_listening_ends_the_whole_node(tmp_path: Path, nodes: Nodes) -> None:
    """What the checks do not cover still ends the node: a watched folder that cannot be
    created fails start-up after the DICOM port and a second receiver process (which shares
    it) are up. The node closes the port, ends the receiver and exits."""
    dirs = write_config(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file where a watched folder should be\n")
    set_key(dirs, "node", "receivers = 2")
    set_key(dirs, "watch", f'folders = ["{blocker}/watched"]')
    r = refused(nodes, dirs)
    log = r.node.log()
    assert "action=receive-start" in log  # it did listen before the failure
    assert "the node stopped" in r.line and "NotADirectoryError" in r.line, r.line
    assert_port_free(port_of(dirs))


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    metrics_port = free_port()
    dirs = write_config(tmp_path)
    dirs.config.write_text(dirs.config.read_text().replace(
        'listen = ""', f'listen = "127.0.0.1:{metrics_port}"'))
    closed = _postgres_closed_port(dirs)
    damaged = _damaged(dirs)
    set_key(dirs, "model", f'path = "{damaged}"')
    with listening(port_of(dirs)), listening(metrics_port):
        done = run_cli("check-config", "--config", str(dirs.config),
                       env=no_onnxruntime_env(tmp_path))
    assert done.returncode != 0, done.stderr
    problems = [ln for ln in done.stderr.splitlines() if ln.startswith("problem:")]
    assert len(problems) == 5, done.stderr
    text = "\n".join(problems)
    assert "onnxruntime is not installed" in text and "pip install '.[cpu]'" in text
    assert f"model file {damaged}" in text and "cannot be used" in text
    assert closed in text and "cannot be reached or migrated" in text
    assert "DICOM port" in text and "metrics port" in text
    assert "configuration OK" not in done.stderr


def test_check_config_reports_a_model_without_metadata(tmp_path: Path) -> None:
    dirs = write_config(tmp_path)
    path = _without_metadata(dirs)
    set_key(dirs, "model", f'path = "{path}"')
    done = run_cli("check-config", "--config", str(dirs.config))
    assert done.returncode != 0
    problems = [ln for ln in done.stderr.splitlines() if ln.startswith("problem:")]
    assert len(problems) == 1 and f"model file {path}" in problems[0], done.stderr
