"""The systemd unit passes ``systemd-analyze verify`` (Debian's systemd) and says what
operators rely on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
INSTALLED_CXRD = "/opt/cxrd/bin/cxrd"


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "cxrd.service")
    return parser


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze missing: apt-get install systemd"
    # verify checks that ExecStart's binary exists; the unit names the install location
    # (/opt/cxrd), so point it at this checkout's console script for the check.
    cxrd = Path(sys.executable).with_name("cxrd")
    assert cxrd.exists()
    unit = tmp_path / "cxrd.service"
    unit.write_text((DEPLOY / "cxrd.service").read_text().replace(INSTALLED_CXRD, str(cxrd)))
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cxrd.service" not in proc.stderr, proc.stderr  # no warnings about our unit


def test_unit_contract() -> None:
    svc = _unit()["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure"
    assert int(svc["TimeoutStopSec"]) >= 150  # the node drains for up to about 2 minutes
    assert svc["User"] == "cxrd" and svc["StateDirectory"] == "cxrd"
    assert svc["Environment"] == "CXRD_CONFIG=/etc/cxrd/cxrd.toml"
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes")):
        assert svc[key] == value
    assert "/var/lib/cxrd" in svc["ReadWritePaths"]
    assert svc["CapabilityBoundingSet"] == "" and svc["AmbientCapabilities"] == ""
    low = (DEPLOY / "cxrd.service.d" / "low-port.conf").read_text()
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in low


def test_sysusers_file(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    assert tool, "systemd-sysusers missing: apt-get install systemd"
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([tool, f"--root={tmp_path}", str(DEPLOY / "cxrd.sysusers.conf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert passwd.startswith("cxrd:") or "\ncxrd:" in passwd


def test_example_config_for_the_unit_is_valid() -> None:
    import tomllib

    from cxrd.config import validate

    data = tomllib.loads((DEPLOY / "cxrd.toml").read_text())
    config = validate(data)
    assert str(config.storage.data_dir) == "/var/lib/cxrd"


@pytest.mark.parametrize("path", ["README.md"])
def test_deploy_readme_covers_operations(path: str) -> None:
    text = (DEPLOY / path).read_text()
    for needle in ("/opt/cxrd", "systemctl enable --now cxrd", "cxrd reprocess --since",
                   "low-port.conf", "sysusers"):
        assert needle in text, needle
