"""REPLACES PYNETDICOM'S DATA SET ASSEMBLY: C-STORE data sets stream to spool/tmp/.

This is the one place where ith-proxy replaces a piece of pynetdicom's
reception (written for pynetdicom 3.0.4, refused on any other version by
``check_library``).  Stock 3.0.4 ``DIMSEServiceProvider.receive_primitive``
hands each P-DATA primitive to ``DIMSEMessage.decode_msg``, which appends
every data set fragment to a ``BytesIO``: a whole instance sits in memory
until the C-STORE handler runs (1 GB instance, 1 GB of RSS, per
association).  Its ``STORE_RECV_CHUNKED_DATASET`` option is no way out: it
writes plaintext to the system temp dir, from the network thread.

``install(assoc, open_store)`` replaces ``receive_primitive`` on one
association's DIMSE provider with ``Receiver.receive_primitive``: the same
steps as 3.0.4's (command set fragments, the message class, the completed
message queued for the association thread; a plain C-STORE-RQ command set is
read by hand, ``store_wire.py``, which also packs the C-STORE-RSP), except
that a C-STORE-RQ's data set fragments go, as they arrive on the DUL thread,
to an ``Incoming``:

- its first element is checked: a data set that starts in a group below
  0x0008 (file meta, command or illegal groups, e.g. a (0002,0010) that
  would name deflate) is refused, ``CANNOT_UNDERSTAND``, and not written.
  Group 0004 (Directory Structuring, PS3.3 F.3) is refused too: it belongs
  to a DICOMDIR, never to a composite instance sent by C-STORE;
- its bytes go to ``spool/tmp/`` through a writer (plain: buffered writev;
  ``[spool] encrypt_incoming``: the stream encryptor the service passed in),
  about 1 MiB held at a time;
- past ``[scp] max_instance_mb`` the association is aborted (A-ABORT, as
  for an invalid PDU) and the partial file removed;
- free disk below ``[spool] min_free_mb`` or a write error: refused with
  ``OUT_OF_RESOURCES``, the rest discarded.

The handler takes the ``Incoming`` from the request (``take``) and either
promotes it to ``incoming/`` (fsync, rename, fsync dir) before answering
0x0000, or discards it.  A plain C-STORE (``store_wire`` read its command
set) skips the hand-off: ``install``'s ``store`` does the handler's work on
this DUL thread (``store_inline.py``).  Whatever an association leaves behind (aborted
mid-instance, connection dropped, message never handled) is removed when its
thread ends.  Non-C-STORE messages keep the stock ``BytesIO``, capped at
``MAX_OTHER_DATASET`` (this AE serves none with a data set).  PDUs are
read, and their length bounded, by ``pdu_read``.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from io import BytesIO
from typing import Any, Protocol

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse_messages import _MESSAGE_TYPES, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, N_EVENT_REPORT
from pynetdicom.dsutils import decode
from pynetdicom.utils import make_target

from ith_proxy.dicom import store_inline, store_wire

log = logging.getLogger("ith_proxy.dicom")

WRITTEN_FOR = "3.0.4"
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
WRITEBACK = 256 << 10  # Spool.write_tmp(kick=True) this often
BIG_ENDIAN = "1.2.840.10008.1.2.2"
FLUSH = 1 << 20  # plaintext bytes held before a writev
MAX_COMMAND_SET = 64 << 10  # a command set is a few hundred bytes
MAX_OTHER_DATASET = 1 << 20  # data sets of non-C-STORE messages, kept in memory
MAX_PENDING = 8  # received C-STOREs not yet handled (a peer waits for 1)
_ATTR = "_ith_incoming"


class LibraryMismatch(RuntimeError):
    """The installed pynetdicom is not the version this module replaces code of."""


def check_library(version: str | None = None) -> None:
    """Refuse any pynetdicom but the one this was written for: on another, the
    stock assembly would come back silently, and with it the whole instance in
    memory."""
    found = pynetdicom.__version__ if version is None else version
    if found != WRITTEN_FOR:
        raise LibraryMismatch(
            f"pynetdicom {found} is installed, but ith_proxy/dicom/scp_stream.py replaces the "
            f"data set assembly of pynetdicom {WRITTEN_FOR} only (pin it, or port that module)"
        )


class Writer(Protocol):
    """Where an Incoming's bytes go, handed on to ``out(list_of_buffers)``:
    ``_Buffered``, or the service's stream encryptor's writer."""

    def write(self, data: memoryview) -> None: ...

    def close(self) -> None: ...


# ``factory(out)`` makes the Writer of one file (the service's stream encryptor)
WriterFactory = Callable[[Callable[[list], object]], Writer]


class _Buffered:
    """The plain writer: holds received views up to FLUSH bytes, then one writev."""

    def __init__(self, out: Callable[[list], object]) -> None:
        self._out, self._fill = out, 0
        self._held: list[memoryview] = []

    def write(self, data: memoryview) -> None:
        self._held.append(data)
        self._fill += len(data)
        if self._fill >= FLUSH:
            self._out(self._held)
            self._held, self._fill = [], 0

    def close(self) -> None:
        self._out(self._held)
        self._held, self._fill = [], 0


class Incoming:
    """One C-STORE data set on its way to spool/tmp/ (then incoming/).

    Fed by the DUL thread (``write``), then handed to the handler on the
    association thread (``finish``), or ``discard``-ed.  ``status`` is 0
    while the data set is being kept, else the failure status to answer.
    """

    def __init__(
        self,
        spool: Any,
        head: bytes,
        encryptor: WriterFactory | None,
        big_endian: bool,
        max_bytes: int,
        min_free_mb: int,
        sop_uid: str = "",
    ) -> None:
        self.spool = spool
        self._sop_uid = sop_uid  # names its bucket in incoming/ (store/buckets.py)
        self.size = 0
        self.status = 0
        self._big_endian = big_endian
        self._max_bytes, self._min_free_mb = max_bytes, min_free_mb
        self._first = b""  # the data set's first bytes, until the group is known
        self._kick_at = WRITEBACK
        self._fd, self._path = -1, ""
        self._writer: Writer | None = (encryptor or _Buffered)(self._out)
        self.owner: Receiver | None = None  # the receiver that has it, until taken
        if spool.free_mb() < min_free_mb:
            self._refuse(OUT_OF_RESOURCES, "free disk below [spool] min_free_mb")
        else:
            self._writer.write(memoryview(head))

    def _out(self, parts: list) -> None:
        if self.status:
            return
        if self._fd < 0:
            self._fd, self._path = self.spool.open_tmp()
        elif self._min_free_mb and self.spool.free_mb() < self._min_free_mb:
            raise OSError(28, "free disk below [spool] min_free_mb")
        kick = self.size >= self._kick_at  # start the writeback every WRITEBACK bytes
        self._kick_at += WRITEBACK if kick else 0
        self.spool.write_tmp(self._fd, parts, kick)

    def _refuse(self, status: int, why: str) -> None:
        if not self.status:
            log.error("C-STORE refused: %s", why)
        self.status = status
        self._writer = None
        self._drop_file()

    def _drop_file(self) -> None:
        fd, path, self._fd, self._path = self._fd, self._path, -1, ""
        if path:
            self.spool.discard_tmp(fd, path)

    def write(self, data: memoryview) -> bool:
        """Take the next fragment; False once the instance passes the size limit."""
        self.size += len(data)
        if self.size > self._max_bytes:
            self.discard()
            return False
        if self.status or self._writer is None:  # refused or discarded: status says why
            return True
        if len(self._first) < 2:
            self._first += bytes(data[: 2 - len(self._first)])
            if len(self._first) == 2:
                group = struct.unpack(">H" if self._big_endian else "<H", self._first)[0]
                if group < 0x0008:
                    self._refuse(CANNOT_UNDERSTAND, "the data set starts in a group below 0008")
                    return True
        try:
            self._writer.write(data)
        except OSError as exc:
            self._refuse(OUT_OF_RESOURCES, f"I/O error ({exc.strerror or type(exc).__name__})")
        return True

    def finish(self) -> tuple[int, str | None]:
        """(status, name in incoming/): durable before success is answered."""
        if not self.status and len(self._first) < 2:
            self._refuse(CANNOT_UNDERSTAND, "the data set is empty")
        if self.status or self._writer is None:  # refused or discarded: status says why
            return self.status, None
        try:
            self._writer.close()
            fd, path, self._fd, self._path = self._fd, self._path, -1, ""
            return 0, self.spool.promote_incoming(fd, path, self._sop_uid)
        except OSError as exc:
            self._refuse(OUT_OF_RESOURCES, f"I/O error ({exc.strerror or type(exc).__name__})")
            return self.status, None

    def discard(self) -> None:
        self.status = self.status or CANNOT_UNDERSTAND
        self._writer = None
        self._drop_file()


def take(request: Any) -> Incoming | None:
    """The streamed data set of a C-STORE request, now the handler's to finish."""
    incoming = request.__dict__.pop(_ATTR, None)
    if incoming is not None:
        incoming.owner.claim(incoming)
    return incoming


