"""The forwarder on real rooms (catalog, spool, outbox) and a real DCMTK
storescp: an instance file that can no longer be read fails only itself,
under its own SOP UID in the ledger, and the others are delivered."""

from __future__ import annotations

from pathlib import Path

import tools
from ith_proxy.config import NodeConfig
from ith_proxy.store.nodes import Nodes
from ith_proxy.workers.forwarder import Forwarder
from outbox_site import Site


def test_an_unreadable_instance_fails_alone_under_its_sop_uid(rooms, tmp_path: Path) -> None:
    site = Site(rooms, tmp_path, destinations=("pacs",))
    study = site.complete(3)
    files = sorted(site.files(study))
    files[1].write_bytes(b"not DICOM any more")  # e.g. damaged on disk after indexing
    broken_sop = files[1].stem
    with tools.StoreSCP(tmp_path / "received") as peer:
        node = NodeConfig("pacs", "dicom", ae_title=peer.aet, host="127.0.0.1", port=peer.port)
        Nodes(rooms.catalog).load_local((node,))
        forwarder = Forwarder(rooms.cfg, rooms.spool, rooms.catalog, clock=site.clock)
        assert forwarder.run_once() == 1
        received = {p.name.split(".", 1)[1] for p in (tmp_path / "received").iterdir()}
    assert received == {f.stem for f in files} - {broken_sop}
    entry = site.entry(study, "pacs")
    assert entry.state == "failed"
    assert entry.attempts == 0  # a permanent outcome, not retries until exhausted
    assert entry.last_error is not None and "1 of 3 instance(s) failed" in entry.last_error
    failed = rooms.catalog.conn.execute(
        "SELECT sop_uid FROM deliveries WHERE result = 'failed'"
    ).fetchall()
    assert failed == [(broken_sop,)]
