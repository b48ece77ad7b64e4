"""The test tree: pytest imports test files by their base name (the folders are not
packages), so two test files with one name in two folders stop the whole collection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def test_test_file_names_are_unique_across_folders() -> None:
    tests = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in tests.rglob("test_*.py"))
    assert [name for name, n in names.items() if n > 1] == []
