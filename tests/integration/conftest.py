"""Fixtures shared by the integration tier's modules (the peers themselves are in
``dicompeers``).

``pki`` is made once per session: the receiver's TLS tests and the sender's TLS tests use
the same throw-away CA, server, client and rogue certificates. ``moto_endpoint`` is one
moto S3 server per module (``s3peer``), ``fake_aws`` its credentials in the environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dicompeers import Pki, make_pki
from s3peer import start_moto, stop, use_fake_aws


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    proc, endpoint = start_moto()
    try:
        yield endpoint
    finally:
        stop(proc)


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials from the environment only: no profile, no shared files of the host's,
    no instance metadata lookups."""
    use_fake_aws(monkeypatch, tmp_path)
