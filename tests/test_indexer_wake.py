"""The indexer's watch on incoming/ (workers/indexer.py, issue 11): the
kernel is asked for arrivals only.  Its own reads (open, close without
write) and deletions of each file it indexes used to be three more inotify
events per instance, each decoded and dispatched by watchdog in the indexer
process; an arrival still wakes it at once."""

from __future__ import annotations

import threading
from pathlib import Path

import dicomgen
from helpers import wait_until
from ith_proxy.workers import indexer as indexer_mod
from worker_rooms import Rooms


def test_only_arrivals_reach_the_indexer(tmp_path: Path, monkeypatch) -> None:
    seen: list[str] = []
    stock = indexer_mod._Wake.on_any_event

    def recording(self, event) -> None:
        seen.append(event.event_type)
        stock(self, event)

    monkeypatch.setattr(indexer_mod._Wake, "on_any_event", recording)
    series = dicomgen.make_small_series(tmp_path / "in", 5)
    rooms = Rooms(tmp_path / "site", "[indexer]\nrescan_interval = 3600\n")
    stop = threading.Event()
    thread = threading.Thread(target=rooms.indexer.run, args=(stop,), daemon=True)
    try:
        thread.start()
        wait_until(lambda: rooms.indexer.wake is not None and thread.is_alive(), 10, "start")
        # a first instance, which the indexer's first pass may take without any
        # event (delivered before that pass): once it is indexed, the indexer idles
        rooms.spool.deliver_incoming(series.files[0].read_bytes())
        wait_until(lambda: rooms.indexer.processed == 1, 60, "the first instance indexed")
        for src in series.files[1:]:  # as the SCP delivers: tmp/, fsync, rename into incoming/
            rooms.spool.deliver_incoming(src.read_bytes())
        # the rescan is an hour away: only the watch's wake-ups get these indexed
        wait_until(lambda: rooms.indexer.processed == 5, 60, "4 more instances indexed")
    finally:
        stop.set()
        thread.join(30)
        rooms.close()
    assert not thread.is_alive()
    assert not list(rooms.spool.incoming.iterdir())
    assert seen and set(seen) <= {"created", "moved", "closed"}, seen
