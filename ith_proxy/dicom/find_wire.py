"""C-FIND answers on the wire: the one replacement of pynetdicom's sending of
C-FIND-RSP messages (pynetdicom 3.0.4 only, checked), and the identifiers of
pending answers encoded by hand.

Stock 3.0.4 turns each pending answer into a ``Dataset``, encodes it with
pydicom, builds the command set with pydicom too, and sends command and
identifier as two P-DATA-TF PDUs, each handed to the DUL thread: about
0.9 ms per match, against Orthanc's ~0.15 ms.  Here:

- ``one_pdu_answers`` (installed per association by ``qr.handle_find``)
  replaces the association's ``dimse.send_msg`` for C-FIND responses: a
  response whose fragments fit in the peer's maximum PDU length goes as ONE
  P-DATA-TF with both PDVs (PS3.8 9.3.5 allows several PDVs per PDU), and is
  written from the association thread (``_write_direct``).  Anything else is
  sent as stock does.
- ``send_pending`` sends one pending answer whose identifier is already
  bytes (``encode_identifier``: the answer's values packed with struct, for
  Implicit and Explicit VR Little Endian), with the command set packed by
  hand (PS3.7 9.3.2.2): no Dataset, no pydicom, no per-answer pass through
  pynetdicom's service loop.  ``qr.py`` uses it when ``fast`` says it may;
  otherwise it yields Datasets to pynetdicom as a stock handler does.
- Pending answers are written ~16 KB at a time (``_BATCH``) under the
  socket's write lock that the DUL thread's writes take too
  (``get_stream.WRITE_LOCK``); a final response writes what is held.

Nothing here logs: no value of an answer can reach a log.
"""

from __future__ import annotations

import struct
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.pdu_primitives import P_DATA

from ith_proxy.dicom import get_stream, scu_wire

PENDING = 0xFF00
PENDING_WARNING = 0xFF01
WRITTEN_FOR = "3.0.4"
_INSTALLED = "_ith_one_pdu_find"  # on the association's DIMSE provider
_HELD = "_ith_find_held"  # on the association: pending answers not yet written
_BATCH = 16384  # bytes of pending answers written at once
_DATA_STATES = ("Sta6", "Sta8")  # established; release asked by the peer (P-DATA allowed)
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _vrs(names: str) -> frozenset[str]:
    return frozenset(names.split())


# explicit VR: the VRs with a 4-byte length (PS3.5 7.1.2); the others have 2
_LONG_VRS = _vrs("OB OD OF OL OV OW SQ SV UC UN UR UT UV")
_SHORT_VRS = _vrs("AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US")
TEXT_VRS = _vrs("AE AS CS DA DS DT IS LO LT PN SH ST TM UI UC UR UT")
ENCODABLE_VRS = _LONG_VRS | _SHORT_VRS
_CHARSET = 0x00080005
_UTF8 = b"ISO_IR 192"


def one_pdu_answers(assoc: Any) -> None:
    """REPLACES PYNETDICOM'S C-FIND-RSP SENDING on one association (3.0.4
    only; idempotent).  A plain pending answer's command set is packed with
    struct (pynetdicom's pydicom encoding of it was ~0.4 ms of a match's
    ~0.9 ms)."""
    dimse = assoc.dimse
    if pynetdicom.__version__ != WRITTEN_FOR or getattr(dimse, _INSTALLED, False):
        return
    stock = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if not isinstance(primitive, C_FIND) or primitive.MessageIDBeingRespondedTo is None:
            stock(primitive, context_id)
            return
        final = primitive.Status not in (PENDING, PENDING_WARNING)
        limit = dimse.maximum_pdu_size
        pdvs = None
        identifier = _plain_identifier(primitive)
        if not final and identifier is not None and not assoc.get_handlers(evt.EVT_DIMSE_SENT):
            command = pending_command(
                primitive.AffectedSOPClassUID, primitive.MessageIDBeingRespondedTo
            )
            pdvs = _pdvs(context_id, command, identifier, limit)
        if pdvs is None:  # pynetdicom's encoding (finals; or an EVT_DIMSE_SENT handler)
            msg = C_FIND_RSP()
            msg.primitive_to_message(primitive)
            msg.context_id = context_id
            evt.trigger(assoc, evt.EVT_DIMSE_SENT, {"message": msg})
            pdvs = [
                pdv
                for p in msg.encode_msg(context_id, limit)
                for pdv in p.presentation_data_value_list
            ]
        _send(assoc, pdvs, final, limit)

    dimse.send_msg = send_msg
    setattr(dimse, _INSTALLED, True)


