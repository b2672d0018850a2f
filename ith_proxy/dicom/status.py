"""What a DICOM status code means for one instance sent to a node.

One table for both ways out: the C-STORE SCU reads the status of each
C-STORE response, the STOW-RS client the FailureReason (0008,1197) and
WarningReason (0008,1196) of each instance in the response, and both turn
it into what the forwarder's ledger records:

==========================================  ===========  ======================
status                                      result       why
==========================================  ===========  ======================
0x0000 Success                              delivered
0xBxxx, 0x0107, 0x0116 (warnings)           delivered    the warning is kept
0xA7xx Out of resources                     transient    the peer may recover
0x0213 Resource limitation, 0xFE00 Cancel   transient
0xA9xx, 0xCxxx (data set refused)           permanent    resending cannot help
0x0117, 0x0122, 0x0124, 0x0211, 0x0212      permanent    instance, class, or
                                                         authorization refused
anything else (0x0110 Processing failure,   transient    retried until the
unknown codes)                                           attempts run out
==========================================  ===========  ======================

Unknown failures are transient on purpose: a retry costs little and the
forwarder's attempt limit turns a lasting one into a permanent failure,
while a wrong "permanent" would dead-letter an instance a retry would
have delivered.
"""

from __future__ import annotations

DELIVERED = "delivered"
TRANSIENT = "transient"
PERMANENT = "permanent"

NAMES = {
    0x0000: "Success",
    0x0107: "Attribute list error",
    0x0110: "Processing failure",
    0x0116: "Attribute value out of range",
    0x0117: "Invalid object instance",
    0x0122: "SOP class not supported",
    0x0124: "Not authorized",
    0x0210: "Duplicate invocation",
    0x0211: "Unrecognized operation",
    0x0212: "Mistyped argument",
    0x0213: "Resource limitation",
    0xA700: "Out of resources",
    0xA900: "Data set does not match SOP class",
    0xB000: "Coercion of data elements",
    0xB006: "Elements discarded",
    0xB007: "Data set does not match SOP class",
    0xC000: "Cannot understand",
    0xC122: "Transfer syntax not supported",
    0xFE00: "Cancel",
}
_FAMILY = {0xA7: "Out of resources", 0xA9: "Data set does not match SOP class"}

WARNINGS = frozenset({0x0107, 0x0116})
PERMANENT_CODES = frozenset({0x0117, 0x0122, 0x0124, 0x0211, 0x0212})
TRANSIENT_CODES = frozenset({0x0213, 0xFE00})


def describe(status: int) -> str:
    """'0xA701 Out of resources': the code and its name, for a reason text."""
    if not 0 <= status <= 0xFFFF:
        return f"invalid status {status}"
    name = NAMES.get(status) or _FAMILY.get(status >> 8)
    if name is None and status >> 12 == 0xC:
        name = "Cannot understand"
    if name is None and status >> 12 == 0xB:
        name = "Warning"
    return f"0x{status:04X} {name}" if name else f"0x{status:04X}"


def classify(status: int) -> tuple[str, str]:
    """(result, description): result is ``delivered`` (warnings included:
    the description is then the warning to record), ``transient`` or
    ``permanent``."""
    text = describe(status)
    if not 0 <= status <= 0xFFFF:
        return TRANSIENT, text
    if status == 0x0000 or status in WARNINGS or status >> 12 == 0xB:
        return DELIVERED, text
    if status >> 8 == 0xA7 or status in TRANSIENT_CODES:
        return TRANSIENT, text
    if status in PERMANENT_CODES or status >> 8 == 0xA9 or status >> 12 == 0xC:
        return PERMANENT, text
    return TRANSIENT, f"{text} (not a known permanent failure: retried)"
