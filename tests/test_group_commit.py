"""Group commit of incoming/'s directory fsync (fsio.DirSync, issue 11).

The SCP's association threads each rename a received instance into
incoming/ and must not acknowledge it before that directory entry is
durable.  Concurrent ones share one fsync: ``sync()`` returns only after an
fsync that *began after its caller's rename* has *succeeded*; a failed fsync
covers no one.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import dicomgen
import tools
from helpers import wait_until
from ith_proxy import fsio
from ith_proxy.dicom.scp import StorageSCP
from worker_rooms import Rooms


class _Recorder:
    """Stands in for fsio.fsync_dir: logs each fsync's start and end, and
    holds the first one until released (so others pile up behind it)."""

    def __init__(self, fail_first: bool = False) -> None:
        self.log: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.calls = 0
        self.fail_first = fail_first

    def __call__(self, path) -> None:
        with self.lock:
            self.calls += 1
            n = self.calls
            self.log.append(("start", n))
        if n == 1:
            self.release.wait(30)
            if self.fail_first:
                with self.lock:
                    self.log.append(("failed", n))
                raise OSError(5, "injected")
        with self.lock:
            self.log.append(("end", n))


def _writers(tmp_path: Path, sync: fsio.DirSync, recorder: _Recorder, n: int):
    events: list[tuple[str, int]] = []
    errors: list[int] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        (tmp_path / f"f{i}").write_bytes(b"x")  # the rename
        with lock:
            events.append(("renamed", i))
        try:
            sync.sync()
        except OSError:
            with lock:
                errors.append(i)
            return
        with lock:
            events.append(("acked", i))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    return threads, events, errors, lock


def test_concurrent_writers_share_fsyncs_and_none_returns_before_its_own(
    tmp_path: Path, monkeypatch
) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(fsio, "fsync_dir", recorder)
    sync = fsio.DirSync(tmp_path)
    threads, events, errors, lock = _writers(tmp_path, sync, recorder, 6)
    threads[0].start()
    wait_until(lambda: recorder.calls == 1, 10, "the first fsync")
    for t in threads[1:]:
        t.start()
    wait_until(lambda: sync._asked == 6, 10, "five more writers waiting")
    with lock:
        assert not [e for e in events if e[0] == "acked"]  # no one before the fsync ends
    recorder.release.set()
    for t in threads:
        t.join(30)
    assert not errors
    # the five that came while the first fsync ran were covered by ONE more
    assert recorder.calls == 2
    assert recorder.log == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    acked = [e for e in events if e[0] == "acked"]
    assert len(acked) == 6


def test_every_return_follows_an_fsync_begun_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    """Shared log of renames, fsync starts/ends and returns, in real order."""
    log: list[tuple[str, int]] = []
    lock = threading.Lock()
    count = [0]

    def fsync(path) -> None:
        with lock:
            count[0] += 1
            n = count[0]
            log.append(("start", n))
        os.sync()  # some real time in the kernel, so that callers overlap
        with lock:
            log.append(("end", n))

    monkeypatch.setattr(fsio, "fsync_dir", fsync)
    sync = fsio.DirSync(tmp_path)

    def writer(i: int) -> None:
        for j in range(20):
            with lock:
                log.append(("renamed", i * 100 + j))
            sync.sync()
            with lock:
                log.append(("acked", i * 100 + j))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert count[0] <= 80
    for who in {w for kind, w in log if kind == "renamed"}:
        renamed = log.index(("renamed", who))
        acked = log.index(("acked", who))
        begun_after = {n for kind, n in log[renamed:acked] if kind == "start"}
        ended_before = {n for kind, n in log[renamed:acked] if kind == "end"}
        assert begun_after & ended_before, f"{who} returned without its own fsync"


def test_a_failed_fsync_covers_no_one(tmp_path: Path, monkeypatch) -> None:
    recorder = _Recorder(fail_first=True)
    monkeypatch.setattr(fsio, "fsync_dir", recorder)
    sync = fsio.DirSync(tmp_path)
    threads, events, errors, _ = _writers(tmp_path, sync, recorder, 4)
    threads[0].start()
    wait_until(lambda: recorder.calls == 1, 10, "the first fsync")
    for t in threads[1:]:
        t.start()
    wait_until(lambda: sync._asked == 4, 10, "three more writers waiting")
    recorder.release.set()
    for t in threads:
        t.join(30)
    assert errors == [0]  # the one whose fsync failed gets the error
    assert sorted(i for kind, i in events if kind == "acked") == [1, 2, 3]
    assert recorder.log[:3] == [("start", 1), ("failed", 1), ("start", 2)]


def test_concurrent_associations_are_acknowledged_after_shared_fsyncs(
    tmp_path: Path, monkeypatch
) -> None:
    """Real DCMTK senders to an in-process SCP: every acknowledged instance
    is in incoming/, and was there when an incoming/ fsync that succeeded
    began (that fsync's listing holds it)."""
    covered: set[str] = set()
    calls = [0]
    lock = threading.Lock()
    stock = fsio.fsync_dir

    def listing_fsync(path) -> None:
        names = set(os.listdir(path))
        stock(path)
        with lock:
            calls[0] += 1
            covered.update(names)

    monkeypatch.setattr(fsio, "fsync_dir", listing_fsync)
    senders = 3
    env = {
        "DICOM_STORAGE_DIR": str(tmp_path / "spool"),
        "DICOM_PORT": str(tools.free_port()),
        "DICOM_BIND_ADDRESS": "127.0.0.1",
        "VAULT_KEY_FILE": str(tmp_path / "secrets" / "vault.key"),
    }
    rooms = Rooms(tmp_path / "site", "[spool]\nencrypt_incoming = false\n", env)
    try:
        scp = StorageSCP(rooms.cfg, rooms.spool)
        scp.start()
        try:
            series = [dicomgen.make_small_series(tmp_path / f"in{i}", 10) for i in range(senders)]
            results: list = [None] * senders

            def send(i: int) -> None:
                results[i] = tools.storescu(rooms.cfg.scp.port, series[i].files)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        finally:
            scp.stop()
        for r in results:
            assert r is not None and r.returncode == 0, r and r.stderr
            assert len(tools.acked_files(r)) == 10
        names = set(rooms.spool.incoming_names())
        assert len(names) == 10 * senders
        assert names <= covered
        assert calls[0] <= 10 * senders
    finally:
        rooms.close()