def fast(assoc: Any, transfer_syntax: str) -> bool:
    """True when ``send_pending`` may send this association's answers: the
    replacement is installed, the socket has its write lock, nothing watches
    EVT_DIMSE_SENT (it wants pynetdicom's messages) and the answers' transfer
    syntax is one ``encode_identifier`` writes."""
    return (
        getattr(assoc.dimse, _INSTALLED, False)
        and getattr(assoc, get_stream.WRITE_LOCK, None) is not None
        and not assoc.get_handlers(evt.EVT_DIMSE_SENT)
        and transfer_syntax in (IMPLICIT_LE, EXPLICIT_LE)
    )


def send_pending(assoc: Any, context_id: int, command: bytes, identifier: bytes) -> None:
    """One pending (0xFF00) C-FIND-RSP (``command``: ``pending_command`` of
    the request) with these identifier bytes: one P-DATA-TF when it fits the
    peer's maximum PDU, fragments otherwise; held and written with the next
    ~16 KB."""
    limit = assoc.dimse.maximum_pdu_size
    pdvs = _pdvs(context_id, command, identifier, limit)
    if pdvs is None:  # a peer's maximum too small for whole fragments: one PDV per PDU
        pdvs = _fragments(context_id, 0x01, command, limit) + _fragments(
            context_id, 0x00, identifier, limit
        )
    _send(assoc, pdvs, False, limit)


def encode_identifier(elements: list[tuple[int, str, str]], explicit: bool) -> bytes | None:
    """An identifier of (tag, VR, text value) elements in Little Endian, the
    elements sorted by tag, text padded to even length (UI with NUL),
    SpecificCharacterSet ISO_IR 192 (UTF-8) added when a value is not ASCII.
    None when a VR or length does not fit (the caller then uses pydicom)."""
    out = []
    wide = False
    for tag, vr, text in sorted(elements):
        if vr not in ENCODABLE_VRS or (text and vr not in TEXT_VRS):
            return None
        value = text.encode("utf-8")
        wide = wide or len(value) != len(text)
        if len(value) % 2:
            value += b"\0" if vr == "UI" else b" "
        element = _element(tag, vr, value, explicit)
        if element is None:
            return None
        out.append(element)
    if wide:
        out.insert(0, _element(_CHARSET, "CS", _UTF8, explicit) or b"")
    return b"".join(out)


def _element(tag: int, vr: str, value: bytes, explicit: bool) -> bytes | None:
    group_element = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return group_element + struct.pack("<L", len(value)) + value
    if vr in _LONG_VRS:
        return group_element + vr.encode() + struct.pack("<HL", 0, len(value)) + value
    if len(value) > 0xFFFF:
        return None
    return group_element + vr.encode() + struct.pack("<H", len(value)) + value


def _plain_identifier(primitive: Any) -> bytes | None:
    """A pending answer's identifier bytes when it has nothing else (no
    OffendingElement, no ErrorComment): what _command packs; else None."""
    if primitive.Identifier is None or primitive.OffendingElement or primitive.ErrorComment:
        return None
    return primitive.Identifier.getvalue()


