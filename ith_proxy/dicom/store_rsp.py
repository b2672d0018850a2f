"""C-STORE answers on the wire: the one replacement of pynetdicom's sending
of C-STORE-RSP messages (pynetdicom 3.0.4 only, checked).

Stock 3.0.4 ``DIMSEServiceProvider.send_msg`` turns the response primitive
into a ``C_STORE_RSP`` message whose command set is a pydicom ``Dataset``,
encodes it twice (once to measure the Command Group Length, once to send)
and queues the P-DATA primitive for the DUL thread, which encodes the PDU and
writes it.  That was ~38% of the SCP's CPU time per small instance
(py-spy, docs/performance.md "Issue 11: receive and index cost").

``install(assoc)`` (called by ``scp_stream.install`` for every acceptor
association) wraps ``dimse.send_msg``: a C-STORE response that carries only
what ``StorageServiceClass.SCP`` puts in it (Message ID Being Responded To,
Affected SOP Class and Instance UIDs, Status; no Error Comment, no Offending
Element) has its command set packed with struct, byte for byte what
pynetdicom sends (PS3.7 9.3.1.2; tests/test_store_rsp.py compares them), and
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
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from ith_proxy.dicom import find_wire

WRITTEN_FOR = "3.0.4"
_INSTALLED = "_ith_store_rsp"  # on the association's DIMSE provider
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _uid(value: Any) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def command_set(sop_class: Any, message_id: int, status: int, sop_instance: Any) -> bytes:
    """A C-STORE-RSP command set without a data set, Implicit VR Little
    Endian, its elements in tag order, as pynetdicom's C_STORE_RSP encodes it."""
    body = b"".join(
        (
            _element(0x0002, _uid(sop_class)),  # Affected SOP Class UID
            _element(0x0100, struct.pack("<H", _C_STORE_RSP)),  # Command Field
            _element(0x0120, struct.pack("<H", message_id)),  # Message ID Being Responded To
            _element(0x0800, struct.pack("<H", _NO_DATA_SET)),  # Command Data Set Type
            _element(0x0900, struct.pack("<H", status)),  # Status
            _element(0x1000, _uid(sop_instance)),  # Affected SOP Instance UID
        )
    )
    return _element(0x0000, struct.pack("<L", len(body))) + body


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


def install(assoc: Any) -> None:
    """REPLACES PYNETDICOM'S C-STORE-RSP SENDING on one association (3.0.4
    only; idempotent)."""
    dimse = assoc.dimse
    if pynetdicom.__version__ != WRITTEN_FOR or getattr(dimse, _INSTALLED, False):
        return
    stock = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        command = _plain(primitive)
        limit = dimse.maximum_pdu_size
        if (
            command is None
            or (limit and len(command) + 6 > limit)
            or assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            stock(primitive, context_id)
            return
        find_wire._send(assoc, [(context_id, b"\x03" + command)], True, limit)

    dimse.send_msg = send_msg
    setattr(dimse, _INSTALLED, True)
