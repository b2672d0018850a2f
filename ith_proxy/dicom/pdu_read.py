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

Bytes are received into an ``Inbox``: one ``recv_into`` asks for up to
``BUFFER`` (128 KiB), so a sender that is ahead hands over several PDUs at
once.  A P-DATA-TF that arrives in Sta6 (data transfer: DT-2's only state,
which it leaves as it is) is split into its PDVs as memoryviews of that
buffer (PS3.8 9.3.5.1) and given to ``dimse.receive_primitive`` at once:
the call DT-2 makes.  A region handed out is never written again, so a
writer may keep views of earlier fragments.  The next P-DATA-TF already
held is handled in the same call, without a pass of the reactor (a select,
a poll, queue and timer checks, per PDU: a large instance at 16 KiB PDUs is
32 of them; docs/performance.md "The Inbox"), unless that pass has something to do first (an
event queued, a primitive to send, the reactor killed).  Any other PDU
held is left for the reactor's next pass; ``_is_transport_event`` counts
a whole PDU held as data on the socket, and the DUL's wait (wake.py) does
not wait while one is held, since ``select`` and ``poll`` cannot see it.
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

from ith_proxy.dicom.wake import HELD_ATTR

log = logging.getLogger("ith_proxy.dicom")

_HEAD = struct.Struct(">BBL")
_ITEM = struct.Struct(">LB")  # PDV item: length, presentation context ID
_P_DATA_TF = 0x04
_KNOWN = frozenset(range(0x01, 0x08))
MAX_OTHER_PDU = 1 << 20  # A-ASSOCIATE-RQ & co (many contexts may pass 16 KiB)
_LENGTH = struct.Struct(">L")
BUFFER = 128 << 10  # bytes asked of one recv: eight P-DATA-TFs at the default max PDU
RECV_MIN = 16 << 10  # a buffer with less room left is replaced before a recv


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


class Inbox:
    """Bytes received on one association and not yet read as PDUs.

    ``fill`` asks the socket for up to ``BUFFER`` bytes at a time (blocking
    as the socket's timeout says), so a sender that is ahead of us hands
    over several PDUs per ``recv``; ``take`` returns the next bytes as a
    view.  A region handed out is never written again: a buffer without
    room for what is needed is replaced by a fresh one (what is held is
    copied over), and a buffer read to its end is dropped, so a writer may
    keep views of earlier fragments and an idle association holds none.
    """

    __slots__ = ("buf", "end", "start")

    def __init__(self) -> None:
        self.buf = bytearray()  # no room: the first fill makes a buffer
        self.start = self.end = 0

    def held(self) -> int:
        return self.end - self.start

    def complete(self) -> bool:
        """A whole PDU is held."""
        held = self.end - self.start
        if held < _HEAD.size:
            return False
        return held >= _HEAD.size + _LENGTH.unpack_from(self.buf, self.start + 2)[0]

    def next_type(self) -> int:
        """The type of the held PDU that ``take`` returns next (-1: none held)."""
        return self.buf[self.start] if self.end > self.start else -1

    def fill(self, sock: Any, need: int) -> bool:
        """Hold at least ``need`` bytes; False if the connection ends first."""
        held = self.end - self.start
        if held >= need:
            return True
        if len(self.buf) - self.end < max(need - held, RECV_MIN):
            fresh = bytearray(max(BUFFER, need))
            fresh[:held] = memoryview(self.buf)[self.start : self.end]
            self.buf, self.start, self.end = fresh, 0, held
        view = memoryview(self.buf)
        while self.end - self.start < need:
            got = sock.recv_into(view[self.end :])
            if not got:
                return False
            self.end += got
        return True

    def take(self, n: int) -> memoryview:
        """The next ``n`` held bytes (``fill`` made sure they are)."""
        view = memoryview(self.buf)[self.start : self.start + n]
        self.start += n
        if self.start == self.end:  # read to its end: the views handed out keep it alive
            self.buf, self.start, self.end = bytearray(), 0, 0
        return view


def install(assoc: Any, max_pdu: int) -> None:
    """Read this association's PDUs by hand (see the module); ``max_pdu`` is
    the maximum PDU length we announced (0: unlimited, as configured)."""
    dul = assoc.dul
    limit = max(max_pdu, MAX_OTHER_PDU) if max_pdu else 0
    inbox = Inbox()

    def fast() -> bool:
        """A P-DATA-TF now goes the hand-made way (else: stock's steps)."""
        return (
            dul.state_machine.current_state == "Sta6"
            and not assoc.get_handlers(evt.EVT_DATA_RECV)
            and not assoc.get_handlers(evt.EVT_PDU_RECV)
        )

    def read_pdu_data() -> None:
        raw = dul.socket.socket
        while True:
            try:
                if not inbox.fill(raw, _HEAD.size):
                    raise ConnectionError
                pdu_type, _, length = _HEAD.unpack_from(inbox.buf, inbox.start)
                if pdu_type not in _KNOWN:
                    log.error("unknown PDU type 0x%02X received", pdu_type)
                    dul.event_queue.put("Evt19")
                    return
                if limit and length > limit:
                    log.error("connection closed: PDU longer than the maximum PDU length")
                    raise ConnectionError
                if not inbox.fill(raw, _HEAD.size + length):
                    raise ConnectionError
            except (OSError, TimeoutError):  # ConnectionError included
                dul.event_queue.put("Evt17")
                return
            pdu = inbox.take(_HEAD.size + length)
            if pdu_type != _P_DATA_TF or not fast():
                try:  # stock's steps (3.0.4 _read_pdu_data), the bytes already read
                    decoded, event = dul._decode_pdu(bytes(pdu))
                    dul.event_queue.put(event)
                except Exception:
                    log.error("unable to decode the received PDU")
                    dul.event_queue.put("Evt19")
                    return
                dul._recv_pdu.put(decoded)
                return
            pdvs = split_pdvs(pdu[_HEAD.size :])
            if pdvs is None:
                log.error("received an invalid P-DATA-TF PDU")
                dul.event_queue.put("Evt19")
                return
            assoc.dimse.receive_primitive(PData(pdvs))  # as DT-2 does
            # the next P-DATA-TF already held is read now, without a pass of the
            # reactor, unless that pass has something to do first
            if not (
                inbox.next_type() == _P_DATA_TF
                and inbox.complete()
                and dul.event_queue.empty()
                and dul.to_provider_queue.empty()
                and not dul._kill_thread
            ):
                return

    stock_transport_event = dul._is_transport_event

    def is_transport_event() -> bool:
        """3.0.4 ``_is_transport_event``, with a whole PDU held counted as data
        on the socket (it may be all there is: ``select`` would not see it)."""
        if inbox.complete() and getattr(dul.socket, "_is_connected", False):
            read_pdu_data()
            return True
        return stock_transport_event()

    dul._read_pdu_data = read_pdu_data
    dul._is_transport_event = is_transport_event
    setattr(dul, HELD_ATTR, inbox.complete)
