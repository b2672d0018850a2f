"""The listening AE: its presentation contexts and limits, and the socket
fixes over stock pynetdicom's association server.

Every association the server accepts streams its C-STORE data sets to the
spool (``scp_stream.install`` with the server's ``store_opener``) and wakes
its reactor on work (``wake.py``).  Socket fixes, in ``Server``:

- TCP_NODELAY on every accepted socket (Nagle + delayed ACK cost ~40 ms per
  request/response exchange on loopback);
- a listen backlog of at least the association limit (pynetdicom uses 5);
- a connection must send its first byte (the A-ASSOCIATE-RQ) within
  ``artim_timeout`` before an association thread is made for it, so port
  probes never hold an association slot;
- the association's reactor threads wake on work instead of polling every
  1 ms (``wake.py``).

With ``[scp] workers`` > 1, ``max_associations`` holds for all the SCP
processes together: each counts its connections in a shared page
(``OpenCount``, kept by ``scp_stats``) and ``ListeningAE`` admits an association only
while its own plus the others' stay within the limit.
"""

from __future__ import annotations

import logging
import select
import socket
import socketserver
from collections.abc import Callable
from typing import Any, Protocol

from pynetdicom import AE
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from ith_proxy.config import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, Config
from ith_proxy.dicom import get_stream, pdu_read, scp_stream
from ith_proxy.dicom.wake import wake_on_work

log = logging.getLogger("ith_proxy.dicom")

STORAGE_CLASSES = {
    "CTImageStorage": "1.2.840.10008.5.1.4.1.1.2",
    "EnhancedCTImageStorage": "1.2.840.10008.5.1.4.1.1.2.1",
    "LegacyConvertedEnhancedCTImageStorage": "1.2.840.10008.5.1.4.1.1.2.2",
    "MRImageStorage": "1.2.840.10008.5.1.4.1.1.4",
    "EnhancedMRImageStorage": "1.2.840.10008.5.1.4.1.1.4.1",
    "EnhancedMRColorImageStorage": "1.2.840.10008.5.1.4.1.1.4.3",
    "LegacyConvertedEnhancedMRImageStorage": "1.2.840.10008.5.1.4.1.1.4.4",
    "PositronEmissionTomographyImageStorage": "1.2.840.10008.5.1.4.1.1.128",
    "LegacyConvertedEnhancedPETImageStorage": "1.2.840.10008.5.1.4.1.1.128.1",
    "EnhancedPETImageStorage": "1.2.840.10008.5.1.4.1.1.130",
}
VERIFICATION = "1.2.840.10008.1.1"
# Q/R retrieve, both models (dicom/qr_retrieve.py)
RETRIEVE_CLASSES = (
    "1.2.840.10008.5.1.4.1.2.1.2",  # Patient Root Q/R MOVE
    "1.2.840.10008.5.1.4.1.2.1.3",  # Patient Root Q/R GET
    "1.2.840.10008.5.1.4.1.2.2.2",  # Study Root Q/R MOVE
    "1.2.840.10008.5.1.4.1.2.2.3",  # Study Root Q/R GET
)
# Query/Retrieve FIND (dicom/qr.py): Patient Root, Study Root
QR_FIND_CLASSES = ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1")
DEFAULT_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


class OpenCount(Protocol):
    """A process's open connections where the other SCP processes see them
    (``scp_stats.OpenCount``, given by whoever starts the SCP)."""

    def add(self, delta: int) -> None: ...

    def others(self) -> int: ...


class ListeningAE(AE):
    """pynetdicom's AE, whose association limit leaves room for the
    associations the other SCP processes hold (``others_open``; none with
    one process).  pynetdicom refuses an association (A-ASSOCIATE-RJ,
    transient, local limit exceeded) when this process's acceptors, the new
    one included, are more than ``maximum_associations``."""

    others_open: Callable[[], int] = staticmethod(lambda: 0)

    @property
    def maximum_associations(self) -> int:
        return max(0, self._maximum_associations - self.others_open())

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._maximum_associations = max(1, value)  # as pynetdicom's setter ([scp] checks 1..1000)


