"""Forwarding end to end (issue 8): a real proxy process sends completed studies
to a real Orthanc, by C-STORE and by STOW-RS (its DICOMweb plugin), through
PACS outages, proxy restarts, kill -9 and a permanent rejection that an
operator fixes and requeues.

Every test checks what the PACS holds against the proxy's own files: exactly
the proxy's anonymized SOP Instance UIDs, and none of the originals.
Retention, the disk watermark, ``retrieve`` and the CLI's errors are in
test_forward_e2e_cli.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import dicomgen
import tools
from forward_e2e import (
    attempts_logged,
    config,
    crash,
    destination,
    dicom_node,
    discard,
    events,
    make_fast,
    proxy_sops,
    running,
    slow_orthanc,
    store,
    wait_destination,
    wait_new_study,
    wait_state,
    web_node,
)
from helpers import wait_until
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.outbox import Outbox
from orthanc import OrthancProcess


def _in_order(seen: list[str], wanted: list[str]) -> bool:
    """``wanted`` occurs in ``seen`` in this order (other events may be between)."""
    rest = iter(seen)
    return all(any(e == w for e in rest) for w in wanted)


def test_a_study_is_forwarded_by_c_store_and_by_stow_rs(tmp_path: Path) -> None:
    src = dicomgen.make_small_series(tmp_path / "src", 5)
    with (
        running(OrthancProcess(tmp_path / "pacs")) as pacs,
        running(OrthancProcess(tmp_path / "web", dicomweb=True)) as web,
    ):
        ini = config(
            "pacs, web", dicom_node("pacs", pacs.dicom_port), web_node("web", web.dicomweb_url)
        )
        with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
            store(proxy, src.files)
            study = wait_new_study(proxy, set())
            data = wait_state(proxy, study, ("forwarded", "failed"))
            sops = proxy_sops(proxy, study)
        # each PACS holds exactly the proxy's anonymized instances, under its study UID
        held = {p: (p.sop_instance_uids(study), p.sop_instance_uids()) for p in (pacs, web)}
    assert data["state"] == "forwarded"
    assert len(sops) == 5 and sops.isdisjoint(src.sop_uids) and study != src.study_uid
    assert held[pacs] == (sops, sops) and held[web] == (sops, sops)
    for node in ("pacs", "web"):
        dest = destination(data, node)
        assert (dest["state"], dest["reason"], dest["attempts"], dest["last_error"]) == (
            "delivered",
            "complete",
            0,
            None,
        )
        assert (dest["delivered"], dest["failed"], dest["failures"]) == (5, 0, [])
        assert dest["delivered_at"] >= data["completed_at"] and dest["delivered_at_iso"]
    assert _in_order(
        events(data),
        ["complete", "queued pacs (complete)", "queued web (complete)", "forwarding", "forwarded"],
    )
    assert {"delivered pacs", "delivered web"} <= set(events(data))


@pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
def test_a_pacs_that_dies_during_the_send_gets_the_whole_study_when_it_returns(
    tmp_path: Path, kind: str
) -> None:
    n = 30
    src = dicomgen.make_small_series(tmp_path / "src", n)
    pacs = slow_orthanc(tmp_path / "pacs", dicomweb=kind == "dicomweb").start()
    try:
        if kind == "dicom":
            ini = config("pacs", dicom_node("pacs", pacs.dicom_port))
            refused = f"connection refused by 127.0.0.1:{pacs.dicom_port}"
        else:  # batches of 5: Orthanc dies in the second
            node = web_node("pacs", pacs.dicomweb_url)
            ini = config("pacs", node, forward="stow_batch_instances = 5\n")
            refused = (
                f"cannot connect to http://127.0.0.1:{pacs.http_port}:"
                " ConnectionRefusedError (Connection refused)"
            )
        with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
            store(proxy, src.files)
            study = wait_new_study(proxy, set())
            # C-STORE: each instance is answered before the next goes, so 5 held means
            # 4 answered at least.  STOW-RS: 5 held may be a whole first batch whose
            # answer is still on its way (a kill then leaves nothing acknowledged);
            # a 6th means the second batch went, so the first was answered.
            before = 5 if kind == "dicom" else 6
            wait_until(lambda: pacs.instance_count() >= before, 60, f"Orthanc holding {before}")
            crash(pacs)
            # the broken attempt and one against the dead port are failed attempts;
            # what Orthanc acknowledged before it died is in the ledger
            down = wait_destination(
                proxy, study, "pacs", "failed twice", lambda d: d["attempts"] >= 2
            )
            dest = destination(down, "pacs")
            assert down["state"] == "forwarding" and dest["state"] == "pending"
            acked = dest["delivered"]
            assert 0 < acked < n and dest["failed"] == 0
            if kind == "dicom":
                refused = f"{n - acked} instance(s) not delivered: {refused}"
            assert dest["last_error"] == refused
            make_fast(pacs)
            pacs.start()
            held = pacs.instance_count()
            assert acked <= held < n  # the crash did cut the send short
            data = wait_state(proxy, study, ("forwarded", "failed"))
            sops = proxy_sops(proxy, study)
            logged = attempts_logged(proxy, study, "pacs")
        stored = (pacs.sop_instance_uids(study), pacs.sop_instance_uids())
    finally:
        discard(pacs)
    assert data["state"] == "forwarded"
    dest = destination(data, "pacs")
    assert (dest["state"], dest["last_error"], dest["delivered"], dest["failed"]) == (
        "delivered",
        None,
        n,
        0,
    )
    assert dest["attempts"] >= 2
    assert len(sops) == n and stored == (sops, sops)
    # the first attempt sent everything; every retry only what the ledger lacked
    assert logged[0] == (n, 1) and len(logged) == dest["attempts"] + 1
    assert [count for count, _ in logged[1:]] == [n - acked] * dest["attempts"]
    assert [attempt for _, attempt in logged] == list(range(1, len(logged) + 1))


def _catalog_destination(proxy: tools.ProxyProcess, study: str, node: str) -> dict:
    """The outbox entry as the catalog has it (the proxy is stopped)."""
    cat = Catalog(proxy.spool / "catalog.sqlite3", readonly=True)
    try:
        return destination({"destinations": Outbox(cat).study_destinations(study)}, node)
    finally:
        cat.close()


def test_a_proxy_restarted_while_the_pacs_is_down_delivers_when_it_returns(tmp_path: Path) -> None:
    src = dicomgen.make_small_series(tmp_path / "src", 4)
    pacs = OrthancProcess(tmp_path / "pacs")  # its ports are chosen; it is down
    try:
        ini = config("pacs", dicom_node("pacs", pacs.dicom_port))
        proxy = tools.ProxyProcess(tmp_path / "p", config_text=ini)
        with proxy:
            store(proxy, src.files)
            study = wait_new_study(proxy, set())
            wait_destination(proxy, study, "pacs", "tried", lambda d: d["attempts"] >= 1)
        before = _catalog_destination(proxy, study, "pacs")
        assert before["state"] == "pending" and before["delivered"] == 0
        assert before["last_error"] == (
            f"4 instance(s) not delivered: connection refused by 127.0.0.1:{pacs.dicom_port}"
        )
        assert len(attempts_logged(proxy, study, "pacs")) == before["attempts"]
        with proxy:
            # the entry survived the restart: it is tried again, still in vain
            wait_destination(
                proxy, study, "pacs", "retried", lambda d: d["attempts"] > before["attempts"]
            )
            pacs.start()
            data = wait_state(proxy, study, ("forwarded", "failed"))
            sops = proxy_sops(proxy, study)
        stored = pacs.sop_instance_uids()
    finally:
        discard(pacs)
    dest = destination(data, "pacs")
    assert (data["state"], dest["state"], dest["last_error"], dest["delivered"]) == (
        "forwarded",
        "delivered",
        None,
        4,
    )
    assert dest["attempts"] > before["attempts"]
    assert len(sops) == 4 and stored == sops
    # an outage logs each failed attempt once, not once per instance of the study
    # (found error.log growing by one line per instance at every retry)
    errors = (proxy.spool / "logs" / "error.log").read_text()
    assert not [sop for sop in sops if sop in errors]
    assert (
        errors.count(f"study {study} to pacs: pending (4 instance(s) not delivered")
        == (dest["attempts"])
    )


def test_the_catalog_opens_in_many_threads_at_once(tmp_path: Path) -> None:
    """At start-up the scheduler and forwarder threads and the indexer open the
    catalog together, on a file without its WAL yet. Found by the test above:
    the forwarder thread sometimes died of BusyError there (the busy timeout
    was set after the journal_mode pragma), and the proxy never forwarded
    again until the next restart."""
    path = tmp_path / "catalog.sqlite3"
    Catalog(path).close()
    errors: list[str] = []

    def open_close(barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            Catalog(path).close()
        except Exception as exc:  # the failure under test, whatever its type
            errors.append(type(exc).__name__)

    for _ in range(40):  # each round starts from a closed catalog (no -wal file)
        barrier = threading.Barrier(4)
        threads = [threading.Thread(target=open_close, args=(barrier,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_kill_9_during_a_forward_then_a_restart_delivers_every_instance_once_more(
    tmp_path: Path,
) -> None:
    n = 48  # the ledger is written every 32 outcomes (workers/forwarder.py LEDGER_BATCH)
    src = dicomgen.make_small_series(tmp_path / "src", n)
    pacs = slow_orthanc(tmp_path / "pacs").start()
    try:
        ini = config("pacs", dicom_node("pacs", pacs.dicom_port))
        proxy = tools.ProxyProcess(tmp_path / "p", config_text=ini)
        with proxy:
            store(proxy, src.files)
            study = wait_new_study(proxy, set())
            wait_destination(proxy, study, "pacs", "32 recorded", lambda d: d["delivered"] >= 32)
            held = pacs.instance_count()
            assert held <= n - 4, f"the send ended before the kill ({held} of {n} stored)"
            proxy.kill9()
            assert proxy.returncode == -9
            assert _catalog_destination(proxy, study, "pacs")["delivered"] == 32
            proxy.start()
            data = wait_state(proxy, study, ("forwarded", "failed"))
            sops = proxy_sops(proxy, study)
            logged = attempts_logged(proxy, study, "pacs")
        stored = (pacs.sop_instance_uids(), pacs.instance_count())
    finally:
        discard(pacs)
    dest = destination(data, "pacs")
    assert (data["state"], dest["state"], dest["attempts"], dest["delivered"]) == (
        "forwarded",
        "delivered",
        0,
        n,
    )
    # the restart resumed from the ledger: what was sent but not recorded went
    # again (at least once), with the same UIDs, and the PACS holds each once
    assert logged == [(n, 1), (n - 32, 1)]
    assert len(sops) == n and stored == (sops, n)


def test_a_permanent_rejection_is_dead_lettered_and_a_requeue_delivers_it(tmp_path: Path) -> None:
    src = dicomgen.make_small_series(tmp_path / "src", 3)
    with running(OrthancProcess(tmp_path / "pacs")) as pacs:  # DicomCheckCalledAet: true
        wrong = config("pacs", dicom_node("pacs", pacs.dicom_port, ae_title="NOTORTHANC"))
        proxy = tools.ProxyProcess(tmp_path / "p", config_text=wrong)
        with proxy:
            store(proxy, src.files)
            study = wait_new_study(proxy, set())
            failed = wait_state(proxy, study, ("failed", "forwarded"))
            status = proxy.cli("status")
        dest = destination(failed, "pacs")
        assert failed["state"] == "failed"
        assert (dest["state"], dest["attempts"], dest["delivered"], dest["next_at"]) == (
            "failed",
            0,
            0,
            None,
        )
        why = "association rejected permanently by the Service User: Called AE title not recognised"
        assert dest["last_error"] == f"3 of 3 instance(s) failed: {why} (x3)"
        assert dest["failed"] == 3 and {f["reason"] for f in dest["failures"]} == {why}
        assert "failed pacs" in events(failed)
        assert status.returncode == 0 and "forwarded 0, failed 1\n" in status.stdout
        assert pacs.instance_count() == 0
        # the operator fixes the node, restarts the proxy and requeues the study
        proxy.config_path.write_text(config("pacs", dicom_node("pacs", pacs.dicom_port)))
        with proxy:
            result = proxy.cli("requeue", study)
            assert (result.returncode, result.stderr) == (0, "")
            assert result.stdout == f"requeued study {study} for pacs; the running proxy sends it\n"
            data = wait_state(proxy, study, ("forwarded",))
            sops = proxy_sops(proxy, study)
        held = pacs.sop_instance_uids()
    dest = destination(data, "pacs")
    assert (dest["state"], dest["reason"], dest["attempts"], dest["last_error"]) == (
        "delivered",
        "requeue",
        0,
        None,
    )
    assert _in_order(events(data), ["failed pacs", "failed", "requeued pacs", "delivered pacs"])
    assert len(sops) == 3 and held == sops
