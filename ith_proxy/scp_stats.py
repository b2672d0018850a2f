"""What each SCP worker process reports to the service ([scp] workers > 1).

One shared page (a memfd, mapped MAP_SHARED by the service and by every
worker, passed to an exec'd worker as a descriptor) with one slot per
worker.  A worker is the only writer of its slot; the service only reads
(sums) them.  Each field is an aligned 8-byte word, written whole.

Slot fields: instances and bytes received (totals since the service
started: a restarted worker goes on from what its slot holds), associations
open now, listening (1/0), and a heartbeat (``time.monotonic()`` of the
worker's last report; the clock is system-wide on Linux).
"""

from __future__ import annotations

import mmap
import os
import struct
import time

SLOTS = 16  # [scp] workers is at most 16
_SLOT = struct.Struct("<QQQQd")  # instances, bytes, associations, listening, heartbeat
_STRIDE = 64


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
        """After a worker died: its associations died with it."""
        instances, size, _, _, beat = self.read(slot)
        _SLOT.pack_into(self._map, slot * _STRIDE, instances, size, 0, 0, beat)

    def totals(self, slots: range) -> tuple[int, int, int]:
        """(instances, bytes, associations) summed over ``slots``."""
        rows = [self.read(s) for s in slots]
        return sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows)
