"""C-STORE messages on the wire: request command sets decoded and response
command sets encoded by hand, for pynetdicom 3.0.4 only (checked).

Requests.  Stock 3.0.4 decodes every command set into a pydicom ``Dataset``
and turns it into a primitive by iterating its elements (keyword, VM and
value lookups per element): ~17% of the SCP's GIL time per small instance.
``read_request`` (``parse_store_rq``) reads a C-STORE-RQ command set (Implicit VR Little
Endian, PS3.7 9.3.1.1) with struct, and ``store_primitive`` makes the
``C_STORE`` primitive from it through the same setters, in the same order,
as ``DIMSEMessage.message_to_primitive`` (tests/test_store_wire.py compares
them); ``scp_stream.Receiver`` uses them when nothing watches
``EVT_DIMSE_RECV``.  Only a plain command set is taken:
elements of C-STORE-RQ only, each once, US values of 2 bytes, text values
that are ASCII, not empty and single-valued, a data set announced; anything
else (None) is decoded by pynetdicom as before, whose checks then apply.

Responses.  Stock 3.0.4 ``DIMSEServiceProvider.send_msg`` turns the response primitive
into a ``C_STORE_RSP`` message whose command set is a pydicom ``Dataset``,
encodes it twice (once to measure the Command Group Length, once to send)
and queues the P-DATA primitive for the DUL thread, which encodes the PDU and
writes it.  That was ~38% of the SCP's GIL time per small instance
(py-spy, docs/performance.md "Issue 11: receive and index cost").

``install(assoc)`` (called by ``scp_stream.install`` for every acceptor
association) wraps ``dimse.send_msg``: a C-STORE response that carries only
what ``StorageServiceClass.SCP`` puts in it (Message ID Being Responded To,
Affected SOP Class and Instance UIDs, Status; no Error Comment, no Offending
Element) has its command set packed with struct, byte for byte what
pynetdicom sends (PS3.7 9.3.1.2; tests/test_store_wire.py compares them), and
goes as one P-DATA-TF PDU written from the association thread under the
socket's write lock (``find_wire._write_direct``, shared with the C-FIND
answers).  Anything else, a command set larger than the peer's maximum PDU,
or an association with an ``EVT_DIMSE_SENT`` handler (it wants pynetdicom's
message), is sent as stock does.

The answer is still sent after the handler returns, so after the instance
is durable (``scp.handle_store``).  Nothing here logs.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from ith_proxy.dicom import find_wire, scu_wire

WRITTEN_FOR = "3.0.4"
_INSTALLED = "_ith_store_wire"  # on the association's DIMSE provider
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_C_STORE_RQ = 0x0001
_HEAD = struct.Struct("<HHL")
# C-STORE-RQ's command elements (PS3.7 Table 9.3-1): element -> (kind, keyword)
_RQ_ELEMENTS = {
    0x0000: ("UL", "CommandGroupLength"),
    0x0002: ("UI", "AffectedSOPClassUID"),
    0x0100: ("US", "CommandField"),
    0x0110: ("US", "MessageID"),
    0x0700: ("US", "Priority"),
    0x0800: ("US", "CommandDataSetType"),
    0x1000: ("UI", "AffectedSOPInstanceUID"),
    0x1030: ("AE", "MoveOriginatorApplicationEntityTitle"),
    0x1031: ("US", "MoveOriginatorMessageID"),
}
_RQ_REQUIRED = (0x0002, 0x0100, 0x0110, 0x0800, 0x1000)
_SIZES = {"UL": (4, "<L"), "US": (2, "<H")}


class StoreRequest:
    """A plain C-STORE-RQ command set: its values by element number, and the
    two UIDs under the names ``open_store`` reads from a command set."""

    def __init__(self, fields: dict[int, Any]) -> None:
        self.fields = fields
        self.AffectedSOPClassUID = fields[0x0002]
        self.AffectedSOPInstanceUID = fields[0x1000]


def parse_store_rq(raw: bytes) -> StoreRequest | None:
    """A C-STORE-RQ command set announcing a data set, read with struct; None
    for anything else (pynetdicom decodes it then)."""
    fields: dict[int, Any] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = _HEAD.unpack_from(raw, pos)
        pos += 8
        if group or element not in _RQ_ELEMENTS or element in fields or length > end - pos:
            return None
        value, pos = raw[pos : pos + length], pos + length
        kind = _RQ_ELEMENTS[element][0]
        if kind in _SIZES:
            size, fmt = _SIZES[kind]
            if length != size:
                return None
            fields[element] = struct.unpack(fmt, value)[0]
            continue
        if not value.isascii() or b"\\" in value:
            return None
        text = value.decode("ascii")  # as pydicom: UI without trailing NUL/space, AE stripped
        text = text.rstrip("\0 ") if kind == "UI" else text.strip()
        if not text:
            return None
        fields[element] = text
    if any(e not in fields for e in _RQ_REQUIRED):
        return None
    if fields[0x0100] != _C_STORE_RQ or fields[0x0800] == _NO_DATA_SET:
        return None
    return StoreRequest(fields)


def read_request(assoc: Any, msg: Any) -> StoreRequest | None:
    """The complete command set of ``msg`` read by hand, ``msg`` then a
    C_STORE_RQ; None when it is no plain C-STORE-RQ or something watches
    EVT_DIMSE_RECV (it wants pynetdicom's decoded message)."""
    if assoc.get_handlers(evt.EVT_DIMSE_RECV):
        return None
    request = parse_store_rq(msg.encoded_command_set.getvalue())
    if request is not None:
        msg.__class__ = C_STORE_RQ
    return request


def store_primitive(request: StoreRequest, context_id: int) -> C_STORE:
    """The C_STORE primitive ``message_to_primitive`` makes of this command set
    (its setters, its order), with an empty stock data set: the received
    bytes went to the spool (scp_stream.Incoming)."""
    primitive = C_STORE()
    for element in sorted(request.fields):
        keyword = _RQ_ELEMENTS[element][1]
        if hasattr(primitive, keyword):
            setattr(primitive, keyword, request.fields[element])
    primitive.DataSet = BytesIO()
    primitive._context_id = context_id
    primitive._dataset_path = None
    primitive._dataset_file = None
    return primitive


def response_primitive(request: StoreRequest, status: int) -> C_STORE:
    """The C-STORE response primitive ``StorageServiceClass.SCP`` makes for
    this request and status."""
    primitive = C_STORE()
    primitive.MessageID = primitive.MessageIDBeingRespondedTo = request.fields[0x0110]
    primitive.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
    primitive.AffectedSOPClassUID = request.AffectedSOPClassUID
    primitive.Status = status
    return primitive


def command_set(sop_class: Any, message_id: int, status: int, sop_instance: Any) -> bytes:
    """A C-STORE-RSP command set without a data set, Implicit VR Little
    Endian, its elements in tag order, as pynetdicom's C_STORE_RSP encodes it."""
    return scu_wire.command_set(
        (0x0002, scu_wire.ui(sop_class)),  # Affected SOP Class UID
        (0x0100, struct.pack("<H", _C_STORE_RSP)),  # Command Field
        (0x0120, struct.pack("<H", message_id)),  # Message ID Being Responded To
        (0x0800, struct.pack("<H", _NO_DATA_SET)),  # Command Data Set Type
        (0x0900, struct.pack("<H", status)),  # Status
        (0x1000, scu_wire.ui(sop_instance)),  # Affected SOP Instance UID
    )


def _plain(primitive: Any) -> bytes | None:
    """The packed command set of a plain C-STORE response, else None."""
    if not isinstance(primitive, C_STORE):
        return None
    sop_class, message_id = primitive.AffectedSOPClassUID, primitive.MessageIDBeingRespondedTo
    status, sop = primitive.Status, primitive.AffectedSOPInstanceUID
    if sop_class is None or message_id is None or status is None or sop is None:
        return None
    if primitive.ErrorComment or primitive.OffendingElement:
        return None
    try:
        return command_set(sop_class, message_id, status, sop)
    except (UnicodeEncodeError, struct.error):  # not ASCII, not a US: pynetdicom's to refuse
        return None


def send_packed(assoc: Any, context_id: int, command: bytes) -> bool:
    """Send a packed C-STORE-RSP command set as one P-DATA-TF PDU under the
    socket's write lock; False (nothing sent) when it must go pynetdicom's
    way: larger than the peer's maximum PDU, or ``EVT_DIMSE_SENT`` watched."""
    limit = assoc.dimse.maximum_pdu_size
    if (limit and len(command) + 6 > limit) or assoc.get_handlers(evt.EVT_DIMSE_SENT):
        return False
    find_wire._send(assoc, [(context_id, b"\x03" + command)], True, limit)
    return True


def install(assoc: Any) -> None:
    """REPLACES PYNETDICOM'S C-STORE-RSP SENDING on one association (3.0.4
    only; idempotent)."""
    dimse = assoc.dimse
    if pynetdicom.__version__ != WRITTEN_FOR or getattr(dimse, _INSTALLED, False):
        return
    stock = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        command = _plain(primitive)
        if command is None or not send_packed(assoc, context_id, command):
            stock(primitive, context_id)

    dimse.send_msg = send_msg
    setattr(dimse, _INSTALLED, True)
