"""The storage SCP: C-ECHO and C-STORE into the spool.

No decoding: each C-STORE data set is streamed, as its P-DATA fragments
arrive, to ``spool/tmp/`` behind a file meta header we write
(``scp_stream.py``, the one place that replaces pynetdicom's data set
assembly; an instance is never whole in memory).  The handler makes that file
durable in ``incoming/`` (fsync, rename, fsync dir) and only then answers
0x0000.  With ``[spool] encrypt_incoming`` the bytes are encrypted on their
way to ``tmp/`` by the stream encryptor the service passes in (this room
holds no key), so no plaintext PHI touches the disk.  A data set starting in
a group below 0x0008 (but 0004) answers 0xC000; disk below the watermark or any I/O
error answers 0xA700; an instance past ``[scp] max_instance_mb`` aborts the
association.  None of these leaves anything in ``tmp/`` or ``incoming/``.

The AE, its contexts and the socket fixes over stock pynetdicom are
``ae.py``'s.
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from ith_proxy.config import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, Config
from ith_proxy.dicom import get_stream, qr, qr_retrieve, scp_stream
from ith_proxy.dicom.ae import AssociationHandler, OpenCount, Server, build_ae
from ith_proxy.dicom.inflow import InFlow
from ith_proxy.store.spool import Spool

log = logging.getLogger("ith_proxy.dicom")

# pydicom/pynetdicom settings (no identifiers logged, no value validation) are
# applied by libsetup.configure_libraries(), called by the service.

OUT_OF_RESOURCES = scp_stream.OUT_OF_RESOURCES
CANNOT_UNDERSTAND = scp_stream.CANNOT_UNDERSTAND


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xL", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def file_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group, Explicit VR LE.

    Hand-encoded: pydicom's general-purpose encoder cost ~7% of the SCP's
    CPU time per instance.
    """
    body = b"".join(
        (
            _element(2, 0x0001, b"OB", b"\x00\x01"),
            _element(2, 0x0002, b"UI", _text(sop_class, b"\x00")),
            _element(2, 0x0003, b"UI", _text(sop_instance, b"\x00")),
            _element(2, 0x0010, b"UI", _text(transfer_syntax, b"\x00")),
            _element(2, 0x0012, b"UI", _text(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _element(2, 0x0013, b"SH", _text(IMPLEMENTATION_VERSION, b" ")),
            _element(2, 0x0016, b"AE", _text(source_ae.strip(), b" ")),
        )
    )
    return b"\x00" * 128 + b"DICM" + _element(2, 0x0000, b"UL", struct.pack("<L", len(body))) + body


def handle_echo(event: evt.Event) -> int:
    return 0x0000


class Counters:
    """What the SCP received since the process started, across restarts of the
    SCP (a new AE title or port): instances acknowledged with success and
    their bytes as received (the data set, without our file meta header).
    Thread-safe: every association thread adds to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances = 0
        self._bytes = 0

    def add(self, size: int) -> None:
        with self._lock:
            self._instances += 1
            self._bytes += size

    def snapshot(self) -> tuple[int, int]:
        """(instances, bytes)"""
        with self._lock:
            return self._instances, self._bytes


def handle_store(
    event: evt.Event, counters: Counters | None = None, inflow: InFlow | None = None
) -> int:
    """The bound EVT_C_STORE handler, for the requests pynetdicom serves (a
    plain C-STORE is served by ``store_inline`` with ``store_status``)."""
    incoming = scp_stream.take(event.request)
    if incoming is None:  # not received through scp_stream: never acknowledged
        log.error("C-STORE failed: the data set was not streamed to the spool")
        return CANNOT_UNDERSTAND
    return store_status(incoming, counters, inflow)


def store_status(
    incoming: scp_stream.Incoming, counters: Counters | None = None, inflow: InFlow | None = None
) -> int:
    """Make the streamed data set durable in incoming/, then acknowledge
    (or answer the failure found while it was received).  Only a success
    is counted, and paced while the indexer drains a backlog (``inflow.py``),
    just before it is answered."""
    try:
        status = incoming.finish()[0]
    except Exception as exc:  # never a traceback on the wire
        incoming.discard()
        log.error("C-STORE failed: %s", type(exc).__name__)
        return CANNOT_UNDERSTAND
    if status == 0 and counters is not None:
        counters.add(incoming.size)
    if status == 0 and inflow is not None:
        inflow.wait()
    return status


def _log_assoc(event: evt.Event, what: str) -> None:
    assoc = event.assoc
    log.info(
        "association %s: calling %s from %s:%s",
        what,
        assoc.requestor.ae_title,
        assoc.requestor.address,
        assoc.requestor.port,
    )


class StorageSCP:
    """Owns the AE and its listening server.

    ``encryptor``, when given, is a stream-encryptor factory: ``encryptor(out)``
    returns a writer (``write(buffer)``, ``close()``) that passes the
    encrypted file to ``out(list_of_buffers)``; received instances go through
    it before they reach the disk.
    """

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        encryptor: scp_stream.WriterFactory | None = None,
        counters: Counters | None = None,
        open_count: OpenCount | None = None,
    ) -> None:
        scp_stream.check_library()  # raises LibraryMismatch on another pynetdicom
        get_stream.check_library()
        self.cfg = cfg
        self.spool = spool
        self.encryptor = encryptor
        self.counters = counters or Counters()
        self.inflow = InFlow(spool.incoming_count, cfg.scp.in_flow_backlog, cfg.scp.in_flow_delay)
        self.ae = build_ae(cfg)
        self.open_count = open_count  # [scp] workers > 1: the limit is for every process
        if open_count is not None:
            self.ae.others_open = open_count.others
        self.server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.counters, self.inflow]),
            (evt.EVT_C_FIND, qr.handle_find, [self.cfg, self.spool]),  # Q/R (dicom/qr.py)
            (evt.EVT_ACCEPTED, _log_assoc, ["accepted"]),
            (evt.EVT_REJECTED, _log_assoc, ["rejected"]),
            (evt.EVT_ABORTED, _log_assoc, ["aborted"]),
        ]
        server_cls: type[Server] = type(
            "Server",
            (Server,),
            {
                "request_queue_size": max(self.cfg.scp.max_associations * 2, 64),
                "artim_timeout": self.cfg.scp.artim_timeout,
                "reuse_port": self.cfg.scp.workers > 1,
                "open_count": self.open_count,
                "store_opener": staticmethod(self._store_opener),
                "store": staticmethod(
                    functools.partial(store_status, counters=self.counters, inflow=self.inflow)
                ),
                "retrieve": staticmethod(qr_retrieve.serve(self.cfg, self.spool)),
            },
        )
        self.server = self.ae.make_server(
            (self.cfg.scp.bind_address, self.cfg.scp.port),
            evt_handlers=handlers,
            server_class=server_cls,
            request_handler=AssociationHandler,
        )
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="scp-server", daemon=True
        )
        self._thread.start()
        log.info(
            "SCP %s listening on %s:%d",
            self.cfg.scp.ae_title,
            self.cfg.scp.bind_address,
            self.cfg.scp.port,
        )

    def _store_opener(self, assoc: Any) -> Callable[[Any, str], scp_stream.Incoming]:
        """For one association: makes the Incoming of each C-STORE (DUL thread)."""
        max_bytes = self.cfg.scp.max_instance_mb << 20
        min_free_mb = self.cfg.spool.min_free_mb

        def open_store(command_set: Any, transfer_syntax: str) -> scp_stream.Incoming:
            try:
                sop_uid = str(command_set.AffectedSOPInstanceUID)
                head = file_header(
                    str(command_set.AffectedSOPClassUID),
                    sop_uid,
                    transfer_syntax,
                    assoc.requestor.ae_title,
                )
            except Exception:  # a malformed command set: refused, never a traceback
                incoming = scp_stream.Incoming(self.spool, b"", None, False, max_bytes, 0)
                incoming.discard()
                return incoming
            return scp_stream.Incoming(
                self.spool,
                head,
                self.encryptor,
                transfer_syntax == scp_stream.BIG_ENDIAN,
                max_bytes,
                min_free_mb,
                sop_uid,
            )

        return open_store

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def active_associations(self) -> int:
        return len(self.ae.active_associations)

    def stop_listening(self) -> None:
        """Close the listening socket; the associations in progress go on to
        their end (a restart on a new AE title or port drains the old SCP)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def stop(self) -> None:
        """Stop listening and abort every association in progress."""
        self.stop_listening()
        self.ae.shutdown()
