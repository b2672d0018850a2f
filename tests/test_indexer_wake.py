"""The indexer's doorbell on incoming/ (workers/index_watch.py, issue 11).

The kernel is asked for arrivals only: the indexer's own reads and deletions
of each file it indexes wake nothing.  An arrival wakes an idle indexer at
once; while the indexer works, the doorbell reads nothing (one read, not
one per file), and whatever arrived meanwhile rings once it listens again."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import dicomgen
from helpers import wait_until
from ith_proxy.store.spool import Spool
from ith_proxy.workers import index_watch
from worker_rooms import Rooms


@pytest.fixture
def bell(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    wake = threading.Event()
    doorbell = index_watch.Doorbell(str(spool.incoming), wake)
    doorbell.start()
    yield spool, wake, doorbell
    doorbell.stop()
    doorbell.join(10)
    assert not doorbell.is_alive()


def test_it_rings_once_then_waits_for_listen(bell) -> None:
    spool, wake, doorbell = bell
    spool.deliver_incoming(b"first")  # as the SCP: tmp/, fsync, rename into incoming/
    assert wake.wait(10)
    assert doorbell.reads == 1
    wake.clear()
    for i in range(20):  # the indexer is busy: nobody listens
        spool.deliver_incoming(b"more %d" % i)
    time.sleep(0.5)
    assert not wake.is_set() and doorbell.reads == 1  # parked: nothing read
    doorbell.listen()  # the indexer ran out of work
    assert wake.wait(10)  # the arrivals queued meanwhile ring at once
    assert doorbell.reads == 2


def test_the_indexers_own_reads_and_deletions_wake_nothing(bell) -> None:
    spool, wake, doorbell = bell
    names = [spool.deliver_incoming(b"x" * 100) for _ in range(3)]
    assert wake.wait(10)
    wake.clear()
    doorbell.listen()  # whatever else the three arrivals queued is read now
    wake.wait(1)
    wake.clear()
    doorbell.listen()
    reads = doorbell.reads
    for name in names:  # what the indexer does to each file: read, delete, or move out
        spool.incoming_path(name).read_bytes()
    spool.remove_incoming(names[:2])
    spool.quarantine(names[2], "unreadable", {"why": "test"})
    time.sleep(0.5)
    assert not wake.is_set() and doorbell.reads == reads
    spool.deliver_incoming(b"an arrival")
    assert wake.wait(10)


def test_arrivals_wake_an_idle_indexer(tmp_path: Path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 5)
    rooms = Rooms(tmp_path / "site", "[indexer]\nrescan_interval = 3600\n")
    stop = threading.Event()
    thread = threading.Thread(target=rooms.indexer.run, args=(stop,), daemon=True)
    try:
        thread.start()
        wait_until(lambda: rooms.indexer._bell is not None, 10, "the doorbell")
        rooms.spool.deliver_incoming(series.files[0].read_bytes())
        wait_until(lambda: rooms.indexer.processed == 1, 60, "the first instance indexed")
        for src in series.files[1:]:
            time.sleep(0.2)  # the indexer idles between them
            rooms.spool.deliver_incoming(src.read_bytes())
        # the rescan is an hour away: only the doorbell gets these indexed
        wait_until(lambda: rooms.indexer.processed == 5, 60, "4 more instances indexed")
    finally:
        stop.set()
        thread.join(30)
        rooms.close()
    assert not thread.is_alive()
    assert rooms.indexer._bell is None  # stopped with the loop
    assert not list(rooms.spool.incoming.iterdir())


def test_another_watchdog_is_refused() -> None:
    index_watch.check_library("7.1.0")
    with pytest.raises(index_watch.WatchLibraryMismatch):
        index_watch.check_library("6.0.0")
