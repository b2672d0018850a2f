"""[scp] workers > 1 (issue 11 prototype): several processes listen on the
DICOM port with SO_REUSEPORT; associations land on all of them; every
instance is indexed; the metrics count all of them; a move of the SCP
through the API reaches every worker; a killed worker comes back (forked by
the zygote)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from pynetdicom import AE

import dicomgen
import procfs
import tokens
import tools
from helpers import wait_indexed, wait_until

TOKEN = tokens.mint()
INI = "[scp]\nworkers = 2\n"


def _pids(ss_args: list[str]) -> set[int]:
    out = subprocess.run(
        [tools.require_tool("ss"), "-Htnp", *ss_args], capture_output=True, text=True, check=True
    ).stdout
    return {int(part.split(",")[0]) for part in out.split("pid=")[1:]}


def _listeners(port: int) -> set[int]:
    return _pids(["-l", f"sport = :{port}"])


def _worker(proxy: tools.ProxyProcess) -> int:
    assert proxy.pid is not None
    found = [c for c in procfs.children(proxy.pid) if procfs.comm(c) == "ith-scp"]
    assert len(found) == 1, found
    return found[0]


def test_two_processes_share_the_port_and_all_instances_are_counted(tmp_path: Path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 12)
    with tools.ProxyProcess(tmp_path / "p", env=tokens.ENV, config_text=INI) as proxy:
        assert proxy.pid is not None
        worker = _worker(proxy)
        kids = sorted(procfs.comm(c) for c in procfs.children(proxy.pid))
        assert kids == ["ith-indexer", "ith-scp", "ith-zygote"]  # the helper: on a backlog
        # the worker listens once it has started, maybe after the service is ready
        wait_until(lambda: _listeners(proxy.dicom_port) == {proxy.pid, worker}, 30, "both listen")
        # 16 associations at once: the kernel spreads them over both sockets
        ae = AE(ae_title="SPREAD")
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification
        assocs = [
            ae.associate("127.0.0.1", proxy.dicom_port, ae_title="DICOMRCV") for _ in range(16)
        ]
        try:
            assert all(a.is_established for a in assocs)
            served = _pids(["state", "established", f"sport = :{proxy.dicom_port}"])
            assert served == {proxy.pid, worker}
        finally:
            for a in assocs:
                a.release()
        # instances sent over four associations at once all arrive, and are counted
        results: list[int] = []
        parts = [series.files[i::4] for i in range(4)]
        threads = [
            threading.Thread(
                target=lambda files=files: results.append(
                    tools.storescu(proxy.dicom_port, files).returncode
                )
            )
            for files in parts
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [0, 0, 0, 0]
        wait_indexed(proxy.spool, 12)

        def counted() -> bool:
            status, body = proxy.api("GET", "/api/config/", token=TOKEN)
            return status == 200 and body["scp"]["instances_received"] == 12

        wait_until(counted, 10, "both processes' instances in the status")
        assert proxy.health()[0] == 200
        assert proxy.stop() == 0
    assert procfs.gone(worker)


def test_a_move_reaches_every_worker_and_a_killed_worker_comes_back(tmp_path: Path) -> None:
    with tools.ProxyProcess(tmp_path / "p", env=tokens.ENV, config_text=INI) as proxy:
        assert proxy.pid is not None
        worker = _worker(proxy)
        new = tools.free_port()
        status, body = proxy.api(
            "PUT", "/api/config/", {"ae_title": "EDGE7", "dicom_port": new}, token=TOKEN
        )
        assert status == 200, body
        wait_until(lambda: _listeners(new) == {proxy.pid, worker}, 10, "both on the new port")
        wait_until(lambda: not _listeners(proxy.dicom_port), 10, "the old port closed")
        assert tools.echoscu(new, aec="EDGE7").returncode == 0
        # kill -9 the worker: health says so, the port still answers, it comes back
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: proxy.health()[0] == 503, 10, "health reports the dead worker")
        assert tools.echoscu(new, aec="EDGE7").returncode == 0

        (zygote,) = [c for c in procfs.children(proxy.pid) if procfs.comm(c) == "ith-zygote"]

        def back() -> int | None:  # forked by the zygote
            again = [c for c in procfs.children(zygote) if procfs.comm(c) == "ith-scp"]
            return again[0] if again and proxy.health()[0] == 200 else None

        second = wait_until(back, 30, "the worker restarted")
        assert isinstance(second, int)
        # the restarted worker applied the moved settings too
        wait_until(lambda: _listeners(new) == {proxy.pid, second}, 30, "both on the new port")
        log = (proxy.spool / "logs" / "main.log").read_text()
        assert "SCP worker 1 exited (code -9); restarting" in log
        wait_until(
            lambda: (
                f"SCP worker 1 (pid {second}) started (zygote)"
                in (proxy.spool / "logs" / "main.log").read_text()
            ),
            30,
            "the restarted worker's log line",
        )
        assert proxy.stop() == 0


def _verification_ae() -> AE:
    ae = AE(ae_title="LIMIT")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    return ae


def test_max_associations_holds_for_every_worker_together(tmp_path: Path) -> None:
    ini = "[scp]\nworkers = 2\nmax_associations = 6\n"
    with tools.ProxyProcess(tmp_path / "p", env=tokens.ENV, config_text=ini) as proxy:
        assert proxy.pid is not None
        worker = _worker(proxy)
        port = proxy.dicom_port
        ae = _verification_ae()
        # six at once, spread over both processes (each holds fewer than six: a limit
        # counted per process alone would admit a seventh)
        for _ in range(5):
            held = [ae.associate("127.0.0.1", port, ae_title="DICOMRCV") for _ in range(6)]
            assert all(a.is_established for a in held)
            if _pids(["state", "established", f"sport = :{port}"]) == {proxy.pid, worker}:
                break
            for a in held:
                a.release()
        else:
            raise AssertionError("the kernel never spread six associations over both processes")
        try:
            extra = ae.associate("127.0.0.1", port, ae_title="DICOMRCV")
            assert extra.is_rejected  # A-ASSOCIATE-RJ: local limit exceeded
            assert proxy.health()[0] == 200  # the limit reached is no fault
            held.pop().release()

            def admitted() -> bool:
                again = ae.associate("127.0.0.1", port, ae_title="DICOMRCV")
                if again.is_established:
                    held.append(again)
                return again.is_established

            wait_until(admitted, 10, "a slot freed by a release")
        finally:
            for a in held:
                a.release()
        assert tools.echoscu(port).returncode == 0
        assert proxy.stop() == 0


def test_a_worker_that_stops_reporting_is_in_health(tmp_path: Path) -> None:
    with tools.ProxyProcess(tmp_path / "p", env=tokens.ENV, config_text=INI) as proxy:
        worker = _worker(proxy)
        assert proxy.health()[0] == 200
        os.kill(worker, signal.SIGSTOP)  # alive, but hung: no report
        try:
            wait_until(lambda: proxy.health()[0] == 503, 15, "health reports the silent worker")
            assert "SCP worker 1 has not reported for" in json.dumps(proxy.health()[1])
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_until(lambda: proxy.health()[0] == 200, 15, "health back once it reports again")
        assert _worker(proxy) == worker  # the same process: it was never restarted
        assert proxy.stop() == 0
