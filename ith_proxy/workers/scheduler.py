"""The scheduler: finalize quiet studies, keep study.json current, clean tmp/.

A study is ``complete`` once no instance has arrived for ``study_timeout``
seconds.  The timer is the study's ``last_received`` time in the catalog, so
it survives restarts: a restart neither loses nor shortens it.  The clock is
injectable for tests.

The scheduler is the only writer of ``studies/<S>/study.json``: the catalog
bumps a study's version on every change, and each pass rewrites the summary
of every study whose file is older than its row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from ith_proxy.config import Config
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool

log = logging.getLogger("ith_proxy.scheduler")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def study_summary(row: dict) -> dict:
    """The non-PHI study.json content for a catalog study row."""
    return {
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
    }


class Scheduler:
    def __init__(
        self, cfg: Config, spool: Spool, catalog: Catalog, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.catalog = catalog
        self.clock = clock
        self._last_tmp_clean = 0.0

    def run_once(self) -> dict:
        now = self.clock()
        timeout = self.cfg.scheduler.study_timeout
        completed = [
            uid
            for uid in self.catalog.quiet_studies(now, timeout)
            if self.catalog.complete_study(uid, now, timeout)
        ]
        for uid in completed:
            log.info("study %s complete", uid)
        written = 0
        for uid, version in self.catalog.stale_summaries():
            row = self.catalog.study(uid)
            if row is None:
                continue
            self.spool.write_study_json(uid, study_summary(row))
            self.catalog.summary_written(uid, version)
            written += 1
        cleaned = 0
        if now - self._last_tmp_clean >= min(60.0, self.cfg.spool.tmp_max_age):
            cleaned = self.spool.clean_tmp(self.cfg.spool.tmp_max_age, now)
            self._last_tmp_clean = now
            if cleaned:
                log.info("removed %d stale tmp file(s)", cleaned)
        return {"completed": completed, "summaries": written, "tmp_cleaned": cleaned}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("scheduler pass failed; retrying")
            stop.wait(self.cfg.scheduler.interval)
