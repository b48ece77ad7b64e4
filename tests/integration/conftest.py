"""Fixtures shared by the integration tier's modules (the peers themselves are in
``dicompeers``).

``pki`` is made once per session: the receiver's TLS tests and the sender's TLS tests use
the same throw-away CA, server, client and rogue certificates.
"""

from __future__ import annotations

import pytest
from dicompeers import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
