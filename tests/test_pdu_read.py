"""P-DATA-TF PDUs read by hand on the DUL thread (dicom/pdu_read.py, issue 11).

The PDVs of a P-DATA-TF are split as PS3.8 9.3.5.1 frames them, the same
items as pynetdicom's decoder gives; a malformed item aborts the
association, as pynetdicom's decoder does; a real SCP takes every
P-DATA-TF of a data transfer through the hand-made path, several PDVs in one
PDU included, and stores byte-exact instances."""

from __future__ import annotations

import socket
import struct
import threading
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

import dicomgen
import tools
from helpers import associate_rq
from ith_proxy.dicom import pdu_read
from ith_proxy.dicom.scp import StorageSCP
from worker_rooms import Rooms

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


def _pdv(context: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context, control) + data


def _stock_items(body: bytes) -> list[tuple[int, bytes]]:
    pdu = P_DATA_TF()
    pdu.decode(_pdu(4, body))
    return pdu.to_primitive().presentation_data_value_list


@pytest.mark.parametrize(
    "body",
    [
        b"",
        _pdv(1, 3, b"\x08\x00" * 10),
        _pdv(1, 1, b"a" * 7) + _pdv(3, 2, b"") + _pdv(255, 0, b"b" * 16000),
    ],
)
def test_the_items_are_pynetdicoms(body: bytes) -> None:
    mine = pdu_read.split_pdvs(memoryview(body))
    assert mine is not None
    assert [(c, bytes(v)) for c, v in mine] == [(c, bytes(v)) for c, v in _stock_items(body)]


@pytest.mark.parametrize(
    "body",
    [
        struct.pack(">LB", 0, 1),  # no context ID
        struct.pack(">LB", 1, 1),  # no message control header
        _pdv(1, 3, b"abcd")[:-1],  # shorter than its length
        _pdv(1, 3, b"abcd") + b"\x00\x00\x00",  # a cut item header after it
        b"\x00",
    ],
)
def test_a_malformed_item_is_refused(body: bytes) -> None:
    assert pdu_read.split_pdvs(memoryview(body)) is None


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return 0, b""  # closed
        head += chunk
    kind, _, length = struct.unpack(">BBL", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "closed mid-PDU"
        body += chunk
    return kind, body


@pytest.fixture
def scp(tmp_path: Path, monkeypatch):
    """An SCP in this process; ``split`` counts the PDUs read by hand."""
    split: list[int] = []
    stock = pdu_read.split_pdvs

    def counted(body):
        split.append(len(body))
        return stock(body)

    monkeypatch.setattr(pdu_read, "split_pdvs", counted)
    env = {"DICOM_PORT": str(tools.free_port()), "DICOM_BIND_ADDRESS": "127.0.0.1"}
    rooms = Rooms(tmp_path, "[spool]\nencrypt_incoming = false\n", env)
    server = StorageSCP(rooms.cfg, rooms.spool)
    server.start()
    try:
        yield rooms, split
    finally:
        server.stop()
        rooms.close()


def test_a_real_scp_reads_every_data_pdu_by_hand(tmp_path: Path, scp) -> None:
    rooms, split = scp
    series = dicomgen.make_small_series(tmp_path / "in", 3)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT, EXPLICIT)
    assoc = ae.associate("127.0.0.1", rooms.cfg.scp.port, ae_title=rooms.cfg.scp.ae_title)
    assert assoc.is_established
    try:
        for path in series.files:
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    finally:
        assoc.release()
    assert len(rooms.spool.incoming_names()) == 3
    # every P-DATA-TF went the hand-made way: per instance its command's and its data set's
    assert len(split) == 3 * 2


