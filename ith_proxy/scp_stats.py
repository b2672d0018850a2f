"""What each SCP worker process reports to the service ([scp] workers > 1).

One shared page (a memfd, mapped MAP_SHARED by the service and by every
worker, passed to an exec'd worker as a descriptor) with one slot per
worker.  A worker is the only writer of its slot; the service only reads
(sums) them.  Each field is an aligned 8-byte word, written whole.

Slot fields: instances and bytes received (totals since the service
started: a restarted worker goes on from what its slot holds), associations
open now, listening (1/0), and a heartbeat (``time.monotonic()`` of the
worker's last report; the clock is system-wide on Linux).  Those are written
once a second by the worker's report.

One more field, ``open``, is written at once by the process's association
threads (``OpenCount``): the connections that process is serving right now.
It is how ``[scp] max_associations`` holds for the whole proxy: the service
is slot 0 and has one too, and every process's AE admits an association only
while its own ones plus the other slots' ``open`` stay within the limit
(``dicom/ae.ListeningAE``).  A connection counts from the moment its thread
starts, before its A-ASSOCIATE-RQ is negotiated, so two processes that accept
at the same instant both see each other: at the boundary both may refuse,
never both admit.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time

SLOTS = 16  # [scp] workers is at most 16
_SLOT = struct.Struct("<QQQQd")  # instances, bytes, associations, listening, heartbeat
_STRIDE = 64
_OPEN = struct.Struct("<Q")
_OPEN_AT = _SLOT.size  # the ``open`` field, after the report's
SILENT_AFTER = 5.0  # seconds without a report: the worker is reported in health


class WorkerStats:
    def __init__(self, fd: int | None = None) -> None:
        """A new page (the service), or the one behind ``fd`` (a worker)."""
        if fd is None:
            fd = os.memfd_create("ith-scp-stats")
            os.ftruncate(fd, SLOTS * _STRIDE)
        self.fd = fd
        self._map = mmap.mmap(fd, SLOTS * _STRIDE, mmap.MAP_SHARED)

    def read(self, slot: int) -> tuple[int, int, int, int, float]:
        return _SLOT.unpack_from(self._map, slot * _STRIDE)

    def write(
        self, slot: int, instances: int, size: int, associations: int, listening: bool
    ) -> None:
        _SLOT.pack_into(
            self._map,
            slot * _STRIDE,
            instances,
            size,
            associations,
            int(listening),
            time.monotonic(),
        )

    def forget_associations(self, slot: int) -> None:
        """After a worker died: its associations died with it.  The heartbeat
        is set to now: the restarted worker has its first second to report."""
        instances, size, _, _, _ = self.read(slot)
        _SLOT.pack_into(self._map, slot * _STRIDE, instances, size, 0, 0, time.monotonic())
        self.set_opened(slot, 0)

    def opened(self, slot: int) -> int:
        return _OPEN.unpack_from(self._map, slot * _STRIDE + _OPEN_AT)[0]

    def set_opened(self, slot: int, count: int) -> None:
        _OPEN.pack_into(self._map, slot * _STRIDE + _OPEN_AT, count)

    def silent(self, slots: range, now: float | None = None) -> list[tuple[int, float]]:
        """(slot, seconds) of every worker whose last report is older than SILENT_AFTER."""
        now = time.monotonic() if now is None else now
        ages = [(s, now - self.read(s)[4]) for s in slots]
        return [(s, age) for s, age in ages if age > SILENT_AFTER]

    def totals(self, slots: range) -> tuple[int, int, int]:
        """(instances, bytes, associations) summed over ``slots``."""
        rows = [self.read(s) for s in slots]
        return sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows)


class OpenCount:
    """One process's open connections, in its slot's ``open`` field (its
    only writer), and the sum of the other processes' (``others``)."""

    def __init__(self, stats: WorkerStats, slot: int, slots: int) -> None:
        self._stats, self._slot = stats, slot
        self._others = [s for s in range(slots) if s != slot]
        self._lock = threading.Lock()
        self._count = 0

    def add(self, delta: int) -> None:
        with self._lock:
            self._count = max(0, self._count + delta)
            self._stats.set_opened(self._slot, self._count)

    def others(self) -> int:
        return sum(self._stats.opened(s) for s in self._others)
