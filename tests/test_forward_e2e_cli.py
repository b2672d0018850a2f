"""Forwarding end to end (issue 8), continued: retention only after every
destination acknowledged a study, the free-disk watermark while forwarding is
stuck, ``retrieve`` from Orthanc by C-MOVE, and the one-line answers of
``echo``, ``send`` and ``requeue``. A real proxy process and a real Orthanc.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt

import dicomgen
import tools
from forward_e2e import (
    config,
    destination,
    dicom_node,
    one_line_error,
    proxy_sops,
    running,
    store,
    studies,
    study_files,
    summary,
    wait_destination,
    wait_new_study,
    wait_state,
    web_node,
)
from helpers import catalog_study, find_bytes, original_to_anonymized_sop, wait_indexed, wait_until
from orthanc import OrthancProcess


@contextmanager
def closing_server(server: Any) -> Iterator[None]:
    try:
        yield
    finally:
        server.shutdown()


def _sent(result, study: str, node: str) -> None:
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == f"queued study {study} for {node}; the running proxy sends it\n"


def test_retention_purges_only_what_every_destination_acknowledged_and_the_watermark_refuses(
    tmp_path: Path,
) -> None:
    kept_src = dicomgen.make_small_series(tmp_path / "kept", 4)
    gone_src = dicomgen.make_small_series(tmp_path / "gone", 3)
    new_src = dicomgen.make_small_series(tmp_path / "new", 2)
    with running(OrthancProcess(tmp_path / "pacs")) as pacs:
        nodes = (dicom_node("pacs", pacs.dicom_port), dicom_node("dead", tools.free_port(), "DEAD"))
        spool = "[spool]\nretention_hours = 0.0003\nmin_free_mb = {}\n"  # 1.08 s
        proxy = tools.ProxyProcess(
            tmp_path / "p", config_text=config("none", *nodes, extra=spool.format(0))
        )
        with proxy:
            store(proxy, kept_src.files)
            kept = wait_new_study(proxy, set())
            store(proxy, gone_src.files)
            gone = wait_new_study(proxy, {kept})
            for study in (kept, gone):  # no [forward] destinations: they wait for an operator
                assert wait_state(proxy, study, ("complete",))["destinations"] == []
            # kept: acknowledged by pacs, never by dead (nothing listens there)
            _sent(proxy.cli("send", kept, "dead"), kept, "dead")
            _sent(proxy.cli("send", kept, "pacs"), kept, "pacs")
            wait_destination(proxy, kept, "pacs", "delivered", lambda d: d["state"] == "delivered")
            wait_destination(proxy, kept, "dead", "tried", lambda d: d["attempts"] >= 1)
            kept_files = study_files(proxy, kept)
            # gone: acknowledged by its only destination after kept was, then purged
            _sent(proxy.cli("send", gone, "pacs"), gone, "pacs")
            purged = wait_until(
                lambda: (data := summary(proxy, gone)).get("purged_at") and data, 60, "the purge"
            )
            kept_data = summary(proxy, kept)
            assert isinstance(purged, dict)
            assert study_files(proxy, gone) == []
            assert [p.name for p in (proxy.spool / "studies" / gone).iterdir()] == ["study.json"]
            assert (purged["state"], purged["instance_count"]) == ("forwarded", 3)
            tombstone = purged["tombstone"]
            uid_at = tombstone["fields"].index("sop_instance_uid")
            tomb_sops = {row[uid_at] for row in tombstone["instances"]}
            assert len(tomb_sops) == 3 and tomb_sops == pacs.sop_instance_uids(gone)
            row = catalog_study(proxy.spool, gone)
            assert row is not None and row["purged_at"] == purged["purged_at"]
            assert "purged" in [e["event"] for e in purged["events"]]
            # kept's pacs delivery is older than gone's, but dead never acknowledged it
            assert (
                destination(kept_data, "pacs")["delivered_at"]
                < destination(purged, "pacs")["delivered_at"]
            )
            assert (kept_data["state"], kept_data["purged_at"]) == ("forwarding", None)
            assert destination(kept_data, "dead")["state"] == "pending"
            assert len(kept_files) == 4 and study_files(proxy, kept) == kept_files
            tried = destination(summary(proxy, kept), "dead")["attempts"]

        # The disk watermark above the free space: while forwarding is stuck,
        # new stores are refused (0xA700) and nothing unforwarded is removed.
        proxy.config_path.write_text(config("none", *nodes, extra=spool.format(999_999_999)))
        with proxy:
            refused = tools.storescu(proxy.dicom_port, new_src.files, extra=["-nh"])
            assert [r.status for r in tools.parse_storescu(refused)] == [
                "Refused: OutOfResources"
            ] * 2
            # a forwarder attempt and a scheduler pass (retention included) since the restart
            wait_destination(proxy, kept, "dead", "retried", lambda d: d["attempts"] > tried)
            assert studies(proxy) == {kept, gone}
            assert study_files(proxy, kept) == kept_files
            assert proxy_sops(proxy, kept) == pacs.sop_instance_uids(kept)
            assert summary(proxy, kept)["purged_at"] is None
            assert not list((proxy.spool / "incoming").iterdir())


def test_retrieve_pulls_a_study_from_orthanc_and_it_arrives_anonymized(tmp_path: Path) -> None:
    src = dicomgen.make_small_series(tmp_path / "src", 4)
    proxy = tools.ProxyProcess(tmp_path / "p")  # its ports are chosen: Orthanc must know them
    orthanc = OrthancProcess(
        tmp_path / "pacs", modalities={"PROXY": ("DICOMRCV", "127.0.0.1", proxy.dicom_port)}
    )
    with running(orthanc) as pacs:
        for f in src.files:
            pacs.upload(f)
        assert pacs.sop_instance_uids() == set(src.sop_uids)
        proxy.config_path.write_text(config("none", dicom_node("pacs", pacs.dicom_port)))
        with proxy:
            missing = one_line_error(proxy.cli("retrieve", "pacs", "1.2.3.4"))
            assert missing == (
                "ith-proxy: retrieve from pacs: unable to process (0xC000)"
                " (0 completed, 0 failed, 0 warning)"
            )
            result = proxy.cli("retrieve", "pacs", src.study_uid)
            assert (result.returncode, result.stderr) == (0, ""), result.stderr
            assert result.stdout == (
                "retrieved study from pacs: 4 completed, 0 failed, 0 warning;"
                " it is ingested as it arrives\n"
            )
            wait_indexed(proxy.spool, 4)
            study = wait_new_study(proxy, set())
            data = wait_state(proxy, study, ("complete",))
            sops = proxy_sops(proxy, study)
    assert (data["instance_count"], data["destinations"]) == (4, [])
    assert study != src.study_uid and len(sops) == 4 and sops.isdisjoint(src.sop_uids)
    # nothing identifying in studies/: files and study.json alike
    assert find_bytes(proxy.spool / "studies", src.leak_strings()) == []
    assert src.patient_name.split("^")[0] in src.leak_strings()
    # the vault maps each original instance to the stored one
    mapping = original_to_anonymized_sop(proxy.workdir)
    assert set(mapping) == set(src.sop_uids) and set(mapping.values()) == sops


def test_echo_send_and_requeue_answer_in_one_line(tmp_path: Path) -> None:
    dead = tools.free_port()
    # a peer that accepts the association and answers C-ECHO with 0x0110
    # (Processing failure): found `echo` ending in a traceback
    failing = AE(ae_title="FAILING")
    failing.add_supported_context("1.2.840.10008.1.1")  # Verification
    failing_port = tools.free_port()
    server = failing.start_server(
        ("127.0.0.1", failing_port),
        block=False,
        evt_handlers=[(evt.EVT_C_ECHO, lambda event: 0x0110)],
    )
    with running(OrthancProcess(tmp_path / "pacs")) as pacs, closing_server(server):
        port = pacs.dicom_port
        ini = config(
            "none",
            dicom_node("pacs", port),
            dicom_node("dead", dead, "DEAD"),
            dicom_node("failing", failing_port, "FAILING"),
            dicom_node("wrongae", port, "NOTORTHANC"),
            web_node("web", "http://127.0.0.1:9/dicom-web"),
        )
        with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
            ok = proxy.cli("echo", "pacs")
            assert (ok.returncode, ok.stderr) == (0, "")
            assert ok.stdout == f"echo pacs: ok (ORTHANC@127.0.0.1:{port})\n"
            assert proxy.cli("echo", "PACS").returncode == 0  # names in any case
            errors = {
                args: one_line_error(proxy.cli(*args))
                for args in (
                    ("echo", "dead"),
                    ("echo", "wrongae"),
                    ("echo", "failing"),
                    ("echo", "nosuch"),
                    ("echo", "web"),
                    ("send", "1.2.3.4", "pacs"),
                    ("send", "1.2.3.4", "nosuch"),
                    ("send", "not-a-uid", "pacs"),
                    ("requeue", "1.2.3.4"),
                    ("retrieve", "nosuch", "1.2.3.4"),
                    ("retrieve", "dead", "1.2.3.4"),
                    ("retrieve", "pacs", "1.2.3.4"),  # this Orthanc does not know the proxy
                )
            }
    assert errors == {
        ("echo", "dead"): (
            f"ith-proxy: echo dead (DEAD@127.0.0.1:{dead}): connection refused by 127.0.0.1:{dead}"
        ),
        ("echo", "wrongae"): (
            f"ith-proxy: echo wrongae (NOTORTHANC@127.0.0.1:{port}): association rejected"
            " permanently by the Service User: Called AE title not recognised"
        ),
        ("echo", "failing"): (
            f"ith-proxy: echo failing (FAILING@127.0.0.1:{failing_port}):"
            " C-ECHO answered with status 0x0110"
        ),
        ("echo", "nosuch"): "ith-proxy: unknown node 'nosuch' (see docs/nodes.md)",
        ("echo", "web"): "ith-proxy: node web is a DICOMweb node: this command speaks DICOM",
        ("send", "1.2.3.4", "pacs"): "ith-proxy: send 1.2.3.4: unknown study",
        ("send", "1.2.3.4", "nosuch"): "ith-proxy: unknown node 'nosuch' (see docs/nodes.md)",
        ("send", "not-a-uid", "pacs"): "ith-proxy: not a DICOM UID: 'not-a-uid'",
        ("requeue", "1.2.3.4"): "ith-proxy: requeue 1.2.3.4: unknown study",
        ("retrieve", "nosuch", "1.2.3.4"): "ith-proxy: unknown node 'nosuch' (see docs/nodes.md)",
        ("retrieve", "dead", "1.2.3.4"): (
            f"ith-proxy: retrieve from dead: connection refused by 127.0.0.1:{dead}"
        ),
        ("retrieve", "pacs", "1.2.3.4"): (
            "ith-proxy: retrieve from pacs: the peer aborted the association during the C-MOVE"
            " (a peer that does not know the calling AE title may do that)"
        ),
    }
