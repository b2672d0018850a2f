"""C-ECHO SCU and C-STORE SCU (C-MOVE SCU: dicom/move.py).

Plain values in (``Peer``, ``Timeouts``, file paths), ``Outcome`` values out:
dicom/ knows nothing of nodes or the outbox.  The forwarder maps its node to a
``Peer`` and records each ``Outcome`` in its ledger as ``on_outcome`` reports
it, so a send killed half-way resumes where it stopped.  Every association
is made by dicom/scu_assoc.py (TCP_NODELAY, wake-ups, bounded socket I/O).

**C-STORE.**  Contexts are proposed for exactly the (SOP class, transfer
syntax) pairs of the files, read from each file's meta only
(scu_wire.read_meta): one context per pair, and for a file in Explicit or
Implicit VR Little Endian one more with the other of the two, so a peer that
takes only the default syntax still gets the instance (re-encoded through
pydicom: the only decode).  More pairs than 128 contexts hold: several
associations in turn.

The data set goes out as it is in the file (scu_wire.send_message, which
says why not pynetdicom's ``send_c_store``), written from this thread under
the socket lock the DUL's own writes also take, while the association's
reactor is paused as ``send_c_store`` pauses it; the DUL thread still reads
the responses.

Every file gets exactly one ``Outcome``: delivered, transient (try again
later) or permanent (dead letter), with a reason; ``classify`` is the status
table, shared with the STOW-RS client (dicom/status.py).  ``store`` raises
only what ``on_outcome`` raises (after aborting).
Logs carry UIDs, counts and statuses, never a peer's error comment.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from pydicom import dcmread
from pynetdicom import build_context
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from ith_proxy.dicom import scu_wire as wire
from ith_proxy.dicom.scu_assoc import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    AssociationFailed,
    ContextsRefused,
    EchoFailed,
    Peer,
    ScuError,
    Timeouts,
    associate,
    close,
    echo,
    writer,
)
from ith_proxy.dicom.scu_wire import FileMeta, WireError
from ith_proxy.dicom.status import classify
from ith_proxy.fsio import open_read

__all__ = [
    "AssociationFailed",
    "ContextsRefused",
    "EchoFailed",
    "Outcome",
    "Peer",
    "ScuError",
    "Timeouts",
    "classify",
    "echo",
    "store",
]

log = logging.getLogger("ith_proxy.dicom")

OTHER_LE = {EXPLICIT_LE: IMPLICIT_LE, IMPLICIT_LE: EXPLICIT_LE}
MAX_CONTEXTS = 128
ABORTED = "association aborted"


@dataclass(frozen=True)
class Outcome:
    sop_uid: str  # "" when the file could not be read
    status: int | None  # the peer's DIMSE status, None when it gave none
    result: str  # "delivered" | "transient" | "permanent"
    reason: str
    warning: str = ""  # a delivered instance's warning status, as a reason
    path: Path | None = None  # the file it is about


@dataclass(frozen=True)
class _Item:
    index: int
    path: Path
    meta: FileMeta

    def outcome(self, result: str, reason: str) -> Outcome:
        return Outcome(self.meta.sop_instance, None, result, reason, path=self.path)

    def refused(self) -> Outcome:
        meta = self.meta
        return self.outcome(
            "permanent",
            f"presentation context refused (SOP class {meta.sop_class}, "
            f"transfer syntax {meta.transfer_syntax})",
        )


class _Broken(Exception):
    """The association cannot go on; ``outcome`` is the instance in flight's
    when that is not simply transient with ``reason``."""

    def __init__(self, reason: str, outcome: Outcome | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome = outcome


def _unreadable(exc: OSError | WireError) -> str:
    if isinstance(exc, WireError):
        return str(exc)
    return f"cannot read the file: {exc.strerror or type(exc).__name__}"


def _plan(items: list[_Item]) -> list[tuple[list[tuple[str, str]], list[_Item]]]:
    """(contexts, items) per association; a SOP class's contexts share one
    association unless they alone are more than MAX_CONTEXTS."""
    by_class: dict[str, list[str]] = {}
    for item in items:
        syntaxes = by_class.setdefault(item.meta.sop_class, [])
        ts = item.meta.transfer_syntax
        for proposed in (ts, OTHER_LE.get(ts)):
            if proposed is not None and proposed not in syntaxes:
                syntaxes.append(proposed)
    groups: list[list[tuple[str, str]]] = []
    for sop_class, syntaxes in by_class.items():
        pairs = [(sop_class, ts) for ts in syntaxes]
        for start in range(0, len(pairs), MAX_CONTEXTS):
            chunk = pairs[start : start + MAX_CONTEXTS]
            if not groups or len(groups[-1]) + len(chunk) > MAX_CONTEXTS:
                groups.append([])
            groups[-1].extend(chunk)
    where = {pair: n for n, group in enumerate(groups) for pair in group}
    members: list[list[_Item]] = [[] for _ in groups]
    for item in items:
        members[where[item.meta.sop_class, item.meta.transfer_syntax]].append(item)
    return list(zip(groups, members, strict=True))


def reencoded(fh: BinaryIO, ts: str) -> bytes:
    """The data set in Explicit/Implicit VR Little Endian ``ts`` (lossless
    between these two): the fallback when the peer refused the file's own
    syntax, here and for C-GET (the only decode).  WireError says why not."""
    try:
        fh.seek(0)
        data = encode(dcmread(fh), ts == IMPLICIT_LE, True)
    except Exception as exc:  # pydicom raises many types on bad input
        raise WireError(f"cannot re-encode for {ts}: {type(exc).__name__}") from None
    if not data:
        raise WireError(f"cannot re-encode for {ts}")
    return data


@dataclass(frozen=True)
class _StoreResponse:
    msg_id: int
    status: int
    # what the association reactor reads if a late one reaches it after the
    # store loop (a response after a DIMSE timeout): it logs and ignores it
    is_valid_request: ClassVar[bool] = False
    msg_type: ClassVar[str] = "C-STORE-RSP"


def _fast_responses(assoc: Association) -> None:
    """Decode whole one-PDV C-STORE-RSPs with struct, in the DUL thread
    (scu_wire.parse_store_response); anything else the stock way."""
    dimse = assoc.dimse
    stock = dimse.receive_primitive

    def receive(primitive: Any) -> None:
        pdvs = primitive.presentation_data_value_list
        if dimse.message is None and len(pdvs) == 1:
            ctx, pdv = pdvs[0]
            parsed = wire.parse_store_response(pdv)
            if parsed is not None:
                item: Any = (ctx, _StoreResponse(*parsed))  # only _send_one takes it
                dimse.msg_queue.put(item)
                return
        stock(primitive)

    dimse.receive_primitive = receive  # type: ignore[method-assign]  # per association


def _send_one(
    assoc: Association, item: _Item, ctx: int, convert: str | None, msg_id: int, dimse: float
) -> Outcome:
    """One C-STORE exchange; raises _Broken when the association cannot go on."""
    try:
        fh = open_read(item.path)
    except OSError as exc:
        return item.outcome("permanent", _unreadable(exc))
    with fh:
        try:
            meta = wire.read_meta(fh)
            if meta != item.meta:  # replaced since it was planned: plan it again later
                return item.outcome("transient", "the file changed during the send")
            source: BinaryIO = fh
            length = meta.size - meta.offset
            if convert is not None:
                data = reencoded(fh, convert)
                source, length = io.BytesIO(data), len(data)
        except (OSError, WireError) as exc:
            return item.outcome("permanent", _unreadable(exc))
        command = wire.store_command(msg_id, meta.sop_class, meta.sop_instance)
        try:
            max_pdu = assoc.acceptor.maximum_length or 0
            wire.send_message(writer(assoc), ctx, max_pdu, command, source, length)
        except WireError as exc:  # the message is cut: the association cannot go on
            raise _Broken(ABORTED, item.outcome("permanent", str(exc))) from None
        except OSError as exc:
            raise _Broken(f"{ABORTED} ({exc.strerror or type(exc).__name__})") from None
    rsp: Any = assoc.dimse.get_msg(block=True)[1]  # a DIMSE primitive or a _StoreResponse
    if rsp is None:
        if assoc.acse.is_aborted():
            raise _Broken(ABORTED)
        raise _Broken(f"no C-STORE response within {dimse:g} s")
    if isinstance(rsp, C_STORE):
        rsp = _StoreResponse(rsp.MessageIDBeingRespondedTo, rsp.Status)  # type: ignore[arg-type]  # checked next
    status = rsp.status if isinstance(rsp, _StoreResponse) and rsp.msg_id == msg_id else None
    if not isinstance(status, int):
        raise _Broken("invalid C-STORE response from the peer")
    result, reason = classify(status)
    warning = reason if result == "delivered" and status != 0x0000 else ""
    return Outcome(meta.sop_instance, status, result, reason, warning, item.path)


def _store_group(
    peer: Peer,
    calling_ae: str,
    timeouts: Timeouts,
    pairs: list[tuple[str, str]],
    items: list[_Item],
    record: Callable[[_Item, Outcome], None],
) -> None:
    """One association: its contexts, then its instances in turn."""
    try:
        contexts = [build_context(sop, [ts]) for sop, ts in pairs]
        assoc = associate(peer, calling_ae, timeouts, contexts)
    except ContextsRefused:
        for item in items:
            record(item, item.refused())
        return
    except AssociationFailed as exc:
        for item in items:
            record(item, item.outcome("transient" if exc.transient else "permanent", exc.reason))
        return
    accepted = {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id or 0)
        for cx in assoc.accepted_contexts
    }
    try:
        wire.fragment_size(assoc.acceptor.maximum_length or 0)
    except WireError as exc:  # a peer maximum PDU too small to send anything through
        close(assoc, clean=False)
        for item in items:
            record(item, item.outcome("permanent", str(exc)))
        return
    _fast_responses(assoc)
    broken: str | None = None
    msg_id = 0
    # pause the reactor so that it leaves our responses to us, as send_c_store does
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused and assoc.is_alive():
        time.sleep(0.0001)
    try:
        for item in items:
            if broken is None and not assoc.is_established:
                broken = ABORTED
            if broken is not None:
                record(item, item.outcome("transient", ABORTED))
                continue
            sop, ts = item.meta.sop_class, item.meta.transfer_syntax
            convert = None
            ctx = accepted.get((sop, ts))
            if ctx is None and ts in OTHER_LE:
                convert = OTHER_LE[ts]
                ctx = accepted.get((sop, convert))
            if ctx is None:
                record(item, item.refused())
                continue
            msg_id = msg_id % 0xFFFF + 1
            try:
                outcome = _send_one(assoc, item, ctx, convert, msg_id, timeouts.dimse)
            except _Broken as exc:
                broken = exc.reason
                outcome = exc.outcome or item.outcome("transient", exc.reason)
            record(item, outcome)
    except BaseException:
        broken = broken or "interrupted"
        raise
    finally:
        assoc._reactor_checkpoint.set()
        close(assoc, clean=broken is None)


def store(
    peer: Peer,
    calling_ae: str,
    files: Sequence[Path],
    timeouts: Timeouts,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """C-STORE ``files`` to ``peer``: one Outcome per file, returned in the
    order of ``files`` and passed to ``on_outcome`` as soon as it is known."""
    started = time.monotonic()
    outcomes: list[Outcome | None] = [None] * len(files)
    counts = dict.fromkeys(("delivered", "transient", "permanent"), 0)

    def record(item: _Item, outcome: Outcome) -> None:
        outcomes[item.index] = outcome
        counts[outcome.result] += 1
        # A transient outcome without a status is the association's (refused,
        # aborted, timed out): the summary below counts it, and the forwarder
        # logs the reason once per attempt, not once per instance of the study.
        if outcome.result == "permanent" or (
            outcome.result == "transient" and outcome.status is not None
        ):
            status = "none" if outcome.status is None else f"0x{outcome.status:04X}"
            uid = outcome.sop_uid or "(unreadable file)"
            log.warning("C-STORE %s to %s: %s, status %s", uid, peer, outcome.result, status)
        if on_outcome is not None:
            on_outcome(outcome)

    items: list[_Item] = []
    for index, name in enumerate(files):
        path = Path(name)
        try:
            with open_read(path) as fh:
                items.append(_Item(index, path, wire.read_meta(fh)))
        except (OSError, WireError) as exc:
            item = _Item(index, path, FileMeta("", "", "", 0, 0))
            record(item, Outcome("", None, "permanent", _unreadable(exc), path=path))
    for pairs, members in _plan(items):
        _store_group(peer, calling_ae, timeouts, pairs, members, record)
    elapsed = time.monotonic() - started
    log.info(
        "C-STORE to %s: %d delivered, %d transient, %d permanent in %.1f s",
        *(peer, counts["delivered"], counts["transient"], counts["permanent"], elapsed),
    )
    return [outcome for outcome in outcomes if outcome is not None]
