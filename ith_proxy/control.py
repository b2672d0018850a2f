"""The running service's controls: the SCP under the runtime settings, the
counters the API shows, and a C-ECHO of a node (the API's ``Control``).

The persisted runtime settings (``store/settings.py``) may change while the
proxy runs: through ``PUT /api/config/`` (which then calls
``settings_changed``) or through the backend link, another connection, which
this room notices by polling ``RuntimeSettings.fingerprint()`` (``poll``,
called by the service's supervise loop about once a second).  Applying them:

- a new AE title or DICOM port restarts the SCP in this process: the new
  one is started first when the port changes (if it cannot listen, the old
  one keeps serving and the problem is reported); the old one stops
  listening and its associations in progress finish on their own;
- ``study_timeout`` and ``forward_to`` need nothing here: the scheduler
  reads the persisted layer on every pass;
- with ``[scp] auto_start`` off, the SCP stays stopped ("held") until the
  first write to the persisted layer made while this process runs.

Every method may be called from any thread; one lock serialises them, and
the one catalog connection of this room is used only under it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ith_proxy.config import Config
from ith_proxy.dicom import scu
from ith_proxy.dicom.scp import Counters, StorageSCP
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.nodes import Nodes
from ith_proxy.store.settings import RuntimeSettings, effective

log = logging.getLogger("ith_proxy.service")

ScpFactory = Callable[[Config, Counters], StorageSCP]
MAX_ECHOES = 2  # of the API's 4 threads, echoes to slow peers may hold at most 2


def scu_timeouts(cfg: Config) -> scu.Timeouts:
    """The ``[scu]`` timeouts that bound every outgoing association."""
    return scu.Timeouts(
        connect=cfg.scu.connect_timeout, acse=cfg.scu.acse_timeout, dimse=cfg.scu.dimse_timeout
    )


def echo_peer(cfg: Config, name: str, peer: scu.Peer) -> str:
    """C-ECHO ``peer`` as this proxy's AE title; the one-line result, or
    ``scu.ScuError`` (with its one-line ``reason``).  The CLI's ``echo`` and
    the API's ``POST /api/nodes/<name>/echo/`` both come here."""
    scu.echo(peer, cfg.scp.ae_title, scu_timeouts(cfg))
    return f"echo {name}: ok ({peer})"


@dataclass(frozen=True)
class _Listening:
    ae_title: str
    port: int


