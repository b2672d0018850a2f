"""The spool: a Maildir-style folder state machine.

Only this module creates, renames or deletes spool files.  Every write goes
to ``tmp/`` under an opaque unique name, is fsynced, renamed into place and
the target directory is fsynced.  Nothing is ever rewritten in place.

::

    tmp/                      partial writes
    incoming/                 raw instances as received (PHI), opaque names
    studies/<S>/<Se>/<I>.dcm  de-identified instances
    studies/<S>/study.json    non-PHI summary (atomic rewrite)
    quarantine/<reason>/      input that could not be processed + <name>.json
    attempts/                 the indexers' in-progress markers (attempts per file)
                              and bucket locks
    logs/                     rotated logs and audit.log

What is inside a raw input file (plaintext, or encrypted by ``vault.stream``)
is not this module's business: writers and transforms are passed in.

Symbolic links are never followed: files are opened with ``O_NOFOLLOW``, only
regular files are listed, handed out or moved (a link planted in incoming/ or
quarantine/ is skipped, never read), and ``symlinks()`` lets the service refuse
to start when the spool's folders, logs, vault or catalog are links.

The quarantine folder's part of the spool is ``store/quarantine.py``, the
indexers' in-progress markers (attempts/) ``store/attempts.py``, the
buckets that share incoming/ among indexers ``store/buckets.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeAlias

from ith_proxy.fsio import (
    SYNC_FILE_RANGE_WRITE,
    DirSync,
    fsync_dir,
    is_regular_entry,
    keeping_times,
    load_sync_file_range,
    load_syncfs,
    read_nofollow,
    real_dir,
    regular_file,
    unique_name,
    writev_all,
)
from ith_proxy.store import buckets
from ith_proxy.store.attempts import AttemptsFolder
from ith_proxy.store.quarantine import QuarantineFolder

_Chunk: TypeAlias = bytes | bytearray | memoryview  # what writev takes
FILE_MODE = 0o600
DIR_MODE = 0o700
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def _check_uid(uid: str) -> str:
    if not uid or len(uid) > 64 or not _UID_RE.fullmatch(uid):  # '$' takes a final newline
        raise ValueError("not a valid UID for a spool path")
    return uid


class Spool(QuarantineFolder, AttemptsFolder):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "incoming"
        self.studies = self.root / "studies"
        self.quarantine_dir = self.root / "quarantine"
        self.logs = self.root / "logs"
        self.catalog_file = self.root / "catalog.sqlite3"  # with its -wal and -shm journals
        self.vault_file = self.root / "vault.phi"
        self.audit_file = self.logs / "audit.log"
        self._tmp_s = str(self.tmp)
        self._incoming_s = str(self.incoming)
        self._incoming_sync = DirSync(self._incoming_s)  # group commit (fsio.DirSync)
        self._sync_file_range = load_sync_file_range()  # looked up once per process

    # --- set-up and housekeeping ---

    def ensure(self) -> None:
        for d in (self.root, self.tmp, self.incoming, self.studies, self.quarantine_dir, self.logs):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)

    def lock(self) -> int | None:
        """Take the spool's run lock; return its fd, or None if another process holds it."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def symlinks(self, extra: Iterable[Path] = ()) -> list[Path]:
        """Every symbolic link where the proxy opens files by a fixed name: the
        spool's folders, its lock, every file in logs/ and quarantine/, and
        ``extra`` (vault.phi, the catalog and its journals).  The service
        refuses to start on any: logging, apsw and the vault would follow them."""
        names = [
            self.tmp,
            self.incoming,
            self.studies,
            self.quarantine_dir,
            self.logs,
            self.root / ".lock",
        ]
        for path in extra:
            names += [Path(path)] + [Path(f"{path}{s}") for s in ("-wal", "-shm", "-journal")]
        for folder in (self.logs, self.quarantine_dir):
            try:
                names += [Path(e.path) for e in os.scandir(folder)]
            except (FileNotFoundError, NotADirectoryError):
                pass
        return [p for p in names if p.is_symlink()]

    def sync_all(self) -> None:
        """Make every write to the spool's filesystem durable (one syncfs call).

        The indexer writes a batch of files without per-file fsyncs and then
        calls this once, before it commits the catalog and deletes raw files.
        """
        syncfs = load_syncfs()  # looked up once per process
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if syncfs is None or syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def free_mb(self) -> float:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize / (1024 * 1024)

    def clean_tmp(self, max_age: float, now: float | None = None) -> int:
        """Remove tmp files older than max_age seconds (left by a crash)."""
        now = time.time() if now is None else now
        removed = 0
        for entry in os.scandir(self.tmp):
            try:
                if now - entry.stat().st_mtime > max_age:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # --- the one write primitive ---

    def _deliver(
        self,
        target: Path | str,
        write: Callable[[BinaryIO], None] | None = None,
        sync: bool = True,
        chunks: Iterable[_Chunk] | None = None,
    ) -> Path:
        """Write through tmp/, fsync, rename to target, fsync its directory.

        Either ``write(fh)`` fills a buffered file, or ``chunks`` (bytes or
        memoryviews; a list, or an iterator consumed piece by piece) go
        straight to the descriptor with writev.  Paths are plain strings
        here: this is the SCP's per-instance hot path.
        """
        tmp_path = os.path.join(self._tmp_s, unique_name())
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            if chunks is not None:
                try:
                    if isinstance(chunks, (list, tuple)):
                        writev_all(fd, list(chunks))
                    else:  # a generator (e.g. encrypting): one piece at a time
                        for chunk in chunks:
                            writev_all(fd, [chunk])
                    if sync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            elif write is None:
                os.close(fd)
                raise TypeError("_deliver needs write or chunks")
            else:
                with os.fdopen(fd, "wb") as fh:
                    write(fh)
                    fh.flush()
                    if sync:
                        os.fsync(fh.fileno())
            os.rename(tmp_path, target)
        except BaseException:
            try:
                os.unlink(tmp_path)
            except FileNotFoundError:
                pass
            raise
        if sync:
            fsync_dir(os.path.dirname(target))
        return Path(target)

    # --- incoming/ : owned by the SCP (writer) and the indexer (consumer) ---

    def deliver_incoming(self, data: _Chunk | Iterable[_Chunk]) -> str:
        """Make raw received bytes durable in incoming/; return the opaque name.

        ``data`` is the file's content: bytes, a list of pieces, or an
        iterator of pieces (the SCP's encrypting stream).
        """
        name = unique_name()
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = [data]
        self._deliver(os.path.join(self._incoming_s, name), chunks=data)
        return name

    def open_tmp(self) -> tuple[int, str]:
        """A new empty file in tmp/ for a writer that streams (the SCP):
        (descriptor, path).  Finish it with ``promote_incoming`` or
        ``discard_tmp``; the same tmp -> fsync -> rename -> fsync-dir path as
        ``deliver_incoming``."""
        tmp_path = os.path.join(self._tmp_s, unique_name())
        return os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), tmp_path

    def write_tmp(self, fd: int, chunks: list, kick: bool = False) -> None:
        """Append buffers to a file from ``open_tmp`` (one writev where it can).

        ``kick``: then start writing the file's dirty pages to disk, without
        waiting, so the fsync of ``promote_incoming`` finds less to do.  A
        large instance arrives over many PDUs: its writeback overlaps the
        network (0.5 MB: fsync 0.6 -> 0.3 ms here)."""
        writev_all(fd, chunks)
        if kick and self._sync_file_range is not None:
            self._sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # a hint: errors ignored

    def promote_incoming(self, fd: int, tmp_path: str, sop_uid: str = "") -> str:
        """fsync and close a file from ``open_tmp``, rename it into incoming/,
        fsync incoming/ (shared with the other associations' renames waiting
        for it: ``fsio.DirSync``); return its opaque name, which ends with the
        bucket of ``sop_uid`` (``buckets.py``).  On failure it is removed."""
        name = unique_name() + buckets.tag(sop_uid)
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_path, os.path.join(self._incoming_s, name))
        except BaseException:
            self.discard_tmp(-1, tmp_path)
            raise
        self._incoming_sync.sync()  # one fsync for the renames of concurrent associations
        return name

    @staticmethod
    def discard_tmp(fd: int, tmp_path: str) -> None:
        """Close (fd >= 0) and remove a file from ``open_tmp`` that will not be kept."""
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass

    def incoming_names(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.incoming) if is_regular_entry(e))

    def incoming_count(self) -> int:
        """How many entries incoming/ holds (no stat: the SCP's in-flow gate)."""
        with os.scandir(self.incoming) as it:
            return sum(1 for _ in it)

    def oldest_incoming(self) -> tuple[int, float | None]:
        """(how many files wait in incoming/, the oldest one's mtime)."""
        count, oldest = 0, None
        with os.scandir(self.incoming) as it:
            for entry in it:
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue  # the indexer just took it
                count += 1
                oldest = mtime if oldest is None else min(oldest, mtime)
        return count, oldest

    def incoming_path(self, name: str) -> Path:
        return self.incoming / name

    def remove_incoming(self, names: Iterable[str]) -> None:
        removed = False
        for name in names:
            try:
                os.unlink(self.incoming / name)
                removed = True
            except FileNotFoundError:
                pass
        if removed:
            fsync_dir(self.incoming)

    # --- studies/ : owned by the indexer (instances) and scheduler (study.json) ---

    def instance_path(self, study: str, series: str, sop: str) -> Path:
        return self.studies / _check_uid(study) / _check_uid(series) / f"{_check_uid(sop)}.dcm"

    def put_instance(
        self,
        study: str,
        series: str,
        sop: str,
        write: Callable[[BinaryIO], None],
        sync: bool = True,
    ) -> Path:
        target = self.instance_path(study, series, sop)
        made = not target.parent.exists()
        if made:
            target.parent.parent.mkdir(mode=DIR_MODE, exist_ok=True)
            target.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        if made and sync:
            fsync_dir(target.parent.parent)
            fsync_dir(self.studies)
        return self._deliver(target, write, sync)

    def study_dir(self, study: str) -> Path:
        return self.studies / _check_uid(study)

    def write_study_json(self, study: str, summary: dict) -> Path:
        data = json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n"
        target = self.study_dir(study) / "study.json"
        target.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        return self._deliver(target, chunks=[data])

    def read_study_json(self, study: str) -> dict | None:
        try:
            return json.loads(read_nofollow(self.study_dir(study) / "study.json"))
        except (OSError, ValueError):
            return None

    def purge_instances(self, study: str, instances: Iterable[tuple[str, str]]) -> int:
        """Retention (the scheduler): remove these (series, sop) instance files
        and the series folders left empty, fsync what changed; never study.json
        (the tombstone) nor a file not listed.  Return how many were removed."""
        removed, series_dirs = 0, set()
        if not real_dir(self.study_dir(study)):
            return 0  # gone, or a planted link: nothing of ours to remove
        for series, sop in instances:
            path = self.instance_path(study, series, sop)
            if not real_dir(path.parent):
                continue  # never unlink through a link
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass  # a purge cut short by a crash is simply done again
            series_dirs.add(path.parent)
        for folder in sorted(series_dirs):
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                pass
            except OSError:  # not empty: an instance that is kept
                fsync_dir(folder)
        if series_dirs:
            fsync_dir(self.study_dir(study))
        return removed

    def iter_instances(self) -> Iterator[tuple[str, str, str, Path]]:
        """Yield (study, series, sop, path) for every stored instance."""
        for study in sorted(os.scandir(self.studies), key=lambda e: e.name):
            if not study.is_dir(follow_symlinks=False):
                continue
            for series in sorted(os.scandir(study.path), key=lambda e: e.name):
                if not series.is_dir(follow_symlinks=False):
                    continue
                for inst in sorted(os.scandir(series.path), key=lambda e: e.name):
                    if inst.name.endswith(".dcm") and is_regular_entry(inst):
                        yield study.name, series.name, inst.name[:-4], Path(inst.path)

    # --- raw input at rest: key rotation rewrites these ---

    def raw_input_files(self) -> list[Path]:
        """Every raw input file: incoming/ and quarantine/<reason>/ (not the .json)."""
        files = [self.incoming / n for n in self.incoming_names()]
        for qdir in sorted(p for p in self.quarantine_dir.iterdir() if real_dir(p)):
            files.extend(
                sorted(p for p in qdir.iterdir() if regular_file(p) and p.suffix != ".json")
            )
        return files

    def rewrite(self, path: Path, write: Callable[[BinaryIO], object]) -> None:
        """Replace vault.phi or a raw input file with a new version: tmp, fsync,
        rename over it, fsync dir (never in place).  Its times are kept."""
        path = Path(path)
        allowed = (
            path == self.vault_file
            or path.parent == self.incoming
            or path.parent.parent == self.quarantine_dir
        )
        if not allowed or not regular_file(path):
            raise ValueError(f"not a rewritable spool file: {path}")
        self._deliver(path, keeping_times(path, write)[0])