def pending_command(sop_class: Any, message_id: int) -> bytes:
    """A pending C-FIND-RSP's command set with an identifier (Implicit VR LE,
    as pynetdicom's C_FIND_RSP encodes it: PS3.7 9.3.2.2): the same for
    every answer to one request."""
    return scu_wire.command_set(
        (0x0002, scu_wire.ui(sop_class)),  # Affected SOP Class UID
        (0x0100, struct.pack("<H", 0x8020)),  # Command Field: C-FIND-RSP
        (0x0120, struct.pack("<H", message_id)),  # Message ID Being Responded To
        (0x0800, struct.pack("<H", 0x0001)),  # Command Data Set Type: present
        (0x0900, struct.pack("<H", PENDING)),  # Status
    )


def _pdvs(context_id: int, command: bytes, identifier: bytes, limit: int):
    """Command and identifier as two whole PDVs (control headers 0x03 and
    0x02), or None when they do not fit in one PDU of the peer's maximum."""
    pdvs = [(context_id, b"\x03" + command), (context_id, b"\x02" + identifier)]
    if limit and sum(5 + len(value) for _, value in pdvs) > limit:
        return None
    return pdvs


def _fragments(context_id: int, kind: int, data: bytes, limit: int) -> list[tuple[int, bytes]]:
    """``data`` as PDVs of at most ``limit`` - 6 bytes each (PS3.8 E.2: the
    control header's bit 0 is the kind, bit 1 set on the last fragment)."""
    size = max(limit - 6, 1) if limit else len(data)
    chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    last = len(chunks) - 1
    return [
        (context_id, bytes([kind | (0x02 if n == last else 0)]) + chunk)
        for n, chunk in enumerate(chunks)
    ]


def _send(assoc: Any, pdvs: list[tuple[int, bytes]], final: bool, limit: int) -> None:
    if limit and sum(5 + len(value) for _, value in pdvs) > limit:
        groups = [[pdv] for pdv in pdvs]
    else:
        groups = [pdvs]
    if not _write_direct(assoc, [_p_data_tf(g) for g in groups], final):
        for group in groups:
            pdu = P_DATA()
            pdu.presentation_data_value_list.extend(group)
            assoc.dul.send_pdu(pdu)


def _p_data_tf(pdvs: list[tuple[int, bytes]]) -> bytes:
    """One P-DATA-TF PDU of these PDVs (PS3.8 9.3.5): (context ID, control
    header + fragment) each."""
    items = b"".join(struct.pack(">LB", len(value) + 1, cx) + value for cx, value in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


def _write_direct(assoc: Any, pdus: list[bytes], final: bool) -> bool:
    """Write answers' P-DATA-TF PDUs from the association thread, under
    the socket's write lock that the DUL thread's writes also take
    (get_stream._lock_writes): no queue hand-off, no thread switch per
    answer, and a PDU never inside another.  Pending answers are held until
    _BATCH bytes are, and leave with the next write; a final response writes
    everything held.  False (nothing written or held: the caller queues them
    to the DUL, as stock) when there is no such lock or, with nothing held,
    something is still queued for the DUL (order).  When the association is
    no longer in data transfer or an A-RELEASE/A-ABORT PDU has gone out,
    what is held is dropped (the association is ending)."""
    dul = assoc.dul
    lock = getattr(assoc, get_stream.WRITE_LOCK, None)
    held = getattr(assoc, _HELD, None)
    if lock is None or (not held and dul.to_provider_queue.queue):
        return False
    if held is None:
        held = bytearray()
        setattr(assoc, _HELD, held)
    for pdu in pdus:
        held += pdu
    if not final and len(held) < _BATCH:
        return True
    sock = dul.socket
    with lock:
        raw = getattr(sock, "socket", None)
        state = dul.state_machine.current_state
        try:
            ended = getattr(sock, get_stream.ENDED, False)
            if raw is not None and not ended and state in _DATA_STATES:
                raw.sendall(held)
        except OSError:
            sock.event_queue.put("Evt17")  # as AssociationSocket.send: connection closed
        finally:
            held.clear()
    return True
