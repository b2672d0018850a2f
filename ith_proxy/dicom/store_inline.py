"""A plain C-STORE served on the DUL thread that received it.

Stock 3.0.4 hands every complete request to the association thread: the
DUL thread queues the primitive and wakes it, and the association thread
runs ``Association._serve_request`` (a scan of pynetdicom's SOP class
tables), ``StorageServiceClass.SCP`` (a response primitive, an ``Event``,
the bound handler, the status check) and ``send_msg``.  For a small
instance that hand-off is a thread switch and a GIL hand-over per instance,
and with ten associations twenty threads take turns at one GIL.

``serve`` does the same work on the DUL thread, for a request that
``store_wire`` read by hand (a plain C-STORE-RQ) and ``scp_stream`` streamed
to the spool, once pynetdicom's primitive setters have checked its values
(``scp_stream`` builds the primitive first, and an invalid value aborts the
association as before): the request checks ``_serve_request`` makes
(association not releasing, the context accepted, a storage SOP class,
every request field there), then the SCP's ``store`` (``scp.store_status``: durable in
``incoming/``, counted, paced), then the response packed by ``store_wire``
and written under the socket's write lock (``store_wire.send_packed``), after the
instance is durable as before.  Anything else (a watched ``EVT_DIMSE_SENT``,
a response larger than the peer's maximum PDU, a SOP class that is not a
storage one) goes the stock way, so pynetdicom's own answers and logs stay
what they were.

While it serves, the DUL thread does not read the socket: a peer that sends
its next request before this one's answer (asynchronous operations are not
negotiated) finds it waiting in the socket buffer, as it waits for the
answer anyway.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from ith_proxy.dicom import store_wire

log = logging.getLogger("ith_proxy.dicom")

CANNOT_UNDERSTAND = 0xC000
_REQUIRED = (0x0002, 0x0110, 0x0700, 0x1000)  # C_STORE.REQUEST_KEYWORDS' fields but the data set

# the SCP's work for one streamed instance: its status (scp.store_status)
Store = Callable[[Any], int]


@functools.lru_cache(maxsize=256)
def _is_storage(sop_class: str) -> bool:
    """Whether pynetdicom would serve this SOP class with StorageServiceClass
    (its tables are lists scanned per request; a bounded cache)."""
    return uid_to_service_class(sop_class) is StorageServiceClass


def servable(assoc: Any, request: store_wire.StoreRequest, context_id: int) -> bool:
    """The checks of 3.0.4 ``_serve_request`` and ``send_msg`` that would
    make it answer differently, or not at all."""
    fields = request.fields
    if any(f not in fields for f in _REQUIRED):
        return False
    if assoc._sent_release or context_id not in assoc._accepted_cx:
        return False
    if assoc.get_handlers(evt.EVT_DIMSE_SENT):
        return False
    sop_class = request.AffectedSOPClassUID
    extended = assoc.acceptor.accepted_common_extended.get(sop_class)
    if extended:
        sop_class = extended[0]
    return bool(_config.UNRESTRICTED_STORAGE_SERVICE) or _is_storage(sop_class)


def serve(
    assoc: Any, request: store_wire.StoreRequest, context_id: int, incoming: Any, store: Store
) -> None:
    """Serve one plain C-STORE that is ``servable`` here."""
    try:
        status = store(incoming)
    except Exception as exc:  # as StorageServiceClass does: a failure status, no traceback
        incoming.discard()
        log.error("C-STORE failed: %s", type(exc).__name__)
        status = CANNOT_UNDERSTAND
    command = store_wire.command_set(
        request.AffectedSOPClassUID, request.fields[0x0110], status, request.AffectedSOPInstanceUID
    )
    if not store_wire.send_packed(assoc, context_id, command):  # a peer's PDU too small for it
        assoc.dimse.send_msg(store_wire.response_primitive(request, status), context_id)
