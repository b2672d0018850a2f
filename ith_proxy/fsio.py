"""Durable file primitives, stdlib only: the pieces every room that writes a
file the crash-safe way needs (Maildir discipline: write a private file,
fsync it, rename it into place, fsync the folder), and reads that never
follow a symbolic link.

Rooms that own files (``store.spool``, ``store.audit``, ``vault.keyfiles``,
``vault.keys``, ``vault.records``, ``vault.stream``) use these instead of
their own copies; the append-only logs (``vault.phi``, ``audit.log``) append
a record whole or not at all with ``append_whole``.  ``DirSync`` shares one
directory fsync among the threads waiting for it (the SCP's associations
promoting received instances into incoming/).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable
from io import BufferedReader
from pathlib import Path
from typing import BinaryIO


def is_regular_entry(entry: os.DirEntry) -> bool:
    """A directory entry that is a regular file itself, not a link to one."""
    return entry.is_file(follow_symlinks=False)


def real_dir(path: Path) -> bool:
    """A directory itself, not a link to one."""
    return path.is_dir() and not path.is_symlink()


def regular_file(path: Path | str) -> bool:
    """A regular file itself, not a link to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def read_nofollow(path: Path | str) -> bytes:
    """A whole (small) file, never through a symbolic link (OSError ELOOP)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def open_read(path: Path | str) -> BufferedReader:
    """A binary file object for reading, never through a symbolic link (ELOOP)."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")


def writev_all(fd: int, chunks: list) -> None:
    views = [memoryview(c).cast("B") for c in chunks]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def append_whole(
    fd: int, pieces: Iterable[bytes | bytearray], size: int, sync: bool = False
) -> None:
    """Append ``pieces`` to the file open on ``fd`` (O_APPEND), whose length
    is ``size``, as one whole record, or not at all: a short write (a full
    disk) raises ENOSPC, and on any failure, even one raised while the pieces
    are produced, the file is cut back to ``size`` so no torn record stays.
    The caller holds the lock that makes ``size`` the current length."""
    try:
        for piece in pieces:
            if os.write(fd, piece) != len(piece):  # a full disk gives a short write
                raise OSError(errno.ENOSPC, "short write")
        if sync:
            os.fsync(fd)
    except BaseException:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSync:
    """Group commit of one directory's fsync, shared by threads that each
    renamed a file into it and must not go on (acknowledge) before that
    directory entry is durable.

    ``sync()`` returns once a directory fsync that began after the call has
    succeeded.  The first caller runs the fsync; callers that arrive while it
    runs wait and are covered together by the next one, which one of them
    runs: with N concurrent writers, two fsyncs instead of N.  A failed fsync
    covers no one: its caller gets the error, the waiters try again
    themselves (and get their own error if it fails again).
    """

    def __init__(self, path: Path | str) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._asked = 0  # tickets handed out (one per waiting rename)
        self._synced = 0  # every ticket up to this one is durable
        self._busy = False  # an fsync is running

    def sync(self) -> None:
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while self._synced < ticket:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy, covered = True, self._asked
                self._cond.release()
                try:
                    fsync_dir(self._path)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
                self._synced = max(self._synced, covered)  # not reached when it failed


@functools.cache
def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """libc's ``name`` (looked up once per process), or None where it has none."""
    try:
        func = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    if argtypes:
        func.argtypes = list(argtypes)
    return func


def load_syncfs() -> Callable[[int], int] | None:
    return _libc_function("syncfs")


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None.  Only a hint to start writing:
    durability still comes from fsync."""
    return _libc_function(
        "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
    )


def unique_name() -> str:
    """Opaque, unique and roughly time-ordered; never parsed."""
    return f"{time.time_ns()}.{os.getpid()}.{os.urandom(6).hex()}"


def write_private(path: Path, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write a 0600 file beside ``path`` under a unique name, fsynced; return it.

    ``data`` is the content, or a writer that fills the open file.  The caller
    renames or links the result into place and fsyncs the directory.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace_private(path: Path, data: bytes) -> None:
    """Replace ``path`` durably with a 0600 file holding ``data``: a private
    tmp beside it (fsynced), rename over it, fsync the folder."""
    tmp = write_private(path, data)
    try:
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def keeping_times(
    src: Path, write: Callable[[BinaryIO], object]
) -> tuple[Callable[[BinaryIO], None], list]:
    """Wrap a writer so the new file keeps src's times (the mtime of a raw
    file is when it was received); the writer's result lands in the list."""
    st = os.stat(src)
    result: list = [None]

    def wrapped(out: BinaryIO) -> None:
        result[0] = write(out)
        out.flush()
        os.utime(out.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))

    return wrapped, result
