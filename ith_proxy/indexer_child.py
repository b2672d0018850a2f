"""The indexer's child process: its entry point, forked by the service or
the zygote, or exec'd, through ``children.ChildProcess`` (see there: the
lifeline, the log socket, why a restart is not forked by the service).
Run as ``python -m ith_proxy.indexer_child LIFELINE LOGFD`` it imports only
the indexer's rooms (no SCP, API or link).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
import threading

from ith_proxy import logs
from ith_proxy.children import prepare_child, read_config, watch_lifeline
from ith_proxy.config import Config
from ith_proxy.dicom.libsetup import configure_libraries
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool
from ith_proxy.vault.keyfiles import load_site_secret
from ith_proxy.vault.records import Vault
from ith_proxy.workers.indexer import Indexer

log = logging.getLogger("ith_proxy.indexer")

COMM = "ith-indexer"  # the child's /proc/PID/comm (ps -o comm, tests)
MODULE = "ith_proxy.indexer_child"


def limit_memory(limit_mb: int) -> None:
    """Cap this process's data segment ([indexer] memory_limit_mb; 0: no cap).

    RLIMIT_DATA (heap, anonymous mmaps, thread stacks), not RLIMIT_AS: the
    address space also counts the 64 MB malloc arenas each thread reserves
    and every mapped library, which are not memory in use.  A parse that
    runs away then raises MemoryError for that one file (quarantined as
    ``failed``) instead of waking the OOM killer.
    """
    if limit_mb <= 0:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = limit_mb * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def comm(slot: int) -> str:
    """The /proc/PID/comm of indexer ``slot``: ith-indexer, ith-indexer1, ..."""
    return COMM + (str(slot) if slot else "")


def title(slot: int) -> str:
    """How the logs name indexer ``slot``."""
    return "indexer process" + (f" {slot}" if slot else "")


def child_main(lifeline: int, log_fd: int, how: str, slot: int = 0) -> int:
    """Indexer process ``slot`` (``[indexer] processes``): its configuration
    from ``lifeline``, then index until end of file on it.  Returns the exit
    code."""
    prepare_child(comm(slot))
    cfg = read_config(lifeline)
    limit_memory(cfg.indexer.memory_limit_mb)
    logs.setup_worker(socket.socket(fileno=log_fd), cfg.log)
    logs.uncaught_logged(_index)(cfg, lifeline, how, slot)
    return 0


def _index(cfg: Config, lifeline: int, how: str, slot: int) -> None:
    configure_libraries()
    stop = threading.Event()
    watch_lifeline(lifeline, stop)
    how += f", indexer {slot}" if slot else ""
    log.info("indexer process %d started (%s)", os.getpid(), how)
    spool = Spool(cfg.spool.dir)
    catalog = Catalog(spool.catalog_file)
    vault = Vault(spool.vault_file, cfg.vault.key_file)
    try:
        secret = load_site_secret(cfg.vault.secret_file)
        Indexer(cfg, spool, catalog, vault, secret, slot).run(stop)
    finally:
        vault.close()
        catalog.close()
    log.info("indexer process %d stopped", os.getpid())


if __name__ == "__main__":  # exec'd: python -m ith_proxy.indexer_child LIFELINE LOGFD [SLOT]
    sys.exit(child_main(int(sys.argv[1]), int(sys.argv[2]), "exec", *map(int, sys.argv[3:4])))
