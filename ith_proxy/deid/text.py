"""Descriptor cleaning: pure functions on text.

The Clean Descriptors option (and the columns of other options that say
``C`` for free text) keeps a descriptor but takes out what identifies the
patient in it: every identifying value of the same instance (names and
their components, IDs, dates as stored...) and digit runs long enough to be
a phone number, a record number or a date written in prose.
"""

from __future__ import annotations

import re


def clean_text(text: str, identifiers: list[str]) -> str:
    """Remove identifying substrings from a descriptor.

    ``identifiers`` are the instance's original identifying values (names and
    their components, IDs, accession number, dates, institution...).  Every
    occurrence, case-insensitive, is replaced with ``*``; so are digit runs of
    six or more (phone numbers, MRNs, dates written inside free text).
    """
    cleaned = text
    for ident in sorted({i for i in identifiers if i and len(i) >= 2}, key=len, reverse=True):
        cleaned = re.sub(re.escape(ident), "*", cleaned, flags=re.IGNORECASE)
    cleaned = re.sub(r"\d{6,}", "*", cleaned)
    return cleaned


def identifier_fragments(values: list[str]) -> list[str]:
    """Values plus their name components (``DOE^JOHN`` -> ``DOE``, ``JOHN``)."""
    out: list[str] = []
    for v in values:
        v = str(v).strip()
        if not v:
            continue
        out.append(v)
        for part in re.split(r"[\^=\\ ,]+", v):
            if (len(part) >= 3 and not part.isdigit()) or len(part) >= 6:
                out.append(part)
    return out
