"""The backend link's durable outgoing messages (DESIGN.md §5, "Delivery").

``study.completed``, ``study.forwarded``, ``study.failed`` and
``command.result`` are written here, each as its whole JSON text, and stay
until the backend acks their ``id``.  A message that was only sent is not
delivered: the backend may crash with it in a buffer.  After every ``hello``
the link sends the unacked ones again, in order (``seq``): at least once,
and the backend dedups by ``id``.

The study events are posted by the scheduler and the forwarder inside their
own transactions (``store/outbox.py``), so a state change and its event
commit together or not at all.  The link is the only room that deletes
(on ``ack``).

Bounded: a backend that never acks cannot fill the disk.  When more than
``MAX_MESSAGES`` would wait, the oldest are dropped and the count is logged
(docs/backend-protocol.md, "Delivery").  All SQL of the table is here.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from ith_proxy.store.catalog import Catalog

log = logging.getLogger("ith_proxy.link")

DURABLE = ("study.completed", "study.forwarded", "study.failed", "command.result")
MAX_MESSAGES = 100_000  # ~300 bytes each: at most ~30 MB of catalog
MAX_ACK_IDS = 10_000  # per ack message
_ID_MAX = 64


def timestamp(now: float) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. 2026-12-02T04:10:00.123Z."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def envelope(kind: str, payload: Mapping[str, object], now: float | None = None) -> dict:
    """A protocol message: ``type``, a fresh ``id`` (uuid4), ``ts``, then the payload."""
    now = time.time() if now is None else now
    message: dict[str, object] = {"type": kind, "id": str(uuid.uuid4()), "ts": timestamp(now)}
    for key, value in payload.items():
        if key not in message:
            message[key] = value
    return message


class Linkbox:
    """The durable outgoing messages, over one catalog connection."""

    def __init__(self, catalog: Catalog, limit: int = MAX_MESSAGES) -> None:
        self._conn = catalog.conn
        self._limit = limit

    def post(self, kind: str, payload: Mapping[str, object], now: float | None = None) -> dict:
        """Store a durable message (a savepoint inside the caller's
        transaction, if any); return it."""
        if kind not in DURABLE:
            raise ValueError(f"{kind!r} is not a durable message type")
        now = time.time() if now is None else now
        message = envelope(kind, payload, now)
        with self._conn:
            self._conn.execute(
                "INSERT INTO linkbox(id, type, body, created_at) VALUES (?, ?, ?, ?)",
                (message["id"], kind, json.dumps(message, separators=(",", ":")), now),
            )
            self._conn.execute(
                "DELETE FROM linkbox WHERE seq <= (SELECT max(seq) FROM linkbox) - ?",
                (self._limit,),
            )
            dropped = self._conn.changes()
        if dropped:
            log.warning(
                "link: %d unacked message(s) dropped: more than %d were waiting for the backend",
                dropped,
                self._limit,
            )
        return message

    def unacked(self, after: int = 0, limit: int = 200) -> list[tuple[int, str]]:
        """``(seq, JSON text)`` of waiting messages after ``seq``, oldest first."""
        return [
            (int(seq), str(body))
            for seq, body in self._conn.execute(
                "SELECT seq, body FROM linkbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            )
        ]

    def ack(self, ids: Iterable[object]) -> int:
        """Delete the acked messages; ids that are not strings of a sane
        length, or unknown, are ignored.  Return how many were deleted."""
        wanted = [(i,) for i in ids if isinstance(i, str) and 0 < len(i) <= _ID_MAX]
        with self._conn:
            before = self._conn.total_changes()
            for start in range(0, len(wanted), 500):
                self._conn.executemany(
                    "DELETE FROM linkbox WHERE id = ?", wanted[start : start + 500]
                )
            deleted = self._conn.total_changes() - before
        return deleted

    def depth(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM linkbox").get)

    # --- the study events (posted by store/outbox.py, in its transactions) ---

    def study_completed(self, study_uid: str, now: float) -> dict:
        row = self._conn.execute(
            "SELECT (SELECT count(*) FROM instances WHERE study_uid = ?),"
            " (SELECT count(*) FROM series WHERE study_uid = ?)",
            (study_uid, study_uid),
        ).fetchone()
        instances, series = row if row is not None else (0, 0)
        modalities = sorted(
            {
                str(m)
                for (m,) in self._conn.execute(
                    "SELECT DISTINCT modality FROM series WHERE study_uid = ? AND modality <> ''",
                    (study_uid,),
                )
            }
        )
        payload = {
            "study_instance_uid": study_uid,
            "instances": instances,
            "series": series,
            "modalities": modalities,
            "completed_at": timestamp(now),
        }
        return self.post("study.completed", payload, now)

    def study_forwarded(self, study_uid: str, node: str, now: float) -> dict:
        return self.post("study.forwarded", {"study_instance_uid": study_uid, "node": node}, now)

    def study_failed(self, study_uid: str, node: str, reason: str, now: float) -> dict:
        payload = {"study_instance_uid": study_uid, "node": node, "reason": reason}
        return self.post("study.failed", payload, now)
