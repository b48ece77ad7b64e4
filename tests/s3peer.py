"""moto's standalone S3 server as a real peer for the tests that use S3 (``cxrd.store``).

``python -m moto.server`` (``moto[server]`` in the ``[test]`` extra) is started on a free
loopback port; the code under test talks to it over HTTP through boto3, as it would to
AWS, MinIO or Ceph: no client is mocked. moto accepts any credentials unless told to
check them (``INITIAL_NO_AUTH_ACTION_COUNT``), keeps everything in memory (a restarted
server is empty), and its region is us-east-1. The fake credentials below name no real
account; they go in the environment only, never in a config file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import boto3
from dicompeers import free_port

#: moto's server takes any access key unless it checks them; these name no real account.
FAKE_KEY_ID = "testing"
FAKE_SECRET = "testing"
REGION = "us-east-1"  # moto's default region


def start_moto(env: dict[str, str] | None = None, port: int | None = None
               ) -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server on a free (or the given) loopback port, answering; (process,
    endpoint URL)."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's server did not start (is moto[server] "
                                   "installed? it is in the [test] extra)") from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def aws_environ(home: Path) -> dict[str, str]:
    """The AWS variables of a process that uses moto: the fake credentials, no profile,
    no shared files of the host's (``home`` holds none), no instance metadata lookups."""
    return {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-credentials"),
            "AWS_CONFIG_FILE": str(home / "no-config"),
            "AWS_EC2_METADATA_DISABLED": "true"}


def use_fake_aws(monkeypatch: Any, home: Path) -> None:
    """Put :func:`aws_environ` in this test's environment, every other ``AWS_*`` variable
    out (``monkeypatch``: pytest's, which restores them)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in aws_environ(home).items():
        monkeypatch.setenv(name, value)


def new_bucket(endpoint: str) -> str:
    name = f"cxrd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def object_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every key in ``bucket`` under ``prefix``, sorted (read with boto3 directly)."""
    client = boto3.client("s3", endpoint_url=endpoint)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(str(item["Key"]) for item in page.get("Contents", ()))
    return sorted(keys)
