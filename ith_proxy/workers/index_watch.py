"""The indexer's doorbell on incoming/: wakes it when something arrives.

Written for watchdog 7 (``InotifyFD``, checked by ``check_library``).
Watchdog's ``Observer`` ran three threads in the indexer process for this
one hint: the inotify reader, the emitter (which turns each kernel event
into a watchdog event, through a move grouper and a delayed queue) and the
dispatcher (which called the handler).  Each took the GIL once per arriving
file, from the thread that does the indexing: 14% of the indexer's GIL
samples at one association (py-spy ``--gil``, docs/performance.md, "The
indexer's doorbell").

``Doorbell`` is watchdog's inotify reader alone, with its own loop: one
thread, which reads the kernel's events only while the indexer waits for
them.  The indexer calls ``listen()`` when it runs out of work and waits on
its ``wake`` event.  The reader then reads whatever the kernel has queued,
rings (sets ``wake``) if anything came, and parks until the next
``listen()``.  While the indexer works, arrivals wait in the kernel's queue,
whatever their number: when the queue overflows, its overflow event rings
too.  Nothing is missed, since every pass of the indexer lists incoming/
afresh, and DESIGN.md's rule still holds: the watch is only a hint, and the
scans are the truth.

The kernel is asked for arrivals only (created, moved in, closed after
writing). The indexer's own opens, reads, deletions and moves out wake
nothing.
"""

from __future__ import annotations

import os
import threading

import watchdog.version
from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
)

WRITTEN_FOR = "7."  # InotifyFD, read_events and add_callback as in watchdog 7
ARRIVALS = Mask(
    InotifyConstants.IN_CREATE | InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_CLOSE_WRITE
)


class WatchLibraryMismatch(RuntimeError):
    pass


def check_library(version: str = watchdog.version.VERSION_STRING) -> None:
    if not version.startswith(WRITTEN_FOR):
        raise WatchLibraryMismatch(
            f"workers/index_watch.py is written for watchdog {WRITTEN_FOR}x, not {version}"
        )


class Doorbell(InotifyFD):
    """Sets ``wake`` when something arrives in ``folder``, once per ``listen``."""

    def __init__(self, folder: str, wake: threading.Event) -> None:
        check_library()
        super().__init__()
        self.name = "indexer-doorbell"
        self._wake = wake
        self._listening = threading.Event()
        self._listening.set()  # the indexer's first pass may find nothing
        self.reads = 0  # reads that found events (tests)
        self.add_callback(os.fsencode(folder), ARRIVALS, self, CallbackId(0))

    def listen(self) -> None:
        """The indexer is about to wait: read the kernel's events again."""
        self._listening.set()

    def run(self) -> None:  # instead of InotifyFD's: no event is handled one by one
        while self.should_keep_running():
            self._listening.wait()
            if not self.should_keep_running():
                return
            if self.read_events():  # blocks until an event comes or we are closed
                self.reads += 1
                self._listening.clear()
                self._wake.set()

    def on_thread_stop(self) -> None:
        super().on_thread_stop()  # closes the inotify descriptor: a read returns
        self._listening.set()  # and a parked reader wakes to see it must stop

    # the callback add_callback keeps (never called: run() handles no event)
    def on_event(self, event: InotifyEvent) -> None:
        pass

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        pass

    def on_queue_overflow(self) -> None:
        pass
