"""The scheduler: finalize quiet studies, queue them, keep study.json current,
purge forwarded studies after their retention time, clean tmp/.

A study is ``complete`` once no instance has arrived for ``study_timeout``
seconds.  The timer is the study's ``last_received`` time in the catalog, so
it survives restarts: a restart neither loses nor shortens it.  The clock is
injectable for tests.

The scheduler is the only writer of ``studies/<S>/study.json``: the catalog
bumps a study's version on every change, and each pass rewrites the summary
of every study whose file is older than its row.

A completed study is queued for every ``[forward] destinations`` node in the
same transaction as its state (store/outbox.py); the forwarder does the rest.
``study_timeout`` and the destinations are runtime settings: each pass reads
the persisted layer (``store/settings.py``, written by the API and the
backend link), so a change takes effect on the next pass, without a restart.
Retention (``[spool] retention_hours`` > 0) removes the instance files of a
study only when every destination acknowledged it that long ago; its rows stay,
marked purged, and study.json stays as the tombstone (store/retention.py).
Unforwarded data is never removed, whatever the disk: the ``min_free_mb``
watermark refuses new stores instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from ith_proxy.config import Config
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.outbox import Outbox, OutboxError, check_node
from ith_proxy.store.retention import Retention
from ith_proxy.store.settings import RuntimeSettings, effective
from ith_proxy.store.spool import Spool

log = logging.getLogger("ith_proxy.scheduler")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


TOMBSTONE_FIELDS = (
    "series_instance_uid",
    "modality",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax",
    "size",
    "received_at",
)


def study_summary(row: dict, destinations: Sequence[dict] = (), purged: Sequence = ()) -> dict:
    """The non-PHI study.json content for a catalog study row, its outbox
    destinations (Outbox.study_destinations) and its purged instances
    (Retention.purged_instances: the tombstone that reindex reads back)."""
    summary = {
        "study_instance_uid": row["study_instance_uid"],
        "state": row["state"],
        "series_count": row["series_count"],
        "instance_count": row["instance_count"],
        "bytes": row["bytes"],
        "modalities": row["modalities"],
        "first_received": row["first_received"],
        "last_received": row["last_received"],
        "completed_at": row["completed_at"],
        "first_received_iso": _iso(row["first_received"]),
        "last_received_iso": _iso(row["last_received"]),
        "completed_at_iso": _iso(row["completed_at"]),
        "reopened": row["reopened"],
        "events": row["events"],
        "purged_at": row.get("purged_at"),
        "purged_at_iso": _iso(row.get("purged_at")),
        "destinations": [
            {**d, "delivered_at_iso": _iso(d.get("delivered_at"))} for d in destinations
        ],
    }
    if purged:
        summary["tombstone"] = {
            "fields": list(TOMBSTONE_FIELDS),
            "instances": [list(p) for p in purged],
        }
    return summary


class Scheduler:
    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        catalog: Catalog,
        clock: Callable[[], float] = time.time,
        destinations: Sequence[str] = (),
        retention_hours: float = 0.0,
    ) -> None:
        """``destinations``: the ``[forward] destinations`` node names (a name
        given twice is queued once); ``retention_hours``: 0 keeps everything."""
        self.cfg = cfg
        self.spool = spool
        self.catalog = catalog
        self.outbox = Outbox(catalog, link_events=not cfg.link.offline)
        self.retention = Retention(catalog)
        self.settings = RuntimeSettings(catalog)
        self.clock = clock
        self.destinations = tuple(dict.fromkeys(check_node(n) for n in destinations))
        if not retention_hours >= 0:  # NaN too
            raise OutboxError("retention_hours must be >= 0")
        self.retention_s = float(retention_hours) * 3600.0
        self._last_tmp_clean = 0.0

    def live(self) -> tuple[float, tuple[str, ...]]:
        """(study_timeout, destinations) as they are now: the persisted runtime
        settings over the configuration and the constructor's destinations."""
        persisted = self.settings.persisted()
        live = effective(self.cfg, persisted)
        destinations = self.destinations
        if "forward_to" in persisted:
            destinations = tuple(dict.fromkeys(check_node(n) for n in live.forward.destinations))
        return live.scheduler.study_timeout, destinations

    def run_once(self) -> dict:
        now = self.clock()
        timeout, destinations = self.live()
        completed = [
            uid
            for uid in self.catalog.quiet_studies(now, timeout)
            if self.outbox.complete_study(uid, now, timeout, destinations)
        ]
        for uid in completed:
            log.info("study %s complete, queued for %d destination(s)", uid, len(destinations))
        purged = self.purge(now) if self.retention_s > 0 else []
        written = 0
        for uid, version in self.catalog.stale_summaries():
            row = self.catalog.study(uid)
            if row is None:
                continue
            tombstone = self.retention.purged_instances(uid) if row["purged_at"] else []
            summary = study_summary(row, self.outbox.study_destinations(uid), tombstone)
            self.spool.write_study_json(uid, summary)
            self.catalog.summary_written(uid, version)
            written += 1
        cleaned = 0
        if now - self._last_tmp_clean >= min(60.0, self.cfg.spool.tmp_max_age):
            cleaned = self.spool.clean_tmp(self.cfg.spool.tmp_max_age, now)
            self._last_tmp_clean = now
            if cleaned:
                log.info("removed %d stale tmp file(s)", cleaned)
        return {
            "completed": completed,
            "summaries": written,
            "tmp_cleaned": cleaned,
            "purged": purged,
        }

    def purge(self, now: float) -> list[str]:
        """Retention: remove the files of studies every destination acknowledged
        more than retention_hours ago (files first, then the rows are marked: a
        crash in between only purges again).  Return the purged studies."""
        purged = []
        for uid in self.retention.purgeable(now - self.retention_s):
            items = self.retention.purge_list(uid)
            if not items:
                continue
            try:
                removed = self.spool.purge_instances(uid, items)
            except OSError as exc:
                log.error("study %s: retention purge failed: %s", uid, exc)
                continue
            self.retention.mark_purged(uid, [sop for _, sop in items], now)
            log.info("study %s purged by retention (%d instance file(s))", uid, removed)
            purged.append(uid)
        return purged

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("scheduler pass failed; retrying")
            stop.wait(self.cfg.scheduler.interval)
