"""The suite's own ordering (tests/conftest.py): every file it names exists, so a rename cannot silently put a
long file at the end of `make test` again."""

from __future__ import annotations

from tests.conftest import LONGEST_FIRST, REPO


def test_every_longest_first_file_exists() -> None:
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert [p for p in LONGEST_FIRST if not (REPO / p).is_file()] == []
