"""Health policy: what counts as a problem, in one place.

The API's ``/api/health/`` reports these lines (503 when there are any), and
the metrics and status routes are to reuse them.  The policy reads the spool
and the catalog itself; whether the workers are alive only the supervisor
knows, so it passes that in.  Nothing here connects to the DICOM port.  The
lines are part of the API: operators and monitors match on them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ith_proxy.config import Config
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool


@dataclass(frozen=True)
class Liveness:
    """Which workers the supervisor sees running."""

    dicom: bool  # the SCP listens (not a problem when [scp] auto_start is off)
    indexer: bool
    scheduler: bool
    forwarder: bool = True


def problems(cfg: Config, spool: Spool, alive: Liveness) -> list[str]:
    """One line per problem, in a fixed order; an empty list means healthy."""
    out = worker_problems(cfg, alive)
    try:
        out += spool_problems(cfg, spool)
    except OSError:
        out.append("spool is not accessible")
    if not catalog_readable(spool):
        out.append("catalog is not accessible")
    return out


def worker_problems(cfg: Config, alive: Liveness) -> list[str]:
    out = []
    if cfg.scp.auto_start and not alive.dicom:
        out.append("dicom listener is not running")
    if not alive.indexer:
        out.append("indexer is not running")
    if not alive.scheduler:
        out.append("scheduler is not running")
    if not alive.forwarder:
        out.append("forwarder is not running")
    return out


def spool_problems(cfg: Config, spool: Spool) -> list[str]:
    """Low free disk (the SCP refuses C-STORE then) and an indexer that has
    left files in incoming/ for longer than ``[indexer] stuck_after``.
    Raises OSError when the spool cannot be read."""
    out = []
    if spool.free_mb() < cfg.spool.min_free_mb:
        out.append("free disk is below the minimum; C-STORE is refused")
    waiting, oldest = spool.oldest_incoming()
    age = time.time() - oldest if oldest is not None else 0.0
    if age > cfg.indexer.stuck_after:
        out.append(
            f"indexer is behind or stuck: {waiting} file(s) in incoming/, "
            f"the oldest for {age:.0f} s (see error.log)"
        )
    return out


def catalog_readable(spool: Spool) -> bool:
    """The catalog opens read-only and answers a query."""
    try:
        cat = Catalog(spool.catalog_file, readonly=True)
        try:
            cat.ping()
        finally:
            cat.close()
    except Exception:  # any failure to open or query is the one problem reported
        return False
    return True
