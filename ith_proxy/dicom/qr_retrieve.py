"""C-GET and C-MOVE SCP: the stored instances an identifier names, sent as they are.

Both information models (Patient Root, Study Root), hierarchical retrieve
only (PS3.4 C.4.2.2.1 / C.4.3.2.1): ``QueryRetrieveLevel`` and unique keys.
The retrieve level's key may be a list (UIDs, backslash separated);
the keys above it, when given, must be single values and narrow the match.
PATIENT level is keyed by PatientID, the pseudonymized id the proxy stores;
Study Root has no PATIENT level (0xA900).  Other attributes in the
identifier are ignored.  The instances come from the catalog (store/qr_files.py,
purged ones never) through a read-only connection per request.

Statuses (PS3.4 C.4.2.1.5 / C.4.3.1.4), answered, never a traceback:

==========  ===============================================================
0x0124      refused by ``[qr] allow_get/allow_move`` (dicom/qr_access.py)
0xA900      no or unknown level, PATIENT in Study Root, a missing, empty,
            wildcard or malformed unique key, a list above the retrieve level
0xC000      undecodable identifier; more than ``MAX_KEYS`` keys
0xA701      more than 65535 instances match (the counts are US)
0xA801      C-MOVE destination not a known dicom node, or this proxy's own
            AE title (no connection opened)
0xFF00      pending, after each sub-operation but the last, with the counts
0x0000      every sub-operation completed (also: nothing matched, 0 of each)
0xB000      some sub-operations failed or had warnings; Failed SOP Instance UID List
0xA702      every sub-operation failed; Failed SOP Instance UID List
0xFE00      cancelled (C-CANCEL): counts, remaining, failed list
==========  ===============================================================

C-GET sends each instance over the requesting association through
``get_stream.Channel.store``: the file's data set bytes as stored, on the
context the requester accepted for its SOP class and transfer syntax.  If
the requester accepted only the other of Implicit/Explicit VR Little
Endian, the data set is converted (``_converted``: decoded and encoded by
pydicom, lossless for these two; in memory, so only up to ``[qr]
max_convert_mb``).  Anything else is a failed sub-operation whose reason is
logged with the (anonymized) SOP Instance UID.

C-MOVE looks the destination AE title up among the nodes (store/nodes.py)
and sends through the forwarder's C-STORE SCU (dicom/scu.py ``store``: a new
association, files streamed as they are, bounded by the ``[scu]``
timeouts); each outcome becomes a pending response.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ith_proxy.config import Config
from ith_proxy.dicom import qr_access, scu
from ith_proxy.dicom import scu_wire as wire
from ith_proxy.dicom.get_stream import PENDING, Broken, Channel
from ith_proxy.dicom.scu_assoc import EXPLICIT_LE, IMPLICIT_LE, Peer, Timeouts
from ith_proxy.dicom.status import classify
from ith_proxy.fsio import open_read
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.nodes import Nodes
from ith_proxy.store.qr_files import QrFiles, RetrieveKeys, StoredInstance
from ith_proxy.store.spool import Spool

log = logging.getLogger("ith_proxy.dicom")

PATIENT_ROOT = {"1.2.840.10008.5.1.4.1.2.1.3", "1.2.840.10008.5.1.4.1.2.1.2"}  # GET, MOVE
STUDY_ROOT = {"1.2.840.10008.5.1.4.1.2.2.3", "1.2.840.10008.5.1.4.1.2.2.2"}
RETRIEVE_CLASSES = {
    "PatientRootQueryRetrieveInformationModelGet": "1.2.840.10008.5.1.4.1.2.1.3",
    "PatientRootQueryRetrieveInformationModelMove": "1.2.840.10008.5.1.4.1.2.1.2",
    "StudyRootQueryRetrieveInformationModelGet": "1.2.840.10008.5.1.4.1.2.2.3",
    "StudyRootQueryRetrieveInformationModelMove": "1.2.840.10008.5.1.4.1.2.2.2",
}
MAX_KEYS = 10000  # unique keys in one identifier's list
MAX_MATCHES = 65535  # sub-operation counts are US
OTHER_LE = {EXPLICIT_LE: IMPLICIT_LE, IMPLICIT_LE: EXPLICIT_LE}
SUCCESS, CANCEL, WARNING = 0x0000, 0xFE00, 0xB000
NO_MATCH_CLASS, UNABLE, TOO_MANY, ALL_FAILED, UNKNOWN_DEST = 0xA900, 0xC000, 0xA701, 0xA702, 0xA801
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_KEY = {
    "PATIENT": 0x00100020,  # PatientID
    "STUDY": 0x0020000D,  # StudyInstanceUID
    "SERIES": 0x0020000E,  # SeriesInstanceUID
    "IMAGE": 0x00080018,  # SOPInstanceUID
}
_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


class _Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class _SubOpFailed(Exception):
    """One instance cannot be sent; the message is the reason (no PHI)."""


class _Cancelled(Exception):
    pass


def _values(ds: Dataset, tag: int) -> list[str] | None:
    """The element's values as text (None: absent); empty list: empty value."""
    if tag not in ds:
        return None
    value = ds[tag].value
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v).strip(" \x00") for v in items]


