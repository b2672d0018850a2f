"""A C-FIND identifier as pure data: the level, the matching keys and the
return keys (``store.qr_catalog.QuerySpec``), per PS3.4 C.2.2.2 and C.4.1.

- Levels as each model defines them: Patient Root PATIENT/STUDY/SERIES/IMAGE,
  Study Root STUDY/SERIES/IMAGE (PATIENT there is refused, 0xA900).
- Hierarchical keys (C.4.1.2.2): below the model's top level the unique keys
  of every level above must be present with single value matching (0xA900).
- Matching: an empty value is universal; ``*`` and ``?`` make a wildcard
  (a lone ``*`` is universal); ``a-``, ``-b``, ``a-b`` a range for DA and TM;
  backslash-separated UIDs a list; several values of another key are
  alternatives.  PN is matched case-insensitively.  UIDs take no wildcard.
- Keys of this level or above with a catalog column or a computation are
  matched and returned; the others are return keys only (IMAGE level: read
  from the stored header; above it: returned empty).  Keys of levels below
  the query level are returned empty and never matched.

Anything that does not fit (a bad level, a sequence or a binary VR where a
value is expected, an invalid date, range or UID, a value longer than
``MAX_VALUE``, sequences nested deeper than ``MAX_DEPTH``) raises
``IdentifierError`` with the status to answer and a fixed comment: never a
value of the identifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ith_proxy.store import qr_catalog as q

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
MODELS = {
    PATIENT_ROOT_FIND: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    STUDY_ROOT_FIND: ("STUDY", "SERIES", "IMAGE"),
}
NOT_MATCHING = 0xA900  # Identifier does not match SOP Class
CANNOT_PROCESS = 0xC000  # Unable to process
MAX_VALUE = 256  # characters in one matching value (the longest main attribute is 64)
MAX_WILDCARDS = 16  # per value: GLOB cost stays bounded
MAX_DEPTH = 3  # nested sequence levels in an identifier
_UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}
_SKIP = {0x00080005, 0x00080052}  # SpecificCharacterSet, QueryRetrieveLevel
_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI", "LT", "ST"}
# special return keys answered from the proxy itself
SELF = {"RetrieveAETitle", "InstanceAvailability"}


class IdentifierError(ValueError):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class ReturnKey:
    """One element of each answer: where its value comes from.

    source: "sql" (``index`` into the row after the unique keys), "header"
    (IMAGE level: the stored file), "self" (RetrieveAETitle,
    InstanceAvailability) or "empty"."""

    tag: int
    keyword: str
    vr: str
    source: str
    index: int = -1


@dataclass(frozen=True)
class Query:
    model: str
    level: str
    spec: q.QuerySpec
    keys: tuple[ReturnKey, ...]


def _values(elem) -> list[str]:
    value = elem.value
    if value is None:
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, (bytes, bytearray, Dataset)):
            raise IdentifierError(NOT_MATCHING, "binary value where text is expected")
        text = str(item).strip()
        if len(text) > MAX_VALUE:
            raise IdentifierError(NOT_MATCHING, "matching value too long")
        if any(ord(ch) < 0x20 for ch in text):  # binary (e.g. a sequence read as text)
            raise IdentifierError(NOT_MATCHING, "control characters in a matching value")
        out.append(text)
    return [v for v in out if v] if len(out) > 1 else out


def _wild(value: str) -> bool:
    return "*" in value or "?" in value


def _match(keyword: str, kind: str, values: list[str]) -> q.Match | None:
    """The Match for a key's values, or None for universal matching."""
    if not values or values == [""]:
        return None
    if kind == "uid":
        for v in values:
            if len(v) > 64 or not _UID.fullmatch(v):
                raise IdentifierError(NOT_MATCHING, f"invalid UID in {keyword}")
        return q.Match(keyword, "single" if len(values) == 1 else "list", tuple(values))
    if kind in ("date", "time"):
        if len(values) != 1:
            raise IdentifierError(NOT_MATCHING, f"several values in {keyword}")
        return _range(keyword, kind, values[0])
    for v in values:
        if v.count("*") + v.count("?") > MAX_WILDCARDS:
            raise IdentifierError(NOT_MATCHING, f"too many wildcards in {keyword}")
    if any(set(v) == {"*"} for v in values):
        return None  # "*" alone: universal
    if len(values) > 1:
        return q.Match(keyword, "list", tuple(values))
    return q.Match(keyword, "wildcard" if _wild(values[0]) else "single", tuple(values))