class ServiceControl:
    """The SCP's life under the runtime settings; the API's ``Control``."""

    def __init__(
        self, cfg: Config, catalog_file: Path, make_scp: ScpFactory, link_state: Callable[[], str]
    ) -> None:
        self.base = cfg  # defaults < INI < .env < environment
        self.cfg = cfg  # with the persisted layer on top (as last applied)
        self._catalog_file = catalog_file
        self._make_scp = make_scp
        self._link_state = link_state
        self.counters = Counters()
        self.scp: StorageSCP | None = None
        self._retired: list[StorageSCP] = []  # stopped listening; associations draining
        self._lock = threading.RLock()
        self._catalog: Catalog | None = None
        self._fingerprint: tuple | None = None
        self._problems: list[str] = []
        self.held = False  # stopped on purpose: auto_start off, no settings written yet
        # the other SCP processes ([scp] workers > 1): (instances, bytes, associations)
        self.others: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)
        # an echo holds an API thread up to the [scu] timeouts: at most this many at once
        self._echoes = threading.BoundedSemaphore(MAX_ECHOES)

    # --- life ---

    def _settings(self) -> RuntimeSettings:
        if self._catalog is None:
            self._catalog = Catalog(self._catalog_file)
        return RuntimeSettings(self._catalog)

    def start(self) -> None:
        """At start-up: apply the persisted layer; start the SCP unless
        ``auto_start`` is off.  OSError when it cannot listen (the service
        refuses to start then)."""
        with self._lock:
            settings = self._settings()
            self._fingerprint = settings.fingerprint()
            self.cfg = effective(self.base, settings.persisted())
            if not self.base.scp.auto_start:
                self.held = True
                log.info("DICOM listener held (auto_start off) until the runtime settings are set")
                return
            self.scp = self._new_scp(self.cfg)

    def _new_scp(self, cfg: Config) -> StorageSCP:
        scp = self._make_scp(cfg, self.counters)
        scp.start()
        return scp

    def stop(self) -> None:
        with self._lock:
            for scp in [*self._retired, *([self.scp] if self.scp else [])]:
                scp.stop()
            self._retired, self.scp = [], None
            if self._catalog is not None:
                self._catalog.close()
                self._catalog = None

    def poll(self) -> None:
        """Apply the persisted layer if another connection (the link) changed
        it, or if the last change could not be applied (a port that was busy
        may be free now)."""
        with self._lock:
            self._prune()
            try:
                fingerprint = self._settings().fingerprint()
            except Exception as exc:  # the catalog is busy or gone: next second
                log.warning("runtime settings not readable: %s", type(exc).__name__)
                return
            if fingerprint != self._fingerprint or self._problems:
                try:
                    self._apply()
                except Exception as exc:  # the supervise loop must go on; next second
                    log.error("runtime settings not applied: %s", type(exc).__name__)

    def settings_changed(self) -> list[str]:
        with self._lock:
            return self._apply()

    def _apply(self) -> list[str]:
        settings = self._settings()
        self._fingerprint = settings.fingerprint()
        persisted = settings.persisted()
        new = effective(self.base, persisted)
        before, self._problems = self._problems, []
        try:
            return self._apply_to(new, bool(persisted))
        finally:
            for line in self._problems:
                if line not in before:  # a retry that fails the same way is not logged again
                    log.error("%s", line)

    def _apply_to(self, new: Config, persisted: bool) -> list[str]:
        if self.held:
            if not persisted:
                self.cfg = new
                return []
            log.info("runtime settings written: the held DICOM listener starts")
        self.held = False
        old = self.scp
        wanted = _Listening(new.scp.ae_title, new.scp.port)
        if (
            old is not None
            and old.alive()
            and wanted == _Listening(old.cfg.scp.ae_title, old.cfg.scp.port)
        ):
            self.cfg = new
            return []
        self._restart(old, new)
        return list(self._problems)

    def _restart(self, old: StorageSCP | None, new: Config) -> None:
        same_port = old is not None and old.cfg.scp.port == new.scp.port
        if old is not None and same_port:
            old.stop_listening()  # the port is needed again: free it first
        try:
            scp = self._new_scp(new)
        except OSError as exc:
            where = f"{new.scp.bind_address}:{new.scp.port}"
            reason = exc.strerror or type(exc).__name__
            if old is not None and same_port:
                try:  # back to the old one on its port
                    self.scp = self._new_scp(old.cfg)
                    self._retire(old)
                except OSError:
                    self.scp = None
                    self._retire(old)
            line = f"dicom listener cannot listen as {new.scp.ae_title} on {where}: {reason}"
            if self.scp is not None and self.scp.alive():
                line += f"; still {self.scp.cfg.scp.ae_title} on port {self.scp.cfg.scp.port}"
            self._problems = [line]
            return
        if old is not None:
            if not same_port:
                old.stop_listening()
            self._retire(old)
        self.scp, self.cfg = scp, new
        log.info("DICOM listener now %s on port %d", new.scp.ae_title, new.scp.port)

    def _retire(self, scp: StorageSCP) -> None:
        """The old SCP's associations finish; it is shut down once they have."""
        if scp not in self._retired:
            self._retired.append(scp)
        self._prune()

    def _prune(self) -> None:
        for scp in list(self._retired):
            if scp.active_associations() == 0:
                scp.stop()
                self._retired.remove(scp)

    # --- what the API and health see ---

    def problems(self) -> list[str]:
        """Health lines of this room: a setting that could not be applied, a
        listener that was started and has died."""
        with self._lock:
            out = list(self._problems)
            dead = self.scp is None or not self.scp.alive()
            if not self.held and not self.base.scp.auto_start and dead:
                out.append("dicom listener is not running")
            return out

    def listening(self) -> bool:
        """For health: the listener runs, or is held on purpose."""
        with self._lock:
            return self.held or (self.scp is not None and self.scp.alive())

    def scp_status(self) -> dict[str, object]:
        with self._lock:
            scp = self.scp
            running = scp is not None and scp.alive()
            cfg = scp.cfg if scp is not None and running else self.cfg
            associations = sum(s.active_associations() for s in self._retired)
            if scp is not None:
                associations += scp.active_associations()
        instances, size = self.counters.snapshot()
        more_instances, more_size, more_associations = self.others()
        instances, size = instances + more_instances, size + more_size
        associations += more_associations
        return {
            "state": "running" if running else "stopped",
            "held": self.held,
            "ae_title": cfg.scp.ae_title,
            "port": cfg.scp.port,
            "associations": associations,
            "instances_received": instances,
            "bytes_received": size,
        }

    def echo(self, node: str) -> str:
        catalog = Catalog(self._catalog_file, readonly=True)
        try:
            found = Nodes(catalog).get(node)
        finally:
            catalog.close()
        if found is None:
            raise LookupError(f"no node named {node[:64]!r}")
        if found.kind != "dicom":
            raise ValueError(f"node {found.name} is a DICOMweb node: C-ECHO speaks DICOM")
        peer = scu.Peer(found.ae_title, found.host, found.port)
        if not self._echoes.acquire(blocking=False):
            raise BlockingIOError(f"{MAX_ECHOES} echoes are already running; try again later")
        try:
            return echo_peer(self.cfg, found.name, peer)
        except scu.ScuError as exc:
            raise ValueError(f"echo {found.name} ({peer}): {exc.reason}") from None
        finally:
            self._echoes.release()

    def link_state(self) -> str:
        return self._link_state()
