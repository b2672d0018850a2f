"""In-flow control (dicom/inflow.py): a C-STORE success is answered late
while incoming/ holds more than [scp] in_flow_backlog files and the indexer
is draining it; never while it is not draining, never longer than
[scp] in_flow_delay.  The gate counts a real spool's incoming/ here, and a
real proxy paces a real storescu."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import dicomgen
import procfs
import tools
from helpers import wait_indexed, wait_until
from ith_proxy.dicom import inflow
from ith_proxy.dicom.inflow import InFlow
from ith_proxy.store.spool import Spool

PACED = "C-STORE answers are paced"


def _spool(tmp_path: Path, files: int) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    for _ in range(files):
        spool.deliver_incoming(b"raw")
    return spool


def _take(spool: Spool, n: int) -> None:
    """What the indexer does: remove ``n`` files from incoming/."""
    spool.remove_incoming(spool.incoming_names()[:n])


def _seen_draining(spool: Spool, gate: InFlow) -> None:
    """Let the gate count, take one file, let it count again: it has seen
    incoming/ shrink."""
    gate.wait()
    _take(spool, 1)
    time.sleep(inflow.REFRESH * 2)


def test_no_pause_under_the_backlog_limit(tmp_path) -> None:
    spool = _spool(tmp_path, 5)
    gate = InFlow(spool.incoming_count, 8, 2.0)
    _seen_draining(spool, gate)
    assert gate.wait() == 0.0 and gate.paced == 0


def test_no_pause_while_the_indexer_is_not_draining(tmp_path) -> None:
    spool = _spool(tmp_path, 20)  # over the limit, but nothing ever leaves incoming/
    gate = InFlow(spool.incoming_count, 4, 2.0)
    for _ in range(3):
        assert gate.wait() == 0.0
        time.sleep(inflow.REFRESH * 2)
    assert gate.paced == 0


def test_paced_until_the_backlog_is_under_the_limit(tmp_path) -> None:
    spool = _spool(tmp_path, 20)
    gate = InFlow(spool.incoming_count, 4, 10.0)
    _seen_draining(spool, gate)  # 19 left

    def indexer() -> None:
        for _ in range(15):  # 19 -> 4, one file every 20 ms
            time.sleep(0.02)
            _take(spool, 1)

    drain = threading.Thread(target=indexer)
    drain.start()
    waited = gate.wait()
    left = spool.incoming_count()
    drain.join()
    assert 0.1 < waited < 10.0, waited  # paced, and not to the cap
    assert left <= 4  # it let the answer go once the backlog was at the limit
    assert gate.paced == 1 and gate.delayed == waited


def test_a_pause_never_exceeds_in_flow_delay(tmp_path) -> None:
    spool = _spool(tmp_path, 20)
    gate = InFlow(spool.incoming_count, 4, 0.2)
    _seen_draining(spool, gate)
    waited = gate.wait()  # still draining (shrank < STALL ago), still over the limit
    assert 0.2 <= waited < inflow.STALL, waited


def test_pacing_stops_when_the_indexer_stops_draining(tmp_path) -> None:
    spool = _spool(tmp_path, 20)
    gate = InFlow(spool.incoming_count, 4, 10.0)
    _seen_draining(spool, gate)  # then nothing more leaves incoming/
    waited = gate.wait()
    assert inflow.STALL * 0.8 < waited < 10.0, waited  # released by the stall, not the cap
    assert gate.wait() == 0.0  # and the next answers go at once


def test_zero_turns_it_off(tmp_path) -> None:
    spool = _spool(tmp_path, 20)
    for backlog, delay in ((0, 1.0), (4, 0.0)):
        gate = InFlow(spool.incoming_count, backlog, delay)
        _seen_draining(spool, gate)
        assert not gate.enabled and gate.wait() == 0.0


def test_one_log_line_with_counts_only(tmp_path, caplog) -> None:
    spool = _spool(tmp_path, 20)
    gate = InFlow(spool.incoming_count, 4, 0.05)
    _seen_draining(spool, gate)
    with caplog.at_level(logging.INFO, logger="ith_proxy.dicom"):
        gate.wait()
        gate.wait()
    lines = [r.getMessage() for r in caplog.records if PACED in r.getMessage()]
    assert gate.paced == 2 and len(lines) == 1  # at most one a minute
    assert lines[0].startswith("incoming/ holds 19 files, over [scp] in_flow_backlog = 4")


def test_the_count_error_never_fails_a_store(tmp_path) -> None:
    spool = _spool(tmp_path, 3)
    gate = InFlow(spool.incoming_count, 1, 1.0)
    os.rename(spool.incoming, tmp_path / "elsewhere")  # scandir now fails
    assert gate.wait() == 0.0


# --- a real proxy, a real storescu ---

INI = "[scp]\nin_flow_backlog = {backlog}\nin_flow_delay = {delay}\n"


def _dicom_log(proxy: tools.ProxyProcess) -> str:
    return (proxy.spool / "logs" / "dicom.log").read_text()


def test_a_real_sender_is_paced_and_everything_is_indexed(tmp_path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 150)
    ini = INI.format(backlog=1, delay=1)
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_indexed(proxy.spool, 150)
        assert PACED in _dicom_log(proxy)


def test_a_stopped_indexer_does_not_slow_the_sender(tmp_path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 40)
    ini = INI.format(backlog=1, delay=5)
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        assert proxy.pid is not None
        indexer = next(k for k in procfs.children(proxy.pid) if procfs.comm(k) == "ith-indexer")
        os.kill(indexer, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
            # 40 answers paced 5 s each would take 200 s
            assert time.monotonic() - started < 100
            assert len(list((proxy.spool / "incoming").iterdir())) == 40  # all acknowledged
            assert PACED not in _dicom_log(proxy)
        finally:
            os.kill(indexer, signal.SIGCONT)
        wait_indexed(proxy.spool, 40)
        wait_until(lambda: not list((proxy.spool / "incoming").iterdir()), 30, "drained")