def _range(keyword: str, kind: str, value: str) -> q.Match:
    pattern = _DATE if kind == "date" else _TIME
    if value.count("-") > 1:
        raise IdentifierError(NOT_MATCHING, f"invalid range in {keyword}")
    if "-" not in value:
        if not pattern.fullmatch(value):
            raise IdentifierError(NOT_MATCHING, f"invalid value in {keyword}")
        if kind == "date":
            return q.Match(keyword, "single", (value,))
        return q.Match(keyword, "range", (value, value))  # 10 matches 10:xx:xx
    low, high = value.split("-")
    if not (low or high) or any(p and not pattern.fullmatch(p) for p in (low, high)):
        raise IdentifierError(NOT_MATCHING, f"invalid range in {keyword}")
    return q.Match(keyword, "range", (low, high))


def _level(identifier: Dataset, model: str) -> str:
    try:
        raw = identifier.get("QueryRetrieveLevel")
    except Exception:
        raise IdentifierError(NOT_MATCHING, "unreadable QueryRetrieveLevel") from None
    level = str(raw or "").strip().upper() if isinstance(raw, str) else ""
    if level not in MODELS[model]:
        raise IdentifierError(NOT_MATCHING, "QueryRetrieveLevel missing or not in this model")
    return level


def _check_depth(ds: Dataset, depth: int = 0) -> None:
    """Sequence matching needs one level (PS3.4 C.2.2.2.6); deeper nesting is
    refused before anything else decodes it."""
    for elem in ds:
        if elem.VR == "SQ" and elem.value:
            if depth >= MAX_DEPTH:
                raise IdentifierError(NOT_MATCHING, "sequences nested too deeply")
            for item in elem.value:
                _check_depth(item, depth + 1)


def parse(identifier: Dataset, model: str, limit: int = 0) -> Query:
    """The query an identifier asks for, under one model (a FIND SOP Class UID)."""
    if model not in MODELS:
        raise IdentifierError(NOT_MATCHING, "not a supported FIND model")
    _check_depth(identifier)
    level = _level(identifier, model)
    depth = q.LEVELS.index(level)
    matches: list[q.Match] = []
    keys: list[ReturnKey] = []
    returns: list[str] = []
    seen_unique: dict[str, q.Match | None] = {}
    for elem in identifier:
        tag = int(elem.tag)
        if tag in _SKIP or elem.tag.is_private or tag & 0xFFFF == 0 or tag >> 16 < 0x0008:
            continue
        keyword = elem.keyword
        vr = elem.VR if elem.VR in _TEXT_VRS or elem.VR == "SQ" else _dict_vr(tag)
        found = q.ATTRIBUTES.get(keyword) or q.COMPUTED.get(keyword)
        if found is None or not q.available(keyword, level):
            if keyword in SELF:
                keys.append(ReturnKey(tag, keyword, vr, "self"))
                continue
            stored = found is None and level == "IMAGE"
            keys.append(ReturnKey(tag, keyword, vr, "header" if stored else "empty"))
            continue
        expected = _dict_vr(tag)
        if elem.VR == "SQ" or (expected not in (elem.VR, "UN") and elem.VR != "UN"):
            raise IdentifierError(NOT_MATCHING, f"{keyword} has the wrong VR")
        if elem.VR == "UN" and elem.value:
            raise IdentifierError(NOT_MATCHING, f"{keyword} has an unknown VR")
        values = _values(elem)
        if keyword in q.ATTRIBUTES:
            match = _match(keyword, q.ATTRIBUTES[keyword][1], values)
        elif keyword == "ModalitiesInStudy":
            match = _match(keyword, "text", values)
            if match is not None:  # any series' modality: alternatives
                match = q.Match(keyword, "list", match.values)
        else:
            match = None  # a count: return key only
        if keyword in _UNIQUE.values():
            seen_unique[keyword] = match
        if match is not None:
            matches.append(match)
        keys.append(ReturnKey(tag, keyword, expected or vr, "sql", len(returns)))
        returns.append(keyword)
    top = q.LEVELS.index(MODELS[model][0])
    for above in q.LEVELS[top:depth]:
        unique = _UNIQUE[above]
        match = seen_unique.get(unique)
        if match is None or match.how != "single":
            raise IdentifierError(
                NOT_MATCHING, f"{unique} must be given with a single value at this level"
            )
    own = _UNIQUE.get(level)
    if own is not None and own not in returns:  # the level's unique key is always answered
        tag = _TAGS[own]
        keys.append(ReturnKey(tag, own, _dict_vr(tag), "sql", len(returns)))
        returns.append(own)
    if level == "IMAGE" and "SOPInstanceUID" not in returns:
        keys.append(ReturnKey(0x00080018, "SOPInstanceUID", "UI", "sql", len(returns)))
        returns.append("SOPInstanceUID")
    spec = q.QuerySpec(level, tuple(matches), tuple(returns), limit)
    return Query(model, level, spec, tuple(keys))


_TAGS = {"PatientID": 0x00100020, "StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E}


def _dict_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"
