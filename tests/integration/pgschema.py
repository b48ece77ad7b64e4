"""PostgreSQL for integration tests: a throw-away schema per test in the ``test`` database.

The server is part of the test environment (127.0.0.1:5432, user postgres, trust auth);
``CXRD_TEST_POSTGRES_URL`` names another. When it cannot be reached the tests fail, not
skip, unless ``CXRD_SKIP_POSTGRES=1`` says this machine has none.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_url() -> Iterator[str]:
    """Yield a URL whose search_path is a fresh schema; drop the schema afterwards."""
    if os.environ.get("CXRD_SKIP_POSTGRES") == "1":
        pytest.skip("CXRD_SKIP_POSTGRES=1")
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - environment problem, made loud
        pytest.fail(f"psycopg is not installed (pip install 'cxrd[postgres]'): {exc}")
    base = os.environ.get("CXRD_TEST_POSTGRES_URL", DEFAULT_URL)
    schema = f"cxrd_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {base} is unreachable ({exc}); set CXRD_SKIP_POSTGRES=1 "
                    "on machines without it")
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
