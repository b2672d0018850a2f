"""A site for the outbox and retention tests: real spool folders, catalog and
vault (worker_rooms.Rooms), studies indexed by the real indexer at a chosen
time, a Scheduler driven by an injected clock, and a stand-in for the
forwarder's bookkeeping (the ledger calls it will make after each send)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import dicomgen
from ith_proxy.store.outbox import Entry, Outbox, Outcome
from ith_proxy.workers.scheduler import Scheduler
from worker_rooms import Rooms

T0 = 1_700_000_000.0  # a fixed start: every time in these tests is T0 + something


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Site:
    def __init__(
        self,
        rooms: Rooms,
        tmp_path: Path,
        destinations: tuple[str, ...] = (),
        retention_hours: float = 0.0,
    ) -> None:
        self.rooms = rooms
        self.tmp = Path(tempfile.mkdtemp(prefix="site-", dir=tmp_path))  # this Site's inputs
        self.spool = rooms.spool
        self.catalog = rooms.catalog
        self.outbox = Outbox(rooms.catalog)
        self.clock = Clock(T0)
        self.timeout = rooms.cfg.scheduler.study_timeout
        self.scheduler = Scheduler(
            rooms.cfg,
            rooms.spool,
            rooms.catalog,
            clock=self.clock,
            destinations=destinations,
            retention_hours=retention_hours,
        )
        self._n = 0

    def index(self, n: int, at: float, like: dicomgen.Series | None = None) -> dicomgen.Series:
        """``n`` new instances (a new study, or a new series of ``like``'s)
        received at ``at``, through incoming/ and the real indexer."""
        self._n += 1
        series = dicomgen.make_series(
            self.tmp / f"in{self._n}", n, rows=16, cols=16, like=like, series_number=self._n
        )
        for f in series.files:
            name = self.spool.deliver_incoming(f.read_bytes())
            os.utime(self.spool.incoming_path(name), (at, at))
        assert self.rooms.indexer.run_once() == n
        return series

    def complete(self, n: int = 3) -> str:
        """A new study of ``n`` instances, completed by the scheduler; its UID."""
        before = set(self.catalog.study_uids())
        self.index(n, self.clock.now)
        self.clock.now += self.timeout
        result = self.scheduler.run_once()
        (study,) = set(self.catalog.study_uids()) - before
        assert study in result["completed"]
        return study

    def state(self, study: str) -> str:
        row = self.catalog.study(study)
        assert row is not None
        return row["state"]

    def entry(self, study: str, node: str) -> Entry:
        (entry,) = [e for e in self.outbox.entries(study) if e.node == node]
        return entry

    def deliver(self, entry: Entry, fail: set[str] = frozenset(), reason: str = "") -> str:
        """What the forwarder does for one entry: send every pending instance,
        record each result, then finish."""
        outcomes = [
            Outcome(p.sop_uid, p.sop_uid not in fail, 0xC000 if p.sop_uid in fail else 0, reason)
            for p in self.outbox.pending_instances(entry)
        ]
        self.outbox.record(entry.id, outcomes, self.clock.now)
        return self.outbox.finish(entry.id, self.clock.now)

    def summary(self, study: str) -> dict:
        self.scheduler.run_once()
        return json.loads((self.spool.study_dir(study) / "study.json").read_text())

    def files(self, study: str) -> list[Path]:
        return sorted(self.spool.study_dir(study).rglob("*.dcm"))
