"""Retention: which forwarded studies may lose their files, and their tombstones.

The scheduler purges; this room says what: a study whose every destination
acknowledged it (every outbox entry delivered, none pending or failed) longer
ago than ``[spool] retention_hours``, and of it only the instances that every
destination has a 'delivered' ledger row for.  Rows are kept and marked
(``purged_at`` on the study and on each instance); ``study.json`` stays as the
tombstone and lists the purged instances, so that reindex keeps them.  A
reindex into a new catalog file puts the entries back from study.json
(``restore``).  See docs/forwarding.md.
"""

from __future__ import annotations

from collections.abc import Iterable

from ith_proxy.store.catalog import Catalog
from ith_proxy.store.outbox import REASONS, OutboxError, check_node, clean_text, immediate


class Retention:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.conn = catalog.conn

    def purgeable(self, delivered_before: float) -> list[str]:
        """Forwarded studies with files left whose every destination acknowledged
        them (every entry delivered, none pending or failed) before the time."""
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT s.study_uid FROM studies s WHERE s.state = 'forwarded'"
                " AND EXISTS (SELECT 1 FROM instances i WHERE i.study_uid = s.study_uid"
                "  AND i.purged_at IS NULL)"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid"
                "  AND o.state != 'delivered')"
                " AND (SELECT max(o.delivered_at) FROM outbox o"
                "  WHERE o.study_uid = s.study_uid) <= ?"
                " ORDER BY s.study_uid",
                (delivered_before,),
            )
        ]

    def purge_list(self, study_uid: str) -> list[tuple[str, str]]:
        """(series, sop) of the study's unpurged instances that every destination
        of the study has a 'delivered' ledger row for: nothing else is removed,
        even if the study changed since ``purgeable`` looked."""
        return list(
            self.conn.execute(
                "SELECT i.series_uid, i.sop_uid FROM instances i"
                " WHERE i.study_uid = ? AND i.purged_at IS NULL"
                " AND EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = i.study_uid)"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = i.study_uid"
                "  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.node = o.node"
                "   AND d.sop_uid = i.sop_uid AND d.result = 'delivered'))"
                " ORDER BY i.series_uid, i.sop_uid",
                (study_uid,),
            )
        )

    def mark_purged(
        self, study_uid: str, sops: Iterable[str], ts: float, event: bool = True
    ) -> int:
        """Record that these instances' files are gone (all rows are kept)."""
        with immediate(self.catalog):
            marked = sum(
                1
                for sop in sops
                if self.conn.execute(
                    "UPDATE instances SET purged_at = ? WHERE sop_uid = ? AND study_uid = ?"
                    " RETURNING 1",
                    (ts, sop, study_uid),
                ).get
            )
            self.conn.execute(
                "UPDATE studies SET purged_at = ? WHERE study_uid = ?", (ts, study_uid)
            )
            self.catalog.study_changed(study_uid, ts, None, ["purged"] if event else [])
        return marked

    def purged_instances(self, study_uid: str) -> list[list]:
        """[series, modality, sop, sop class, transfer syntax, size, received_at]
        of each purged instance: the tombstone lists them so reindex keeps them."""
        return [
            list(r)
            for r in self.conn.execute(
                "SELECT i.series_uid, se.modality, i.sop_uid, i.sop_class_uid,"
                " i.transfer_syntax, i.size, i.received_at FROM instances i"
                " JOIN series se ON se.series_uid = i.series_uid"
                " WHERE i.study_uid = ? AND i.purged_at IS NOT NULL"
                " ORDER BY i.series_uid, i.sop_uid",
                (study_uid,),
            )
        ]

    def restore(self, study_uid: str, destinations: Iterable[dict], now: float) -> int:
        """Put back a study's entries from its study.json when the catalog lost
        them (a reindex into a new file; entries still there win).  A delivered
        destination's ledger is rebuilt for the instances received before its
        delivery; anything else is sent again (at least once)."""
        restored = 0
        with immediate(self.catalog):
            for d in destinations:
                try:
                    node = check_node(d["node"])
                except (TypeError, KeyError, OutboxError):
                    continue  # not one of ours: study.json is read, never trusted
                state = d.get("state") if d.get("state") in ("delivered", "failed") else "pending"
                delivered_at = _number(d.get("delivered_at"))
                if state == "delivered" and delivered_at is None:
                    state = "pending"
                reason = d.get("reason") if d.get("reason") in REASONS else "requeue"
                entry_id = self.conn.execute(
                    "INSERT INTO outbox(study_uid, node, reason, state, attempts, next_at,"
                    " last_error, created_at, updated_at, delivered_at)"
                    " VALUES (?,?,?,?,0,?,?,?,?,?) ON CONFLICT(study_uid, node) DO NOTHING"
                    " RETURNING id",
                    (
                        study_uid,
                        node,
                        reason,
                        state,
                        now,
                        clean_text(d.get("last_error")),
                        _number(d.get("created_at")) or now,
                        now,
                        delivered_at,
                    ),
                ).get
                if entry_id is None:
                    continue
                restored += 1
                if state == "delivered":
                    self.conn.execute(
                        "INSERT INTO deliveries(node, sop_uid, study_uid, outbox_id, result,"
                        " reason, at) SELECT ?, sop_uid, study_uid, ?, 'delivered',"
                        " 'restored by reindex', ? FROM instances"
                        " WHERE study_uid = ? AND received_at <= ?"
                        " ON CONFLICT(node, sop_uid) DO NOTHING",
                        (node, entry_id, now, study_uid, delivered_at),
                    )
        return restored


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
