"""The attempts folder of the spool: the indexer's in-progress markers
(docs/architecture.md, "Poison pills").

``attempts/.inflight-<unique>``: a batch's names after a 9-byte header, the
index of the file in hand (``len(names)``: committing), locked by its
indexer while it lives and removed when the batch ends; ``attempts/<name>``:
how often an indexer died with ``incoming/<name>`` in flight.  No fsync: the
page cache survives a killed indexer; a power cut resets them.  This is
part of the spool room: ``Spool`` inherits it (as it inherits
``QuarantineFolder``).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ith_proxy.fsio import read_nofollow, unique_name, writev_all

_BATCH = ".inflight-"

FILE_MODE = 0o600
DIR_MODE = 0o700


class AttemptsFolder:
    """The attempts methods of ``Spool`` (which provides ``root``)."""

    root: Path

    def begin_batch(self, names: list[str]) -> tuple[str, int]:
        """The batch file of ``names``, locked (``flock``) by this indexer
        until ``end_batch``: another indexer's ``dead_batches`` skips it.  It
        is written as ``.new-`` and renamed, so it is never seen unlocked."""
        folder = os.path.join(self.root, "attempts")
        unique = unique_name()
        new, path = os.path.join(folder, ".new-" + unique), os.path.join(folder, _BATCH + unique)
        os.makedirs(folder, mode=DIR_MODE, exist_ok=True)
        fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            writev_all(fd, [b"00000000\n" + "".join(n + "\n" for n in names).encode()])
            os.rename(new, path)
        except BaseException:  # e.g. ENOSPC: no fd leaked, no partial batch file left
            os.close(fd)
            Path(new).unlink(missing_ok=True)
            raise
        return path, fd

    @staticmethod
    def batch_at(batch: tuple[str, int], index: int) -> None:
        os.pwrite(batch[1], b"%08d" % index, 0)

    @staticmethod
    def end_batch(batch: tuple[str, int]) -> None:
        try:
            Path(batch[0]).unlink(missing_ok=True)
        finally:
            os.close(batch[1])  # after the unlink: a dead batch is never one that ended

    def dead_batches(self) -> Iterator[tuple[int, list[str]]]:
        """(index, names) of each batch file left by a dead indexer, removed
        once read.  A batch file whose ``flock`` is held is a live indexer's
        (``[indexer] processes`` > 1) and is left alone."""
        for entry in sorted(n for n in self._entries() if n.startswith((_BATCH, ".new-"))):
            path = self.root / "attempts" / entry
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:  # its batch just ended
                continue
            except OSError:  # a link planted in attempts/: never followed, removed
                path.unlink(missing_ok=True)
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live indexer's batch
                if not _same_file(path, fd):  # another indexer read it first
                    continue
                if not entry.startswith(_BATCH):  # its indexer died before the rename
                    if time.time() - os.fstat(fd).st_mtime > 60:  # (or is about to lock it)
                        path.unlink(missing_ok=True)
                    continue
                path.unlink(missing_ok=True)
                lines = os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace").split("\n")
            finally:
                os.close(fd)
            yield (int(lines[0]) if lines[0].isdigit() else 0), [n for n in lines[1:] if n]

    def attempt_names(self) -> set[str]:
        """Names with an attempt count."""
        return {n for n in self._entries() if n[:1] != "."}

    def _entries(self) -> list[str]:
        try:
            return os.listdir(self.root / "attempts")
        except FileNotFoundError:
            return []

    def attempts(self, name: str) -> int:
        try:
            text = read_nofollow(self.root / "attempts" / name).strip()
        except FileNotFoundError:
            return 0
        except OSError:  # a link planted in attempts/ (never followed): count it in flight
            return 1
        return int(text) if text.isdigit() else 1  # torn write: it was in flight

    def set_attempts(self, name: str, count: int) -> None:
        """Record COUNT attempts at incoming/<name>; 0 removes the marker."""
        if "/" in name or name[:1] in ("", "."):
            raise ValueError("bad incoming name")
        path = self.root / "attempts" / name
        if count <= 0:
            return path.unlink(missing_ok=True)
        path.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
        try:
            os.write(fd, b"%d\n" % count)
        finally:
            os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
