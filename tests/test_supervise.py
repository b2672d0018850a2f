"""The service restarts a worker thread that ended: a scheduler or forwarder
thread whose catalog could not be opened at start-up comes back on the next
supervision pass instead of leaving the site without forwarding until a
restart."""

from __future__ import annotations

import threading

from ith_proxy.service import Service


def test_a_dead_forwarder_or_scheduler_thread_is_restarted(rooms) -> None:
    service = Service(rooms.cfg)
    for name in ("scheduler", "forwarder"):
        dead = threading.Thread(target=lambda: None, name=name)
        dead.start()
        dead.join()
        service.threads[name] = dead
    try:
        service._supervise()
        for name in ("scheduler", "forwarder"):
            assert service.threads[name].is_alive(), name
    finally:
        service.stop_event.set()
        for thread in service.threads.values():
            thread.join(10)
    assert not any(t.is_alive() for t in service.threads.values())


def test_no_restart_once_stopping(rooms) -> None:
    service = Service(rooms.cfg)
    dead = threading.Thread(target=lambda: None, name="forwarder")
    dead.start()
    dead.join()
    service.threads["forwarder"] = dead
    service.stop_event.set()
    service._supervise()
    assert service.threads["forwarder"] is dead
