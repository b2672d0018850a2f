"""The proxy's process tree (issue 11): the service, its two indexer
children and the zygote, nothing else (no multiprocessing resource
tracker); the first indexers are forked by the service, a restarted one by the zygote (exec'd if
the zygote is gone); the indexer's records reach the service's log files; it
alone has the memory ceiling; it and the zygote exit when the service dies."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import dicomgen
import procfs
import tools
from helpers import wait_indexed, wait_until

INDEXER_COMM = "ith-indexer"
HELPER_COMM = "ith-indexer1"  # [indexer] processes = 2 (the default)
ZYGOTE_COMM = "ith-zygote"


def _cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def _data_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max data size"):
            return line.split()[3]
    raise AssertionError("no data limit line")


def _log(proxy: tools.ProxyProcess) -> str:
    return (proxy.spool / "logs" / "main.log").read_text()


def _kids(pid: int) -> dict[str, int]:
    """The children by name (one of each)."""
    kids = procfs.children(pid)
    named = {procfs.comm(k): k for k in kids}
    assert len(named) == len(kids), [_cmdline(k) for k in kids]
    return named


def _optional_libraries(pid: int) -> list[str]:
    """Mappings of packages the proxy must never import (``ith_proxy.NEVER_IMPORTED``
    and what they pull in): charset_normalizer's compiled module stands for requests."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if "/charset_normalizer/" in line})


def _requests_installed() -> None:
    """The check above means something only where requests could be imported."""
    import charset_normalizer.md  # compiled; requests imports it
    import requests  # noqa: F401  (imported only to show it can be)

    assert charset_normalizer.md.__file__.endswith(".so")


def test_the_tree_is_the_service_its_indexer_and_the_zygote(tmp_path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 2)
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        assert proxy.pid is not None
        kids = _kids(proxy.pid)
        # no resource tracker; no helper indexer without a backlog ([indexer] processes = 2)
        assert sorted(kids) == [INDEXER_COMM, ZYGOTE_COMM]
        indexer, zygote = kids[INDEXER_COMM], kids[ZYGOTE_COMM]
        for pid in (indexer, zygote):
            assert _cmdline(pid) == _cmdline(proxy.pid)  # forked, not a new interpreter
            assert procfs.children(pid) == []
        # their own records reach the service's files (they write none themselves)
        wait_until(lambda: f"indexer process {indexer} started (fork)" in _log(proxy), 30, "log")
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_indexed(proxy.spool, 2)
        assert procfs.children(zygote) == []  # two files are no backlog
        # the ceiling is the indexers' only
        assert _data_limit(indexer) == str(1024 << 20)
        # pydicom would import requests from this virtualenv (the test tools need it)
        _requests_installed()
        for pid in (proxy.pid, indexer, zygote):
            assert _optional_libraries(pid) == [], procfs.comm(pid)
        assert _data_limit(proxy.pid) == "unlimited"
        assert _data_limit(zygote) == "unlimited"
        assert proxy.stop() == 0  # SIGTERM: a clean stop, the children with it
    assert procfs.gone(indexer) and procfs.gone(zygote)
    text = _log(proxy)  # its last record too: the listener writes all before it stops
    assert f"indexer process {indexer} stopped" in text
    assert text.index(f"indexer process {indexer} stopped") < text.index(
        "INFO ith_proxy.service [MainThread] stopped"
    )


def _helper(zygote: int) -> int | None:
    kids = procfs.children(zygote)
    return kids[0] if len(kids) == 1 and procfs.comm(kids[0]) == HELPER_COMM else None


