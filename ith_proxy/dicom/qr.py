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

Answers go out through ``find_wire.py`` (the one replacement of
pynetdicom's C-FIND-RSP sending, on 3.0.4 only): when every return key has
a catalog or fixed value and the context is Implicit or Explicit VR Little
Endian, each row's identifier is encoded by hand (``_encoded``) and sent
from here, command and identifier in one P-DATA-TF, ~16 KB of answers per
write; otherwise (an IMAGE key read from a stored header, an unusual VR or
transfer syntax) the row becomes a Dataset (``_answer``) that pynetdicom
encodes, and ``find_wire`` still sends it as one PDU.  Both give the same
bytes (tests/test_qr_find.py compares them).

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
from collections.abc import Iterator
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from ith_proxy.config import Config
from ith_proxy.dicom import files as dicomfile
from ith_proxy.dicom import find_wire, qr_match
from ith_proxy.store import qr_catalog
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool

log = logging.getLogger("ith_proxy.dicom")

PENDING = find_wire.PENDING
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
LIMIT_COMMENT = "result limit reached"
_MODEL_NAMES = {qr_match.PATIENT_ROOT_FIND: "Patient Root", qr_match.STUDY_ROOT_FIND: "Study Root"}
FIND_CLASSES = tuple(_MODEL_NAMES)

Answer = tuple[int | Dataset, Dataset | None]
_LEVEL_TAG = 0x00080052  # QueryRetrieveLevel


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def handle_find(event: Any, cfg: Config, spool: Spool) -> Iterator[Answer]:
    """EVT_C_FIND: yield (status, identifier) pairs, pending ones streamed."""
    find_wire.one_pdu_answers(event.assoc)
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
    assoc = event.assoc
    context = event.context
    fast = _encodable(query) and find_wire.fast(assoc, str(context.transfer_syntax))
    explicit = str(context.transfer_syntax) == find_wire.EXPLICIT_LE
    request = event.request
    command = find_wire.pending_command(request.AffectedSOPClassUID, request.MessageID)
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
            encoded = _encoded(query, row, cfg, explicit) if fast else None
            if encoded is None:
                yield PENDING, _answer(query, row, cfg, spool)
            elif not assoc.is_established:
                outcome = "association ended"
                return
            else:
                find_wire.send_pending(assoc, context.context_id, command, encoded)
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


def _encodable(query: qr_match.Query) -> bool:
    """Whether every answer of this query can be encoded by hand
    (find_wire.encode_identifier): no key read from a stored header, and
    only VRs it writes."""
    return all(key.source != "header" and key.vr in find_wire.ENCODABLE_VRS for key in query.keys)


def _encoded(query: qr_match.Query, row: tuple, cfg: Config, explicit: bool) -> bytes | None:
    """One answer's identifier bytes, with the same elements and values as
    ``_answer`` gives pydicom to encode; None when a value does not fit."""
    unique = len(qr_catalog.UNIQUE[query.level])
    elements = [(_LEVEL_TAG, "CS", query.level)]
    for key in query.keys:
        text = ""
        if key.source == "sql":
            value = row[unique + key.index]
            text = "" if value is None else str(value)
        elif key.source == "self":
            text = cfg.scp.ae_title if key.keyword == "RetrieveAETitle" else "ONLINE"
        elements.append((key.tag, key.vr, text))
    return find_wire.encode_identifier(elements, explicit)


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
