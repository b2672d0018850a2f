"""What one Annex E action makes of one value: the PHI rule, written once.

The engine applies an action along one of two paths: raw text elements are
read and replaced without pydicom decoding them (``Deidentifier._act_raw``),
everything else goes through a decoded DataElement (``Deidentifier._act``).
Both ask ``replacement`` what the element becomes, so the two cannot drift
apart: a drift would leak a value, or lose it from the vault, depending only
on how the element happened to be held (tests/test_deid_actions.py runs every
case through both paths).

Values come and go in plain form: text as stored, multiple values joined with
backslashes; ``bytes`` for binary VRs; numbers; a list for a sequence.
``None`` is an empty value.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ith_proxy.deid.dates import shift_value
from ith_proxy.deid.pseudo import remap_uid
from ith_proxy.deid.text import clean_text

DUMMY_BY_VR: dict[str, object] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "PN": "ANONYMIZED",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "FL": 0.0,
    "FD": 0.0,
    "AE": "ANONYMIZED",
    "CS": "ANONYMIZED",
}
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SV", "UV"})
# text that cleaning (C) rewrites, and whose values are the identifiers it removes
CLEANABLE_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "AE", "UC"})


class Outcome(Enum):
    REMOVE = "remove"  # the element goes (X); its value to the vault
    KEEP = "keep"  # it stays as it is: kept, or an empty value with nothing to hide


REMOVE = Outcome.REMOVE
KEEP = Outcome.KEEP


@dataclass(frozen=True)
class Context:
    """What the rule needs besides the element, fixed for one instance."""

    secret: bytes
    patient_id: str  # the pseudonyms PatientID and PatientName get
    patient_name: str
    date_mode: str  # REMOVED, MODIFIED or UNMODIFIED
    days: int  # the patient's keyed date shift (Modified Dates)
    identifiers: tuple[str, ...]  # the instance's identifying text, for cleaning


def replacement(action: str, vr: str, keyword: str, value: object, ctx: Context) -> object:
    """What an element becomes under a resolved action (``profile.Rule.action``):
    ``REMOVE``, ``KEEP``, or its new value in plain form (``None`` empty,
    ``[]`` an emptied sequence).

    An empty value hides nothing, so it stays, except under ``D``: the
    standard asks for a non-zero length value there (``D?`` is the profile's
    "D when valued, else Z").  PatientID and PatientName always get the
    pseudonyms unless removed (the walk never brings a kept element here)."""
    if action == "X":
        return REMOVE
    if keyword == "PatientID":
        return ctx.patient_id
    if keyword == "PatientName":
        return ctx.patient_name
    if action == "K" or (action != "D" and _empty(value)):
        return KEEP
    if action == "Z":
        return _emptied(vr)
    if action in ("D", "D?"):
        return dummy(vr, value, ctx.secret)
    if action == "U":
        # the rule says U, so remap even under Retain UIDs (its column says K
        # for the UIDs it keeps, and those never get here)
        return remap_uids(ctx.secret, value) if vr == "UI" else _emptied(vr)
    if action == "C":
        return _clean(vr, value, ctx)
    raise ValueError(f"unknown de-identification action {action!r}")


def dummy(vr: str, value: object, secret: bytes) -> object:
    """A value of the right VR that says nothing; a UID is remapped, so that
    references to it stay consistent."""
    if vr == "SQ":
        return []
    if vr in BINARY_VRS:
        return b"\x00\x00"
    if vr == "AT":
        return 0
    if vr == "UI":
        return remap_uids(secret, value)
    return DUMMY_BY_VR.get(vr, "ANONYMIZED")


def remap_uids(secret: bytes, value: object) -> str:
    """Every UID of a (multi-valued) UI value remapped, empty values kept empty."""
    return "\\".join(remap_uid(secret, uid) for uid in str(value or "").split("\\"))


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, (str, bytes, list)) and len(value) == 0)


def _emptied(vr: str) -> object:
    return [] if vr == "SQ" else None


def _clean(vr: str, value: object, ctx: Context) -> object:
    """C: dates shift (Modified Dates) or go, times of day stay with whole-day
    shifts, text loses the instance's identifiers; anything else is emptied,
    since it cannot be cleaned safely."""
    if vr in ("DA", "DT"):
        return shift_value(vr, str(value), ctx.days) if ctx.date_mode == "MODIFIED" else None
    if vr == "TM":
        return KEEP if ctx.date_mode == "MODIFIED" else None
    if vr in CLEANABLE_VRS:
        return clean_text(str(value), list(ctx.identifiers))
    return None
