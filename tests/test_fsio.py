"""fsio.append_whole: a record is appended whole or not at all, on a real
file.  A real short write comes from RLIMIT_FSIZE (the kernel writes what
fits below the limit and returns the short count, as on a full disk)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ith_proxy.fsio import append_whole

REPO = Path(__file__).resolve().parent.parent


def _append_fd(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND)


def test_whole_record_is_appended_and_synced(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"first\n")
    fd = _append_fd(path)
    try:
        append_whole(fd, [b"second ", b"record\n"], 6, sync=True)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"first\nsecond record\n"


def test_failure_while_pieces_are_made_cuts_back(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"first\n")

    def pieces():
        yield b"half of a rec"
        raise RuntimeError("sealing failed")

    fd = _append_fd(path)
    try:
        with pytest.raises(RuntimeError):
            append_whole(fd, pieces(), 6)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"first\n"


def test_short_write_raises_enospc_and_leaves_no_torn_record(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"x" * 4000)
    code = textwrap.dedent(f"""
        import errno, os, resource, signal
        from ith_proxy.fsio import append_whole
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG / short count, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        fd = os.open({str(path)!r}, os.O_WRONLY | os.O_APPEND)
        try:
            append_whole(fd, [b"y" * 1000], 4000)
        except OSError as exc:
            print("raised", errno.errorcode[exc.errno])
    """)
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "raised ENOSPC"  # 96 bytes fitted: a short write
    assert path.read_bytes() == b"x" * 4000
