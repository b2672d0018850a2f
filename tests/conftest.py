"""Fixtures shared by the test modules, and how pytest-xdist groups the tests.

bin/test runs the tests in parallel worker processes (``-n auto --dist
loadgroup`` in pyproject.toml). Every test is isolated on its own (tmp dirs,
ports from ``tools.free_port``, which splits the ports between the workers),
so single tests are spread over the workers; only the tests that share a
module- or class-scoped fixture (one proxy, one Orthanc, one corpus for the
whole module) are kept on one worker, so that fixture is set up once, as in a
serial run (:func:`pytest_collection_modifyitems`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import ith_proxy
from worker_rooms import Rooms

# ith_proxy keeps requests out of its own processes; the test tools use it here
for _name in ith_proxy.NEVER_IMPORTED:
    if _name in sys.modules and sys.modules[_name] is None:
        del sys.modules[_name]

_SHARED_SCOPES = ("class", "module", "package")  # session ones are per worker anyway


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test that uses a fixture of a wider scope than a function
    with ``xdist_group(<its module>)``: under ``--dist loadgroup`` the tests of
    one module that share such a fixture run in one worker."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        shared = any(d and d[-1].scope in _SHARED_SCOPES for d in info.name2fixturedefs.values())
        module = getattr(item, "module", None)
        if shared and module is not None:
            item.add_marker(pytest.mark.xdist_group(module.__name__))


@pytest.fixture
def rooms(tmp_path: Path):
    """The rooms of one new site under tmp_path/site (worker_rooms.Rooms),
    closed after the test."""
    r = Rooms(tmp_path / "site")
    yield r
    r.close()