def _uids(values: list[str], what: str) -> tuple[str, ...]:
    if not values:
        raise _Refused(NO_MATCH_CLASS, f"empty {what} (no universal matching in a retrieve)")
    for uid in values:
        if not 0 < len(uid) <= 64 or not _UID.fullmatch(uid):
            raise _Refused(NO_MATCH_CLASS, f"invalid {what}")
    return tuple(values)


def retrieve_keys(ds: Dataset, sop_class: str) -> RetrieveKeys:
    """The level and keys of a retrieve identifier; _Refused with its status."""
    try:
        level_values = _values(ds, 0x00080052)
    except Exception:
        raise _Refused(NO_MATCH_CLASS, "unreadable QueryRetrieveLevel") from None
    level = (level_values or [""])[0].upper()
    if level not in _LEVELS or len(level_values or []) != 1:
        raise _Refused(NO_MATCH_CLASS, "missing or unknown QueryRetrieveLevel")
    patient_root = sop_class in PATIENT_ROOT
    if level == "PATIENT" and not patient_root:
        raise _Refused(NO_MATCH_CLASS, "Study Root has no PATIENT level")
    found: dict[str, tuple[str, ...]] = {}
    depth = _LEVELS.index(level)
    for index, name in enumerate(_LEVELS):
        if index > depth or (name == "PATIENT" and not patient_root):
            continue
        try:
            values = _values(ds, _KEY[name])
        except Exception:
            raise _Refused(NO_MATCH_CLASS, f"unreadable {name} key") from None
        if index == depth:
            if values is None:
                raise _Refused(NO_MATCH_CLASS, f"no unique key for the {name} level")
            if len(values) > MAX_KEYS:
                raise _Refused(UNABLE, f"more than {MAX_KEYS} keys")
            if name == "PATIENT":
                if len(values) != 1 or not values[0] or any(c in values[0] for c in "*?"):
                    raise _Refused(NO_MATCH_CLASS, "PatientID must be one value")
                found[name] = (values[0],)
            else:
                found[name] = _uids(values, f"{name} key")
        elif values:  # a key above the level narrows; empty means not given
            if len(values) != 1:
                raise _Refused(NO_MATCH_CLASS, f"a list of {name} keys above the retrieve level")
            found[name] = (values[0],) if name == "PATIENT" else _uids(values, f"{name} key")

    def above(name: str) -> str | None:
        return found[name][0] if name in found and name != level else None

    return RetrieveKeys(
        level,
        found[level],
        patient_id=above("PATIENT"),
        study_uid=above("STUDY"),
        series_uid=above("SERIES"),
    )


def _converted(fh: BinaryIO, ts: str) -> bytes:
    """The data set in Implicit/Explicit VR Little Endian ``ts`` (scu.reencoded,
    bounded by the caller's size check); a failed sub-operation otherwise."""
    try:
        return scu.reencoded(fh, ts)
    except wire.WireError as exc:
        raise _SubOpFailed(str(exc).replace("re-encode for", "convert to", 1)) from None


