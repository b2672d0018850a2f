"""assoc_wake: pynetdicom's reactor sleeps return early when there is work for
that thread, never last longer than asked (but an idle reactor pass, which
waits IDLE_WAIT when work can wake it), and leave no descriptor behind.
Real pynetdicom Association objects on a real socket pair; then the proxy
process itself under many short associations."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pynetdicom.association
import pynetdicom.dul
import pynetdicom.fsm
import pytest
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

import dicomgen
import tools
from helpers import wait_until
from ith_proxy.dicom import wake as assoc_wake

LONG = 5.0  # a wait that would fail the test if it ran its full length


@pytest.fixture
def wired():
    a, b = socket.socketpair()
    assoc = Association(AE(), MODE_ACCEPTOR)
    assoc.set_socket(AssociationSocket(assoc, client_socket=a))
    assoc_wake.wake_on_work(assoc)
    yield assoc, b
    a.close()
    b.close()


def _timed_wait(wait, trigger) -> float:
    """Seconds a wait(LONG) lasted when trigger() runs 0.1 s after it started."""
    elapsed: list[float] = []

    def waiter() -> None:
        t0 = time.monotonic()
        wait(LONG)
        elapsed.append(time.monotonic() - t0)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.1)
    trigger()
    th.join(LONG + 2)
    return elapsed[0]


def test_install_replaces_time_in_both_reactor_modules_only_once() -> None:
    assoc_wake.install()
    shim = pynetdicom.dul.time
    assert isinstance(shim, assoc_wake._Time) and isinstance(
        pynetdicom.association.time, assoc_wake._Time
    )
    assoc_wake.install()
    assert pynetdicom.dul.time is shim
    assert shim.monotonic is time.monotonic  # everything else is the real module


def test_dul_wakes_when_its_socket_turns_readable(wired) -> None:
    assoc, peer = wired
    assert _timed_wait(assoc.dul._ith_wait, lambda: peer.send(b"\x01")) < LONG / 2


def test_dul_wakes_when_a_primitive_is_queued_to_send(wired) -> None:
    assoc, _ = wired
    assert (
        _timed_wait(assoc.dul._ith_wait, lambda: assoc.dul.to_provider_queue.put("primitive"))
        < LONG / 2
    )
    assert assoc.dul.to_provider_queue.get_nowait() == "primitive"


@pytest.mark.parametrize("queue_name", ["msg_queue", "to_user_queue"])
def test_association_wakes_on_a_message_or_acse_primitive(wired, queue_name) -> None:
    assoc, _ = wired
    q = assoc.dimse.msg_queue if queue_name == "msg_queue" else assoc.dul.to_user_queue
    assert _timed_wait(assoc._ith_wait, lambda: q.put((1, "msg"))) < LONG / 2
    assert q.get_nowait() == (1, "msg")


def test_a_reactor_pause_wakes_the_association_thread(wired) -> None:
    """send_*/release clear the checkpoint from another thread and then poll
    _is_paused: the idle pass must end then, not after IDLE_WAIT."""
    assoc, _ = wired
    checkpoint = assoc._reactor_checkpoint
    assert checkpoint.is_set()  # as pynetdicom made it
    assert _timed_wait(assoc._ith_wait, checkpoint.clear) < LONG / 2
    assert not checkpoint.is_set()
    checkpoint.set()
    assert checkpoint.wait(0)


def test_with_nothing_to_do_a_sleep_lasts_as_asked(wired) -> None:
    assoc, _ = wired
    for wait in (assoc._ith_wait, assoc.dul._ith_wait):
        t0 = time.monotonic()
        wait(0.2)
        assert time.monotonic() - t0 >= 0.19


def test_an_idle_reactor_pass_waits_longer_unless_woken(wired) -> None:
    """3.0.4's reactor pass (0.001 s) waits IDLE_WAIT when work wakes the thread:
    fewer idle wake-ups per association; any other sleep lasts as asked."""
    assoc, _ = wired
    for wait in (assoc._ith_wait, assoc.dul._ith_wait):
        t0 = time.monotonic()
        wait(assoc_wake.REACTOR_PASS)
        assert time.monotonic() - t0 >= assoc_wake.IDLE_WAIT * 0.9
    assert assoc_wake.IDLE_WAIT < 0.1  # timers and kill flags are still seen promptly
    assoc.dul.socket.socket = None  # closed: nothing would wake the DUL, the pass is as asked
    t0 = time.monotonic()
    assoc.dul._ith_wait(assoc_wake.REACTOR_PASS)
    assert time.monotonic() - t0 < assoc_wake.IDLE_WAIT * 0.9


def test_dul_does_not_wait_while_a_pdu_read_ahead_is_held(wired) -> None:
    """A whole PDU read ahead by pdu_read's Inbox is on no socket: the DUL's
    wait returns at once, as for a TLS socket's pending bytes."""
    assoc, _ = wired
    held = [True]
    setattr(assoc.dul, assoc_wake.HELD_ATTR, lambda: held[0])
    t0 = time.monotonic()
    assoc.dul._ith_wait(LONG)
    assert time.monotonic() - t0 < LONG / 2
    held[0] = False
    t0 = time.monotonic()
    assoc.dul._ith_wait(0.2)
    assert time.monotonic() - t0 >= 0.19


def test_threads_not_wired_get_the_real_sleep() -> None:
    assoc_wake.install()
    t0 = time.monotonic()
    pynetdicom.dul.time.sleep(0.05)
    assert time.monotonic() - t0 >= 0.049


def test_the_doorbell_closes_once_and_a_late_ring_is_harmless() -> None:
    bell = assoc_wake._Doorbell()
    fd = bell.fd
    bell.ring()
    bell.close()
    bell.close()
    bell.ring()  # after close: must not write into whatever reuses the number
    assert bell.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_many_associations_leave_no_descriptor_behind(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 2, rows=32, cols=32)
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        assert tools.echoscu(proxy.dicom_port).returncode == 0  # threads and logs warmed up
        before = _fds(proxy.pid)
        for i in range(30):
            if i % 2:
                assert tools.echoscu(proxy.dicom_port).returncode == 0
            else:
                assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        # each association had its own eventfd; all are closed when their DUL ends
        wait_until(
            lambda: _fds(proxy.pid) <= before + 2,
            10,
            f"descriptors back to {before} (now {_fds(proxy.pid)})",
        )


def test_the_pynetdicom_internals_it_relies_on_are_still_there() -> None:
    """An upgrade of pynetdicom that renames these makes the wake-ups silently useless."""
    import inspect

    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dul import DULServiceProvider

    assert "time.sleep(0.001)" in inspect.getsource(Association._run_reactor)
    assert "self.dimse.get_msg(block=False)" in inspect.getsource(Association._run_reactor)
    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(DULServiceProvider.run_reactor)
    assert "self._run_loop_delay = 0.001" in inspect.getsource(DULServiceProvider.__init__)
    assert "self.msg_queue.put(" in inspect.getsource(DIMSEServiceProvider.receive_primitive)
    assert "self.to_provider_queue.put(" in inspect.getsource(DULServiceProvider.send_pdu)
    fsm = inspect.getsource(pynetdicom.fsm)
    assert "dul.to_user_queue.put(" in fsm
    assert "dul.to_provider_queue.put(" not in fsm  # only send_pdu feeds it
