"""The C-FIND SCP: Patient Root and Study Root queries over the catalog.

``handle_find`` is bound to EVT_C_FIND by the SCP (``dicom/scp.py``).  The
identifier becomes a query spec (``qr_match.py``), the spec one parameterized
SELECT (``store/qr_catalog.py``) on a read-only catalog connection of the
association's own thread, opened per request and closed when the answers
end.  Each row becomes one pending (0xFF00) answer as the cursor gives it:
nothing is collected in memory, and a C-CANCEL (``event.is_cancelled``)
stops the cursor at the next row with 0xFE00.

Answers carry only the keys asked for (plus the level and its unique key),
with the anonymized values the catalog holds.  At the IMAGE level a key
without a catalog column is read from the stored file's header (no pixels);
above it such a key is returned empty.

Each pending answer leaves as one P-DATA-TF PDU (command and identifier
PDVs together, ``one_pdu_answers``: the one place that replaces pynetdicom's
sending, for C-FIND responses only and on 3.0.4 only) instead of two,
its command set packed with struct, written from the association thread
under the socket's write lock (``_write_direct``, several pending answers
per write) instead of queued to the DUL thread one by one.

``[qr] max_find_results`` (0: no limit) cuts the answers: after that many
pending answers the final status is 0xA700 (Out of resources) with the
ErrorComment "result limit reached": the requester knows the list is
incomplete, as with Orthanc's LimitFindResults.

Failures are statuses, never tracebacks: an identifier that does not decode
is 0xC000, one that does not fit the model 0xA900 (``qr_match``), a catalog
error 0xC000.  The log gets the model, level, calling AE and counts, never a
value of the identifier or of an answer.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from typing import Any

import pynetdicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.pdu_primitives import P_DATA

from ith_proxy.config import Config
from ith_proxy.dicom import files as dicomfile
from ith_proxy.dicom import get_stream, qr_match
from ith_proxy.store import qr_catalog
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool

log = logging.getLogger("ith_proxy.dicom")

PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
LIMIT_COMMENT = "result limit reached"
_MODEL_NAMES = {qr_match.PATIENT_ROOT_FIND: "Patient Root", qr_match.STUDY_ROOT_FIND: "Study Root"}
FIND_CLASSES = tuple(_MODEL_NAMES)

Answer = tuple[int | Dataset, Dataset | None]
ONE_PDU_WRITTEN_FOR = "3.0.4"
_ONE_PDU = "_ith_one_pdu_find"
_HELD = "_ith_find_held"  # on the association: pending answers not yet written
_BATCH = 16384  # bytes of pending answers written at once
_DATA_STATES = ("Sta6", "Sta8")  # established; release asked by the peer (P-DATA allowed)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def one_pdu_answers(assoc: Any) -> None:
    """REPLACES PYNETDICOM'S C-FIND-RSP SENDING on one association (3.0.4 only).

    Stock 3.0.4 sends each DIMSE message as one P-DATA-TF PDU per fragment:
    a pending answer is two PDUs (command, identifier), each a hand-off to
    the DUL thread and a socket send: most of a match's cost.  Here a C-FIND
    response whose fragments fit in one PDU of the peer's maximum length goes
    as ONE P-DATA-TF with both PDVs (PS3.8 9.3.5 allows several PDVs per
    PDU); anything else is sent as stock does.  A plain pending answer's
    command set is packed with struct (``_pending_pdvs``: pynetdicom's
    pydicom encoding of it was ~0.4 ms of a match's ~0.9 ms), and the PDUs
    are written from the association thread, pending answers ~16 KB at a
    time (``_write_direct``).  Idempotent."""
    dimse = assoc.dimse
    if pynetdicom.__version__ != ONE_PDU_WRITTEN_FOR or getattr(dimse, _ONE_PDU, False):
        return
    stock = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if not isinstance(primitive, C_FIND) or primitive.MessageIDBeingRespondedTo is None:
            stock(primitive, context_id)
            return
        final = primitive.Status not in (PENDING, PENDING_WARNING)
        limit = dimse.maximum_pdu_size
        pdvs = None
        if not final and not assoc.get_handlers(evt.EVT_DIMSE_SENT):
            pdvs = _pending_pdvs(primitive, context_id)
            if pdvs and limit and sum(5 + len(value) for _, value in pdvs) > limit:
                pdvs = None  # fragments to fit the peer's maximum: pynetdicom's encoding
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
        if limit and sum(5 + len(value) for _, value in pdvs) > limit:
            groups = [[pdv] for pdv in pdvs]
        else:
            groups = [pdvs]
        if not _write_direct(assoc, [_p_data_tf(g) for g in groups], final):
            for group in groups:
                pdu = P_DATA()
                pdu.presentation_data_value_list.extend(group)
                assoc.dul.send_pdu(pdu)

    dimse.send_msg = send_msg
    setattr(dimse, _ONE_PDU, True)


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, tag, len(value)) + value


def _pending_pdvs(primitive: Any, context_id: int) -> list[tuple[int, bytes]] | None:
    """A pending C-FIND-RSP's two PDVs (command set packed with struct, as
    pynetdicom's C_FIND_RSP encodes it: PS3.7 9.3.2.2), or None when it is
    not a plain one (no identifier, an OffendingElement or ErrorComment)."""
    identifier = primitive.Identifier
    if identifier is None or primitive.OffendingElement or primitive.ErrorComment:
        return None
    uid = str(primitive.AffectedSOPClassUID).encode()
    body = b"".join(
        (
            _element(0x0002, uid + b"\0" * (len(uid) % 2)),  # Affected SOP Class UID
            _element(0x0100, struct.pack("<H", 0x8020)),  # Command Field: C-FIND-RSP
            _element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
            _element(0x0800, struct.pack("<H", 0x0001)),  # Command Data Set Type: present
            _element(0x0900, struct.pack("<H", primitive.Status)),
        )
    )
    command = _element(0x0000, struct.pack("<L", len(body))) + body
    return [(context_id, b"\x03" + command), (context_id, b"\x02" + identifier.getvalue())]


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


def handle_find(event: Any, cfg: Config, spool: Spool) -> Iterator[Answer]:
    """EVT_C_FIND: yield (status, identifier) pairs, pending ones streamed."""
    one_pdu_answers(event.assoc)
    model = str(event.request.AffectedSOPClassUID)
    calling = event.assoc.requestor.ae_title
    try:
        identifier = event.identifier
        query = qr_match.parse(identifier, model, _fetch_limit(cfg))
    except qr_match.IdentifierError as exc:
        log.info("C-FIND from %s refused: 0x%04X %s", calling, exc.status, exc.comment)
        yield _status(exc.status, exc.comment), None
        return
    except (Exception, RecursionError) as exc:  # undecodable: never a traceback
        log.info("C-FIND from %s: identifier not understood (%s)", calling, type(exc).__name__)
        yield _status(qr_match.CANNOT_PROCESS, "identifier not understood"), None
        return
    yield from _answers(event, cfg, spool, query, calling)


def _fetch_limit(cfg: Config) -> int:
    limit = cfg.qr.max_find_results
    return limit + 1 if limit else 0  # one more row tells that the limit cut


def _answers(event: Any, cfg: Config, spool: Spool, query: qr_match.Query, calling: str):
    limit = cfg.qr.max_find_results
    sent = 0
    outcome = "success"
    catalog: Catalog | None = None
    try:
        catalog = Catalog(spool.catalog_file, readonly=True)
        for row in qr_catalog.rows(catalog, query.spec):
            if event.is_cancelled:
                outcome = "cancelled"
                yield CANCEL, None
                return
            if limit and sent >= limit:
                outcome = "cut at the limit"
                yield _status(OUT_OF_RESOURCES, LIMIT_COMMENT), None
                return
            yield PENDING, _answer(query, row, cfg, spool)
            sent += 1
    except Exception as exc:
        outcome = f"failed ({type(exc).__name__})"
        yield _status(qr_match.CANNOT_PROCESS, "query failed"), None
    finally:
        if catalog is not None:
            catalog.close()
        log.info(
            "C-FIND %s %s from %s: %d answer(s), %s",
            _MODEL_NAMES.get(query.model, "?"),
            query.level,
            calling,
            sent,
            outcome,
        )


def _answer(query: qr_match.Query, row: tuple, cfg: Config, spool: Spool) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level
    unique = len(qr_catalog.UNIQUE[query.level])
    header: Dataset | None = None
    wide = False
    for key in query.keys:
        value: Any = ""
        if key.source == "sql":
            value = row[unique + key.index]
            if value is None:
                value = ""
            elif isinstance(value, int):
                value = str(value)
            elif key.keyword == "ModalitiesInStudy" and value:
                value = value.split("\\")
        elif key.source == "self":
            value = cfg.scp.ae_title if key.keyword == "RetrieveAETitle" else "ONLINE"
        elif key.source == "header":
            if header is None:
                header = _header(spool, row[0], row[1], row[2])
            if key.tag in header:
                try:
                    ds[key.tag] = header[key.tag]
                    continue
                except Exception:
                    value = ""
        if key.vr == "SQ":
            ds.add(DataElement(key.tag, "SQ", []))
            continue
        wide = wide or any(
            not str(v).isascii() for v in (value if isinstance(value, list) else [value])
        )
        ds.add(DataElement(key.tag, key.vr, value))
    if wide:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _header(spool: Spool, study: str, series: str, sop: str) -> Dataset:
    """The stored file's header without pixels; empty when it cannot be read."""
    try:
        return dicomfile.read_split(spool.instance_path(study, series, sop)).header
    except (OSError, dicomfile.DicomFileError, ValueError):
        return Dataset()
