"""C-STORE command sets by hand (ith_proxy/dicom/store_wire.py, issue 11):

- a plain C-STORE-RQ command set read with struct gives the primitive
  pynetdicom 3.0.4 makes of it (priorities, Move Originator, odd and even
  UIDs); anything else (an unknown or repeated element, a bad length,
  non-ASCII or multi-valued text, another command, no data set, a truncated
  or foreign group) is left to pynetdicom;

- the packed command set is byte for byte what pynetdicom 3.0.4 encodes, for
  odd and even UID lengths, every status the SCP answers and the extreme
  message IDs;
- a response pynetdicom would carry more in (an Error Comment, an Offending
  Element) is left to pynetdicom;
- a real SCP reads each C-STORE-RQ of a pynetdicom SCU by hand and answers
  through the packed path: the SCU decodes success, and the failure the SCP finds (a data set
  that starts in group 0004), with the request's UIDs and message ID.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode

import dicomgen
import tools
from ith_proxy.dicom import store_wire
from ith_proxy.dicom.scp import StorageSCP
from worker_rooms import Rooms

CT = "1.2.840.10008.5.1.4.1.1.2"


def _response(sop_class: str, sop: str, message_id: int, status: int) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    return rsp


def _stock(rsp: C_STORE, context_id: int = 1) -> bytes:
    """The command set PDV pynetdicom 3.0.4 sends for this response."""
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    pdvs = [
        pdv for p in msg.encode_msg(context_id, 16384) for pdv in p.presentation_data_value_list
    ]
    assert len(pdvs) == 1 and pdvs[0][1][0] == 0x03
    assert pdvs[0][1][1:] == encode(msg.command_set, True, True)
    return pdvs[0][1][1:]


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0xB000, 0xC211])
@pytest.mark.parametrize("message_id", [1, 2, 4711, 0xFFFF])
@pytest.mark.parametrize(
    "sop", ["1.2.3", "1.2.34", "2.25." + "9" * 59, "1.2.840.113619.2.55.3.1234567.12"]
)
def test_command_set_is_byte_for_byte_pynetdicoms(status: int, message_id: int, sop: str) -> None:
    for sop_class in (CT, "1.2.840.10008.5.1.4.1.1.12.1"):  # odd and even lengths
        rsp = _response(sop_class, sop, message_id, status)
        assert store_wire._plain(rsp) == _stock(rsp)
        assert store_wire.command_set(sop_class, message_id, status, sop) == _stock(rsp)


def test_a_response_with_more_in_it_is_left_to_pynetdicom() -> None:
    rsp = _response(CT, "1.2.3", 1, 0xC000)
    assert store_wire._plain(rsp) is not None
    rsp.ErrorComment = "something"
    assert store_wire._plain(rsp) is None
    rsp = _response(CT, "1.2.3", 1, 0xC000)
    rsp.OffendingElement = [0x00100010]
    assert store_wire._plain(rsp) is None
    find = C_STORE()  # a request (no MessageIDBeingRespondedTo)
    find.MessageID = 1
    assert store_wire._plain(find) is None


def test_a_real_scp_reads_and_answers_by_hand(tmp_path: Path, monkeypatch) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 3)
    read_by_hand: list[str] = []
    by_hand = store_wire.read_request

    def counted(assoc, msg):
        request = by_hand(assoc, msg)
        if request is not None:
            read_by_hand.append(request.AffectedSOPInstanceUID)
        return request

    monkeypatch.setattr(store_wire, "read_request", counted)
    # Rooms sets the spool and the vault key under tmp_path; the SCP's address:
    env = {"DICOM_PORT": str(tools.free_port()), "DICOM_BIND_ADDRESS": "127.0.0.1"}
    rooms = Rooms(tmp_path, "[spool]\nencrypt_incoming = false\n", env)
    answers: list = []
    packed: list[bool] = []

    def on_recv(event: evt.Event) -> None:  # the SCU side: every decoded answer
        cs = event.message.command_set
        answers.append(
            (cs.MessageIDBeingRespondedTo, cs.Status, cs.AffectedSOPInstanceUID, cs.CommandField)
        )

    try:
        scp = StorageSCP(rooms.cfg, rooms.spool)
        scp.start()
        try:
            with rooms.scu(evt_handlers=[(evt.EVT_DIMSE_RECV, on_recv)]) as assoc:
                datasets = [dcmread(f) for f in series.files]
                for ds, msg_id in zip(datasets, (7, 300, 0xFFFF), strict=True):
                    assert assoc.send_c_store(ds, msg_id=msg_id).Status == 0x0000
                    packed += [
                        getattr(a.dimse, "_ith_store_wire", False)
                        for a in scp.ae.active_associations
                    ]
                bad = dcmread(series.files[0])
                bad.SOPInstanceUID = "1.2.3.4.5"
                bad.add_new(0x00041130, "CS", "X")  # a DICOMDIR's group: refused
                assert assoc.send_c_store(bad, msg_id=9).Status == 0xC000
        finally:
            scp.stop()
        assert packed and all(packed)
        assert [a[0] for a in answers] == [7, 300, 0xFFFF, 9]
        assert [a[1] for a in answers] == [0, 0, 0, 0xC000]
        assert {a[3] for a in answers} == {0x8001}
        assert [a[2] for a in answers] == [ds.SOPInstanceUID for ds in datasets] + ["1.2.3.4.5"]
        assert len(rooms.spool.incoming_names()) == 3
        assert read_by_hand == [a[2] for a in answers]  # every request, the refused one too
    finally:
        rooms.close()


def test_install_is_idempotent() -> None:
    class Dimse:
        maximum_pdu_size = 16384

        def send_msg(self, primitive, context_id):  # pragma: no cover - never reached
            raise AssertionError

    class Assoc:
        dimse = Dimse()

    assoc = Assoc()
    store_wire.install(assoc)
    first = assoc.dimse.send_msg
    store_wire.install(assoc)
    assert assoc.dimse.send_msg is first


# --------------------------------------------------------------------------
# requests: command sets read by hand give pynetdicom's primitive, or None
# --------------------------------------------------------------------------

_PRIMITIVE_FIELDS = (
    "AffectedSOPClassUID",
    "MessageID",
    "Priority",
    "AffectedSOPInstanceUID",
    "MoveOriginatorApplicationEntityTitle",
    "MoveOriginatorMessageID",
)


def _request_bytes(sop: str, message_id: int, priority: int, mover: str | None) -> bytes:
    rq = C_STORE()
    rq.MessageID = message_id
    rq.AffectedSOPClassUID = CT
    rq.AffectedSOPInstanceUID = sop
    rq.Priority = priority
    if mover is not None:
        rq.MoveOriginatorApplicationEntityTitle = mover
        rq.MoveOriginatorMessageID = 3
    rq.DataSet = BytesIO(b"\x08\x00\x05\x00")
    msg = C_STORE_RQ()
    msg.primitive_to_message(rq)
    return encode(msg.command_set, True, True)


def _stock_primitive(raw: bytes) -> C_STORE:
    msg = C_STORE_RQ()
    msg.command_set = decode(BytesIO(raw), True, True)
    msg.context_id = 5
    return msg.message_to_primitive()


@pytest.mark.parametrize("mover", [None, "MOVER", "  PADDED AE  "])
@pytest.mark.parametrize("priority", [0, 1, 2])
@pytest.mark.parametrize("sop", ["1.2.3", "1.2.34", "2.25." + "1" * 59])
def test_a_request_read_by_hand_gives_pynetdicoms_primitive(
    sop: str, priority: int, mover: str | None
) -> None:
    for message_id in (1, 0xFFFF):
        raw = _request_bytes(sop, message_id, priority, mover)
        request = store_wire.parse_store_rq(raw)
        assert request is not None
        assert (request.AffectedSOPClassUID, request.AffectedSOPInstanceUID) == (CT, sop)
        ours, stock = store_wire.store_primitive(request, 5), _stock_primitive(raw)
        for name in _PRIMITIVE_FIELDS:
            assert getattr(ours, name) == getattr(stock, name), name
        assert ours._context_id == stock._context_id == 5
        assert ours.DataSet.getvalue() == b"" and ours._dataset_path is None


def _el(element: int, value: bytes, group: int = 0) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


def _rq(*extra: bytes, skip: tuple[int, ...] = (), **values: bytes) -> bytes:
    parts = {
        0x0002: _el(0x0002, values.get("cls", b"1.2.840.10008.5.1.4.1.1.2\0")),
        0x0100: _el(0x0100, values.get("field", _us(0x0001))),
        0x0110: _el(0x0110, values.get("mid", _us(7))),
        0x0700: _el(0x0700, _us(0)),
        0x0800: _el(0x0800, values.get("dst", _us(0x0001))),
        0x1000: _el(0x1000, values.get("sop", b"1.2.3.4\0")),
    }
    body = b"".join(v for k, v in sorted(parts.items()) if k not in skip) + b"".join(extra)
    return _el(0x0000, struct.pack("<L", len(body))) + body


def test_only_a_plain_request_is_read_by_hand() -> None:
    assert store_wire.parse_store_rq(_rq()) is not None
    odd = [
        _rq(_el(0x0901, _us(1))),  # an element C-STORE-RQ does not have
        _rq(_el(0x0110, _us(8))),  # an element twice
        _rq(mid=struct.pack("<L", 7)),  # a US of 4 bytes
        _rq(sop="1.2.\xe9".encode("latin-1")),  # not ASCII
        _rq(sop=b"1.2.3\\1.2.4"),  # two values
        _rq(sop=b"\0\0"),  # empty once unpadded
        _rq(skip=(0x1000,)),  # no SOP Instance UID
        _rq(field=_us(0x0030)),  # a C-ECHO-RQ
        _rq(dst=_us(0x0101)),  # no data set
        _rq()[:-3],  # truncated
        _rq() + _el(0x0010, b"", group=8),  # another group
        b"",
    ]
    for raw in odd:
        assert store_wire.parse_store_rq(raw) is None
