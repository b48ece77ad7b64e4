"""The kill -9 storm (``bench/storm.py``) in the test command: five rounds of SIGKILL to the
whole node while two storescu associations send, then a clean run; every instance
acknowledged Success must end with exactly one SC and its study with one current SR."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from nodehelpers import REPO, cli_env

pytestmark = pytest.mark.slow


def test_kill_9_storm_loses_and_duplicates_nothing(tmp_path):
    figures = tmp_path / "storm.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "storm.py"), "--rounds", "5", "--senders", "2",
         "--work", str(tmp_path / "work"), "--json", str(figures), "--settle-timeout", "120"],
        env=cli_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
        check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    summary = json.loads(figures.read_text())
    assert summary["rounds"] == 5
    assert summary["lost"] == 0 and summary["duplicated"] == 0 and summary["problems"] == 0
    # every instance sent was acknowledged in the end (unacknowledged ones are sent again)
    # and each has its SC; the storm really did interrupt senders
    assert summary["instances_acknowledged"] == summary["instances_sent"] > 0
    assert summary["results_sc"] == summary["instances_acknowledged"]
    assert summary["results_sr_current"] == summary["studies"]
    assert summary["c_stores"] >= summary["instances_sent"]
    assert "lost: 0" in done.stdout and "duplicated: 0" in done.stdout
