"""The attempts folder of the spool: the indexer's in-progress markers
(docs/architecture.md, "Poison pills").

``attempts/.inflight-<unique>``: a batch's names after a 9-byte header, the
index of the file in hand (``len(names)``: committing), removed when the
batch ends; ``attempts/<name>``: how often the indexer died with
``incoming/<name>`` in flight.  No fsync: the page cache survives a killed
indexer; a power cut resets them.  This is part of the spool room: ``Spool``
inherits it (as it inherits ``QuarantineFolder``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ith_proxy.fsio import read_nofollow, unique_name, writev_all

FILE_MODE = 0o600
DIR_MODE = 0o700


class AttemptsFolder:
    """The attempts methods of ``Spool`` (which provides ``root``)."""

    root: Path

    def begin_batch(self, names: list[str]) -> tuple[str, int]:
        path = os.path.join(self.root, "attempts", ".inflight-" + unique_name())
        os.makedirs(os.path.dirname(path), mode=DIR_MODE, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        try:
            writev_all(fd, [b"00000000\n" + "".join(n + "\n" for n in names).encode()])
        except BaseException:  # e.g. ENOSPC: no fd leaked, no partial batch file left
            os.close(fd)
            Path(path).unlink(missing_ok=True)
            raise
        return path, fd

    @staticmethod
    def batch_at(batch: tuple[str, int], index: int) -> None:
        os.pwrite(batch[1], b"%08d" % index, 0)

    @staticmethod
    def end_batch(batch: tuple[str, int]) -> None:
        os.close(batch[1])
        Path(batch[0]).unlink(missing_ok=True)

    def dead_batches(self) -> Iterator[tuple[int, list[str]]]:
        """(index, names) of each batch file left by a dead indexer, removed
        once read; only before this indexer begins batches."""
        for entry in sorted(self.attempt_names(".inflight-")):
            path = self.root / "attempts" / entry
            lines = read_nofollow(path).decode(errors="replace").split("\n")
            yield (int(lines[0]) if lines[0].isdigit() else 0), [n for n in lines[1:] if n]
            path.unlink()

    def attempt_names(self, prefix: str = "") -> set[str]:
        """Names with an attempt count (or batch files, with their prefix)."""
        try:
            names = os.listdir(self.root / "attempts")
        except FileNotFoundError:
            return set()
        return {n for n in names if n.startswith(prefix) and (prefix or n[0] != ".")}

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
