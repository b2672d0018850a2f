"""The catalog: an APSW/SQLite index of the spool, and the one apsw import.

All SQL lives in ``store/``: the connection, the migrations and the study
and instance queries here; the node registry's queries in ``store/nodes.py``
over this connection.

Connections follow apsw's best practice (WAL, busy timeout, foreign keys).
Each thread opens its own ``Catalog``; there is no shared connection.
Schema changes are ``user_version`` steps, one transaction each; a database
newer than this code is refused.

Only anonymized values are stored here.  The filesystem is the truth:
``workers/reindex.py`` can rebuild every row from ``studies/`` plus the vault.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from types import MappingProxyType

import apsw

from ith_proxy.store.schema import (  # noqa: F401  # re-exported: the catalog's schema
    _LEVELS,
    INSTANCE_MAIN,
    PATIENT_MAIN,
    SERIES_MAIN,
    STATES,
    STUDY_MAIN,
)
from ith_proxy.store.schema import MIGRATIONS as _MIGRATIONS


@dataclass(frozen=True)
class InstanceRow:
    """One de-identified instance as the indexer hands it to the catalog."""

    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax: str
    size: int
    vault_offset: int | None
    received_at: float
    # Q/R main attributes: {"patient"|"study"|"series"|"instance": {column: value}}
    main: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


# InstanceRow -> the instances table's leading columns, in record_instances' order
_INSTANCE = attrgetter(
    *("sop_uid", "series_uid", "study_uid", "sop_class_uid", "transfer_syntax", "size"),
    *("vault_offset", "received_at"),
)
_NONE: Mapping[str, str] = MappingProxyType({})
_BLANKS = ("",) * 8  # a default per column (map stops at the shorter)


def _main(r: InstanceRow, level: str, cols: tuple[str, ...]) -> tuple[str, ...]:
    """A level's Q/R main columns of a row, "" where absent."""
    return tuple(map(r.main.get(level, _NONE).get, cols, _BLANKS))


def _best_practice(conn: apsw.Connection) -> None:
    # The busy timeout first: the journal_mode pragma takes a lock, and the
    # service's threads and the indexer open the catalog at the same moment
    # (without it, one of them got BusyError at start-up and its thread died).
    conn.setbusytimeout(15000)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.config(apsw.SQLITE_DBCONFIG_DQS_DML, 0)
    conn.config(apsw.SQLITE_DBCONFIG_DQS_DDL, 0)


