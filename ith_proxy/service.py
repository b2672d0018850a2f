"""Wires and supervises the workers, with a clean shutdown.

Each worker gets its own catalog connection and talks to the others only
through spool folders and catalog rows.  The SCP, scheduler, forwarder and API run as
threads here; the indexer runs in a child process of its own, because
parsing and rewriting files is CPU work that would otherwise compete with
the SCP for the GIL (measured: ingest ~45% slower with both in one process).
The process tree is this process, that child and a zygote, nothing else
(no multiprocessing, so no resource-tracker process).  The zygote and the
first indexer are forked in ``start`` before this process starts any
thread, so they share the imported modules' pages copy-on-write; a
restarted indexer is forked by the single-threaded zygote (``zygote``;
forking this process once it has threads would copy the locks they hold),
or is a fresh, lean interpreter if the zygote is gone (``children``).  The
helper indexers (``[indexer] processes`` > 1) are forked by the zygote too,
when ``incoming/`` holds a backlog, and exit after ``[indexer]
helper_idle`` seconds without one.  The
child's log records come back over a socket, so
only this process writes the log files; it stops at end of file on its
lifeline pipe, so it exits by itself when this process dies.  With
``[scp] workers`` > 1 (a prototype) SCP worker processes (``scp_worker``)
are forked the same way and share the DICOM port with this one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ith_proxy import indexer_child, logs, scp_worker
from ith_proxy.children import ChildProcess
from ith_proxy.cli.common import audit_log
from ith_proxy.config import Config
from ith_proxy.control import ServiceControl
from ith_proxy.dicom import scp_stream
from ith_proxy.dicom.libsetup import configure_libraries
from ith_proxy.dicom.scp import Counters, StorageSCP
from ith_proxy.health import Liveness, problems
from ith_proxy.scp_stats import OpenCount, WorkerStats
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.nodes import load_config_nodes
from ith_proxy.store.spool import Spool
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.keyfiles import (
    VaultKeyError,
    ensure_secrets,
    load_site_secret,
    shared_volume_warning,
)
from ith_proxy.vault.keys import Keyring
from ith_proxy.vault.records import Vault
from ith_proxy.web.app import NO_JWT_KEY, ApiServer, make_app
from ith_proxy.web.auth import AuthConfigError, Verifier
from ith_proxy.workers.forwarder import Forwarder
from ith_proxy.workers.scheduler import Scheduler
from ith_proxy.zygote import Zygote

if TYPE_CHECKING:  # imported when ITH_URL is set: offline, no websocket-client (~0.7 MiB)
    from ith_proxy.link.client import Link

log = logging.getLogger("ith_proxy.service")

WAKE_INTERVAL = 0.1  # seconds between two looks for a backlog the helper indexers take


def _helper_done(slot: int, kid: ChildProcess) -> bool:
    """A helper indexer (slot 1..N-1) that ended for want of a backlog (exit
    code 0): no death, no health problem; started again by the next backlog."""
    return slot > 0 and not kid.is_alive() and kid.exitcode == 0


class StartupError(RuntimeError):
    """The service cannot start; the message is one line for the operator."""


class Service:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool.dir)
        self.stop_event = threading.Event()
        self.threads: dict[str, threading.Thread] = {}
        self.control: ServiceControl | None = None  # the SCP under the runtime settings
        self.api: ApiServer | None = None
        # the backend link's state for status and metrics: offline | connected | disconnected
        self.link_status = "offline"
        self.link: Link | None = None  # set when ITH_URL is set
        self._lock_fd: int | None = None
        self.indexers: dict[int, ChildProcess] = {}  # [indexer] processes, by slot
        self._log_listener: logs.Listener | None = None
        self._log_socks: tuple[socket.socket, socket.socket] | None = None  # (read, send)
        # [scp] workers > 1: SCP processes 1..N-1 (this process is 0) and their reports
        self.scp_workers: dict[int, ChildProcess] = {}
        self._scp_stats: WorkerStats | None = None
        self._started: dict[tuple[str, int], float] = {}  # (kind, slot): when (re)started
        self._zygote: Zygote | None = None  # forks the children started later (restarts)

    # --- start-up ---

    def prepare(self) -> None:
        os.umask(0o077)  # files 0600, folders 0700: catalog, logs, everything
        try:  # the JWT keys, before anything is created or logged (one line)
            jwt_configured = Verifier(self.cfg.api).configured
        except AuthConfigError as exc:
            raise StartupError(str(exc)) from None
        try:
            self.spool.ensure()
        except OSError as exc:
            raise StartupError(f"cannot create spool {self.spool.root}: {exc.strerror}") from None
        links = self.spool.symlinks(extra=(self.spool.vault_file, self.spool.catalog_file))
        if links:  # before anything opens them: lock, logs, catalog (apsw), vault
            raise StartupError(
                f"refusing to start: {links[0]} is a symbolic link; the "
                "spool's files are never opened through links"
            )
        self._lock_fd = self.spool.lock()
        if self._lock_fd is None:
            raise StartupError(f"another ith-proxy is already using {self.spool.root}")
        logs.setup(self.spool.logs, self.cfg.log)
        # Keys are created only for a new spool (no vault, no catalog); otherwise a
        # missing one stops the start, naming it, before anything is created.
        new_spool = not self.spool.vault_file.exists() and not self.spool.catalog_file.exists()
        ensure_secrets(
            self.cfg.vault.key_file,
            new_spool,
            audit_in_use=self.cfg.vault.audit_anchor_file.exists(),
        )
        warning = shared_volume_warning(self.cfg.vault.key_file, self.spool.root)
        if warning:
            log.warning("%s", warning)
        load_site_secret(self.cfg.vault.secret_file)  # check it before the workers
        Vault(self.spool.vault_file, self.cfg.vault.key_file).close()  # key check
        catalog = Catalog(self.spool.catalog_file)  # migrations
        try:  # the configured nodes become the registry's ini/derived rows (it logs)
            load_config_nodes(catalog, self.cfg)
        finally:
            catalog.close()
        removed = self.spool.clean_tmp(0)
        if removed:
            log.info("removed %d partial file(s) left in tmp/", removed)
        if not jwt_configured:  # after every refusal above (each one stderr line)
            log.warning("%s", NO_JWT_KEY)

    def _worker(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self.threads[name] = thread
        thread.start()

    def _start_indexer(self, slot: int) -> None:
        """Forked while this process has no thread yet (at start-up), by the
        zygote or exec'd later (a restart): see ``indexer_child``."""
        assert self._log_socks is not None
        self.indexers[slot] = ChildProcess.start(
            self.cfg,
            self._log_socks[1],
            indexer_child.child_main,
            indexer_child.MODULE,
            close_in_child=self._children_fds(),
            args=(slot,),
            spawner=self._live_zygote(),
            kind="indexer",
        )
        self._started["indexer", slot] = time.monotonic()

    def _children_fds(self) -> tuple[socket.socket | int, ...]:
        """What a forked child must not keep: the log socket's reading end,
        the spool lock, the other children's lifelines."""
        assert self._log_socks is not None
        lock = () if self._lock_fd is None else (self._lock_fd,)
        kids = [*self.indexers.values(), *self.scp_workers.values()]
        lifelines = tuple(k.lifeline for k in kids if k.lifeline is not None)
        zygote = () if self._zygote is None else (self._zygote.sock,)
        return (self._log_socks[0], *lock, *lifelines, *zygote)

    def _live_zygote(self) -> Zygote | None:
        if self._zygote is not None and not self._zygote.alive():
            log.warning("the zygote process has exited; children are exec'd from now on")
            self._zygote = None
        return self._zygote

    def _start_scp_worker(self, slot: int) -> None:
        assert self._log_socks is not None and self._scp_stats is not None
        self._scp_stats.forget_associations(slot)  # a restart: they died with the old one
        self.scp_workers[slot] = ChildProcess.start(
            self.cfg,
            self._log_socks[1],
            scp_worker.child_main,
            scp_worker.MODULE,
            close_in_child=self._children_fds(),
            pass_fds=(self._scp_stats.fd,),
            args=(slot,),
            spawner=self._live_zygote(),
            kind="scp",
        )
        self._started["scp", slot] = time.monotonic()

    def _supervise(self) -> None:
        """Restart a child process (an indexer, an SCP worker), or a worker
        thread, that died (a child with a short back-off; a thread's loop
        catches every error of a pass, so only a failure to start, such as
        an unopenable catalog, ends one)."""
        self._live_zygote()  # reaps it (and says so) if it died
        for kind, kids, start in (
            ("indexer", self.indexers, self._start_indexer),
            ("scp", self.scp_workers, self._start_scp_worker),
        ):
            for slot, kid in list(kids.items()):
                if kid.is_alive() or self.stop_event.is_set():
                    continue
                if kind == "indexer" and _helper_done(slot, kid):
                    kid.forget()
                    del kids[slot]  # started again by _wake_helpers
                    continue
                if time.monotonic() - self._started[kind, slot] < 5:
                    continue
                name = f"SCP worker {slot}" if kind == "scp" else indexer_child.title(slot)
                log.error("%s exited (code %s); restarting", name, kid.exitcode)
                kid.forget()
                start(slot)
        for name, target in self._restartable():
            thread = self.threads.get(name)
            if thread is not None and not thread.is_alive() and not self.stop_event.is_set():
                log.error("%s thread ended; restarting it", name)
                self._worker(name, target)

    def _wake_helpers(self) -> None:
        """Start the helper indexers that are not running once incoming/
        holds more than one batch: one batch before they may take their
        share (``buckets.backlog``, two), so they are ready when it builds.
        Each exits again after ``[indexer] helper_idle`` seconds without a
        backlog (docs/architecture.md, "Several indexers").  At idle they
        cost no memory."""
        idle = [s for s in range(1, self.cfg.indexer.processes) if s not in self.indexers]
        if not idle or self.stop_event.is_set():
            return
        try:
            if self.spool.incoming_count() <= self.cfg.indexer.batch_size:
                return
        except OSError:  # incoming/ unreadable: the indexer's own pass says why
            return
        for slot in idle:
            self._start_indexer(slot)

    def _restartable(self) -> tuple[tuple[str, Callable[[], None]], ...]:
        link = (("link", self._run_link_thread),) if self.link is not None else ()
        return (
            ("scheduler", self._run_scheduler_thread),
            ("forwarder", self._run_forwarder_thread),
            *link,
        )

    def _set_link_status(self, status: str) -> None:
        self.link_status = status

    def _start_link(self) -> None:
        """The backend link, when ITH_URL is set: the backend's config is
        fetched once now (it is persisted before the SCP starts; when the
        backend is down the proxy starts on the last persisted config), then
        the link thread keeps the WebSocket and retries the fetch."""
        if self.cfg.link.offline:
            return
        from ith_proxy.link.client import Link

        self.link = Link(
            self.cfg, self.spool.catalog_file, health=self.health, set_status=self._set_link_status
        )
        self.link_status = "disconnected"
        catalog = Catalog(self.spool.catalog_file)
        try:
            self.link.fetch_config(catalog)
        finally:
            catalog.close()
        self._worker("link", self._run_link_thread)

    def _run_link_thread(self) -> None:
        assert self.link is not None
        self.link.run(self.stop_event)

    def _run_scheduler_thread(self) -> None:
        catalog = Catalog(self.spool.catalog_file)
        try:
            Scheduler(
                self.cfg,
                self.spool,
                catalog,
                destinations=self.cfg.forward.destinations,
                retention_hours=self.cfg.spool.retention_hours,
            ).run(self.stop_event)
        finally:
            catalog.close()

    def _run_forwarder_thread(self) -> None:
        catalog = Catalog(self.spool.catalog_file)
        try:
            Forwarder(self.cfg, self.spool, catalog).run(self.stop_event)
        finally:
            catalog.close()

    def start(self) -> None:
        try:
            scp_stream.check_library()  # the SCP's memory bound needs this pynetdicom
        except scp_stream.LibraryMismatch as exc:
            raise StartupError(str(exc)) from None
        self.prepare()
        configure_libraries()  # library globals, before any DICOM is handled
        # the indexer first: forked before this process starts any thread
        self._log_socks = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._zygote = Zygote.start(  # first: it must hold no child's lifeline
            {"indexer": indexer_child.child_main, "scp": scp_worker.child_main},
            self._log_socks[1],
            close_in_child=self._children_fds(),
        )
        self._start_indexer(0)  # the helpers (slots 1..N-1) start on a backlog: _wake_helpers
        if self.cfg.scp.workers > 1:  # forked too, before any thread
            self._scp_stats = WorkerStats()
            for slot in range(1, self.cfg.scp.workers):
                self._start_scp_worker(slot)
        self._log_listener = logs.listen(*self._log_socks)
        self._worker("scheduler", self._run_scheduler_thread)
        self._worker("forwarder", self._run_forwarder_thread)
        self._start_link()
        encryptor = None  # the SCP gets a stream-encryptor factory, never a key
        if self.cfg.spool.encrypt_incoming:
            encryptor = vault_stream.encryptor(Keyring.load(self.cfg.vault.key_file))
            log.info("received instances are encrypted under the vault key in incoming/")

        stats = self._scp_stats  # [scp] workers > 1: max_associations counts every process
        opened = OpenCount(stats, 0, self.cfg.scp.workers) if stats is not None else None

        def make_scp(cfg: Config, counters: Counters) -> StorageSCP:
            return StorageSCP(cfg, self.spool, encryptor, counters, opened)

        self.control = ServiceControl(
            self.cfg, self.spool.catalog_file, make_scp, lambda: self.link_status
        )
        if stats is not None:  # the metrics and status count every SCP process
            workers = range(1, self.cfg.scp.workers)
            self.control.others = lambda: stats.totals(workers)
        try:  # the SCP starts on the persisted runtime settings (or is held)
            self.control.start()
        except OSError as exc:
            scp = self.control.cfg.scp
            raise StartupError(
                f"cannot listen for DICOM on {scp.bind_address}:{scp.port}: {exc.strerror}"
            ) from None
        try:
            self.api = ApiServer(self.cfg.api, self._make_api())
        except OSError as exc:
            raise StartupError(
                f"cannot listen for HTTP on {self.cfg.api.bind_address}:"
                f"{self.cfg.api.port}: {exc.strerror}"
            ) from None
        self.api.start()
        mode = "offline" if self.cfg.link.offline else f"backend {self.cfg.link.ith_url}"
        log.info("ith-proxy running (%s)", mode)

    def _make_api(self):
        spool, cfg = self.spool, self.cfg
        try:
            return make_app(
                cfg,
                connect_catalog=lambda: Catalog(spool.catalog_file),
                open_vault=lambda: Vault(spool.vault_file, cfg.vault.key_file),
                audit=audit_log(cfg, append=True),
                health=self.health,
                control=self.control,
            )
        except (AuthConfigError, VaultKeyError) as exc:
            raise StartupError(str(exc)) from None

    # --- supervision ---

    def health(self) -> list[str]:
        """The problems /api/health/ reports (policy in ``health``)."""
        scheduler = self.threads.get("scheduler")
        forwarder = self.threads.get("forwarder")
        control = self.control
        found = problems(
            self.cfg,
            self.spool,
            Liveness(  # a listener held on purpose (auto_start off) is no problem
                dicom=control is not None
                and control.listening()
                and all(w.is_alive() for w in self.scp_workers.values()),
                indexer=0 in self.indexers
                and all(
                    kid.is_alive() or _helper_done(slot, kid) for slot, kid in self.indexers.items()
                ),
                scheduler=scheduler is not None and scheduler.is_alive(),
                forwarder=forwarder is not None and forwarder.is_alive(),
            ),
        )
        return found + self._silent_workers() + (control.problems() if control is not None else [])

    def _silent_workers(self) -> list[str]:
        """A worker that is alive but has stopped reporting (hung): its share
        of the associations may be stuck."""
        stats = self._scp_stats
        if stats is None:
            return []
        return [
            f"SCP worker {slot} has not reported for {age:.0f} s"
            for slot, age in stats.silent(range(1, self.cfg.scp.workers))
            if slot in self.scp_workers and self.scp_workers[slot].is_alive()
        ]

    def stop(self) -> None:
        log.info("shutting down")
        if self.api:
            self.api.stop()
        if self.control:
            self.control.stop()
        self.stop_event.set()
        for worker in self.scp_workers.values():  # SCPs first: nothing arrives once it stops
            worker.stop(timeout=30)
        for indexer in self.indexers.values():  # all at once, then each in turn
            indexer.let_go()
        for indexer in self.indexers.values():
            indexer.stop(timeout=30)
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None
        for t in self.threads.values():
            t.join(timeout=30)
        if self._log_listener is not None:
            self._log_listener.stop()
            self._log_listener = None
        for sock in self._log_socks or ():
            sock.close()
        self._log_socks = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")

    def run_forever(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        try:
            tick = 0
            while not done.wait(WAKE_INTERVAL):
                self._wake_helpers()
                tick += 1
                if tick % round(1 / WAKE_INTERVAL):
                    continue
                self._supervise()  # every second
                if self.control is not None:  # runtime settings the link wrote
                    self.control.poll()
        finally:
            self.stop()
