"""An SCP worker process ([scp] workers > 1; issue 11 prototype).

The service is worker 0 (its SCP as before); workers 1..N-1 are children
started through ``children.ChildProcess`` (forked at start-up, by the
zygote on a restart, or exec'd as ``python -m ith_proxy.scp_worker LIFELINE
LOGFD STATSFD SLOT`` without one).  Each runs its own ``ServiceControl``: the SCP (C-STORE, C-ECHO,
Q/R) on the same port with SO_REUSEPORT, under the runtime settings, which
it polls every second as the service does (so a new AE title or port set
through the API or the link reaches every worker within a second).  It
reports its counters in its slot of ``scp_stats`` once a second.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import cast

from ith_proxy import logs
from ith_proxy.children import prepare_child, read_config, watch_lifeline
from ith_proxy.config import Config
from ith_proxy.control import ServiceControl
from ith_proxy.dicom.libsetup import configure_libraries
from ith_proxy.dicom.scp import Counters, StorageSCP
from ith_proxy.scp_stats import OpenCount, WorkerStats
from ith_proxy.store.spool import Spool
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.keys import Keyring

log = logging.getLogger("ith_proxy.dicom.worker")

COMM = "ith-scp"
MODULE = "ith_proxy.scp_worker"


def child_main(lifeline: int, log_fd: int, how: str, stats_fd: int, slot: int) -> int:
    prepare_child(COMM)
    cfg = read_config(lifeline)
    logs.setup_worker(socket.socket(fileno=log_fd), cfg.log)
    logs.uncaught_logged(_serve)(cfg, lifeline, how, WorkerStats(stats_fd), slot)
    return 0


def _serve(cfg: Config, lifeline: int, how: str, stats: WorkerStats, slot: int) -> None:
    configure_libraries()
    stop = threading.Event()
    watch_lifeline(lifeline, stop)
    spool = Spool(cfg.spool.dir)
    encryptor = None
    if cfg.spool.encrypt_incoming:
        encryptor = vault_stream.encryptor(Keyring.load(cfg.vault.key_file))

    opened = OpenCount(stats, slot, cfg.scp.workers)  # max_associations: every process

    def make_scp(c: Config, counters: Counters) -> StorageSCP:
        return StorageSCP(c, spool, encryptor, counters, opened)

    base_instances, base_bytes = stats.read(slot)[:2]  # a restart goes on from these
    control = ServiceControl(cfg, spool.catalog_file, make_scp, lambda: "n/a")
    control.start()
    log.info("SCP worker %d (pid %d) started (%s)", slot, os.getpid(), how)

    def report() -> None:
        instances, size = control.counters.snapshot()
        status = control.scp_status()
        stats.write(
            slot,
            base_instances + instances,
            base_bytes + size,
            cast(int, status["associations"]),
            control.listening(),
        )

    try:
        report()
        while not stop.wait(1.0):
            control.poll()
            report()
    finally:
        control.stop()
        stats.forget_associations(slot)
    log.info("SCP worker %d (pid %d) stopped", slot, os.getpid())


if __name__ == "__main__":  # python -m ith_proxy.scp_worker LIFELINE LOGFD STATSFD SLOT
    lifeline, log_fd, stats_fd, slot = map(int, sys.argv[1:5])
    sys.exit(child_main(lifeline, log_fd, "exec", stats_fd, slot))
