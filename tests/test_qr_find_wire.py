"""C-FIND answers on the wire, read by a raw socket peer that checks every
PDU's framing: the answers are written from the association thread
(dicom/find_wire._write_direct) while the DUL thread may write too (an A-ABORT),
so a PDU must never start inside another, and no P-DATA-TF may follow an
A-ABORT.  Two cases on a series of BULK matches: C-CANCEL in the middle of
the stream (the answers stop with 0xFE00, then a clean release), and an
unrecognised PDU in the middle of the stream (the proxy aborts while it is
answering)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_CANCEL_RQ, C_FIND_RQ
from pynetdicom.dimse_primitives import C_CANCEL, C_FIND
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF

from ith_proxy.store.catalog import Catalog
from tests.helpers import associate_rq, bulk_rows
from tests.tools import ProxyProcess

STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BULK = 10000  # more answers than the socket buffers hold
STUDY, SERIES = "1.2.826.0.1.3680043.10.9998.1", "1.2.826.0.1.3680043.10.9998.2"
MAX_PDU = 16384
RCVBUF = 32768  # bytes; the kernel doubles it


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with ProxyProcess(tmp_path_factory.mktemp("qr-wire") / "p") as proxy:
        rows = bulk_rows("ITH-WIRE", STUDY, SERIES, "1.2.826.0.1.3680043.10.9998.3", BULK)
        cat = Catalog(Path(proxy.spool) / "catalog.sqlite3")
        try:
            cat.record_instances(rows)
        finally:
            cat.close()
        yield proxy


def _find_rq() -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY, SERIES, ""
    primitive = C_FIND()
    primitive.MessageID, primitive.AffectedSOPClassUID, primitive.Priority = 1, STUDY_ROOT, 2
    primitive.Identifier = BytesIO(encode(ds, True, True))
    msg = C_FIND_RQ()
    msg.primitive_to_message(primitive)
    return b"".join(P_DATA_TF(p).encode() for p in msg.encode_msg(1, MAX_PDU))


def _cancel_rq() -> bytes:
    primitive = C_CANCEL()
    primitive.MessageIDBeingRespondedTo = 1
    msg = C_CANCEL_RQ()
    msg.primitive_to_message(primitive)
    return b"".join(P_DATA_TF(p).encode() for p in msg.encode_msg(1, MAX_PDU))


def _exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


@dataclass
class Wire:
    """What the peer read, PDU by PDU, every framing rule checked."""

    kinds: list[int] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # of each complete command set
    command: bytearray = field(default_factory=bytearray)

    def read_pdu(self, sock: socket.socket) -> int:
        kind, reserved, length = struct.unpack(">BBI", _exact(sock, 6))
        assert kind in (0x02, 0x04, 0x06, 0x07), f"PDU type 0x{kind:02X}: not a PDU start"
        assert reserved == 0 and length <= MAX_PDU, (kind, reserved, length)
        body = _exact(sock, length)
        self.kinds.append(kind)
        if kind == 0x04:
            self._pdvs(body)
        return kind

    def _pdvs(self, body: bytes) -> None:
        at = 0
        while at < len(body):
            assert len(body) - at >= 6, "a PDV header cut by the PDU's end"
            size, context, header = struct.unpack(">IBB", body[at : at + 6])
            assert size >= 2 and at + 4 + size <= len(body), "PDV length beyond the PDU"
            assert context == 1 and header <= 3, (context, header)
            value = body[at + 6 : at + 4 + size]
            if header & 1:  # command fragment
                self.command += value
                if header & 2:  # the last one
                    cmd = decode(BytesIO(bytes(self.command)), True, True, False)
                    self.statuses.append(int(cmd.Status))
                    self.command.clear()
            at += 4 + size


def _open(proxy: ProxyProcess) -> tuple[socket.socket, Wire]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # a small receive window: the proxy's writes fill the buffers and wait for
    # this peer long before the BULK answers are all out, however fast it
    # answers, so the cancel and the abort always land in the middle
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", proxy.dicom_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(associate_rq(STUDY_ROOT, IMPLICIT, b"QRTEST", MAX_PDU))
    wire = Wire()
    assert wire.read_pdu(sock) == 0x02  # A-ASSOCIATE-AC
    wire.kinds.clear()
    sock.sendall(_find_rq())
    return sock, wire


def test_cancel_in_the_middle_of_the_answers(proxy: ProxyProcess) -> None:
    sock, wire = _open(proxy)
    try:
        while len(wire.statuses) < 50:
            assert wire.read_pdu(sock) == 0x04
        sock.sendall(_cancel_rq())
        while not wire.statuses or wire.statuses[-1] == 0xFF00:
            assert wire.read_pdu(sock) == 0x04
        assert wire.statuses[-1] == 0xFE00  # Cancel
        assert set(wire.statuses[:-1]) == {0xFF00}
        assert 50 <= len(wire.statuses) - 1 < BULK
        sock.sendall(bytes([0x05, 0]) + struct.pack(">I", 4) + bytes(4))  # A-RELEASE-RQ
        assert wire.read_pdu(sock) == 0x06  # A-RELEASE-RP, after every answer
    finally:
        sock.close()


def test_abort_in_the_middle_of_the_answers(proxy: ProxyProcess) -> None:
    """An unrecognised PDU while answers stream: the DUL thread writes an
    A-ABORT while the association thread writes answers.  Every PDU read is
    whole, and none follows the A-ABORT."""
    sock, wire = _open(proxy)
    try:
        while len(wire.statuses) < 50:
            assert wire.read_pdu(sock) == 0x04
        sock.sendall(bytes([0x0F, 0]) + struct.pack(">I", 4) + bytes(4))  # no such PDU type
        while wire.read_pdu(sock) != 0x07:  # until the A-ABORT
            pass
        sock.shutdown(socket.SHUT_WR)  # the proxy closes once it sees our end
        while True:
            try:
                kind = wire.read_pdu(sock)
            except EOFError:
                break
            assert kind == 0x07, f"PDU type 0x{kind:02X} after the A-ABORT"
        assert set(wire.statuses) <= {0xFF00}
        assert 50 <= len(wire.statuses) < BULK
    finally:
        sock.close()
