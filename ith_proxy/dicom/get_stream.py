"""REPLACES PYNETDICOM'S C-GET AND C-MOVE SCP: stored bytes go out as they are.

This is the one place where ith-proxy takes over pynetdicom's Query/Retrieve
service for C-GET and C-MOVE (written for pynetdicom 3.0.4, refused on any
other version by ``check_library``).  Stock 3.0.4
``QueryRetrieveServiceClass._get_scp`` makes the handler yield whole
``Dataset``s and sends each through ``Association.send_c_store``, which
encodes it again: every instance decoded and re-encoded, pixels included,
and whole in memory (1 GB instance, 1 GB of RSS).  Its ``_move_scp`` opens
its own association to the destination with the same ``send_c_store``;
C-MOVE must use the forwarder's SCU path (dicom/scu.py) instead.

``install(assoc, serve)`` wraps ``Association._serve_request`` of one
acceptor association: a C-GET-RQ or C-MOVE-RQ goes to ``serve(Channel)``
with the same bookkeeping as stock (C-CANCELs cleared before and after, the
reactor marked paused); every other request goes the stock way.  Through a
``Channel`` the retrieve room (dicom/qr_retrieve.py):

- reads the request (identifier, move destination, calling AE);
- sends C-GET/C-MOVE responses, encoded by pynetdicom's message classes
  but written from the association thread (``respond``);
- sends a C-GET sub-operation's C-STORE-RQ from a file, command set packed
  with struct and the data set read in ~1 MiB blocks (scu_wire.send_message,
  the forwarder's framing), then waits for its C-STORE-RSP (``store``).

Everything this room writes goes out on the association thread under one
lock that also wraps the DUL thread's own writes, so whole PDUs never
interleave and a C-STORE's PDUs are never split by a response.  Memory
stays at one block whatever the instance size.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from io import BytesIO
from typing import Any, BinaryIO

import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF

from ith_proxy.dicom import scu_wire as wire

log = logging.getLogger("ith_proxy.dicom")

WRITTEN_FOR = "3.0.4"
PENDING = 0xFF00


class LibraryMismatch(RuntimeError):
    """The installed pynetdicom is not the version this module replaces code of."""


class Broken(Exception):
    """The association cannot carry the retrieve any further (aborted, timed
    out, or the peer sent something else than the awaited response)."""


def check_library(version: str | None = None) -> None:
    """Refuse any pynetdicom but the one this was written for: on another, the
    stock C-GET would come back silently (every instance decoded, whole in
    memory) and C-MOVE would bypass the forwarder's SCU."""
    found = pynetdicom.__version__ if version is None else version
    if found != WRITTEN_FOR:
        raise LibraryMismatch(
            f"pynetdicom {found} is installed, but ith_proxy/dicom/get_stream.py replaces the "
            f"C-GET/C-MOVE SCP of pynetdicom {WRITTEN_FOR} only (pin it, or port that module)"
        )