class Receiver:
    """Stands in for ``DIMSEServiceProvider.receive_primitive`` (3.0.4) on one association."""

    def __init__(
        self,
        assoc: Any,
        open_store: Callable[[Any, str], Incoming],
        store: store_inline.Store | None = None,
    ) -> None:
        self._assoc, self._dimse = assoc, assoc.dimse
        self._open_store = open_store
        self._store = store  # serves a plain C-STORE on this thread (store_inline.py)
        self._lock = threading.Lock()
        self._current: Incoming | None = None  # being received
        self._pending: set[Incoming] = set()  # received, not yet taken by the handler
        self._other = 0  # bytes of a non-C-STORE data set
        self._request: store_wire.StoreRequest | None = None  # a command set read by hand
        self._done = False  # aborted, or the association is over

    def receive_primitive(self, primitive: Any) -> None:
        with self._lock:
            if self._done or not self._decode(primitive):
                return
        self._deliver()

    def _decode(self, primitive: Any) -> bool:
        """3.0.4 ``DIMSEMessage.decode_msg``, data set fragments excepted."""
        dimse = self._dimse
        msg = dimse.message
        if msg is None:
            msg = dimse.message = DIMSEMessage()
            self._other, self._request = 0, None
        for context_id, data in primitive.presentation_data_value_list:
            control = data[0]
            if control & 1:  # command set fragment
                msg.encoded_command_set.write(data[1:])
                if msg.encoded_command_set.tell() > MAX_COMMAND_SET:
                    return self._abort("command set too large")
                if control & 2:
                    msg.context_id = context_id
                    self._request = store_wire.read_request(self._assoc, msg)
                    if self._request is None:  # not a plain C-STORE-RQ: pynetdicom decodes
                        msg.command_set = decode(msg.encoded_command_set, True, True)
                        msg.__class__ = _MESSAGE_TYPES[msg.command_set.CommandField][1]
                        if msg.command_set.CommandDataSetType == 0x0101:
                            return True
                    if self._current is not None:  # a second command set mid-message
                        self._current.discard()
                        self._current = None
                    if isinstance(msg, C_STORE_RQ):
                        self._current = self._open(self._request or msg.command_set, context_id)
            else:  # data set fragment
                incoming = self._current
                if incoming is not None:
                    if not incoming.write(memoryview(data)[1:]):
                        self._current = None
                        return self._abort("instance larger than [scp] max_instance_mb")
                else:
                    self._other += len(data) - 1
                    if self._other > MAX_OTHER_DATASET:
                        return self._abort("data set too large for its message")
                    msg.data_set.write(data[1:])
                if control & 2:
                    return True
        return False

    def _open(self, command_set: Any, context_id: int) -> Incoming:
        cx = self._assoc._accepted_cx.get(context_id)
        incoming = self._open_store(command_set, cx.transfer_syntax[0] if cx is not None else "")
        incoming.owner = self
        if cx is None:
            incoming.discard()  # pynetdicom refuses the message itself
        return incoming

    def _abort(self, why: str) -> bool:
        """Abort the association from the DUL thread: A-ABORT, as stock does for
        an invalid PDU (the state machine then ignores what the peer still sends)."""
        log.error("association aborted: %s", why)
        self._done = True
        if self._current is not None:
            self._current.discard()
            self._current = None
        self._dimse.dul.event_queue.put("Evt19")
        return False

    def _deliver(self) -> None:
        """3.0.4 ``receive_primitive`` after a message is complete."""
        dimse = self._dimse
        msg = dimse.message
        evt.trigger(self._assoc, evt.EVT_DIMSE_RECV, {"message": msg})
        context_id = msg.context_id
        request, self._request = self._request, None
        try:  # the primitive's setters are pynetdicom's checks of the values: made in either way
            if request is not None:
                d_primitive = store_wire.store_primitive(request, context_id)
            else:
                d_primitive = msg.message_to_primitive()
        except Exception as exc:
            log.error("received an invalid DIMSE message (%s)", type(exc).__name__)
            with self._lock:
                incoming, self._current = self._current, None
            if incoming is not None:
                incoming.discard()
            dimse.dul.event_queue.put("Evt19")
            return
        inline = (
            request is not None
            and self._store is not None
            and store_inline.servable(self._assoc, request, context_id)
        )
        with self._lock:
            incoming, self._current = self._current, None
            if incoming is not None:
                if self._done:  # the association ended meanwhile
                    incoming.discard()
                    return
                if not inline:  # the association thread's handler takes it
                    self._pending.add(incoming)
                if len(self._pending) > MAX_PENDING:  # requests piled up unanswered
                    self._abort("too many C-STORE requests waiting for an answer")
                    return
        if inline and incoming is not None and self._store is not None and request is not None:
            store_inline.serve(self._assoc, request, context_id, incoming, self._store)
            self._reset(msg)
            return
        if incoming is not None:
            setattr(d_primitive, _ATTR, incoming)
        if isinstance(d_primitive, C_CANCEL) and len(dimse.cancel_req) < 10:
            dimse.cancel_req[d_primitive.MessageIDBeingRespondedTo] = d_primitive
        elif isinstance(d_primitive, N_EVENT_REPORT) and d_primitive.is_valid_request:
            threading.Thread(
                target=make_target(self._assoc._serve_request), args=(d_primitive, context_id)
            ).start()
        else:
            dimse.msg_queue.put((context_id, d_primitive))
        self._reset(msg)

    def _reset(self, msg: Any) -> None:
        msg.encoded_command_set = BytesIO()
        msg.data_set = BytesIO()
        msg._data_set_file = None
        msg._data_set_path = None
        self._dimse.message = None

    def claim(self, incoming: Incoming) -> None:
        with self._lock:
            self._pending.discard(incoming)

    def close(self) -> None:
        """The association is over: remove every partial or unhandled data set."""
        with self._lock:
            self._done = True
            left = list(self._pending) + ([self._current] if self._current else [])
            self._pending.clear()
            self._current = None
        for incoming in left:
            incoming.discard()
        if left:
            log.info("removed %d unfinished instance(s) of an ended association", len(left))


def install(
    assoc: Any, open_store: Callable[[Any, str], Incoming], store: store_inline.Store | None = None
) -> None:
    """Wire one not-yet-started acceptor association for streamed data sets.

    ``open_store(command_set, transfer_syntax)`` makes the ``Incoming`` for
    a C-STORE-RQ whose command set is complete (on the DUL thread).
    ``store(incoming)``, when given, is the SCP's work for one instance
    (its status): a plain C-STORE is then served on the DUL thread
    (``store_inline.py``) instead of the association thread's handler."""
    store_wire.install(assoc)  # C-STORE-RSP packed by hand (store_wire.py)
    receiver = Receiver(assoc, open_store, store)
    assoc.dimse.receive_primitive = receiver.receive_primitive
    stock_run = assoc.run

    def run() -> None:
        try:
            stock_run()
        finally:
            receiver.close()

    assoc.run = run
