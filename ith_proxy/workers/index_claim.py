"""Which incoming files an indexer takes next: its batches, the poison-pill
suspects, and its share of the buckets when several indexers run
(``[indexer] processes``; ``store/buckets.py``).

A claim first charges the files of any dead indexer's batch (``_recover``),
then lists ``incoming/``, takes the buckets ``buckets.wanted`` names for this
indexer whose locks it can hold, and returns up to ``[indexer] batch_size``
of their files, oldest first, with a batch file (``Spool.begin_batch``).  A
suspect (a file an indexer died on) goes alone, taking turns with normal
batches, so the culprit alone gathers attempts.  ``end`` lets the names and
their buckets go once the batch is committed or given up.
"""

from __future__ import annotations

import logging
import threading
import time

from ith_proxy.config import Config
from ith_proxy.store import buckets
from ith_proxy.store.buckets import BucketLocks, bucket
from ith_proxy.store.spool import Spool

log = logging.getLogger("ith_proxy.indexer")


class Claims:
    def __init__(self, cfg: Config, spool: Spool, slot: int) -> None:
        self.cfg = cfg
        self.spool = spool
        self.slot = slot  # 0: the first indexer; 1..N-1 help under a backlog
        self.poll = False  # the last claim left files it may take later: look again soon
        self._buckets = BucketLocks(spool.root)
        self._inflight: set[str] = set()  # names in a batch not yet committed
        self._solo_turn = False  # after a restart a normal batch first: ingest goes on
        self._told = 0.0  # when a helper last logged that it helps
        self.backlog_at = time.monotonic()  # a helper: when it last saw a backlog
        self._lock = threading.Lock()

    @property
    def _processes(self) -> int:
        return self.cfg.indexer.processes

    def claim(self) -> tuple[list[str], dict[str, int], tuple | None]:
        """The next batch, oldest first: (names, suspects' attempts, batch file)."""
        size = self.cfg.indexer.batch_size
        if self.slot:  # a helper: a count first, no listing, while there is no backlog
            count = self.spool.incoming_count()
            if not buckets.backlog(count, size):
                self.poll = count > 0
                return [], {}, None
            self.backlog_at = time.monotonic()
        with self._lock:
            self._recover()
            listed = self.spool.incoming_names()
            of = {n: bucket(n, self._processes) for n in listed if n not in self._inflight}
            held = self._take_buckets(len(listed), set(of.values()))
            waiting = [n for n in of if of[n] in held]
            marked = self.spool.attempt_names()
            names, prev = waiting[:size], {}
            if marked:
                present = set(listed) | self._inflight
                for stale in marked - present:
                    self.spool.set_attempts(stale, 0)
                suspects = [n for n in waiting if n in marked]
                normal = [n for n in waiting if n not in marked]
                names = normal[:size]
                if suspects and (self._solo_turn or not normal):
                    names, prev = suspects[:1], {suspects[0]: self.spool.attempts(suspects[0])}
                self._solo_turn = not prev
            for k in held - {of[n] for n in names}:
                self._buckets.release(k)
            if not names:
                return names, prev, None
            self._inflight.update(names)
        try:
            return names, prev, self.spool.begin_batch(names)
        except BaseException:  # e.g. ENOSPC: the files stay claimable by the next pass
            self.end(names)
            raise

    def end(self, names: list[str]) -> None:
        """The batch of ``names`` is committed or given up: they and their
        buckets are free again."""
        with self._lock:
            self._inflight.difference_update(names)
            for k in {bucket(n, self._processes) for n in names}:
                self._buckets.release(k)

    def close(self) -> None:
        self._buckets.close()

    def _take_buckets(self, listed: int, present: set[int]) -> set[int]:
        """Of the buckets of the files waiting, those this claim takes files
        from, held (``buckets.wanted``).  ``self.poll``: files wait that it
        did not take."""
        wanted = buckets.wanted(self.slot, present, listed, self.cfg.indexer.batch_size)
        if self.slot and wanted and time.monotonic() - self._told > 60:
            self._told = time.monotonic()
            log.info("indexer %d helps: %d files wait in incoming/", self.slot, listed)
        held = {k for k in sorted(wanted) if self._buckets.take(k)}
        self.poll = bool(present - held)
        return held

    def _recover(self) -> None:
        """Charge the files a dead indexer was in: the one in hand when it
        died, or every one of a batch that was committing.  Before every
        claim: another indexer may have died since (``[indexer] processes``),
        and its files must be charged before anyone takes them again."""
        for index, names in self.spool.dead_batches():
            for name in names[index : index + 1] if index < len(names) else names:
                if self.spool.incoming_path(name).exists():
                    self.spool.set_attempts(name, self.spool.attempts(name) + 1)
                    log.error(
                        "incoming file %s was in flight when the indexer stopped; "
                        "it is retried alone",
                        name,
                    )