class Channel:
    """One C-GET or C-MOVE request on an acceptor association."""

    def __init__(self, assoc: Any, request: Any, context: Any, lock: threading.Lock) -> None:
        self._assoc = assoc
        self._request = request
        self._context = context
        self._lock = lock
        self.kind = "get" if isinstance(request, C_GET) else "move"
        self.sop_class = str(request.AffectedSOPClassUID or "")
        self.message_id = int(request.MessageID or 0)
        self.calling_ae = str(assoc.requestor.ae_title).strip()
        self.move_destination = str(getattr(request, "MoveDestination", "") or "").strip()
        self.final_sent = False
        self._next_id = self.message_id

    # --- the request ---

    def identifier(self) -> Dataset:
        """The request's identifier; ValueError (or pydicom's errors) when absent
        or undecodable."""
        raw = self._request.Identifier
        if raw is None:
            raise ValueError("no identifier")
        ts = self._context.transfer_syntax[0]
        raw.seek(0)
        return decode(raw, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)

    def cancelled(self) -> bool:
        return self.message_id in self._assoc.dimse.cancel_req

    def established(self) -> bool:
        return bool(self._assoc.is_established)

    def storage_contexts(self) -> dict[str, dict[str, int]]:
        """SOP class -> {transfer syntax: context ID} of the accepted contexts
        on which this side may act as storage SCU (C-GET sub-operations)."""
        out: dict[str, dict[str, int]] = {}
        for cx in self._assoc.accepted_contexts:
            if cx.as_scu and cx.context_id is not None:
                syntaxes = out.setdefault(str(cx.abstract_syntax), {})
                syntaxes.setdefault(str(cx.transfer_syntax[0]), int(cx.context_id))
        return out

    # --- writing ---

    def _write(self, data: bytes) -> None:
        sock = self._assoc.dul.socket
        with self._lock:
            raw = getattr(sock, "socket", None)
            if raw is None:
                raise ConnectionError("the connection is closed")
            raw.sendall(data)

    def respond(
        self,
        status: int,
        completed: int = 0,
        failed: int = 0,
        warning: int = 0,
        remaining: int | None = None,
        failed_uids: list[str] | None = None,
    ) -> None:
        """A C-GET/C-MOVE response (pending when ``status`` is 0xFF00): the
        counts, and a Failed SOP Instance UID List when ``failed_uids`` is given."""
        rsp: Any = C_GET() if self.kind == "get" else C_MOVE()
        rsp.MessageIDBeingRespondedTo = self.message_id
        rsp.AffectedSOPClassUID = self.sop_class
        rsp.Status = status
        if remaining is not None:
            rsp.NumberOfRemainingSuboperations = remaining
        rsp.NumberOfCompletedSuboperations = completed
        rsp.NumberOfFailedSuboperations = failed
        rsp.NumberOfWarningSuboperations = warning
        if failed_uids is not None:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = failed_uids
            ts = self._context.transfer_syntax[0]
            data = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            rsp.Identifier = BytesIO(data or b"")
        msg: Any = C_GET_RSP() if self.kind == "get" else C_MOVE_RSP()
        msg.primitive_to_message(rsp)
        cx_id = int(self._context.context_id)
        msg.context_id = cx_id
        max_pdu = int(self._assoc.requestor.maximum_length or 0)
        parts = []
        for pdata in msg.encode_msg(cx_id, max_pdu):
            pdu = P_DATA_TF()
            pdu.from_primitive(pdata)
            parts.append(pdu.encode())
        try:
            self._write(b"".join(parts))
        except OSError as exc:
            raise Broken(f"cannot send the response ({type(exc).__name__})") from None
        if status != PENDING:
            self.final_sent = True

    def store(
        self, ctx_id: int, sop_class: str, sop_instance: str, source: BinaryIO, length: int
    ) -> int:
        """One C-GET sub-operation: a C-STORE-RQ with ``length`` data set bytes
        read from ``source``; the status the peer answered.  Raises Broken."""
        self._next_id = self._next_id % 0xFFFF + 1
        msg_id = self._next_id
        command = wire.store_command(msg_id, sop_class, sop_instance)
        max_pdu = int(self._assoc.requestor.maximum_length or 0)
        try:
            wire.send_message(self._write, ctx_id, max_pdu, command, source, length)
        except wire.WireError as exc:  # the message is cut: nothing can follow it
            self._assoc.abort()
            raise Broken(str(exc)) from None
        except OSError as exc:
            raise Broken(f"connection lost ({type(exc).__name__})") from None
        _, rsp = self._assoc.dimse.get_msg(block=True)
        if rsp is None:
            if not self._assoc.is_established:
                raise Broken("association aborted")
            self._assoc.abort()
            raise Broken("no C-STORE response within the DIMSE timeout")
        if not isinstance(rsp, C_STORE) or rsp.MessageIDBeingRespondedTo != msg_id:
            self._assoc.abort()
            raise Broken("the peer sent another message instead of the C-STORE response")
        status = rsp.Status
        if not isinstance(status, int):
            raise Broken("C-STORE response without a status")
        return status


WRITE_LOCK = "_ith_write_lock"  # on the association: the lock below (find_wire writes under it)
ENDED = "_ith_writes_ended"  # on its socket: an A-RELEASE or A-ABORT PDU went out
_ENDING_PDUS = (0x05, 0x06, 0x07)  # A-RELEASE-RQ, A-RELEASE-RP, A-ABORT


def _lock_writes(assoc: Any) -> threading.Lock:
    """One lock for every write on this association's socket: the DUL
    thread's (``AssociationSocket.send``) and ours (``Channel._write``; the
    C-FIND and C-STORE answers, through ``find_wire._write_direct``).  Once
    the DUL has written an A-RELEASE or A-ABORT PDU the socket is marked
    ``ENDED`` under the same lock, so a writer that checks it never puts a
    P-DATA-TF after it."""
    lock = threading.Lock()
    sock = assoc.dul.socket
    stock_send = sock.send

    def send(bytestream: bytes) -> None:
        with lock:
            if bytestream[:1] and bytestream[0] in _ENDING_PDUS:
                setattr(sock, ENDED, True)
            stock_send(bytestream)

    sock.send = send
    setattr(assoc, WRITE_LOCK, lock)
    raw = getattr(sock, "socket", None)
    if raw is not None and raw.gettimeout() is None:
        # our sendall must not block for ever on a peer that stops reading
        raw.settimeout(assoc.network_timeout or 60)
    return lock


def install(assoc: Any, serve: Callable[[Channel], None]) -> None:
    """Route one not-yet-started acceptor association's C-GET and C-MOVE
    requests to ``serve`` (the marked replacement of 3.0.4's Q/R SCP)."""
    lock = _lock_writes(assoc)
    stock = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        context = assoc._accepted_cx.get(context_id)
        if (
            not isinstance(msg, (C_GET, C_MOVE))
            or context is None
            or assoc._sent_release
            or not msg.is_valid_request
        ):
            stock(msg, context_id)  # stock logs, ignores or aborts these
            return
        channel = Channel(assoc, msg, context, lock)
        assoc.dimse.cancel_req = {}  # as 3.0.4: C-CANCELs received before do not count
        assoc._is_paused = True
        try:
            serve(channel)
        except Broken as exc:
            log.warning("C-%s stopped: %s", channel.kind.upper(), exc)
        except Exception as exc:  # never a traceback on the wire or in the log
            log.error("C-%s failed: %s", channel.kind.upper(), type(exc).__name__)
            if not channel.final_sent and assoc.is_established:
                try:
                    channel.respond(0xC000)
                except Broken:
                    pass
        finally:
            assoc._is_paused = False
            assoc.dimse.cancel_req = {}

    assoc._serve_request = serve_request
