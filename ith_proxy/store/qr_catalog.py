"""The C-FIND queries: a pure-data query spec in, parameterized SQL out.

``dicom/qr_match.py`` turns a request identifier into a ``QuerySpec`` (the
level, one ``Match`` per matching key, the return keys); this room turns the
spec into one SELECT over the catalog's Q/R columns (migration 7) and
iterates its cursor, so results stream one row at a time and never sit in a
list.  Every value is a bound parameter; a DICOM wildcard becomes a GLOB
pattern whose literal ``[`` ``]`` ``*`` ``?`` are bracket-escaped, and ``%``
or ``_`` have no meaning in GLOB: no value ever becomes SQL or pattern syntax.

Purged studies and instances (retention) are never answered.  The
connection is a read-only ``Catalog`` of the association's own thread: this
room only ever SELECTs.

Which column answers which attribute, per level, is ``ATTRIBUTES``; the
computed attributes (counts, ModalitiesInStudy) are correlated subqueries
over indexed columns, selected only when asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from ith_proxy.store.catalog import Catalog

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def fold(text: str) -> str:
    """Case-folded as SQLite's upper() does it (ASCII letters only): PN matching
    compares fold(value) with upper(column) or the stored upper(name)."""
    return text.translate(_ASCII_UPPER)


# keyword -> (level, kind, column at its own level).  Kinds: uid (single or a
# list), pn (case-insensitive), text (case-sensitive), date, time.
ATTRIBUTES: dict[str, tuple[str, str, str]] = {
    "PatientID": ("PATIENT", "text", "p.pseudo_id"),
    "PatientName": ("PATIENT", "pn", "p.pseudo_name"),
    "PatientBirthDate": ("PATIENT", "date", "p.birth_date"),
    "PatientSex": ("PATIENT", "text", "p.sex"),
    "StudyInstanceUID": ("STUDY", "uid", "s.study_uid"),
    "StudyDate": ("STUDY", "date", "s.study_date"),
    "StudyTime": ("STUDY", "time", "s.study_time"),
    "AccessionNumber": ("STUDY", "text", "s.accession"),
    "StudyID": ("STUDY", "text", "s.study_id"),
    "StudyDescription": ("STUDY", "text", "s.description"),
    "ReferringPhysicianName": ("STUDY", "pn", "s.referring"),
    "SeriesInstanceUID": ("SERIES", "uid", "se.series_uid"),
    "Modality": ("SERIES", "text", "se.modality"),
    "SeriesNumber": ("SERIES", "text", "se.series_number"),
    "SeriesDescription": ("SERIES", "text", "se.description"),
    "BodyPartExamined": ("SERIES", "text", "se.body_part"),
    "SeriesDate": ("SERIES", "date", "se.series_date"),
    "SeriesTime": ("SERIES", "time", "se.series_time"),
    "SOPInstanceUID": ("IMAGE", "uid", "i.sop_uid"),
    "SOPClassUID": ("IMAGE", "uid", "i.sop_class_uid"),
    "InstanceNumber": ("IMAGE", "text", "i.instance_number"),
    "NumberOfFrames": ("IMAGE", "text", "i.number_of_frames"),
}
# Below its own level a key is read from the lower table's foreign key, so the
# filter runs on that table's index (e.g. studies_patient for PatientID).
_AT_LEVEL = {
    ("PatientID", "STUDY"): "s.patient_id",
    ("PatientID", "SERIES"): "s.patient_id",
    ("PatientID", "IMAGE"): "s.patient_id",
    ("StudyInstanceUID", "SERIES"): "se.study_uid",
    ("StudyInstanceUID", "IMAGE"): "i.study_uid",
    ("SeriesInstanceUID", "IMAGE"): "i.series_uid",
}
_FOLDED = {"p.pseudo_name": "p.name_folded"}  # indexed case-folded copies

_MODALITIES = (
    "(SELECT group_concat(m, '\\') FROM (SELECT DISTINCT x.modality AS m FROM series x"
    " WHERE x.study_uid = s.study_uid AND x.modality <> '' ORDER BY 1))"
)
# keyword -> (level, expression): computed, read-only attributes
COMPUTED: dict[str, tuple[str, str]] = {
    "NumberOfPatientRelatedStudies": (
        "PATIENT",
        "(SELECT count(*) FROM studies x WHERE x.patient_id = p.pseudo_id AND x.purged_at IS NULL)",
    ),
    "NumberOfPatientRelatedSeries": (
        "PATIENT",
        "(SELECT count(*) FROM studies x JOIN series y ON y.study_uid = x.study_uid"
        " WHERE x.patient_id = p.pseudo_id AND x.purged_at IS NULL)",
    ),
    "NumberOfPatientRelatedInstances": (
        "PATIENT",
        "(SELECT count(*) FROM studies x JOIN instances y ON y.study_uid = x.study_uid"
        " WHERE x.patient_id = p.pseudo_id AND x.purged_at IS NULL AND y.purged_at IS NULL)",
    ),
    "NumberOfStudyRelatedSeries": (
        "STUDY",
        "(SELECT count(*) FROM series x WHERE x.study_uid = s.study_uid)",
    ),
    "NumberOfStudyRelatedInstances": (
        "STUDY",
        "(SELECT count(*) FROM instances x WHERE x.study_uid = s.study_uid"
        " AND x.purged_at IS NULL)",
    ),
    "ModalitiesInStudy": ("STUDY", _MODALITIES),
    "NumberOfSeriesRelatedInstances": (
        "SERIES",
        "(SELECT count(*) FROM instances x WHERE x.series_uid = se.series_uid"
        " AND x.purged_at IS NULL)",
    ),
}

_FROM = {
    "PATIENT": "patients p",
    "STUDY": "studies s JOIN patients p ON p.pseudo_id = s.patient_id",
    "SERIES": "series se JOIN studies s ON s.study_uid = se.study_uid"
    " JOIN patients p ON p.pseudo_id = s.patient_id",
    "IMAGE": "instances i JOIN series se ON se.series_uid = i.series_uid"
    " JOIN studies s ON s.study_uid = se.study_uid"
    " JOIN patients p ON p.pseudo_id = s.patient_id",
}
_LIVE = {
    "PATIENT": "EXISTS (SELECT 1 FROM studies x WHERE x.patient_id = p.pseudo_id"
    " AND x.purged_at IS NULL)",
    "STUDY": "s.purged_at IS NULL",
    "SERIES": "s.purged_at IS NULL",
    "IMAGE": "s.purged_at IS NULL AND i.purged_at IS NULL",
}
# the unique keys every row carries (the IMAGE level's locate the stored file)
UNIQUE = {
    "PATIENT": ("p.pseudo_id",),
    "STUDY": ("s.study_uid",),
    "SERIES": ("s.study_uid", "se.series_uid"),
    "IMAGE": ("s.study_uid", "se.series_uid", "i.sop_uid"),
}


@dataclass(frozen=True)
class Match:
    """One matching key: ``how`` is single, wildcard, range or list.

    single: ``values[0]``; wildcard: ``values[0]`` with DICOM ``*``/``?``;
    range: ``values`` = (low, high), either may be ""; list: the values
    (UIDs, or alternatives of single/wildcard for other kinds)."""

    keyword: str
    how: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class QuerySpec:
    level: str
    matches: tuple[Match, ...] = ()
    returns: tuple[str, ...] = ()  # keywords of ATTRIBUTES or COMPUTED, in answer order
    limit: int = 0  # rows fetched at most (0: all)


@dataclass
class Sql:
    text: str
    params: list[object] = field(default_factory=list)


def glob_pattern(value: str) -> str:
    """A DICOM wildcard value as a GLOB pattern: ``*`` and ``?`` stay
    wildcards, a literal ``[`` or ``]`` is bracketed (GLOB has no other
    special character; ``%`` and ``_`` are literal)."""
    out = []
    for ch in value:
        if ch == "[":
            out.append("[[]")
        elif ch == "]":
            out.append("[]]")
        else:
            out.append(ch)
    return "".join(out)


def column(keyword: str, level: str) -> str:
    return _AT_LEVEL.get((keyword, level)) or ATTRIBUTES[keyword][2]


def _one(col: str, kind: str, how: str, value: str, sql: Sql) -> str:
    if kind == "pn":
        col = _FOLDED.get(col, f"upper({col})")
        value = fold(value)
    if how == "wildcard":
        sql.params.append(glob_pattern(value))
        return f"{col} GLOB ?"
    sql.params.append(value)
    return f"{col} = ?"


def _range(col: str, kind: str, low: str, high: str, sql: Sql) -> str:
    """DA/TM range, inclusive; an empty stored value never matches.  A date
    bound is a whole date (an index range); a time's high bound compares on
    its own length, so "-1015" takes 10:15:30."""
    parts = [f"{col} <> ''"]
    if low:
        parts.append(f"{col} >= ?")
        sql.params.append(low)
    if high and kind == "date":
        parts.append(f"{col} <= ?")
        sql.params.append(high)
    elif high:
        parts.append(f"substr({col}, 1, ?) <= ?")
        sql.params += [len(high), high]
    return "(" + " AND ".join(parts) + ")"


def _condition(m: Match, level: str, sql: Sql) -> str:
    if m.keyword == "ModalitiesInStudy":  # any of the study's series
        inner = Sql("")
        alts = [
            _one("x.modality", "text", "wildcard" if ("*" in v or "?" in v) else "single", v, inner)
            for v in m.values
        ]
        sql.params += inner.params
        return (
            "EXISTS (SELECT 1 FROM series x WHERE x.study_uid = s.study_uid AND ("
            + " OR ".join(alts)
            + "))"
        )
    kind = ATTRIBUTES[m.keyword][1]
    col = column(m.keyword, level)
    if m.how == "range":
        return _range(col, kind, m.values[0], m.values[1], sql)
    if m.how == "list" and kind == "uid":
        sql.params.append(json.dumps(list(m.values)))
        return f"{col} IN (SELECT value FROM json_each(?))"
    if m.how == "list":
        alts = [
            _one(col, kind, "wildcard" if ("*" in v or "?" in v) else "single", v, sql)
            for v in m.values
        ]
        return "(" + " OR ".join(alts) + ")"
    return _one(col, kind, m.how, m.values[0], sql)


def build(spec: QuerySpec) -> Sql:
    """The SELECT for a spec: the level's unique keys, then one column per
    return key (in ``spec.returns`` order), over unpurged rows only."""
    level = spec.level
    if level not in LEVELS:
        raise ValueError("unknown level")
    sql = Sql("")
    where = [_LIVE[level]]
    for m in spec.matches:
        where.append(_condition(m, level, sql))
    select = list(UNIQUE[level])
    for kw in spec.returns:
        if kw in COMPUTED:
            select.append(COMPUTED[kw][1])
        else:
            select.append(column(kw, level))
    text = f"SELECT {', '.join(select)} FROM {_FROM[level]} WHERE {' AND '.join(where)}"
    if spec.limit:
        text += " LIMIT ?"
        sql.params.append(spec.limit)
    sql.text = text
    return sql


def available(keyword: str, level: str) -> bool:
    """Whether a key has a column or a computation at this query level (its
    own level or one above)."""
    found = ATTRIBUTES.get(keyword) or COMPUTED.get(keyword)
    return found is not None and LEVELS.index(found[0]) <= LEVELS.index(level)


def rows(catalog: Catalog, spec: QuerySpec) -> Iterator[tuple]:
    """Stream the matching rows: (unique keys..., return values...)."""
    sql = build(spec)
    yield from catalog.conn.execute(sql.text, sql.params)


def plan(catalog: Catalog, spec: QuerySpec) -> list[str]:
    """EXPLAIN QUERY PLAN's detail lines for a spec (tests: no full scans)."""
    sql = build(spec)
    return [r[3] for r in catalog.conn.execute("EXPLAIN QUERY PLAN " + sql.text, sql.params)]
