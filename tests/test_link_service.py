"""The service runs the link as a thread only when ITH_URL is set, sets
``link_status`` and restarts the thread when it ends."""

from __future__ import annotations

import threading
from pathlib import Path

from backend_sim import BackendSim
from helpers import wait_until
from ith_proxy.service import Service
from ith_proxy.store.settings import RuntimeSettings
from link_site import FAST
from worker_rooms import Rooms


def test_the_link_thread_is_started_supervised_and_reports_its_state(tmp_path: Path) -> None:
    with BackendSim(config={"study_timeout": 12}) as sim:
        rooms = Rooms(tmp_path / "site", FAST.format(link=""), env=sim.env())
        service = Service(rooms.cfg)
        try:
            service._start_link()  # the first fetch happens before the thread starts
            assert RuntimeSettings(rooms.catalog).persisted()["study_timeout"].value == 12
            wait_until(lambda: service.link_status == "connected", 30, "connected")
            assert "link" in dict(service._restartable())
            sim.kill()
            wait_until(lambda: service.link_status == "disconnected", 30, "disconnected")
            sim.start()
            wait_until(lambda: service.link_status == "connected", 30, "connected again")

            service.stop_event.set()  # the thread ends ...
            service.threads["link"].join(30)
            service.stop_event.clear()
            service._supervise()  # ... and comes back
            wait_until(lambda: sim.connections >= 3, 30, "a new session from the new thread")
            assert service.threads["link"].is_alive()
        finally:
            service.stop_event.set()
            for thread in service.threads.values():
                thread.join(30)
            rooms.close()
        assert service.link_status == "disconnected"


def test_offline_there_is_no_link(rooms) -> None:
    service = Service(rooms.cfg)
    service._start_link()
    assert service.link is None and service.link_status == "offline"
    assert "link" not in dict(service._restartable())
    assert not [t for t in threading.enumerate() if t.name == "link"]
