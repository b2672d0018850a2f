"""A plain C-STORE served on the DUL thread (ith_proxy/dicom/store_inline.py, issue 11):

- DCMTK storescu's instances are served by the thread that received them
  (pynetdicom's DUL thread, never the association thread), each made durable
  in incoming/ before its Success, under its own bucket name;
- a failure found while the data set arrived (it starts in group 0004)
  answers 0xC000 on that path too, and the association goes on;
- an exception in the SCP's work answers 0xC000 without a traceback on the
  wire or in the log, removes the partial file, and the next instance of the
  same association is stored;
- a peer whose maximum PDU is too small for the packed answer gets
  pynetdicom's fragmented one, still from the DUL thread;
- a request that is not plain (a SOP class pynetdicom serves with no storage
  service here) goes the stock way: `servable` says no.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider

import dicomgen
import tools
from ith_proxy.dicom import scp, store_inline, store_wire
from ith_proxy.dicom.scp import StorageSCP
from worker_rooms import Rooms

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture()
def rooms(tmp_path: Path):
    env = {"DICOM_PORT": str(tools.free_port()), "DICOM_BIND_ADDRESS": "127.0.0.1"}
    rooms = Rooms(tmp_path, "[spool]\nencrypt_incoming = false\n", env)
    yield rooms
    rooms.close()


def _recording(monkeypatch, fail_first: bool = False) -> list[tuple[str, bool]]:
    """scp.store_status wrapped: (thread kind, raised) per call."""
    calls: list[tuple[str, bool]] = []
    real = scp.store_status

    def store(incoming, counters=None, inflow=None):
        thread = threading.current_thread()
        kind = "dul" if isinstance(thread, DULServiceProvider) else thread.name
        if fail_first and not calls:
            calls.append((kind, True))
            raise RuntimeError("1.2.840.99999 Doe^John")  # PHI-looking text: never logged
        calls.append((kind, False))
        return real(incoming, counters, inflow)

    monkeypatch.setattr(scp, "store_status", store)
    return calls


def test_storescu_is_served_on_the_dul_thread(rooms: Rooms, tmp_path: Path, monkeypatch) -> None:
    calls = _recording(monkeypatch)
    series = dicomgen.make_small_series(tmp_path / "in", 5)
    server = StorageSCP(rooms.cfg, rooms.spool)
    server.start()
    try:
        out = tools.storescu(rooms.cfg.scp.port, series.files, aec=rooms.cfg.scp.ae_title)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    assert [r.status for r in tools.parse_storescu(out)] == ["Success"] * 5
    assert calls == [("dul", False)] * 5
    names = rooms.spool.incoming_names()
    assert len(names) == 5
    assert server.counters.snapshot()[0] == 5
    stored = {str(dcmread(rooms.spool.incoming_path(n)).SOPInstanceUID) for n in names}
    assert stored == {str(dcmread(f).SOPInstanceUID) for f in series.files}


def test_a_refusal_and_a_failing_store_answer_c000_and_the_association_goes_on(
    rooms: Rooms, tmp_path: Path, monkeypatch, caplog
) -> None:
    calls = _recording(monkeypatch, fail_first=True)
    series = dicomgen.make_small_series(tmp_path / "in", 3)
    bad = dcmread(series.files[0])
    bad.SOPInstanceUID = "1.2.3.4.5"
    bad.add_new(0x00041130, "CS", "X")  # a DICOMDIR's group: refused while it arrives
    server = StorageSCP(rooms.cfg, rooms.spool)
    server.start()
    caplog.set_level(logging.INFO)
    statuses = []
    try:
        with rooms.scu() as assoc:
            datasets = [dcmread(f) for f in series.files]
            for ds in [datasets[0], bad, *datasets[1:]]:
                statuses.append(assoc.send_c_store(ds).Status)
    finally:
        server.stop()
    # the first raised in the SCP's work, the refused one ran it with its status
    assert statuses == [0xC000, 0xC000, 0x0000, 0x0000]
    assert calls == [("dul", True), ("dul", False), ("dul", False), ("dul", False)]
    assert "C-STORE failed: RuntimeError" in caplog.text
    assert "Doe" not in caplog.text and "Traceback" not in caplog.text
    assert len(rooms.spool.incoming_names()) == 2
    assert not list(rooms.spool.tmp.iterdir())  # the failed one's partial file is gone


def test_only_a_storage_sop_class_is_servable() -> None:
    request = store_wire.StoreRequest(
        {0x0002: CT, 0x0100: 1, 0x0110: 1, 0x0700: 0, 0x0800: 0, 0x1000: "1.2.3"}
    )

    class Acceptor:
        def __init__(self) -> None:
            self.accepted_common_extended: dict = {}

    class Assoc:
        def __init__(self) -> None:
            self._sent_release = False
            self._accepted_cx = {1: object()}
            self.acceptor = Acceptor()

        @staticmethod
        def get_handlers(event):
            return []

    assoc = Assoc()
    assert store_inline.servable(assoc, request, 1)
    assert not store_inline.servable(assoc, request, 3)  # a context not accepted
    verification = store_wire.StoreRequest({**request.fields, 0x0002: "1.2.840.10008.1.1"})
    assert not store_inline.servable(assoc, verification, 1)
    no_priority = store_wire.StoreRequest({k: v for k, v in request.fields.items() if k != 0x0700})
    assert not store_inline.servable(assoc, no_priority, 1)  # stock ignores it: so do we
    assoc._sent_release = True
    assert not store_inline.servable(assoc, request, 1)


def test_a_peer_with_a_tiny_maximum_pdu_gets_its_answer_the_stock_way(
    rooms: Rooms, tmp_path: Path, monkeypatch
) -> None:
    """The packed answer (about 130 bytes) does not fit the peer's 64-byte
    PDUs: the inline path hands pynetdicom the response primitive, which
    fragments it; still served on the DUL thread."""
    calls = _recording(monkeypatch)
    sent: list[int] = []
    stock = store_wire.response_primitive

    def primitive(request, status):
        sent.append(status)
        return stock(request, status)

    monkeypatch.setattr(store_wire, "response_primitive", primitive)
    series = dicomgen.make_small_series(tmp_path / "in", 2)
    server = StorageSCP(rooms.cfg, rooms.spool)
    server.start()
    try:
        answers: list = []

        def on_recv(event) -> None:  # the SCU side: every decoded answer
            cs = event.message.command_set
            answers.append((cs.MessageIDBeingRespondedTo, cs.Status, cs.AffectedSOPInstanceUID))

        with rooms.scu(max_pdu=64, evt_handlers=[(evt.EVT_DIMSE_RECV, on_recv)]) as assoc:
            for msg_id, f in zip((11, 12), series.files, strict=True):
                assert assoc.send_c_store(dcmread(f), msg_id=msg_id).Status == 0
    finally:
        server.stop()
    assert answers == [
        (msg_id, 0, str(dcmread(f).SOPInstanceUID))
        for msg_id, f in zip((11, 12), series.files, strict=True)
    ]
    assert sent == [0, 0] and calls == [("dul", False)] * 2
    assert len(rooms.spool.incoming_names()) == 2