class AssociationHandler(RequestHandler):
    server: Server  # only ever made by a Server, which carries the store_opener

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # data sets stream to spool/tmp/ instead of a BytesIO (scp_stream.py)
        # and a plain C-STORE is served on the DUL thread (store_inline.py)
        scp_stream.install(assoc, self.server.store_opener(assoc), self.server.store)
        # PDUs read (and their length bounded) by hand; P-DATA-TF handed on as DT-2 does
        pdu_read.install(assoc, self.ae.maximum_pdu_size)
        wake_on_work(assoc)  # event-driven instead of 1 ms polling (wake.py)
        retrieve = getattr(self.server, "retrieve", None)
        if retrieve is not None:  # C-GET/C-MOVE: stored bytes as they are (get_stream.py)
            get_stream.install(assoc, retrieve)
        if self.server.open_count is not None:
            _counted(assoc, self.server.open_count)
        return assoc


def _counted(assoc: Any, count: OpenCount) -> None:
    """The association's thread counts in ``count`` from its start (before
    the A-ASSOCIATE-RQ is negotiated) to its end."""
    run = assoc.run

    def counted_run() -> None:
        count.add(1)
        try:
            run()
        finally:
            count.add(-1)

    assoc.run = counted_run


class Server(ThreadedAssociationServer):
    daemon_threads = True
    artim_timeout = 5.0
    # set by the SCP (dicom/scp.py) on its subclass: per association, the maker
    # of each C-STORE's Incoming
    store_opener: Callable[[Any], Callable[[Any, str], scp_stream.Incoming]]
    # set by the SCP: its work for one streamed instance (scp.store_status)
    store: Callable[[Any], int] | None = None
    # set by the SCP: serves each C-GET/C-MOVE request (dicom/qr_retrieve.py)
    retrieve: Callable[[get_stream.Channel], None] | None = None

    # several SCP processes on one port ([scp] workers > 1): set by the SCP
    reuse_port = False
    open_count: OpenCount | None = None  # this process's connections, in the shared page

    def server_bind(self) -> None:
        if self.reuse_port and self.socket is not None:  # pynetdicom ignores allow_reuse_port
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def shutdown(self) -> None:
        # pynetdicom's version expects the server in ae._servers (start_server only)
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # Wait for the peer's first PDU before making an Association for it.
        try:
            ready, _, _ = select.select([request], [], [], self.artim_timeout)
        except (OSError, ValueError):
            ready = []
        if not ready:
            log.info(
                "closed connection from %s: nothing sent within %.0fs",
                client_address[0],
                self.artim_timeout,
            )
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def build_ae(cfg: Config) -> ListeningAE:
    scp = cfg.scp
    ae = ListeningAE(ae_title=scp.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION
    # Explicit VR LE first: of the syntaxes a requester proposes in one context
    # pynetdicom accepts the first in this list, and a C-GET can then send
    # the usual (explicit) stored files as they are (docs/conformance.md)
    syntaxes = list(reversed(DEFAULT_TRANSFER_SYNTAXES)) + [
        t for t in scp.transfer_syntaxes if t not in DEFAULT_TRANSFER_SYNTAXES
    ]
    ae.add_supported_context(VERIFICATION, list(DEFAULT_TRANSFER_SYNTAXES))
    for uid in STORAGE_CLASSES.values():
        # either role: C-STORE to us, or from us as C-GET sub-operations
        # (the requester proposes the SCP role for itself; PS3.7 D.3.3.4)
        ae.add_supported_context(uid, syntaxes, scu_role=True, scp_role=True)
    for uid in RETRIEVE_CLASSES + QR_FIND_CLASSES:
        ae.add_supported_context(uid, list(DEFAULT_TRANSFER_SYNTAXES))
    ae.maximum_associations = scp.max_associations
    ae.maximum_pdu_size = scp.max_pdu_size
    ae.acse_timeout = scp.acse_timeout
    ae.dimse_timeout = scp.dimse_timeout
    ae.network_timeout = scp.network_timeout
    ae.require_called_aet = True
    ae.require_calling_aet = list(scp.allowed_calling_aes)
    return ae