class Counts:
    def __init__(self, total: int) -> None:
        self.total = total
        self.completed = self.failed = self.warning = 0
        self.failed_uids: list[str] = []

    @property
    def done(self) -> int:
        return self.completed + self.failed + self.warning

    def add(self, sop_uid: str, status: int | None) -> None:
        result = "failed" if status is None else classify(status)[0]
        if result == "delivered" and status == SUCCESS:
            self.completed += 1
        elif result == "delivered":
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_uid)

    def final(self, channel: Channel) -> int:
        if self.failed == 0 and self.warning == 0:
            channel.respond(SUCCESS, self.completed)
            return SUCCESS
        status = ALL_FAILED if self.completed == 0 and self.warning == 0 else WARNING
        channel.respond(status, self.completed, self.failed, self.warning, None, self.failed_uids)
        return status

    def pending(self, channel: Channel) -> None:
        if self.done < self.total:
            channel.respond(
                PENDING, self.completed, self.failed, self.warning, self.total - self.done
            )

    def cancel(self, channel: Channel) -> None:
        channel.respond(
            CANCEL,
            self.completed,
            self.failed,
            self.warning,
            self.total - self.done,
            self.failed_uids,
        )


class Retrieve:
    """The C-GET/C-MOVE service of the SCP: ``retrieve(channel)`` per request
    (get_stream.install routes them here), on the association's thread."""

    def __init__(self, cfg: Config, spool: Spool) -> None:
        self.cfg = cfg
        self.spool = spool

    @contextmanager
    def _catalog(self) -> Iterator[Catalog]:
        catalog = Catalog(self.spool.catalog_file, readonly=True)
        try:
            yield catalog
        finally:
            catalog.close()

    def __call__(self, channel: Channel) -> None:
        op = channel.kind.upper()
        try:
            rows, node = self._plan(channel)
        except _Refused as exc:
            log.warning(
                "C-%s from %s refused (0x%04X): %s", op, channel.calling_ae, exc.status, exc
            )
            channel.respond(exc.status)
            return
        counts = Counts(len(rows))
        log.info("C-%s from %s: %d instance(s)", op, channel.calling_ae, len(rows))
        try:
            if rows and node is None:
                self._get(channel, rows, counts)
            elif rows:
                self._move(channel, node, rows, counts)
        except _Cancelled:
            log.info("C-%s from %s cancelled after %d", op, channel.calling_ae, counts.done)
            counts.cancel(channel)
            return
        status = counts.final(channel)
        log.info(
            "C-%s from %s: status 0x%04X, %d completed, %d failed, %d warning",
            *(op, channel.calling_ae, status, counts.completed, counts.failed, counts.warning),
        )

    def _plan(self, channel: Channel) -> tuple[list[StoredInstance], Any]:
        """The instances to send (and the C-MOVE destination); _Refused."""
        with self._catalog() as catalog:
            nodes = Nodes(catalog)
            if not qr_access.allowed(
                self.cfg.qr,
                channel.kind,
                channel.calling_ae,
                lambda ae: bool(nodes.by_ae_title(ae)),
            ):
                raise _Refused(qr_access.REFUSED, f"[qr] allow_{channel.kind}")
            try:
                identifier = channel.identifier()
            except Exception:
                raise _Refused(UNABLE, "the identifier cannot be decoded") from None
            want = retrieve_keys(identifier, channel.sop_class)
            node = None
            if channel.kind == "move":
                node = nodes.by_ae_title(channel.move_destination)
                if node is None or not node.host or not node.port:
                    raise _Refused(UNKNOWN_DEST, "move destination is not a known dicom node")
                if node.ae_title == self.cfg.scp.ae_title:  # would feed our own data back in
                    raise _Refused(UNKNOWN_DEST, "move destination is this proxy's own AE title")
            rows = QrFiles(catalog).instances(want, MAX_MATCHES + 1)
        if len(rows) > MAX_MATCHES:
            raise _Refused(TOO_MANY, f"more than {MAX_MATCHES} instances match")
        return rows, node

    # --- C-GET ---

    def _get(self, channel: Channel, rows: list[StoredInstance], counts: Counts) -> None:
        contexts = channel.storage_contexts()
        for row in rows:
            if channel.cancelled():
                raise _Cancelled
            try:
                status: int | None = self._send(channel, row, contexts)
            except _SubOpFailed as exc:
                log.warning("C-GET sub-operation for %s failed: %s", row.sop_uid, exc)
                status = None
            counts.add(row.sop_uid, status)
            if status is not None and status != SUCCESS:
                log.warning("C-GET sub-operation for %s: status 0x%04X", row.sop_uid, status)
            counts.pending(channel)

    def _send(self, channel: Channel, row: StoredInstance, contexts: dict) -> int:
        try:
            path = self.spool.instance_path(row.study_uid, row.series_uid, row.sop_uid)
            fh = open_read(path)
        except (OSError, ValueError) as exc:
            raise _SubOpFailed(f"cannot open the stored file ({type(exc).__name__})") from None
        with fh:
            try:
                meta = wire.read_meta(fh)
            except (OSError, wire.WireError) as exc:
                raise _SubOpFailed(f"unreadable stored file: {exc}") from None
            if meta.sop_instance != row.sop_uid:
                raise _SubOpFailed("the stored file does not hold the cataloged instance")
            accepted = contexts.get(meta.sop_class, {})
            ts = meta.transfer_syntax
            source: BinaryIO = fh
            length = meta.size - meta.offset
            ctx = accepted.get(ts)
            if ctx is None and OTHER_LE.get(ts) in accepted:
                if meta.size > self.cfg.qr.max_convert_mb << 20:
                    raise _SubOpFailed(
                        f"needs conversion to {OTHER_LE[ts]}, larger than [qr] max_convert_mb"
                    )
                data = _converted(fh, OTHER_LE[ts])
                source, length, ctx = io.BytesIO(data), len(data), accepted[OTHER_LE[ts]]
            if ctx is None:
                raise _SubOpFailed(
                    f"the requester accepted no context for SOP class {meta.sop_class} in "
                    f"transfer syntax {ts} (nor a lossless conversion of it)"
                )
            return channel.store(ctx, meta.sop_class, meta.sop_instance, source, length)

    # --- C-MOVE ---

    def _move(
        self, channel: Channel, node: Any, rows: list[StoredInstance], counts: Counts
    ) -> None:
        peer = Peer(node.ae_title, node.host, node.port)
        scu_cfg = self.cfg.scu
        timeouts = Timeouts(scu_cfg.connect_timeout, scu_cfg.acse_timeout, scu_cfg.dimse_timeout)
        files = []
        for row in rows:
            try:
                files.append(self.spool.instance_path(row.study_uid, row.series_uid, row.sop_uid))
            except ValueError:
                counts.add(row.sop_uid, None)
        by_path = {str(path): path.stem for path in files}

        def on_outcome(outcome: scu.Outcome) -> None:
            uid = outcome.sop_uid or by_path.get(str(outcome.path), "")
            delivered = outcome.result == "delivered"
            if not delivered:  # our reason text: a status or a connection error, no peer text
                log.warning("C-MOVE sub-operation for %s failed: %s", uid, outcome.reason)
            counts.add(uid, outcome.status if delivered else None)
            if channel.cancelled():
                raise _Cancelled
            counts.pending(channel)

        scu.store(peer, self.cfg.scp.ae_title, files, timeouts, on_outcome)


def serve(cfg: Config, spool: Spool) -> Callable[[Channel], None]:
    """The function get_stream.install routes C-GET and C-MOVE requests to."""
    retrieve = Retrieve(cfg, spool)

    def run(channel: Channel) -> None:
        try:
            retrieve(channel)
        except Broken:
            raise
        except Exception as exc:
            log.error("C-%s failed: %s", channel.kind.upper(), type(exc).__name__)
            if not channel.final_sent and channel.established():
                channel.respond(UNABLE)

    return run
