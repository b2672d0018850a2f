"""The forwarder: the outbox's due entries, sent to their nodes.

One pass (``run_once``) takes the entries whose time has come, in order, and
for each one sends the study's instances that its node has not acknowledged
yet: by C-STORE (``dicom.scu``) to a ``dicom`` node, by STOW-RS
(``dicom.stow``) to a ``dicomweb`` node.  What each instance came to goes
into the per-instance ledger as it happens (in small batches, one
transaction each), so a pass cut short by kill -9 resumes where the ledger
stops; an instance whose row was not written yet is sent again (delivery is
at least once, with the same anonymized UIDs).

Each outcome falls in one of three classes (docs/forwarding.md has the
table): delivered (warnings recorded), permanent for that instance (the
dead letter, until ``requeue``), or transient.  Transient outcomes and a
failed association or request leave the entry pending with one more attempt
and an exponential backoff with jitter, until ``[forward] max_attempts``
makes it permanent.  A node that does not exist, or an association rejected
for good, fails the whole entry at once.

The forwarder writes only outbox rows, the ledger and the study state that
follows from them (``store/outbox.py``); it reads the instance files where
the indexer put them and never moves a spool file.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ith_proxy.backoff import Backoff
from ith_proxy.config import Config
from ith_proxy.dicom import scu, stow
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.nodes import Node, Nodes
from ith_proxy.store.outbox import Entry, Outbox, Outcome
from ith_proxy.store.spool import Spool

log = logging.getLogger("ith_proxy.forwarder")

LEDGER_BATCH = 32  # outcomes per ledger transaction (a replay after a crash is harmless)


class _Ledger:
    """Collects the outcomes of one send and writes them in small batches."""

    def __init__(self, outbox: Outbox, entry: Entry, clock: Callable[[], float]) -> None:
        self.outbox, self.entry, self.clock = outbox, entry, clock
        self.buffer: list[Outcome] = []
        self.delivered = self.failed = 0

    def add(self, sop_uid: str, result: str, status: int | None, reason: str, warning: str) -> None:
        if result == "transient":
            return  # no row: the instance is sent again on the next attempt
        delivered = result == "delivered"
        self.delivered += delivered
        self.failed += not delivered
        self.buffer.append(
            Outcome(
                sop_uid, delivered, status, None if delivered else reason or None, warning or None
            )
        )
        if len(self.buffer) >= LEDGER_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            batch, self.buffer = self.buffer, []
            self.outbox.record(self.entry.id, batch, self.clock())


class Forwarder:
    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        catalog: Catalog,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.outbox = Outbox(catalog, link_events=not cfg.link.offline)
        self.nodes = Nodes(catalog)
        self.clock = clock
        self.rand = rand
        fwd = cfg.forward
        self.backoff = Backoff(fwd.backoff_base, fwd.backoff_cap, fwd.max_attempts)
        self.timeouts = scu.Timeouts(
            connect=cfg.scu.connect_timeout, acse=cfg.scu.acse_timeout, dimse=cfg.scu.dimse_timeout
        )

    def run_once(self, limit: int = 20) -> int:
        """Send every due entry (at most ``limit``); return how many were tried."""
        entries = self.outbox.due(self.clock(), limit)
        for entry in entries:
            try:
                self.send(entry)
            except Exception as exc:  # one bad entry never stops the queue behind it
                log.exception("forwarding study %s to %s failed", entry.study_uid, entry.node)
                self.outbox.retry_or_fail(
                    entry.id, self.clock(), f"internal error: {type(exc).__name__}",
                    self.backoff, self.rand,
                )  # fmt: skip
        return len(entries)

    def send(self, entry: Entry) -> str:
        """One attempt at one entry; return its state afterwards."""
        node = self.nodes.get(entry.node)
        if node is None:
            return self.outbox.fail(entry.id, self.clock(), f"unknown node {entry.node!r}")
        pending = self.outbox.pending_instances(entry)
        if not pending:
            return self.outbox.finish(entry.id, self.clock())
        # each file under the SOP UID it was stored as: the ledger's key even when
        # the file can no longer be read (an SCU outcome then names only the path)
        files = {self.spool.instance_path(entry.study_uid, p.series_uid, p.sop_uid): p.sop_uid
                 for p in pending}  # fmt: skip
        ledger = _Ledger(self.outbox, entry, self.clock)
        log.info("forwarding study %s to %s: %d instance(s), attempt %d",
                 entry.study_uid, node.name, len(files), entry.attempts + 1)  # fmt: skip
        try:
            transient = self._deliver(node, files, ledger)
        except (scu.AssociationFailed, stow.RequestFailed) as exc:
            ledger.flush()
            return self._failed_attempt(entry, exc.reason, exc.transient)
        ledger.flush()
        if transient:
            return self._failed_attempt(entry, transient, True)
        state = self.outbox.finish(entry.id, self.clock())
        log.info("study %s to %s: %s (%d delivered, %d failed in this attempt)",
                 entry.study_uid, node.name, state, ledger.delivered, ledger.failed)  # fmt: skip
        return state

    def _deliver(self, node: Node, files: dict[Path, str], ledger: _Ledger) -> str:
        """Send the files; return the first transient reason ('' if none)."""
        transient: list[str] = []

        def note(sop: str, result: str, status: int | None, reason: str, warning: str) -> None:
            if result == "transient":
                transient.append(reason)
            ledger.add(sop, result, status, reason, warning)

        if node.kind == "dicom":
            scu.store(
                scu.Peer(node.ae_title, node.host, node.port),
                self.cfg.scp.ae_title,
                list(files),
                self.timeouts,
                on_outcome=lambda o: note(
                    files.get(o.path, o.sop_uid) if o.path else o.sop_uid,
                    o.result,
                    o.status,
                    o.reason,
                    o.warning,
                ),
            )
        else:
            fwd = self.cfg.forward
            stow.store(
                stow.Endpoint(node.url, node.auth_header),
                list(files),  # an unreadable file's outcome is named by its stem: its SOP UID
                batch_bytes=fwd.stow_batch_mb << 20,
                batch_instances=fwd.stow_batch_instances,
                timeout=self.cfg.scu.dimse_timeout,
                on_outcome=lambda o: note(o.sop_uid, o.result, o.status, o.reason, o.warning),
            )
        if transient:
            return f"{len(transient)} instance(s) not delivered: {transient[0]}"
        return ""

    def _failed_attempt(self, entry: Entry, reason: str, transient: bool) -> str:
        now = self.clock()
        if not transient:
            state = self.outbox.fail(entry.id, now, reason)
        else:
            state = self.outbox.retry_or_fail(entry.id, now, reason, self.backoff, self.rand)
        log.warning("study %s to %s: %s (%s)", entry.study_uid, entry.node, state, reason)
        return state

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                log.exception("forwarder pass failed; retrying")
                busy = 0
            if not busy:
                stop.wait(interval)