def _store_rq(path: Path, message_id: int, max_pdu: int) -> tuple[list[P_DATA_TF], bytes]:
    """(the P-DATA-TF PDUs of one C-STORE-RQ of ``path``, the data set sent)."""
    ds = dcmread(path)
    primitive = C_STORE()
    primitive.MessageID, primitive.AffectedSOPClassUID = message_id, CT
    primitive.AffectedSOPInstanceUID, primitive.Priority = ds.SOPInstanceUID, 2
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    primitive.DataSet = BytesIO(buf.getvalue())
    msg = C_STORE_RQ()
    msg.primitive_to_message(primitive)
    return [P_DATA_TF(p) for p in msg.encode_msg(1, max_pdu)], buf.getvalue()


def _store_pdus(path: Path, message_id: int, max_pdu: int = 16384) -> tuple[bytes, bytes]:
    """(the P-DATA-TF PDUs of one C-STORE-RQ of ``path``, encoded, the data set sent)."""
    pdus, data = _store_rq(path, message_id, max_pdu)
    return b"".join(p.encode() for p in pdus), data


def test_command_and_data_set_in_one_pdu_and_a_malformed_pdv(tmp_path: Path, scp) -> None:
    rooms, split = scp
    series = dicomgen.make_small_series(tmp_path / "in", 1)
    pdus, data = _store_rq(series.files[0], 5, 1024)
    pdvs = b"".join(p.presentation_data_value_items[0].encode() for p in pdus)
    assert len(pdvs) < 16000  # one PDU of several PDVs: the command's, then the data set's
    with socket.create_connection(("127.0.0.1", rooms.cfg.scp.port), timeout=30) as sock:
        sock.sendall(associate_rq(CT, EXPLICIT, b"RAWPEER"))
        assert _read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(_pdu(4, pdvs))
        kind, body = _read_pdu(sock)
        assert kind == 0x04  # the C-STORE-RSP
        assert struct.pack("<HHLH", 0x0000, 0x0900, 2, 0x0000) in body  # Status: Success
        # then a PDV that has no message control header: A-ABORT, connection closed
        sock.sendall(_pdu(4, struct.pack(">LB", 1, 1)))
        assert _read_pdu(sock)[0] == 0x07
        assert _read_pdu(sock)[0] == 0  # closed
    assert len(split) == 2
    (name,) = rooms.spool.incoming_names()
    stored = rooms.spool.incoming_path(name).read_bytes()
    assert stored.endswith(data)  # the data set byte for byte, after our meta
    assert not list(rooms.spool.tmp.iterdir())


# --- several PDUs per recv (Inbox) ---


def test_the_inbox_never_writes_over_a_view_it_handed_out() -> None:
    """Views taken stay as they were while later bytes arrive (a writer keeps
    them until its chunk is sealed); a PDU longer than a buffer is read
    whole; a buffer read to its end is let go; an end of the connection
    mid-PDU is False."""
    pdus = [_pdu(4, bytes([n]) * size) for n, size in enumerate((5000, 70000, 10, 300000, 16000))]
    ours, peer = socket.socketpair()
    with ours, peer:
        sender = threading.Thread(target=peer.sendall, args=(b"".join(pdus),))
        sender.start()
        inbox, taken = pdu_read.Inbox(), []
        for _ in pdus:
            assert inbox.fill(ours, 6)
            length = struct.unpack(">L", bytes(inbox.buf[inbox.start + 2 : inbox.start + 6]))[0]
            assert inbox.fill(ours, 6 + length)
            taken.append(inbox.take(6 + length))
        sender.join()
        assert [bytes(v) for v in taken] == pdus
        assert not inbox.buf and inbox.held() == 0 and not inbox.complete()
        peer.sendall(_pdu(4, b"x" * 100)[:50])
        peer.shutdown(socket.SHUT_WR)
        assert inbox.fill(ours, 6) and not inbox.complete()
        assert not inbox.fill(ours, 106)


