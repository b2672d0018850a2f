"""A site with the backend link running in this process, against a real
backend simulator (tests/backend_sim.py): real catalog, real sockets."""

from __future__ import annotations

import threading
from pathlib import Path

from backend_sim import BackendSim
from ith_proxy.link.client import Link
from ith_proxy.store.nodes import load_config_nodes
from outbox_site import Site
from worker_rooms import Rooms

FAST = """
[link]
heartbeat_interval = 0.5
connect_timeout = 5
reconnect_base = 0.1
reconnect_cap = 0.5
max_message_kb = 64
{link}
[scu]
connect_timeout = 2
acse_timeout = 5
dimse_timeout = 5
"""


class LinkSite:
    """Rooms of a site with ITH_URL set to the simulator, the link in a thread."""

    def __init__(
        self,
        tmp_path: Path,
        sim: BackendSim,
        ini: str = "",
        env: dict | None = None,
        link: str = "",
    ) -> None:
        """``link``: more lines of the [link] section; ``ini``: more sections."""
        self.sim = sim
        ini = FAST.format(link=link) + ini
        self.rooms = Rooms(tmp_path / "site", ini, env={**sim.env(), **(env or {})})
        load_config_nodes(self.rooms.catalog, self.rooms.cfg)
        self.site = Site(self.rooms, tmp_path, destinations=())
        self.stop_event = threading.Event()
        self.status: list[str] = []
        self.link = Link(
            self.rooms.cfg,
            self.rooms.spool.catalog_file,
            health=list,
            set_status=self.status.append,
        )
        self.thread: threading.Thread | None = None

    def start(self) -> LinkSite:
        self.thread = threading.Thread(target=self.link.run, args=(self.stop_event,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(30)
            assert not self.thread.is_alive(), "the link thread did not stop"
        self.rooms.close()
