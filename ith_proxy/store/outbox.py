"""The durable outbox: one entry per (study, destination), and the per-instance ledger.

All SQL of the ``outbox`` and ``deliveries`` tables lives here, over a
``Catalog``'s connection (apsw stays in store/catalog.py).  The scheduler
writes the entries of a completed study in the same transaction as the state
``complete``; the forwarder takes ``due`` entries, sends ``pending_instances``,
writes one ledger row per instance and ends with ``finish``, ``retry_later`` or
``fail``.  The design, the states and the study state rule are in
docs/forwarding.md.

An entry's instances are computed, not stored: every instance of the study
that has no ledger row for that node and still has its file.  A resumed entry
(after kill -9) skips what was recorded; a follow-up (a late instance after
completion) sends only the new instances.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from ith_proxy.backoff import Backoff
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.linkbox import Linkbox

REASONS = ("complete", "followup", "requeue", "manual")
TEXT_LIMIT = 300  # a peer's error text is stored bounded and printable
FAILURES_SHOWN = 10  # failed instances listed per destination in study.json


class OutboxError(ValueError):
    """A refused request (unknown study, nothing to send, bad node name)."""


@dataclass(frozen=True)
class Entry:
    id: int
    study_uid: str
    node: str
    reason: str
    state: str
    attempts: int
    next_at: float
    last_error: str | None
    created_at: float
    updated_at: float
    delivered_at: float | None


class PendingInstance(NamedTuple):
    sop_uid: str
    series_uid: str
    sop_class: str
    transfer_syntax: str
    size: int


@dataclass(frozen=True)
class Outcome:
    """What one instance's send came to.  ``delivered=False`` is a permanent
    failure for that instance (a transient one is ``retry_later`` instead)."""

    sop_uid: str
    delivered: bool
    status: int | None = None  # DIMSE status, or the HTTP status of STOW-RS
    reason: str | None = None
    warning: str | None = None


def clean_text(text: object, limit: int = TEXT_LIMIT) -> str | None:
    """A peer's text made safe to store and show: printable, one line, bounded."""
    if text is None:
        return None
    out = "".join(c if c.isprintable() else "?" for c in str(text)[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


def check_node(node: str) -> str:
    if not isinstance(node, str) or not 1 <= len(node) <= 64 or not node.isprintable():
        raise OutboxError(f"not a node name: {clean_text(node, 80)!r}")
    return node


_ENTRY = (
    "SELECT id, study_uid, node, reason, state, attempts, next_at, last_error,"
    " created_at, updated_at, delivered_at FROM outbox"
)


@contextmanager
def immediate(catalog: Catalog) -> Iterator[None]:
    """One write transaction, taken at once (BEGIN IMMEDIATE: a read followed by
    a write never meets a concurrent writer's newer snapshot); a savepoint when
    the caller already holds a transaction."""
    conn = catalog.conn
    if conn.in_transaction:
        with conn:
            yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class Outbox:
    def __init__(self, catalog: Catalog, link_events: bool = False) -> None:
        """``link_events``: post the study events for the backend link
        (store/linkbox.py) in the same transactions (only with ITH_URL set)."""
        self.catalog = catalog
        self.conn = catalog.conn
        self.linkbox = Linkbox(catalog) if link_events else None

    # --- reading ---

    def entry(self, entry_id: int) -> Entry | None:
        row = self.conn.execute(_ENTRY + " WHERE id = ?", (entry_id,)).fetchone()
        return None if row is None else Entry(*row)

    def entries(self, study_uid: str) -> list[Entry]:
        rows = self.conn.execute(_ENTRY + " WHERE study_uid = ? ORDER BY node", (study_uid,))
        return [Entry(*r) for r in rows]

    def failed(self, limit: int = 20) -> list[Entry]:
        """The dead letter: failed entries, the most recent first."""
        rows = self.conn.execute(
            _ENTRY + " WHERE state = 'failed' ORDER BY updated_at DESC LIMIT ?", (limit,)
        )
        return [Entry(*r) for r in rows]

    def due(self, now: float, limit: int = 100) -> list[Entry]:
        """Pending entries whose time has come; a study receiving again waits
        for its next completion."""
        rows = self.conn.execute(
            _ENTRY + " o WHERE o.state = 'pending' AND o.next_at <= ? AND EXISTS"
            " (SELECT 1 FROM studies s WHERE s.study_uid = o.study_uid"
            "  AND s.state != 'receiving') ORDER BY o.next_at, o.id LIMIT ?",
            (now, limit),
        )
        return [Entry(*r) for r in rows]

    def pending_instances(self, entry: Entry) -> list[PendingInstance]:
        """The entry's instances without a ledger row for its node, files present,
        in a stable order (series, then arrival)."""
        rows = self.conn.execute(
            "SELECT i.sop_uid, i.series_uid, i.sop_class_uid, i.transfer_syntax, i.size"
            " FROM instances i WHERE i.study_uid = ? AND i.purged_at IS NULL AND NOT EXISTS"
            " (SELECT 1 FROM deliveries d WHERE d.node = ? AND d.sop_uid = i.sop_uid)"
            " ORDER BY i.series_uid, i.received_at, i.sop_uid",
            (entry.study_uid, entry.node),
        )
        return [PendingInstance(*r) for r in rows]

    def study_destinations(self, study_uid: str) -> list[dict]:
        """Per destination: state, attempts, last error, delivery time, counts
        and the first failed instances (study.json, the CLI and the API)."""
        out = []
        for e in self.entries(study_uid):
            counts = dict(
                self.conn.execute(
                    "SELECT result, count(*) FROM deliveries WHERE study_uid = ? AND node = ?"
                    " GROUP BY result",
                    (study_uid, e.node),
                )
            )
            failures = [
                {"sop_instance_uid": sop, "status": status, "reason": reason}
                for sop, status, reason in self.conn.execute(
                    "SELECT sop_uid, status, reason FROM deliveries WHERE study_uid = ?"
                    " AND node = ? AND result = 'failed' ORDER BY sop_uid LIMIT ?",
                    (study_uid, e.node, FAILURES_SHOWN),
                )
            ]
            out.append(
                {
                    "node": e.node,
                    "state": e.state,
                    "reason": e.reason,
                    "attempts": e.attempts,
                    "next_at": e.next_at if e.state == "pending" else None,
                    "last_error": e.last_error,
                    "created_at": e.created_at,
                    "updated_at": e.updated_at,
                    "delivered_at": e.delivered_at,
                    "delivered": counts.get("delivered", 0),
                    "failed": counts.get("failed", 0),
                    "failures": failures,
                }
            )
        return out

    def counts(self) -> dict[str, int]:
        by_state = dict(self.conn.execute("SELECT state, count(*) FROM outbox GROUP BY state"))
        return {s: by_state.get(s, 0) for s in ("pending", "delivered", "failed")}

    # --- the study state rule, written once ---

    def settle(self, study_uid: str, now: float, events: Iterable[str] = ()) -> None:
        """After any outbox change: ``forwarding`` while an entry is pending,
        ``failed`` if one failed and none is pending, ``forwarded`` when all are
        delivered, ``complete`` with none.  A receiving study is left alone.
        The version is bumped either way, so study.json is rewritten."""
        states = {
            s
            for (s,) in self.conn.execute(
                "SELECT DISTINCT state FROM outbox WHERE study_uid = ?", (study_uid,)
            )
        }
        state = (
            "forwarding" if "pending" in states
            else "failed" if "failed" in states
            else "forwarded" if "delivered" in states
            else "complete"
        )  # fmt: skip
        self.catalog.study_changed(study_uid, now, state, events)

    # --- the scheduler: completion ---

    def complete_study(
        self, study_uid: str, now: float, timeout: float, destinations: Sequence[str]
    ) -> bool:
        """Mark a quiet study complete and queue it for every destination, in
        one transaction: both happen or neither.  A destination that already
        has an entry (the study was reopened by a late instance) gets a
        follow-up; one still pending keeps going and picks up the new instances."""
        nodes = [check_node(n) for n in destinations]
        if len(set(nodes)) != len(nodes):
            raise OutboxError("a destination is named twice")
        with immediate(self.catalog):
            if not self.catalog.complete_study(study_uid, now, timeout):
                return False
            events = [
                f"queued {node} ({reason})"
                for node in nodes
                if (reason := self._queue(study_uid, node, now, "complete")) is not None
            ]
            if events:  # the state stays 'complete' until the forwarder starts
                self.catalog.study_changed(study_uid, now, None, events)
            if self.linkbox is not None:
                self.linkbox.study_completed(study_uid, now)
        return True

    def _state(self, study_uid: str, node: str) -> str | None:
        return self.conn.execute(
            "SELECT state FROM outbox WHERE study_uid = ? AND node = ?", (study_uid, node)
        ).get

    def _queue(
        self, study_uid: str, node: str, now: float, reason: str, reset: bool = False
    ) -> str | None:
        """Create or re-arm the (study, node) entry, attempts from 0; return its
        reason.  A pending entry is only hurried (None), unless ``reset``."""
        state = self._state(study_uid, node)
        if state is None:
            self.conn.execute(
                "INSERT INTO outbox(study_uid, node, reason, state, attempts, next_at,"
                " created_at, updated_at) VALUES (?,?,?,'pending',0,?,?,?)",
                (study_uid, node, reason, now, now, now),
            )
            return reason
        if state == "pending" and not reset:
            self.conn.execute(
                "UPDATE outbox SET next_at = min(next_at, ?), updated_at = ?"
                " WHERE study_uid = ? AND node = ?",
                (now, now, study_uid, node),
            )
            return None
        reason = "followup" if reason == "complete" else reason
        self.conn.execute(
            "UPDATE outbox SET state = 'pending', reason = ?, attempts = 0, next_at = ?,"
            " last_error = NULL, updated_at = ? WHERE study_uid = ? AND node = ?",
            (reason, now, now, study_uid, node),
        )
        return reason

    # --- the forwarder ---

    def record(self, entry_id: int, outcomes: Iterable[Outcome], now: float) -> int:
        """Write ledger rows for instances of the entry's study (one transaction;
        the last result for an instance wins, so a replay is harmless).  Return
        how many were written; an instance not in the study is refused."""
        written = 0
        with immediate(self.catalog):
            entry = self._entry_or_raise(entry_id)
            for o in outcomes:
                done = self.conn.execute(
                    "INSERT INTO deliveries(node, sop_uid, study_uid, outbox_id, result, status,"
                    " reason, warning, at) SELECT ?, sop_uid, study_uid, ?, ?, ?, ?, ?, ?"
                    " FROM instances WHERE sop_uid = ? AND study_uid = ?"
                    " ON CONFLICT(node, sop_uid) DO UPDATE SET outbox_id = excluded.outbox_id,"
                    " result = excluded.result, status = excluded.status,"
                    " reason = excluded.reason, warning = excluded.warning, at = excluded.at"
                    " RETURNING 1",
                    (
                        entry.node,
                        entry.id,
                        "delivered" if o.delivered else "failed",
                        o.status,
                        clean_text(o.reason),
                        clean_text(o.warning),
                        now,
                        o.sop_uid,
                        entry.study_uid,
                    ),
                ).get
                if not done:
                    raise OutboxError("instance is not part of the entry's study")
                written += 1
            self.conn.execute("UPDATE outbox SET updated_at = ? WHERE id = ?", (now, entry.id))
            self.settle(entry.study_uid, now)
        return written

    def retry_later(self, entry_id: int, now: float, error: str, next_at: float) -> str:
        """A transient failure: one more attempt, tried again at ``next_at``."""
        with immediate(self.catalog):
            entry = self._entry_or_raise(entry_id)
            if entry.state != "pending":
                return entry.state
            self.conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ?,"
                " updated_at = ? WHERE id = ?",
                (next_at, clean_text(error), now, entry_id),
            )
            self.settle(entry.study_uid, now)
        return "pending"

    def retry_or_fail(
        self,
        entry_id: int,
        now: float,
        error: str,
        backoff: Backoff,
        rand: Callable[[], float] = random.random,
    ) -> str:
        """``retry_later`` with the backoff's delay, or ``fail`` once attempts
        are exhausted."""
        with immediate(self.catalog):
            entry = self._entry_or_raise(entry_id)
            attempts = entry.attempts + 1
            if backoff.exhausted(attempts):
                self.conn.execute(
                    "UPDATE outbox SET attempts = ? WHERE id = ?", (attempts, entry_id)
                )
                return self.fail(entry_id, now, f"attempts exhausted ({attempts}): {error}")
            return self.retry_later(entry_id, now, error, now + backoff.delay(attempts, rand))

    def finish(self, entry_id: int, now: float) -> str:
        """After a pass over ``pending_instances``: ``delivered`` when every
        instance has a delivered row for the node, ``failed`` (the dead letter,
        with the failed instances' reasons) when the rest failed, still
        ``pending`` (due now) when instances arrived that were not sent."""
        with immediate(self.catalog):
            entry = self._entry_or_raise(entry_id)
            if entry.state != "pending":
                return entry.state
            counted = self.conn.execute(
                "SELECT coalesce(sum(d.result = 'delivered'), 0),"
                " coalesce(sum(d.result = 'failed'), 0),"
                " coalesce(sum(d.result IS NULL AND i.purged_at IS NULL), 0),"
                " coalesce(sum(d.result IS NULL AND i.purged_at IS NOT NULL), 0)"
                " FROM instances i LEFT JOIN deliveries d"
                " ON d.node = ? AND d.sop_uid = i.sop_uid WHERE i.study_uid = ?",
                (entry.node, entry.study_uid),
            ).fetchone()
            assert counted is not None  # an aggregate has one row
            delivered, failed, unsent, lost = counted
            if unsent:
                self.conn.execute(
                    "UPDATE outbox SET next_at = ?, updated_at = ? WHERE id = ?",
                    (now, now, entry_id),
                )
                self.settle(entry.study_uid, now)
                return "pending"
            if not failed and not lost:
                self.conn.execute(
                    "UPDATE outbox SET state = 'delivered', delivered_at = ?, last_error = NULL,"
                    " updated_at = ? WHERE id = ?",
                    (now, now, entry_id),
                )
                self.settle(entry.study_uid, now, [f"delivered {entry.node}"])
                if self.linkbox is not None:
                    self.linkbox.study_forwarded(entry.study_uid, entry.node, now)
                return "delivered"
            return self.fail(entry_id, now, self._failure_summary(entry, failed, lost, delivered))

    def _failure_summary(self, entry: Entry, failed: int, lost: int, delivered: int) -> str:
        total = failed + lost + delivered
        reasons = [
            f"{reason or 'no reason'} (x{n})"
            for reason, n in self.conn.execute(
                "SELECT reason, count(*) FROM deliveries WHERE study_uid = ? AND node = ?"
                " AND result = 'failed' GROUP BY reason ORDER BY count(*) DESC, reason LIMIT 3",
                (entry.study_uid, entry.node),
            )
        ]
        if lost:
            reasons.append(f"removed by retention before delivery (x{lost})")
        return f"{failed + lost} of {total} instance(s) failed: " + "; ".join(reasons)

    def fail(self, entry_id: int, now: float, reason: str) -> str:
        """A permanent failure of the whole entry (rejected for good, unknown
        node, attempts exhausted): the dead letter, until ``requeue``."""
        with immediate(self.catalog):
            entry = self._entry_or_raise(entry_id)
            if entry.state != "pending":
                return entry.state
            self.conn.execute(
                "UPDATE outbox SET state = 'failed', last_error = ?, updated_at = ? WHERE id = ?",
                (clean_text(reason), now, entry_id),
            )
            self.settle(entry.study_uid, now, [f"failed {entry.node}"])
            if self.linkbox is not None:
                self.linkbox.study_failed(
                    entry.study_uid, entry.node, clean_text(reason) or "", now
                )
        return "failed"

    def _entry_or_raise(self, entry_id: int) -> Entry:
        entry = self.entry(entry_id)
        if entry is None:
            raise OutboxError(f"no outbox entry {entry_id}")
        return entry

    # --- operators: requeue STUDY [--node N], send STUDY NODE ---

    def requeue(self, study_uid: str, now: float, node: str | None = None) -> list[str]:
        """Send again, attempts from 0.  A failed or pending destination retries
        what failed or was never sent (its 'failed' ledger rows are dropped); a
        delivered one sends the whole study again.  Without a node: every
        destination the study has.  Return the nodes requeued."""
        with immediate(self.catalog):
            self._sendable(study_uid)
            nodes = [check_node(node)] if node else [e.node for e in self.entries(study_uid)]
            if not nodes:
                raise OutboxError("the study has no destination: name a node")
            for n in nodes:
                self._forget(study_uid, n, everything=self._state(study_uid, n) == "delivered")
                self._queue(study_uid, n, now, "requeue", reset=True)
            self.settle(study_uid, now, [f"requeued {n}" for n in nodes])
        return nodes

    def enqueue(self, study_uid: str, node: str, now: float, reason: str = "manual") -> Entry:
        """A manual dispatch (``send STUDY NODE``): the whole study to the node,
        through the same outbox.  A pending entry for the node is only hurried."""
        if reason not in REASONS:
            raise OutboxError(f"unknown reason {reason!r}")
        check_node(node)
        with immediate(self.catalog):
            self._sendable(study_uid)
            if self._state(study_uid, node) != "pending":
                self._forget(study_uid, node, everything=True)
            queued = self._queue(study_uid, node, now, reason)
            self.settle(study_uid, now, [f"queued {node} ({reason})"] if queued else [])
            row = self.conn.execute(
                _ENTRY + " WHERE study_uid = ? AND node = ?", (study_uid, node)
            ).fetchone()
        assert row is not None  # just queued, in this transaction
        return Entry(*row)

    def _sendable(self, study_uid: str) -> None:
        row = self.conn.execute(
            "SELECT s.purged_at, (SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid"
            " AND i.purged_at IS NULL) FROM studies s WHERE s.study_uid = ?",
            (study_uid,),
        ).fetchone()
        if row is None:
            raise OutboxError("unknown study")
        if row[0] is not None and not row[1]:
            raise OutboxError("the study was purged by retention: nothing left to send")

    def _forget(self, study_uid: str, node: str, everything: bool) -> None:
        """Drop ledger rows so those instances are sent again (never the rows of
        purged instances: their files are gone)."""
        self.conn.execute(
            "DELETE FROM deliveries WHERE study_uid = ? AND node = ?"
            " AND (result = 'failed' OR ?) AND sop_uid NOT IN"
            " (SELECT sop_uid FROM instances WHERE study_uid = ? AND purged_at IS NOT NULL)",
            (study_uid, node, everything, study_uid),
        )