def _answers(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    return [_read_pdu(sock) for _ in range(count)]


def test_pdus_that_arrive_together_are_all_answered(tmp_path: Path, scp) -> None:
    """Two whole C-STOREs (a peer that does not wait for the first answer)
    and the A-RELEASE-RQ behind them, in one send: both are stored and
    answered, and the release, which then waits in the Inbox and not on
    the socket, is answered at once (the reactor must not wait for the
    socket to turn readable, which it never would)."""
    rooms, split = scp
    series = dicomgen.make_small_series(tmp_path / "in", 2, rows=128, cols=128)
    first, data1 = _store_pdus(series.files[0], 1, max_pdu=4096)
    second, data2 = _store_pdus(series.files[1], 2, max_pdu=4096)
    release = _pdu(5, bytes(4))
    with socket.create_connection(("127.0.0.1", rooms.cfg.scp.port), timeout=5) as sock:
        sock.sendall(associate_rq(CT, EXPLICIT, b"RAWPEER"))
        assert _read_pdu(sock)[0] == 0x02
        sock.sendall(first + second + release)
        kinds = _answers(sock, 3)  # a timeout (5 s) here is the stall
        assert [k for k, _ in kinds] == [0x04, 0x04, 0x06]  # two C-STORE-RSPs, A-RELEASE-RP
        for _, body in kinds[:2]:
            assert struct.pack("<HHLH", 0x0000, 0x0900, 2, 0x0000) in body  # Success
        assert _read_pdu(sock)[0] == 0  # then the SCP closes
    stored = sorted(rooms.spool.incoming_path(n).read_bytes() for n in rooms.spool.incoming_names())
    assert len(stored) == 2
    assert any(s.endswith(data1) for s in stored) and any(s.endswith(data2) for s in stored)
    assert len(split) > 10  # the data sets went as many P-DATA-TFs, all split by hand


def test_a_peer_that_sends_a_few_bytes_at_a_time(tmp_path: Path, scp) -> None:
    """PDU headers and bodies cut anywhere across recvs: the same instance."""
    rooms, _ = scp
    series = dicomgen.make_small_series(tmp_path / "in", 1)
    pdus, data = _store_pdus(series.files[0], 7, max_pdu=1024)
    with socket.create_connection(("127.0.0.1", rooms.cfg.scp.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(associate_rq(CT, EXPLICIT, b"RAWPEER"))
        assert _read_pdu(sock)[0] == 0x02
        for at in range(0, len(pdus), 997):  # odd slices: cuts land inside headers too
            sock.sendall(pdus[at : at + 997])
        kind, body = _read_pdu(sock)
        assert kind == 0x04 and struct.pack("<HHLH", 0x0000, 0x0900, 2, 0x0000) in body
        sock.sendall(_pdu(5, bytes(4)))
        assert _read_pdu(sock)[0] == 0x06
    (name,) = rooms.spool.incoming_names()
    assert rooms.spool.incoming_path(name).read_bytes().endswith(data)


def test_a_malformed_pdu_among_held_ones_aborts_and_stores_nothing_after_it(
    tmp_path: Path, scp
) -> None:
    """A P-DATA-TF with a broken PDV item in the middle of one send: the
    association is aborted there; the PDUs held behind it are not read."""
    rooms, _ = scp
    series = dicomgen.make_small_series(tmp_path / "in", 2)
    first, _ = _store_pdus(series.files[0], 1)
    second, _ = _store_pdus(series.files[1], 2)
    broken = _pdu(4, struct.pack(">LB", 1, 1))  # a PDV without its message control header
    with socket.create_connection(("127.0.0.1", rooms.cfg.scp.port), timeout=5) as sock:
        sock.sendall(associate_rq(CT, EXPLICIT, b"RAWPEER"))
        assert _read_pdu(sock)[0] == 0x02
        sock.sendall(first + broken + second)
        kinds = [k for k, _ in _answers(sock, 2)]
        assert kinds == [0x04, 0x07]  # the first answered, then A-ABORT
        assert _read_pdu(sock)[0] == 0  # closed
    assert len(rooms.spool.incoming_names()) == 1
    assert not list(rooms.spool.tmp.iterdir())
