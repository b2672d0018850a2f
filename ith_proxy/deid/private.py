"""Retain Safe Private: which private attributes may stay.

A private attribute is identified by its group, its private creator string
and the low byte of its element (``gggg,xxee`` in PS3.15 notation), never by
its raw element number, which depends on the block the creator was given.

The built-in list is PS3.15 Table E.3.10-1 "Safe Private Attributes"
(edition 2026d, all 479 rows, held as data in ``safe_private_e3_10.json``;
provenance in docs/deid.md).  Sites add their own in ``[deid] safe_private``.
A listed element still has what it carries checked by the engine: a
sequence's items are walked, a UID is remapped (see ``Deidentifier``).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

TABLE_FILE = Path(__file__).with_name("safe_private_e3_10.json")

Key = tuple[int, str, int]  # (group, CREATOR upper-cased, element low byte)


def load_table(path: Path = TABLE_FILE) -> dict[Key, str]:
    """Table E.3.10-1 as {(group, CREATOR, low byte): VR as listed ("" if blank)}."""
    out: dict[Key, str] = {}
    for row in json.loads(path.read_text(encoding="utf-8"))["rows"]:
        key = (int(row["group"], 16), row["creator"].strip().upper(), int(row["element"][-2:], 16))
        out[key] = row["vr"].strip()
    return out


class SafePrivate:
    def __init__(self, extra: tuple[Key, ...] = (), table: dict[Key, str] | None = None) -> None:
        self.listed = load_table() if table is None else table
        self.site = frozenset(extra)

    def safe_vr(self, ds: Dataset, tag: BaseTag) -> str | None:
        """None if ``tag`` is not safe; else the VR the standard lists for it
        ("" when the table leaves it blank), or "*" for a site-configured entry."""
        block = tag.element >> 8
        if block < 0x10:
            return None
        creator = ds.get((tag.group, block))
        if creator is None or not isinstance(creator.value, str):
            return None
        key = (tag.group, creator.value.strip().upper(), tag.element & 0xFF)
        if key in self.site:
            return "*"
        return self.listed.get(key)
