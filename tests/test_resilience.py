"""Crashes, restarts, timers, reopened studies and association limits, end to end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from pynetdicom import AE

import dicomgen
import tools
from helpers import (
    catalog_counts,
    catalog_study,
    original_to_anonymized_sop,
    read_header,
    stored_files,
    study_summary,
    vault_records,
    wait_indexed,
    wait_until,
)


def _only_study(spool: Path) -> str:
    studies = [p.name for p in (spool / "studies").iterdir()]
    assert len(studies) == 1
    return studies[0]


def test_kill9_during_send_loses_nothing_acknowledged_and_resend_duplicates_nothing(
    tmp_path: Path,
) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 150, rows=256, cols=256)
    proxy = tools.ProxyProcess(tmp_path / "p", env={"DICOM_STUDY_TIMEOUT": "600"})
    proxy.start()
    log = tmp_path / "storescu.log"
    with open(log, "w") as out:
        sender = subprocess.Popen(
            [
                tools.require_tool("storescu"),
                "-v",
                "-aec",
                "DICOMRCV",
                "127.0.0.1",
                str(proxy.dicom_port),
                *map(str, series.files),
            ],
            stdout=subprocess.DEVNULL,
            stderr=out,
            env=tools.dcmtk_env(),
        )
        wait_until(
            lambda: log.read_text().count("Received Store Response (Success)") >= 40,
            60,
            "40 acknowledged stores",
            interval=0.005,
        )
        proxy.kill9()
        sender.wait(timeout=60)
    output = log.read_text()
    acked = tools.acked_files(output)
    assert 40 <= len(acked) < 150, "the kill must land in the middle of the send"
    assert sender.returncode != 0
    acked_uids = {str(read_header(p).SOPInstanceUID) for p in acked}

    proxy.start()
    wait_indexed(proxy.spool, len(acked))
    mapping = original_to_anonymized_sop(proxy.workdir)
    stored = {p.stem for p in stored_files(proxy.spool)}
    missing = [u for u in acked_uids if u not in mapping or mapping[u] not in stored]
    assert not missing, f"{len(missing)} acknowledged instance(s) lost"

    result = tools.storescu(proxy.dicom_port, series.files)
    assert result.returncode == 0, result.stderr[-2000:]
    wait_indexed(proxy.spool, 150)
    files = stored_files(proxy.spool)
    assert len(files) == 150
    assert {f.stem for f in files} == {
        original_to_anonymized_sop(proxy.workdir)[u] for u in series.sop_uids
    }
    assert catalog_counts(proxy.spool)["instances"] == 150
    assert len({r["sop"] for r in vault_records(proxy.workdir)}) == 150
    assert not list((proxy.spool / "incoming").iterdir())
    # a second full re-send changes nothing
    assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
    wait_indexed(proxy.spool, 150)
    assert len(stored_files(proxy.spool)) == 150
    proxy.stop()


def test_restart_keeps_states_and_timers(tmp_path: Path) -> None:
    timeout = 8
    early = dicomgen.make_ct_series(tmp_path / "a", 2, rows=64, cols=64)
    late = dicomgen.make_ct_series(tmp_path / "b", 3, rows=64, cols=64)
    ini = f"[scheduler]\nstudy_timeout = {timeout}\ninterval = 0.2\n"
    proxy = tools.ProxyProcess(tmp_path / "p", config_text=ini)
    proxy.start()
    assert tools.storescu(proxy.dicom_port, early.files).returncode == 0
    wait_indexed(proxy.spool, 2)
    first = _only_study(proxy.spool)
    wait_until(
        lambda: catalog_study(proxy.spool, first)["state"] == "complete",
        timeout + 10,
        "first study complete",
    )

    assert tools.storescu(proxy.dicom_port, late.files).returncode == 0
    wait_indexed(proxy.spool, 5)
    second = next(s for s in (p.name for p in (proxy.spool / "studies").iterdir()) if s != first)
    last = catalog_study(proxy.spool, second)["last_received"]
    time.sleep(2)
    proxy.stop()
    time.sleep(1)
    proxy.start()
    row = catalog_study(proxy.spool, second)
    assert row["state"] == "receiving"  # the restart did not complete it early
    assert catalog_study(proxy.spool, first)["state"] == "complete"  # nor reopen the other
    done = wait_until(
        lambda: (r := catalog_study(proxy.spool, second))["state"] == "complete" and r,
        timeout + 10,
        "second study complete",
    )
    assert done["last_received"] == last
    # neither lost (it completed) nor restarted from the restart time (not later)
    assert last + timeout <= done["completed_at"] < last + timeout + 3
    summary = wait_until(
        lambda: (s := study_summary(proxy.spool, second)) and s["state"] == "complete" and s,
        10,
        "study.json",
    )
    assert summary["instance_count"] == 3
    proxy.stop()


def test_late_instance_reopens_the_study_under_the_same_pseudonyms(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "a", 3, rows=64, cols=64)
    late = dicomgen.make_ct_series(
        tmp_path / "b", 1, rows=64, cols=64, like=series, series_number=2
    )
    ini = "[scheduler]\nstudy_timeout = 2\ninterval = 0.2\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_indexed(proxy.spool, 3)
        study = _only_study(proxy.spool)
        wait_until(lambda: catalog_study(proxy.spool, study)["state"] == "complete", 15, "complete")
        # re-sending known instances does not reopen
        assert tools.storescu(proxy.dicom_port, series.files[:1]).returncode == 0
        time.sleep(1)
        assert catalog_study(proxy.spool, study)["state"] == "complete"
        assert tools.storescu(proxy.dicom_port, late.files).returncode == 0
        wait_indexed(proxy.spool, 4)
        row = catalog_study(proxy.spool, study)
        assert row["reopened"] == 1 and row["state"] in ("receiving", "complete")
        assert _only_study(proxy.spool) == study
        assert len({str(read_header(f).PatientID) for f in stored_files(proxy.spool)}) == 1
        wait_until(
            lambda: catalog_study(proxy.spool, study)["state"] == "complete", 15, "complete again"
        )
        summary = wait_until(
            lambda: (
                (s := study_summary(proxy.spool, study))
                and s["state"] == "complete"
                and s["instance_count"] == 4
                and s
            ),
            10,
            "summary",
        )
        assert [e["event"] for e in summary["events"]] == [
            "first-received",
            "complete",
            "reopened",
            "complete",
        ]
        assert summary["series_count"] == 2


# --------------------------------------------------------------------------
# associations: limit, port probes, socket options
# --------------------------------------------------------------------------


def _scu() -> AE:
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 10
    return ae


def test_associations_beyond_the_limit_are_rejected_and_server_stays_healthy(
    tmp_path: Path,
) -> None:
    ini = "[scp]\nmax_associations = 2\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        ae = _scu()
        held = [ae.associate("127.0.0.1", proxy.dicom_port, ae_title="DICOMRCV") for _ in range(2)]
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", proxy.dicom_port, ae_title="DICOMRCV")
        assert extra.is_rejected
        echo = tools.echoscu(proxy.dicom_port)
        assert echo.returncode != 0 and "Association Rejected" in echo.stderr
        for a in held:
            a.release()
        wait_until(lambda: tools.echoscu(proxy.dicom_port).returncode == 0, 10, "echo again")
        assert proxy.health()[0] == 200


def test_port_probes_do_not_hold_association_slots(tmp_path: Path) -> None:
    series = [dicomgen.make_ct_series(tmp_path / f"s{i}", 10, rows=64, cols=64) for i in range(2)]
    ini = "[scp]\nmax_associations = 2\nartim_timeout = 1\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        probes = [socket.create_connection(("127.0.0.1", proxy.dicom_port)) for _ in range(6)]
        results: list = [None, None]

        def send(i: int) -> None:
            results[i] = tools.storescu(proxy.dicom_port, series[i].files, aet=f"SENDER{i}")

        senders = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)
        assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
        assert all(len(tools.acked_files(r)) == 10 for r in results)
        for probe in probes:  # closed by the proxy after artim_timeout
            probe.settimeout(5)
            assert probe.recv(1) == b""
            probe.close()
        wait_indexed(proxy.spool, 20)
        assert "nothing sent within" in (proxy.spool / "logs" / "dicom.log").read_text()


def test_accepted_sockets_have_nodelay_and_listen_backlog_is_raised(tmp_path: Path) -> None:
    ini = "[scp]\nmax_associations = 40\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        listing = subprocess.run(
            [tools.require_tool("ss"), "-Hltn", f"sport = :{proxy.dicom_port}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        backlog = int(listing[2])  # Send-Q of a listening socket is its backlog
        assert backlog >= 40
        pid = proxy.pid
        ae = _scu()
        assoc = ae.associate("127.0.0.1", proxy.dicom_port, ae_title="DICOMRCV")
        assert assoc.is_established
        try:
            local_port = assoc.dul.socket.socket.getsockname()[1]
            info = subprocess.run(
                [tools.require_tool("ss"), "-Htni", "-p", f"dport = :{local_port}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert f"pid={pid}" in info, info
            # ss shows no nodelay flag; read it from the proxy side via /proc instead
            assert _server_socket_nodelay(pid, proxy.dicom_port, local_port)
        finally:
            assoc.release()


def _server_socket_nodelay(pid: int, server_port: int, peer_port: int) -> bool:
    """TCP_NODELAY of the proxy's accepted socket, read through a pidfd dup."""
    import os

    target = f"127.0.0.1:{peer_port}"
    listing = subprocess.run(
        [tools.require_tool("ss"), "-Htnp", f"sport = :{server_port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next((ln for ln in listing.splitlines() if target in ln), "")
    fd = int(line.split("fd=")[1].split(")")[0])
    pidfd = os.pidfd_open(pid)
    try:
        dup = socket.socket(fileno=_pidfd_getfd(pidfd, fd))
    finally:
        os.close(pidfd)
    try:
        return dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        dup.detach()


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    sys_pidfd_getfd = 438  # SYS_pidfd_getfd
    new = libc.syscall(sys_pidfd_getfd, pidfd, fd, 0)
    if new < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd failed")
    return new


def test_a_killed_indexer_process_is_restarted(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 3, rows=32, cols=32)
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        children = Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()
        indexers = [c for c in children if Path(f"/proc/{c}/comm").read_text() == "ith-indexer\n"]
        assert len(indexers) == 1
        os.kill(int(indexers[0]), signal.SIGKILL)
        wait_until(lambda: proxy.health()[0] == 503, 10, "health reports the dead indexer")
        assert "indexer is not running" in proxy.health()[1]["problems"]
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0  # still acked
        wait_until(lambda: proxy.health()[0] == 200, 30, "indexer restarted")
        wait_indexed(proxy.spool, 3)
        assert "restarting" in (proxy.spool / "logs" / "error.log").read_text()
