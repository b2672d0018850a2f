"""Buckets of incoming/: how several indexer processes share the backlog
(``[indexer] processes``; docs/architecture.md, "Several indexers").

The SCP ends each ``incoming/`` name with ``-`` and two hex digits, a hash
of the C-STORE's Affected SOP Instance UID (the indexer checks that the
file meta and the data set carry the same one).  ``bucket(name, n)`` is that
hash modulo the number of indexers; a name without the tag (written by an
older version, or by ``Spool.deliver_incoming``) is in bucket 0.  Every copy
of one SOP instance is so in one bucket, whatever the number of indexers.

An indexer holds a bucket's ``flock`` (``attempts/.bucket-<k>``) from the
claim of a batch with its files until that batch is committed, and takes
only the files of buckets it holds.  The files of one SOP instance are so
never de-identified, vaulted or recorded by two processes at once: the
duplicate-SOP check (the catalog plus the holder's uncommitted batches)
stays exact.  A lock dies with its process, so a killed indexer leaves
nothing to clean up.  This is part of the spool room, beside ``attempts``.
"""

from __future__ import annotations

import fcntl
import os
import threading
import zlib
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
_HEX = frozenset("0123456789abcdef")


def tag(sop_uid: str) -> str:
    """The suffix of an incoming name for this SOP Instance UID."""
    return "-%02x" % (zlib.crc32(sop_uid.encode("ascii", "replace")) & 0xFF)


def bucket(name: str, buckets: int) -> int:
    """Which of ``buckets`` buckets an incoming name is in (0 without a tag)."""
    if buckets <= 1 or len(name) < 3 or name[-3] != "-" or not _HEX.issuperset(name[-2:]):
        return 0
    return int(name[-2:], 16) % buckets


def backlog(count: int, batch_size: int) -> bool:
    """Whether ``count`` files in incoming/ are a backlog: more than two
    batches.  The helper indexers (slots 1..N-1) take their buckets only then
    (the service starts them one batch earlier, so they are ready)."""
    return count > 2 * batch_size


def wanted(slot: int, present: set[int], listed: int, batch_size: int) -> set[int]:
    """Which of the ``present`` buckets indexer ``slot`` takes files from.

    The first indexer (slot 0) takes every bucket, but leaves the others'
    buckets to them while ``incoming/`` holds more than two batches
    (``listed`` files) and bucket 0 has files; indexer k takes bucket k only
    then.  Below that one indexer keeps up (one association), and a second
    one would only add ``syncfs`` calls to the SCP's fsync path."""
    over = backlog(listed, batch_size)
    if slot:
        return {slot} & present if over else set()
    return {0} if over and 0 in present else set(present)


class BucketLocks:
    """This process's holds on the buckets' flocks, counted: the indexer's
    pipeline may claim a bucket's next batch while the last one commits, and
    the lock is let go only when the last batch holding it ends.  Each
    instance opens its own lock files, so two instances (two indexers in one
    test process) exclude each other as two processes do."""

    def __init__(self, root: Path) -> None:
        self._dir = os.path.join(root, "attempts")
        self._fds: dict[int, int] = {}
        self._holds: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self, k: int) -> bool:
        """Hold bucket ``k`` once more if this process holds it or can lock it
        now, without waiting; False if another process holds it."""
        with self._lock:
            if self._holds.get(k, 0):
                self._holds[k] += 1
                return True
            fd = self._fds.get(k)
            if fd is None:
                os.makedirs(self._dir, mode=DIR_MODE, exist_ok=True)
                path = os.path.join(self._dir, f".bucket-{k}")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
                self._fds[k] = fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self._holds[k] = 1
            return True

    def release(self, k: int) -> None:
        with self._lock:
            held = self._holds.get(k, 0)
            if held <= 0:
                return
            self._holds[k] = held - 1
            if held == 1:
                fcntl.flock(self._fds[k], fcntl.LOCK_UN)

    def held(self, k: int) -> bool:
        with self._lock:
            return self._holds.get(k, 0) > 0

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)  # closing drops the flock
            self._fds.clear()
            self._holds.clear()