class Catalog:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        flags = (
            apsw.SQLITE_OPEN_READONLY
            if readonly
            else (apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
        )
        self.path = Path(path)
        self.conn = apsw.Connection(str(self.path), flags=flags)
        _best_practice(self.conn)
        if not readonly:
            self.migrate()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one state of the catalog: a transaction keeps
        the WAL snapshot of its first read until it ends, whatever commits."""
        with self.conn:
            yield

    def migrate(self) -> None:
        with self.conn:
            version = self.conn.execute("PRAGMA user_version").get
            if version > len(_MIGRATIONS):
                raise RuntimeError(
                    f"catalog schema {version} is newer than this code ({len(_MIGRATIONS)})"
                )
        for step in range(version, len(_MIGRATIONS)):
            with self.conn:
                self.conn.execute(_MIGRATIONS[step])
                self.conn.execute(f"PRAGMA user_version = {step + 1}")

    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").get

    def ping(self) -> bool:
        return self.conn.execute("SELECT 1").get == 1

    # --- indexer ---

    def instance_place(self, sop_uid: str) -> tuple[str, str, int | None] | None:
        """(study, series, vault offset) recorded for an instance, or None."""
        row = self.conn.execute(
            "SELECT study_uid, series_uid, vault_offset FROM instances WHERE sop_uid = ?",
            (sop_uid,),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def instance_vault_offset(self, sop_uid: str) -> int | None:
        return self.conn.execute(
            "SELECT vault_offset FROM instances WHERE sop_uid = ?", (sop_uid,)
        ).get

    def record_instances(self, rows: Iterable[InstanceRow]) -> int:
        """Upsert a batch in one transaction; return how many were new.

        A new instance in a study that is no longer receiving reopens it.
        A re-sent instance only refreshes the study's quiet timer.

        The batch is planned here and written table by table (one
        ``executemany`` each; a patient or series once, at its first row):
        the same rows, rowids, events (in row order) and study versions (+1
        per row) as running the statements row by row, with one lookup of the
        batch's studies and one of its instances instead of two per row.
        """
        rows = list(rows)
        if not rows:
            return 0
        c = self.conn
        with c:
            # a write first, as the statements row by row did: it takes the write
            # lock (waiting in the busy handler); a read first would start a WAL
            # snapshot that fails with BusyError, unretried, if another connection
            # commits before this one's first write
            patients: dict[str, tuple] = {}
            for r in rows:
                if r.patient_id not in patients:
                    pm = _main(r, "patient", PATIENT_MAIN)
                    patients[r.patient_id] = (r.patient_id, r.patient_name, r.received_at, *pm)
            c.executemany(
                "INSERT INTO patients(pseudo_id, pseudo_name, created_at, name_folded,"
                " birth_date, sex) VALUES (?1,?2,?3,upper(?2),?4,?5)"
                " ON CONFLICT(pseudo_id) DO NOTHING",
                patients.values(),
            )
            states = self._known("studies", "study_uid", "state", {r.study_uid for r in rows})
            seen = self._known("instances", "sop_uid", "'1'", {r.sop_uid for r in rows})
            studies: list[tuple] = []
            series: dict[str, tuple] = {}
            instances: list[tuple] = []
            reopened: list[tuple[str]] = []
            events: list[tuple[str, float, str]] = []
            touched: dict[str, list] = {}  # study -> [latest received_at, rows]
            new = 0
            for r in rows:  # a level's main columns only for the row that inserts it
                state = states.get(r.study_uid)
                if state is None:
                    sm = _main(r, "study", STUDY_MAIN)
                    studies.append((r.study_uid, r.patient_id, r.received_at, r.received_at, *sm))
                    events.append((r.study_uid, r.received_at, "first-received"))
                    states[r.study_uid] = "receiving"
                if r.series_uid not in series:
                    se = _main(r, "series", SERIES_MAIN)
                    series[r.series_uid] = (r.series_uid, r.study_uid, r.modality, *se)
                instances.append((*_INSTANCE(r), *_main(r, "instance", INSTANCE_MAIN)))
                if r.sop_uid not in seen:
                    seen[r.sop_uid] = "1"
                    new += 1
                    if state not in (None, "receiving"):
                        reopened.append((r.study_uid,))
                        events.append((r.study_uid, r.received_at, "reopened"))
                        states[r.study_uid] = "receiving"
                last = touched.setdefault(r.study_uid, [r.received_at, 0])
                last[0] = max(last[0], r.received_at)
                last[1] += 1
            c.executemany(
                "INSERT INTO studies(study_uid, patient_id, first_received, last_received,"
                " study_date, study_time, accession, study_id, description, referring)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                studies,
            )
            c.executemany(
                "INSERT INTO series(series_uid, study_uid, modality, series_number,"
                " description, body_part, series_date, series_time) VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT(series_uid) DO NOTHING",
                series.values(),
            )
            c.executemany(
                "INSERT INTO instances(sop_uid, series_uid, study_uid, sop_class_uid,"
                " transfer_syntax, size, vault_offset, received_at, instance_number,"
                " number_of_frames) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(sop_uid) DO UPDATE SET size = excluded.size,"
                " transfer_syntax = excluded.transfer_syntax,"
                " vault_offset = COALESCE(excluded.vault_offset, vault_offset),"
                " instance_number = excluded.instance_number,"
                " number_of_frames = excluded.number_of_frames",
                instances,
            )
            c.executemany(
                "UPDATE studies SET state = 'receiving', completed_at = NULL,"
                " reopened = reopened + 1 WHERE study_uid = ?",
                reopened,
            )
            c.executemany("INSERT INTO study_events(study_uid, ts, event) VALUES (?,?,?)", events)
            c.executemany(
                "UPDATE studies SET last_received = max(last_received, ?),"
                " version = version + ? WHERE study_uid = ?",
                ((latest, count, study) for study, (latest, count) in touched.items()),
            )
        return new

    def _known(self, table: str, key: str, column: str, keys: set[str]) -> dict[str, str]:
        """{key: column} of the rows of ``table`` whose ``key`` is in ``keys``
        (one key: a plain lookup, cheaper than a json_each)."""
        select = f"SELECT {key}, {column} FROM {table} WHERE {key}"
        if len(keys) == 1:
            return dict(self.conn.execute(f"{select} = ?", (next(iter(keys)),)))
        return dict(
            self.conn.execute(
                f"{select} IN (SELECT value FROM json_each(?))", (json.dumps(sorted(keys)),)
            )
        )

    def _event(self, study_uid: str, ts: float, event: str) -> None:
        self.conn.execute(
            "INSERT INTO study_events(study_uid, ts, event) VALUES (?,?,?)", (study_uid, ts, event)
        )

    # --- scheduler ---

    def quiet_studies(self, now: float, timeout: float) -> list[str]:
        return [
            row[0]
            for row in self.conn.execute(
                "SELECT study_uid FROM studies WHERE state = 'receiving' AND last_received <= ?"
                " ORDER BY last_received",
                (now - timeout,),
            )
        ]

    def complete_study(self, study_uid: str, now: float, timeout: float) -> bool:
        """Mark a study complete if it is still receiving and still quiet."""
        with self.conn:
            changed = self.conn.execute(
                "UPDATE studies SET state = 'complete', completed_at = ?, version = version + 1"
                " WHERE study_uid = ? AND state = 'receiving' AND last_received <= ?"
                " RETURNING 1",
                (now, study_uid, now - timeout),
            ).get
            if changed:
                self._event(study_uid, now, "complete")
        return bool(changed)

    def study_changed(
        self, study_uid: str, ts: float, state: str | None = None, events: Iterable[str] = ()
    ) -> None:
        """Bump a study's version (study.json is rewritten) and add timeline
        events; set a forwarding state unless the study is receiving again
        (store/outbox.py decides the state; a reopened study waits for completion)."""
        with self.conn:
            old = self.conn.execute(
                "SELECT state FROM studies WHERE study_uid = ?", (study_uid,)
            ).get
            if old is None:
                return
            events = list(events)
            if state is not None and state != old and old != "receiving":
                if state not in STATES:
                    raise ValueError(f"unknown study state {state!r}")
                self.conn.execute(
                    "UPDATE studies SET state = ? WHERE study_uid = ?", (state, study_uid)
                )
                events.append(state)
            self.conn.execute(
                "UPDATE studies SET version = version + 1 WHERE study_uid = ?", (study_uid,)
            )
            for event in events:
                self._event(study_uid, ts, event)

    def stale_summaries(self) -> list[tuple[str, int]]:
        return list(
            self.conn.execute(
                "SELECT study_uid, version FROM studies WHERE json_version != version"
            )
        )

    def summary_written(self, study_uid: str, version: int) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE studies SET json_version = ? WHERE study_uid = ?", (version, study_uid)
            )

    # --- queries ---

    def study(self, study_uid: str) -> dict | None:
        row = self.conn.execute(
            "SELECT s.study_uid, s.patient_id, p.pseudo_name, s.state, s.first_received,"
            " s.last_received, s.completed_at, s.reopened, s.version, s.purged_at,"
            " (SELECT count(*) FROM series WHERE study_uid = s.study_uid),"
            " (SELECT count(*) FROM instances WHERE study_uid = s.study_uid),"
            " (SELECT coalesce(sum(size), 0) FROM instances WHERE study_uid = s.study_uid),"
            " (SELECT group_concat(DISTINCT modality) FROM"
            "   (SELECT modality FROM series WHERE study_uid = s.study_uid ORDER BY modality))"
            " FROM studies s JOIN patients p ON p.pseudo_id = s.patient_id"
            " WHERE s.study_uid = ?",
            (study_uid,),
        ).fetchone()
        if row is None:
            return None
        keys = (
            "study_instance_uid",
            "patient_id",
            "patient_name",
            "state",
            "first_received",
            "last_received",
            "completed_at",
            "reopened",
            "version",
            "purged_at",
            "series_count",
            "instance_count",
            "bytes",
            "modalities",
        )
        out = dict(zip(keys, row, strict=True))
        out["modalities"] = [m for m in (out["modalities"] or "").split(",") if m]
        out["events"] = [
            {"ts": ts, "event": ev}
            for ts, ev in self.conn.execute(
                "SELECT ts, event FROM study_events WHERE study_uid = ? ORDER BY ts, id",
                (study_uid,),
            )
        ]
        return out

    def study_uids(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT study_uid FROM studies ORDER BY 1")]

    def instance_vault_offsets(self, study_uid: str) -> list[int]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT vault_offset FROM instances"
                " WHERE study_uid = ? AND vault_offset IS NOT NULL ORDER BY received_at",
                (study_uid,),
            )
        ]

    def counts(self) -> dict:
        c = self.conn
        by_state = dict(c.execute("SELECT state, count(*) FROM studies GROUP BY state"))
        return {
            "patients": c.execute("SELECT count(*) FROM patients").get,
            "studies": c.execute("SELECT count(*) FROM studies").get,
            "series": c.execute("SELECT count(*) FROM series").get,
            "instances": c.execute("SELECT count(*) FROM instances").get,
            "bytes": c.execute("SELECT coalesce(sum(size), 0) FROM instances").get,
            "studies_by_state": {s: by_state.get(s, 0) for s in STATES},
        }

    # --- reindex ---

    def clear(self) -> None:
        """Drop every row that reindex rebuilds from the spool.  The outbox and
        its ledger stay: they are the forwarder's history, not in the files."""
        with self.conn:
            for table in ("study_events", "instances", "series", "studies", "patients"):
                self.conn.execute(f"DELETE FROM {table}")

    def restore_study_timeline(
        self,
        study_uid: str,
        state: str,
        first: float,
        last: float,
        completed: float | None,
        reopened: int,
        events: list[tuple[float, str]],
    ) -> None:
        """Put back the timeline a study.json recorded (reindex)."""
        if state not in STATES:
            state = "receiving"
        with self.conn:
            self.conn.execute(
                "UPDATE studies SET state = ?, first_received = ?, last_received = ?,"
                " completed_at = ?, reopened = ?, version = version + 1 WHERE study_uid = ?",
                (state, first, last, completed, reopened, study_uid),
            )
            self.conn.execute("DELETE FROM study_events WHERE study_uid = ?", (study_uid,))
            for ts, ev in events:
                self._event(study_uid, ts, ev)