def test_a_helper_indexer_runs_only_while_a_backlog_lasts(tmp_path) -> None:
    """[indexer] processes = 2: the helper is forked by the zygote when
    incoming/ holds more than one batch, and exits by itself (code 0, no
    restart, health stays green) helper_idle seconds after the backlog."""
    series = dicomgen.make_small_series(tmp_path / "in", 16)
    ini = "[indexer]\nbatch_size = 2\nhelper_idle = 2\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        assert proxy.pid is not None
        kids = _kids(proxy.pid)
        first, zygote = kids[INDEXER_COMM], kids[ZYGOTE_COMM]
        os.kill(first, signal.SIGSTOP)  # the backlog builds
        try:
            assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
            helper = wait_until(lambda: _helper(zygote), 10, "a helper forked by the zygote")
            assert isinstance(helper, int)
            assert _cmdline(helper) == _cmdline(proxy.pid)  # forked: no new interpreter
            assert _data_limit(helper) == str(1024 << 20)
            assert _optional_libraries(helper) == []
            # 16 files: one of bucket 1 at least (a miss is 2**-16), which it takes
            wait_until(lambda: "indexer 1 helps" in _log(proxy), 30, "the helper helping")
        finally:
            os.kill(first, signal.SIGCONT)
        wait_indexed(proxy.spool, 16)
        wait_until(lambda: procfs.gone(helper), 30, "the helper exits")
        # its last lines travel to the service's log over a socket: written a moment later
        stopped = f"indexer process {helper} stopped"
        wait_until(lambda: stopped in _log(proxy), 10, "the helper's last log line")
        text = _log(proxy)
        assert f"indexer process {helper} started (zygote, indexer 1)" in text
        assert "indexer 1 stops: no backlog for" in text
        assert "exited (code" not in text  # not a death: nothing restarted it
        assert proxy.health()[0] == 200
        assert procfs.children(zygote) == []
        assert proxy.stop() == 0
    assert not any((proxy.spool / "quarantine").rglob("*"))


def _restarted(proxy: tools.ProxyProcess, parent: int, dead: int) -> int | None:
    kids = [k for k in procfs.children(parent) if k != dead and procfs.comm(k) == INDEXER_COMM]
    return kids[0] if len(kids) == 1 and proxy.health()[0] == 200 else None


def test_a_killed_indexer_comes_back_forked_by_the_zygote_and_still_logs(tmp_path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 3)
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        assert proxy.pid is not None
        kids = _kids(proxy.pid)
        first, zygote = kids[INDEXER_COMM], kids[ZYGOTE_COMM]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: proxy.health()[0] == 503, 10, "health reports the dead indexer")
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0  # still acked
        second = wait_until(lambda: _restarted(proxy, zygote, first), 30, "indexer restarted")
        assert isinstance(second, int)
        assert procfs.children(zygote) == [second]
        assert _cmdline(second) == _cmdline(proxy.pid)  # forked: no new interpreter
        wait_indexed(proxy.spool, 3)
        wait_until(lambda: f"indexer process {second} started (zygote)" in _log(proxy), 30, "log")
        assert "indexer process exited (code -9); restarting" in _log(proxy)
        assert _data_limit(second) == str(1024 << 20)
        # killed again: the service gets its exit code from the zygote
        os.kill(second, signal.SIGKILL)
        third = wait_until(lambda: _restarted(proxy, zygote, second), 30, "restarted again")
        assert isinstance(third, int)
        assert _log(proxy).count("indexer process exited (code -9); restarting") == 2
        assert proxy.stop() == 0
    assert procfs.gone(second) and procfs.gone(third) and procfs.gone(zygote)


def test_without_the_zygote_a_restarted_indexer_is_exec_d(tmp_path) -> None:
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        assert proxy.pid is not None
        kids = _kids(proxy.pid)
        first, zygote = kids[INDEXER_COMM], kids[ZYGOTE_COMM]
        os.kill(zygote, signal.SIGKILL)
        wait_until(lambda: "the zygote process has exited" in _log(proxy), 10, "the warning")
        assert proxy.health()[0] == 200  # nothing is missing until a child dies
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: _restarted(proxy, proxy.pid, first), 60, "indexer restarted")
        assert isinstance(second, int)
        assert b"ith_proxy.indexer_child" in _cmdline(second)  # a fresh, lean interpreter
        wait_until(lambda: f"indexer process {second} started (exec)" in _log(proxy), 30, "log")
        _requests_installed()
        assert _optional_libraries(second) == []  # keep_lean before the module's imports
        assert proxy.stop() == 0
    assert procfs.gone(second)


def test_the_children_exit_when_the_service_is_killed(tmp_path) -> None:
    proxy = tools.ProxyProcess(tmp_path / "p")
    try:
        proxy.start()
        assert proxy.pid is not None
        kids = _kids(proxy.pid)
        os.kill(kids[INDEXER_COMM], signal.SIGKILL)  # a zygote's child too
        restarted = wait_until(
            lambda: _restarted(proxy, kids[ZYGOTE_COMM], kids[INDEXER_COMM]), 30, "restarted"
        )
        assert isinstance(restarted, int)
        os.kill(proxy.pid, signal.SIGKILL)  # the service only, not its group
        for pid in (kids[ZYGOTE_COMM], restarted):
            wait_until(lambda pid=pid: procfs.gone(pid), 30, "the orphans to exit")
    finally:
        proxy.kill9()
