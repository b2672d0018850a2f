"""Date shifting: pure functions (descriptor cleaning is in ``text.py``).

Retain Longitudinal Temporal Information with Modified Dates shifts every
date of a patient by the same keyed number of whole days.  Times of day are
kept, so every interval (acquisition after injection, series after series,
study after study) and every PET decay-correction relation survives, and SUV
stays computable.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import date, timedelta

MAX_SHIFT_DAYS = 3650  # up to ten years back


def shift_days(secret: bytes, patient_key: str) -> int:
    """A stable per-patient offset in days: negative, never zero."""
    digest = hmac.new(secret, f"dateshift\x00{patient_key}".encode(), hashlib.sha256).digest()
    return -(1 + int.from_bytes(digest[:4], "big") % MAX_SHIFT_DAYS)


def _shift_da(value: str, days: int) -> str:
    value = value.strip()
    if len(value) < 8 or not value[:8].isdigit():
        return ""  # unparseable dates are removed rather than kept
    try:
        d = date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return ""
    return (d + timedelta(days=days)).strftime("%Y%m%d")


def shift_value(vr: str, value: str, days: int) -> str:
    """Shift a DA or DT value (multi-valued with backslashes); other VRs unchanged.

    A DA range ``A-B`` shifts both ends.  DT keeps its time part and offset.
    """
    if vr not in ("DA", "DT"):
        return value
    out = []
    for part in value.split("\\"):
        if vr == "DA" and "-" in part:
            out.append("-".join(_shift_da(p, days) if p else "" for p in part.split("-", 1)))
        elif vr == "DA":
            out.append(_shift_da(part, days))
        else:
            shifted = _shift_da(part[:8], days) if len(part) >= 8 else ""
            out.append(shifted + part[8:] if shifted else "")
    return "\\".join(out)
