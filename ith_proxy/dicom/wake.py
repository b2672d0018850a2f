"""Event-driven wake-ups for pynetdicom's two polling loops.

Stock pynetdicom 3.0.4 runs two threads per association, and both poll:

- the DUL reactor (reads PDUs, sends queued primitives) sleeps 1 ms whenever
  a pass found nothing to do;
- the association reactor (takes decoded DIMSE messages and calls our
  handlers) sleeps 1 ms at the top of every pass.

One C-STORE exchange crosses three such hops: request bytes on the socket →
DUL, decoded message → association thread, response primitive → DUL. On
loopback that polling is about a third of the time per small instance
(measured: 1000 64×64 instances took 4.0 s stock, 2.9 s without the sleeps).

The fix keeps pynetdicom's loops and their timing and only makes their sleeps
*interruptible*: ``time`` inside ``pynetdicom.association`` and
``pynetdicom.dul`` is replaced by ``_Time``, whose ``sleep(s)`` waits at most
``s``, as before, but returns as soon as there is work for that thread:

- an association thread wakes when the DUL puts a DIMSE message or an
  ACSE primitive on its queues;
- a DUL thread wakes when its socket turns readable, or when the association
  queues a primitive to send (an eventfd).

An early return only makes a polling loop check its state again.  A sleep
lasts no longer than pynetdicom asked for, except the reactors' idle pass
(``REACTOR_PASS``, 1 ms): a thread that work wakes waits up to ``IDLE_WAIT``
(50 ms) there instead (a pause of the association's reactor, asked for by
pynetdicom's ``send_*`` or ``release`` from another thread, wakes it too),
so an open association no longer costs two thread wake-ups per millisecond
(docs/performance.md "Issue 11: the SCP's receive path").  What is checked
between passes without a wake-up (the ARTIM and idle timers, ``_kill``) is
seen up to 50 ms later; a DUL without a socket (closed: nothing would wake
it, ``stop_dul`` waits for it) waits as asked.  Threads that were not set up
here (any association not made by ``wake_on_work``) get the real ``time.sleep``.

This reaches into pynetdicom's internals (its queues, its DUL's ``run`` and
socket), so it is only done on the version it was written for,
``WRITTEN_FOR``.  On any other version ``install`` and ``wake_on_work`` log
one line and patch nothing: stock polling, which only costs speed.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pynetdicom.association
import pynetdicom.dul

WRITTEN_FOR = "3.0.4"  # the pynetdicom whose internals this module patches
REACTOR_PASS = 0.001  # 3.0.4's reactor sleep per idle pass (both loops; nothing else asks for it)
IDLE_WAIT = 0.05  # what an idle pass waits instead, when work can wake it (below)
_WAIT_ATTR = "_ith_wait"
HELD_ATTR = "_ith_held"  # on a DUL: () -> bool, a whole PDU received waits outside the socket
_FALLBACK_LOGGED = threading.Event()
_FALLBACK_LOCK = threading.Lock()

log = logging.getLogger("ith_proxy.dicom")


def supported() -> bool:
    """True on the pynetdicom version this was written for; otherwise log
    (once per process) that associations use stock polling."""
    version = getattr(pynetdicom, "__version__", "?")
    if version == WRITTEN_FOR:
        return True
    with _FALLBACK_LOCK:
        if not _FALLBACK_LOGGED.is_set():
            _FALLBACK_LOGGED.set()
            log.warning(
                "pynetdicom %s is not %s: reactor wake-ups are off, associations "
                "use pynetdicom's stock 1 ms polling (slower, otherwise the same)",
                version,
                WRITTEN_FOR,
            )
    return False


class _Time:
    """Stands in for the ``time`` module inside pynetdicom's reactors."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wait = getattr(threading.current_thread(), _WAIT_ATTR, None)
        if wait is None:
            time.sleep(seconds)
        else:
            wait(seconds)


def install() -> None:
    """Make pynetdicom's reactor sleeps interruptible (idempotent)."""
    if not supported():
        return
    for module in (pynetdicom.association, pynetdicom.dul):
        if not isinstance(module.time, _Time):
            module.time = _Time()  # type: ignore[attr-defined]  # swaps the module's `time`


class _WakeQueue(queue.Queue):
    """A ``queue.Queue`` that wakes the consuming thread on every put."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _Doorbell:
    """An eventfd one thread rings and the DUL thread waits on; closed exactly once,
    under a lock, so a late ring can never write into a reused descriptor."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()

    def ring(self) -> None:
        with self._lock:
            if self.fd >= 0:
                try:
                    os.eventfd_write(self.fd, 1)
                except OSError:  # counter full: it is only a hint
                    pass

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class _Checkpoint(threading.Event):
    """The association's ``_reactor_checkpoint``: ``clear()`` (a pause asked for
    by ``send_*``/``release`` from another thread, which then polls
    ``_is_paused``) also wakes the reactor, so that its idle pass ends now and
    it reaches the checkpoint, as within 1 ms before."""

    def __init__(self, wake: Callable[[], None], is_set: bool) -> None:
        super().__init__()
        self._wake = wake
        if is_set:
            super().set()

    def clear(self) -> None:
        super().clear()
        self._wake()


def wake_on_work(assoc: Any) -> None:
    """Wire one not-yet-started association (and its DUL) for wake-ups; a
    no-op on a pynetdicom version this was not written for."""
    if not supported():
        return
    install()
    work = threading.Event()

    def assoc_wait(seconds: float) -> None:
        work.wait(IDLE_WAIT if seconds == REACTOR_PASS else seconds)
        work.clear()

    assoc.dimse.msg_queue = _WakeQueue(work.set)
    assoc._reactor_checkpoint = _Checkpoint(work.set, assoc._reactor_checkpoint.is_set())
    assoc.dul.to_user_queue = _WakeQueue(work.set)
    setattr(assoc, _WAIT_ATTR, assoc_wait)

    dul = assoc.dul
    bell = _Doorbell()
    poller = select.poll()  # not select(): fds above 1024 must work too
    poller.register(bell.fd, select.POLLIN)
    watched = -1  # the socket fd now registered

    def dul_wait(seconds: float) -> None:
        nonlocal watched
        sock = getattr(dul.socket, "socket", None)
        fd = sock.fileno() if sock is not None else -1
        if fd != watched:
            if watched >= 0:
                poller.unregister(watched)
            if fd >= 0:
                poller.register(fd, select.POLLIN)
            watched = fd
        if sock is not None and getattr(sock, "pending", lambda: 0)():
            return  # TLS: decrypted bytes already buffered, poll would not see them
        held = getattr(dul, HELD_ATTR, None)
        if held is not None and held():
            return  # a PDU read ahead (pdu_read.py): poll would not see it either
        if fd >= 0 and seconds == REACTOR_PASS:
            seconds = IDLE_WAIT  # the socket or the doorbell wakes it (no socket: as asked)
        try:
            events = poller.poll(seconds * 1000)
        except OSError:
            time.sleep(seconds)
            return
        if any(ev_fd == bell.fd for ev_fd, _ in events):
            bell.drain()

    run = dul.run

    def run_then_close() -> None:  # the DUL thread is the only poller: close after it
        try:
            run()
        finally:
            bell.close()

    dul.run = run_then_close
    weakref.finalize(dul, bell.close)  # a DUL that never started
    dul.to_provider_queue = _WakeQueue(bell.ring)
    setattr(dul, _WAIT_ATTR, dul_wait)
