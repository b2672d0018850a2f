"""The proxy's process tree (issue 11): the service and one indexer child,
nothing else (no multiprocessing resource tracker); the first indexer is
forked, a restarted one exec'd; the indexer's records reach the service's
log files; it alone has the memory ceiling; it exits when the service dies."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import dicomgen
import tools
from helpers import wait_indexed, wait_until

INDEXER_COMM = "ith-indexer"


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def _data_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max data size"):
            return line.split()[3]
    raise AssertionError("no data limit line")


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped (no init in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _log(proxy: tools.ProxyProcess) -> str:
    return (proxy.spool / "logs" / "main.log").read_text()


def test_the_tree_is_the_service_and_one_forked_indexer_whose_logs_arrive(tmp_path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 2)
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        assert proxy.pid is not None
        kids = _children(proxy.pid)
        assert len(kids) == 1, [_cmdline(k) for k in kids]  # no resource tracker
        (indexer,) = kids
        assert _comm(indexer) == INDEXER_COMM
        assert _cmdline(indexer) == _cmdline(proxy.pid)  # forked, not a new interpreter
        assert _children(indexer) == []
        # its own records reach the service's files (it writes none itself)
        wait_until(lambda: f"indexer process {indexer} started (fork)" in _log(proxy), 30, "log")
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_indexed(proxy.spool, 2)
        # the ceiling is the indexer's only
        assert _data_limit(indexer) == str(1024 << 20)
        assert _data_limit(proxy.pid) == "unlimited"
        assert proxy.stop() == 0  # SIGTERM: a clean stop, the indexer with it
    assert _gone(indexer)
    text = _log(proxy)  # its last record too: the listener writes all before it stops
    assert f"indexer process {indexer} stopped" in text
    assert text.index(f"indexer process {indexer} stopped") < text.index(
        "INFO ith_proxy.service [MainThread] stopped"
    )


def test_a_killed_indexer_comes_back_exec_d_and_still_logs(tmp_path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 3)
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        assert proxy.pid is not None
        (first,) = _children(proxy.pid)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: proxy.health()[0] == 503, 10, "health reports the dead indexer")
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0  # still acked

        def restarted() -> int | None:
            kids = [k for k in _children(proxy.pid) if k != first]
            if len(kids) != 1 or proxy.health()[0] != 200:
                return None
            return kids[0] if _comm(kids[0]) == INDEXER_COMM else None  # named once started

        second = wait_until(restarted, 30, "indexer restarted")
        assert isinstance(second, int)
        assert _children(proxy.pid) == [second]
        assert b"ith_proxy.indexer_child" in _cmdline(second)  # a fresh, lean interpreter
        wait_indexed(proxy.spool, 3)
        wait_until(lambda: f"indexer process {second} started (exec)" in _log(proxy), 30, "log")
        assert "indexer process exited (code -9); restarting" in _log(proxy)
        assert _data_limit(second) == str(1024 << 20)
        assert proxy.stop() == 0
    assert _gone(second)


def test_the_indexer_exits_when_the_service_is_killed(tmp_path) -> None:
    proxy = tools.ProxyProcess(tmp_path / "p")
    try:
        proxy.start()
        assert proxy.pid is not None
        (indexer,) = _children(proxy.pid)
        os.kill(proxy.pid, signal.SIGKILL)  # the service only, not its group
        wait_until(lambda: _gone(indexer), 30, "the orphaned indexer to exit")
    finally:
        proxy.kill9()
