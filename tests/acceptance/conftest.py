"""Fixtures of the acceptance tier (the helpers themselves are in ``nodehelpers``).

``nodes`` starts ``cxrd serve`` subprocesses and kills their process groups at teardown;
``hosts`` gives nodes hosts of their own (network namespaces, ``netns``) and deletes them;
``db_of`` opens read-only views of their databases; ``shared_url`` makes a PostgreSQL
database for nodes that share one; the phantom sets are generated once per session and
copied into each test's watched folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from netns import Hosts
from nodehelpers import (
    DbView,
    NodeDirs,
    Nodes,
    PhantomSet,
    frontal_set,
    make_phantom_set,
    shared_database,
)


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    n = Nodes()
    yield n
    n.close()


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Hosts for nodes (``netns.Hosts``): a network namespace each where this machine
    allows it, else this machine's own; every namespace is deleted at teardown."""
    h = Hosts()
    yield h
    h.close()


@pytest.fixture
def db_of() -> Iterator[Callable[[NodeDirs], DbView]]:
    views: list[DbView] = []

    def make(dirs: NodeDirs) -> DbView:
        views.append(DbView(dirs.database))
        return views[-1]

    yield make
    for v in views:
        v.dispose()


@pytest.fixture(scope="session")
def fifty(tmp_path_factory: pytest.TempPathFactory) -> PhantomSet:
    """50 files in several studies, with lateral and non-chest images among them."""
    s = make_phantom_set(tmp_path_factory.mktemp("fifty"), 50, seed=20251128)
    assert sum(f.view == "LL" for f in s.files) >= 2
    assert sum(f.body_part != "CHEST" for f in s.files) >= 2
    assert sum(f.classifiable for f in s.files) >= 15
    return s


@pytest.fixture(scope="session")
def dozen(tmp_path_factory: pytest.TempPathFactory) -> PhantomSet:
    """A dozen frontal chest images in four studies (every one is classified)."""
    return frontal_set(tmp_path_factory.mktemp("dozen"))


@pytest.fixture
def shared_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own on the local server, for nodes that share
    it (``nodehelpers.shared_database``); dropped afterwards."""
    with shared_database("cxrd_nodes") as url:
        yield url
