"""A study's original patient- and study-level values, gathered from the vault
records of its instances: what ``POST /api/phi-metadata/`` answers.

De-identification files every value it replaced or removed under a level
(``deid.profile.level_of``: patient, study, series or instance) in each
instance's vault record, ``record["phi"][level][keyword]``.  Only top-level
attributes get the patient or study level (a value inside a sequence is an
instance's), so the keys here are DICOM keywords.

How values are given back (JSON):

- text, dates, times, UIDs, person names (``Family^Given``): strings;
- numbers (IS, DS, US ...): strings, as written;
- an attribute whose dictionary VM allows several values: a list of strings
  (an empty value: an empty list), whatever its count in this study;
- a binary value (OB, OW, UN ...): ``{"InlineBinary": "<base64>"}``, as in
  the DICOM JSON model (PS3.18 F.2.7);
- a sequence: a list of items, each an object keyed the same way.

The instances of a study should agree on these values; a hostile or broken
sender can make them differ.  The answer holds the value of the first
instance received that has the attribute, and ``conflicts`` lists, for each
attribute whose instances disagree, every distinct value in the order the
instances were received.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VM, tag_for_keyword

LEVELS = ("patient", "study")


@dataclass
class Originals:
    values: dict[str, object] = field(default_factory=dict)
    conflicts: dict[str, list[object]] = field(default_factory=dict)
    instances: int = 0  # vault records read


def _multi(keyword: str) -> bool:
    """May this attribute hold several values (its dictionary VM is not 1)?"""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return False
    try:
        return dictionary_VM(tag) != "1"
    except KeyError:
        return False


def present(keyword: str, value: object) -> object:
    """One vault value as the API gives it back (see the module docstring)."""
    if isinstance(value, (bytes, bytearray)):
        return {"InlineBinary": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):  # a sequence: its items
        return [
            {k: present(k, v) for k, v in item.items()} if isinstance(item, dict) else item
            for item in value
        ]
    if isinstance(value, dict):  # not written today; kept, keyed the same way
        return {k: present(k, v) for k, v in value.items()}
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = str(value)
    if _multi(keyword):
        return text.split("\\") if text else []
    return text


def gather(records: Iterable[dict]) -> Originals:
    """The patient- and study-level originals of these records (one per
    instance, in the order received); ValueError when a record is not shaped
    as the indexer writes them."""
    out = Originals()
    seen: dict[str, list[object]] = {}
    keys: dict[str, set[str]] = {}  # the distinct values of each keyword, as JSON
    for record in records:
        phi = record.get("phi")
        if not isinstance(phi, dict):
            raise ValueError("a vault record without its values")
        out.instances += 1
        for level in LEVELS:
            values = phi.get(level) or {}
            if not isinstance(values, dict):
                raise ValueError("a vault record with a malformed level")
            for keyword, raw in values.items():
                value = present(keyword, raw)
                known = seen.setdefault(keyword, [])
                if not known:
                    out.values[keyword] = value
                key = json.dumps(value, sort_keys=True)
                if key not in keys.setdefault(keyword, set()):
                    keys[keyword].add(key)
                    known.append(value)
    out.conflicts = {k: v for k, v in seen.items() if len(v) > 1}
    return out
