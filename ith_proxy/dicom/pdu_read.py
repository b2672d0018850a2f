"""PDUs read by hand on the DUL thread: length bounded, P-DATA-TF split (pynetdicom 3.0.4 only).

Stock 3.0.4 reads every PDU in ``DULServiceProvider._read_pdu_data``: the
body in 4 KiB ``recv`` calls, each appended to a growing bytearray, then
decoded into a ``P_DATA_TF`` object with one ``PresentationDataValueItem``
per fragment (each value copied to ``bytes``); it queues event Evt10 and the
PDU, and the reactor's next pass runs the state machine, whose action DT-2
turns the PDU into a ``P_DATA`` primitive and hands it to
``dimse.receive_primitive``, on the same thread.  A 200-slice CT at the
default maximum PDU of 16 KiB is 6,400 such PDUs.

``install(assoc, max_pdu)`` replaces ``_read_pdu_data`` for one acceptor
association: every PDU it gets is read here.  Stock pynetdicom reads a whole
PDU into memory before decoding it, trusting the 4-byte length the peer
sends; here a PDU longer than the maximum PDU length we announced
(``max_pdu``, for P-DATA) or than ``MAX_OTHER_PDU`` (association
negotiation) closes the connection before its body is read.

A P-DATA-TF that arrives in Sta6 (data transfer: DT-2's only state, which
it leaves as it is) is read into one buffer with
``recv_into``, split into its PDVs as memoryviews (PS3.8 9.3.5.1), and
given to ``dimse.receive_primitive`` at once: the call DT-2 makes.  A
fresh buffer per PDU, so a writer may keep views of earlier fragments.
Every other PDU, and every PDU of an association with an ``EVT_DATA_RECV``
or ``EVT_PDU_RECV`` handler (it wants pynetdicom's objects), goes through
stock's own steps, the header being already read.  Errors map as stock's
do: a connection that fails or ends mid-PDU, or a PDU longer than we allow,
is Evt17 (as a dropped connection); an unknown PDU type or a
malformed PDV item is Evt19, and the association is aborted.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pynetdicom import evt

log = logging.getLogger("ith_proxy.dicom")

_HEAD = struct.Struct(">BBL")
_ITEM = struct.Struct(">LB")  # PDV item: length, presentation context ID
_P_DATA_TF = 0x04
_KNOWN = frozenset(range(0x01, 0x08))
MAX_OTHER_PDU = 1 << 20  # A-ASSOCIATE-RQ & co (many contexts may pass 16 KiB)


class PData:
    """What DT-2 hands on (a ``P_DATA`` primitive's one field): (context ID,
    message control header + fragment) per PDV."""

    __slots__ = ("presentation_data_value_list",)

    def __init__(self, pdvs: list[tuple[int, memoryview]]) -> None:
        self.presentation_data_value_list = pdvs


def split_pdvs(body: memoryview) -> list[tuple[int, memoryview]] | None:
    """The PDV items of a P-DATA-TF body, or None when one is malformed (an
    item shorter than its header or its length, or with no control header)."""
    pdvs, offset, end = [], 0, len(body)
    while offset < end:
        if end - offset < 6:
            return None
        length, context_id = _ITEM.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            return None
        pdvs.append((context_id, body[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return pdvs


def _recv_exact(sock: Any, n: int) -> bytearray | None:
    """``n`` bytes from the socket, or None if the connection ends first."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        read = sock.recv_into(view[got:])
        if not read:
            return None
        got += read
    return buf


def install(assoc: Any, max_pdu: int) -> None:
    """Read this association's PDUs by hand (see the module); ``max_pdu`` is
    the maximum PDU length we announced (0: unlimited, as configured)."""
    dul = assoc.dul
    limit = max(max_pdu, MAX_OTHER_PDU) if max_pdu else 0

    def read_pdu_data() -> None:
        raw = dul.socket.socket
        try:
            head = _recv_exact(raw, 6)
            if head is None:
                raise ConnectionError
            pdu_type, _, length = _HEAD.unpack(head)
            if pdu_type not in _KNOWN:
                log.error("unknown PDU type 0x%02X received", pdu_type)
                dul.event_queue.put("Evt19")
                return
            if limit and length > limit:
                log.error("connection closed: PDU longer than the maximum PDU length")
                raise ConnectionError
            body = _recv_exact(raw, length)
            if body is None:
                raise ConnectionError
        except (OSError, TimeoutError):  # ConnectionError included
            dul.event_queue.put("Evt17")
            return
        if (
            pdu_type == _P_DATA_TF
            and dul.state_machine.current_state == "Sta6"
            and not assoc.get_handlers(evt.EVT_DATA_RECV)
            and not assoc.get_handlers(evt.EVT_PDU_RECV)
        ):
            pdvs = split_pdvs(memoryview(body))
            if pdvs is None:
                log.error("received an invalid P-DATA-TF PDU")
                dul.event_queue.put("Evt19")
                return
            assoc.dimse.receive_primitive(PData(pdvs))  # as DT-2 does
            return
        try:  # stock's steps (3.0.4 _read_pdu_data), the bytes already read
            pdu, event = dul._decode_pdu(head + body)
            dul.event_queue.put(event)
        except Exception:
            log.error("unable to decode the received PDU")
            dul.event_queue.put("Evt19")
            return
        dul._recv_pdu.put(pdu)

    dul._read_pdu_data = read_pdu_data
