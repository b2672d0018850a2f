"""C-MOVE SCU: ask a peer to send one study, Study Root at STUDY level, to an
AE title (this proxy's own for ``bin/ith-proxy retrieve``; the peer must know
that AE as one of its nodes: docs/nodes.md).

The peer opens its own association to the destination for the C-STORE
sub-operations; this side only counts what the peer reports.  The study UID
asked for is the peer's (original) one: it is never logged, nor is any
identifier in the responses (a failed SOP instance list names originals).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import build_context

from ith_proxy.dicom.scu_assoc import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    AssociationFailed,
    ContextsRefused,
    Peer,
    ScuError,
    Timeouts,
    associate,
    close,
    valid_ae_title,
)

log = logging.getLogger("ith_proxy.dicom")

STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_PENDING = (0xFF00, 0xFF01)
_STATUS = {
    0x0000: "success",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA701: "out of resources: unable to calculate the number of matches",
    0xA702: "out of resources: unable to perform the sub-operations",
    0xA801: "move destination unknown",
    0xA900: "identifier does not match SOP class",
    0xB000: "sub-operations complete with one or more failures or warnings",
    0xFE00: "sub-operations terminated by a cancel",
}
_COUNTS = (
    "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations",
    "NumberOfWarningSuboperations",
)


@dataclass(frozen=True)
class MoveResult:
    completed: int  # sub-operations (instances stored at the destination)
    failed: int
    warning: int
    status: int  # the final C-MOVE status
    reason: str

    @property
    def ok(self) -> bool:
        """Every sub-operation completed."""
        return self.status == 0x0000 and self.failed == 0


def describe(status: int) -> str:
    """One line for a final C-MOVE status (PS3.4 C.4.2.1.5)."""
    code = f"0x{status:04X}"
    if status in _STATUS:
        return f"{_STATUS[status]} ({code})"
    if 0xC000 <= status <= 0xCFFF:
        return f"unable to process ({code})"
    return f"unexpected status {code}"


def move(
    peer: Peer, calling_ae: str, study_uid: str, destination_ae: str, timeouts: Timeouts
) -> MoveResult:
    """C-MOVE one study from ``peer`` to ``destination_ae``; raises ScuError for
    a bad argument (permanent) or AssociationFailed, and otherwise reports the
    peer's counts and final status (``MoveResult.ok``)."""
    if not (isinstance(study_uid, str) and len(study_uid) <= 64 and _UID.fullmatch(study_uid)):
        raise ScuError("invalid Study Instance UID", transient=False)
    if not valid_ae_title(destination_ae):
        raise ScuError(f"invalid destination AE title {destination_ae!r}", transient=False)
    contexts = [build_context(STUDY_ROOT_MOVE, [IMPLICIT_LE, EXPLICIT_LE])]
    try:
        assoc = associate(peer, calling_ae, timeouts, contexts)
    except ContextsRefused:
        raise ContextsRefused("the peer refused Study Root C-MOVE") from None
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    counts = [0, 0, 0]
    final: int | None = None
    aborted = False
    try:
        for status, _identifier in assoc.send_c_move(query, destination_ae, STUDY_ROOT_MOVE):
            if "Status" not in status:  # no response within dimse_timeout, or aborted
                aborted = assoc.is_aborted or assoc.acse.is_aborted()
                break
            for n, keyword in enumerate(_COUNTS):
                value = status.get(keyword)
                if isinstance(value, int) and value >= 0:
                    counts[n] = value
            code = int(status.Status)
            if code not in _PENDING:
                final = code
                break
    finally:
        close(assoc, clean=final is not None)
    if final is None:
        raise AssociationFailed(
            "the peer aborted the association during the C-MOVE (a peer that does not "
            "know the calling AE title may do that)"
            if aborted
            else f"no C-MOVE response within {timeouts.dimse:g} s",
            transient=True,
        )
    result = MoveResult(counts[0], counts[1], counts[2], final, describe(final))
    log.info(
        "C-MOVE from %s to %s: %d completed, %d failed, %d warning, %s",
        *(peer, destination_ae, result.completed, result.failed, result.warning, result.reason),
    )
    return result
