"""Shared fixtures: a migrated database and an Ingestor over a temporary data folder.

pytest puts this folder on ``sys.path`` (rootdir conftest, prepend import mode), so test
modules import the fixture builders as ``import dicomfactory``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom.config
import pytest

from cxrd.db import Database
from cxrd.ingest import Ingestor


@pytest.fixture(autouse=True)
def _pydicom_settings() -> Iterator[None]:
    """pydicom's validation modes are process-wide, and ``cxrd.logs.setup_logging`` sets
    one (as the node does at start); a test that calls it must not change what later tests
    see (a test expecting pydicom's warning on a malformed date passed or failed by order)."""
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = saved


@dataclass(frozen=True)
class DataDirs:
    root: Path
    incoming: Path
    spool: Path
    rejected: Path

    def file(self, key: str) -> Path:
        """The file of a store key (``instances.path``) under this data folder."""
        return self.root / key


@pytest.fixture
def dirs(tmp_path: Path) -> DataDirs:
    d = DataDirs(tmp_path, tmp_path / "incoming", tmp_path / "spool", tmp_path / "rejected")
    d.incoming.mkdir()
    return d


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database in a real file (WAL, as in production)."""
    database = Database(f"sqlite:///{tmp_path / 'cxrd.sqlite'}")
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def memdb() -> Iterator[Database]:
    """A migrated in-memory SQLite database."""
    database = Database("sqlite://")
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def ingestor(db: Database, dirs: DataDirs) -> Ingestor:
    return Ingestor(db, dirs.spool, dirs.rejected)


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, int], Path]]:
    """``tmpfs(folder, size_mb)`` mounts a real tmpfs of that size on ``folder`` (made
    when missing; the tests run as root) and returns it; every mount is undone at teardown.
    A mount that fails fails the test: the disk-full tests would test nothing without it."""
    mounted: list[Path] = []

    def mount(folder: Path, size_mb: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755",
                               "tmpfs", str(folder)], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs on {folder} (root needed): {done.stderr}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
