"""The API's read queries: the study list (keyset pagination and filters),
one study's detail, and the site summary that ``status`` (CLI and API) and
``/metrics`` share.

All of it reads anonymized catalog rows only.  The list is ordered by the
most recent activity first, on the key ``(last_received, study_uid)``
descending, and a page continues strictly below the last key it returned
(never OFFSET): a study inserted or updated during a walk gets a larger
``last_received`` and so lands above the cursor, and a walk never returns a
study twice.  The indexes that serve it (catalog migration 6) are
``studies_recent``, ``studies_state_recent`` and ``series_modality``; every
filter combination is answered from them without sorting (tests check the
query plan).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from ith_proxy.store.catalog import STATES, Catalog
from ith_proxy.store.outbox import Outbox
from ith_proxy.store.spool import Spool

MAX_LIMIT = 500
DEAD_LETTER_SHOWN = 20

Key = tuple[float, str]  # (last_received, study_uid): a position in the list

_LIST = (
    "SELECT s.study_uid, s.state, s.first_received, s.last_received, s.completed_at,"
    " s.reopened, s.purged_at,"
    " (SELECT count(*) FROM series WHERE study_uid = s.study_uid),"
    " (SELECT count(*) FROM instances WHERE study_uid = s.study_uid),"
    " (SELECT group_concat(modality) FROM series WHERE study_uid = s.study_uid)"
    " FROM studies s"
)


def iso(ts: float | None) -> str | None:
    """A catalog time (epoch seconds) as ISO 8601 UTC, as study.json writes it."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Page:
    studies: list[dict]
    next_key: Key | None  # where the next page starts (None: this was the last)


@dataclass(frozen=True)
class Filters:
    state: str | None = None  # one of catalog.STATES
    modality: str | None = None  # a study with a series of this modality
    since: float | None = None  # last_received >= since (epoch seconds)


def list_query(filters: Filters, after: Key | None, limit: int) -> tuple[str, list[object]]:
    """The SQL of one page (fixed fragments; every value is a bound parameter)."""
    where: list[str] = []
    args: list[object] = []
    if filters.state is not None:
        if filters.state not in STATES:
            raise ValueError("unknown state")
        where.append("s.state = ?")
        args.append(filters.state)
    if filters.modality is not None:
        where.append(
            "EXISTS (SELECT 1 FROM series se WHERE se.modality = ? AND se.study_uid = s.study_uid)"
        )
        args.append(filters.modality)
    if filters.since is not None:
        where.append("s.last_received >= ?")
        args.append(filters.since)
    if after is not None:
        where.append("(s.last_received, s.study_uid) < (?, ?)")
        args += [after[0], after[1]]
    sql = _LIST + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY s.last_received DESC, s.study_uid DESC LIMIT ?"
    args.append(limit)
    return sql, args


def _summary(row: tuple) -> dict:
    uid, state, first, last, completed, reopened, purged, series, instances, modalities = row
    return {
        "study_instance_uid": uid,
        "state": state,
        "purged": purged is not None,
        "purged_at": iso(purged),
        "first_received": iso(first),
        "last_received": iso(last),
        "completed_at": iso(completed),
        "reopened": reopened,
        "series_count": series,
        "instance_count": instances,
        "modalities": sorted({m for m in (modalities or "").split(",") if m}),
    }


class Browse:
    """Read-only queries over one catalog connection."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.conn = catalog.conn

    def studies(self, filters: Filters, after: Key | None = None, limit: int = 50) -> Page:
        """One page, most recent activity first; ``after`` is the key the
        previous page ended on."""
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be 1..{MAX_LIMIT}")
        sql, args = list_query(filters, after, limit + 1)
        rows = list(self.conn.execute(sql, args))
        more = len(rows) > limit
        rows = rows[:limit]
        next_key = (rows[-1][3], rows[-1][0]) if more else None
        return Page([_summary(r) for r in rows], next_key)

    def plan(self, filters: Filters, after: Key | None = None) -> list[str]:
        """SQLite's query plan of a page (the tests check it uses the indexes)."""
        sql, args = list_query(filters, after, 1)
        return [row[3] for row in self.conn.execute("EXPLAIN QUERY PLAN " + sql, args)]

    def exists(self, study_uid: str) -> bool:
        return (
            self.conn.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)).get
            is not None
        )

    def study(self, study_uid: str) -> dict | None:
        """One study: its counts, modalities, timeline and forwarding
        destinations; None when the catalog has no such study."""
        found = self.catalog.study(study_uid)
        if found is None:
            return None
        out = {
            "study_instance_uid": found["study_instance_uid"],
            "patient_id": found["patient_id"],  # the pseudonym
            "state": found["state"],
            "purged": found["purged_at"] is not None,
            "purged_at": iso(found["purged_at"]),
            "first_received": iso(found["first_received"]),
            "last_received": iso(found["last_received"]),
            "completed_at": iso(found["completed_at"]),
            "reopened": found["reopened"],
            "series_count": found["series_count"],
            "instance_count": found["instance_count"],
            "bytes": found["bytes"],
            "modalities": found["modalities"],
            "timeline": [{"at": iso(e["ts"]), "event": e["event"]} for e in found["events"]],
        }
        destinations = Outbox(self.catalog).study_destinations(study_uid)
        for d in destinations:
            for k in ("next_at", "created_at", "updated_at", "delivered_at"):
                d[k] = iso(d[k])
        out["destinations"] = destinations
        return out


def site_counts(catalog: Catalog, dead_letters: int = DEAD_LETTER_SHOWN) -> dict:
    """The catalog's counts, the outbox by state and the dead letter (the
    failed destinations, the most recent first): ``status`` in the CLI and
    the API.  One snapshot: a forward that fails between two of the reads
    must not show as a dead letter beside counts that predate it."""
    outbox = Outbox(catalog)
    with catalog.snapshot():
        return {
            **catalog.counts(),
            "outbox": outbox.counts(),
            "failed_forwards": [
                {
                    "study_instance_uid": e.study_uid,
                    "node": e.node,
                    "attempts": e.attempts,
                    "last_error": e.last_error,
                    "failed_at": iso(e.updated_at),
                }
                for e in outbox.failed(dead_letters)
            ],
        }


def incoming_backlog(spool: Spool, now: float | None = None) -> tuple[int, float]:
    """(files waiting in incoming/, the oldest one's age in seconds, 0 when none):
    the indexer's lag."""
    waiting, oldest = spool.oldest_incoming()
    now = time.time() if now is None else now
    return waiting, max(0.0, now - oldest) if oldest is not None else 0.0


def disk_use(spool: Spool) -> tuple[int, int]:
    """(free, total) bytes of the spool's filesystem (free: what an unprivileged
    writer may use, as ``Spool.free_mb`` counts it)."""
    st = os.statvfs(spool.root)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
