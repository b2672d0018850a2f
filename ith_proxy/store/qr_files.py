"""Retrieve's SQL: the stored instances a C-GET or C-MOVE identifier names.

A hierarchical retrieve (PS3.4 C.4.2.2.1, C.4.3.2.1) names one level and a
list of unique keys at that level; unique keys of the levels above, when
given, narrow it (a key that does not fit the rest matches nothing).  The
PATIENT level is keyed by PatientID, which here is the pseudonymized
patient id (``studies.patient_id``).

Purged instances and purged studies are never returned (their files are
gone; retention keeps only the rows and study.json).  At most ``limit``
rows are read: the caller asks for one more than it can serve, so that it
can refuse instead of cutting.  Lists are queried in chunks of ``CHUNK``
bound parameters, each through an index (primary keys, instances_study,
instances_series); a PATIENT-level retrieve reads ``studies`` by
patient_id (no index in the catalog yet: one pass over ``studies``, not over
``instances``).  Read-only: Q/R never writes to the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass

from ith_proxy.store.catalog import Catalog

CHUNK = 500  # bound parameters per IN (...) list
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_COLUMN = {"STUDY": "i.study_uid", "SERIES": "i.series_uid", "IMAGE": "i.sop_uid"}
_SELECT = (
    "SELECT i.study_uid, i.series_uid, i.sop_uid, i.sop_class_uid, i.transfer_syntax, i.size "
    "FROM instances i JOIN studies s ON s.study_uid = i.study_uid "
    "WHERE i.purged_at IS NULL AND s.purged_at IS NULL"
)


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int


@dataclass(frozen=True)
class RetrieveKeys:
    """What a retrieve identifier names: ``level``, the list of unique keys at
    that level (``keys``), and the single unique keys above it, when given."""

    level: str
    keys: tuple[str, ...]
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None


class QrFiles:
    """Retrieve queries over one (read-only) catalog connection."""

    def __init__(self, catalog: Catalog) -> None:
        self._conn = catalog.conn

    def instances(self, want: RetrieveKeys, limit: int) -> list[StoredInstance]:
        """The unpurged instances ``want`` names, ordered by study, series and
        SOP Instance UID; at most ``limit``."""
        if want.level not in LEVELS:
            raise ValueError(f"unknown level {want.level!r}")
        narrow: list[str] = []
        args: list[object] = []
        above = (
            ("s.patient_id", want.patient_id),
            ("i.study_uid", want.study_uid),
            ("i.series_uid", want.series_uid),
        )
        for column, value in above:
            if value is not None:
                narrow.append(f" AND {column} = ?")
                args.append(value)
        column = "s.patient_id" if want.level == "PATIENT" else _COLUMN[want.level]
        found: dict[str, StoredInstance] = {}
        keys = list(dict.fromkeys(want.keys))
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start : start + CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"{_SELECT}{''.join(narrow)} AND {column} IN ({marks}) LIMIT ?"
            rows = self._conn.execute(sql, (*args, *chunk, limit - len(found)))
            for row in rows:
                found.setdefault(row[2], StoredInstance(*row))
            if len(found) >= limit:
                break
        ordered = sorted(found.values(), key=lambda r: (r.study_uid, r.series_uid, r.sop_uid))
        return ordered[:limit]
