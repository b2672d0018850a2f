"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_rooms import Rooms


@pytest.fixture
def rooms(tmp_path: Path):
    """The rooms of one new site under tmp_path/site (worker_rooms.Rooms),
    closed after the test."""
    r = Rooms(tmp_path / "site")
    yield r
    r.close()
