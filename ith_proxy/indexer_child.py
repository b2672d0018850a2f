"""The indexer's child process: how the service starts and stops it, and its entry point.

Started one of two ways (``IndexerProcess.start``):

- **fork**, at start-up, while the service has no thread yet: the child
  shares every page the service had imported (copy-on-write; ``gc.freeze``
  first, so the collector does not write to them) and costs only what it
  dirties.  Forking a process that has threads would copy the locks other
  threads hold (SQLite's, OpenSSL's, an import's) locked, so it is done only
  while ``threading.active_count()`` is 1.
- **exec**, on every later start (a restart after the indexer died): a fresh
  interpreter, ``python -m ith_proxy.indexer_child``, that imports only the
  indexer's modules (no SCP, API or link).

Either way the child gets two descriptors, and nothing from multiprocessing
(so no semaphore, no feeder thread, no resource-tracker process):

- the **lifeline**, a pipe whose write end only the service holds.  The
  configuration comes over it first (8-byte length, pickle); after that, end
  of file means stop, whether the service closed it (shutdown) or died (kill
  -9: the kernel closes it).  No polling of the parent's pid.
- the **log socket**, a SOCK_SEQPACKET socket pair's sending end: each record
  is one message (``logs.setup_worker``), written to the files by the service
  (``logs.listen``).  Only the service writes log files.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ith_proxy import logs
from ith_proxy.config import Config
from ith_proxy.dicom.libsetup import configure_libraries
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool
from ith_proxy.vault.keyfiles import load_site_secret
from ith_proxy.vault.records import Vault
from ith_proxy.workers.indexer import Indexer

log = logging.getLogger("ith_proxy.indexer")

COMM = "ith-indexer"  # the child's /proc/PID/comm (ps -o comm, tests)
_LENGTH = struct.Struct("!Q")


class IndexerProcess:
    """The service's handle on one indexer child (forked or exec'd)."""

    def __init__(self, pid: int, lifeline: int, how: str, popen: subprocess.Popen | None) -> None:
        self.pid = pid
        self.how = how  # "fork" | "exec"
        self._lifeline: int | None = lifeline
        self._popen = popen
        self._exitcode: int | None = None
        self._reaped = False

    @classmethod
    def start(
        cls, cfg: Config, log_sock: socket.socket, close_in_child: Sequence[object] = ()
    ) -> IndexerProcess:
        """Fork the indexer if this process has no other thread, else exec one.
        ``close_in_child``: sockets and fds of the service a forked child must
        not keep (the log socket's reading end, the spool lock)."""
        read_end, write_end = os.pipe()  # both close-on-exec
        try:
            if threading.active_count() == 1:
                proc = cls._fork(read_end, write_end, log_sock, close_in_child)
            else:
                proc = cls._exec(read_end, write_end, log_sock)
        finally:
            os.close(read_end)
        blob = pickle.dumps(cfg)
        try:
            os.write(write_end, _LENGTH.pack(len(blob)))
            view = memoryview(blob)
            while view:
                view = view[os.write(write_end, view) :]
        except OSError:  # the child is gone already: the supervisor sees it
            pass
        return proc

    @classmethod
    def _fork(
        cls, read_end: int, write_end: int, log_sock: socket.socket, close: Sequence[object]
    ) -> IndexerProcess:
        gc.collect()
        gc.freeze()  # the collector never writes to the objects both processes share
        pid = os.fork()
        if pid == 0:  # the child: never returns into the service's code
            code = 1
            try:
                os.close(write_end)
                for item in close:
                    os.close(item.detach() if isinstance(item, socket.socket) else int(item))  # type: ignore[call-overload]
                code = child_main(read_end, log_sock.detach(), "fork")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        return cls(pid, write_end, "fork", None)

    @classmethod
    def _exec(cls, read_end: int, write_end: int, log_sock: socket.socket) -> IndexerProcess:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        log_fd = log_sock.fileno()
        popen = subprocess.Popen(
            [sys.executable, "-m", "ith_proxy.indexer_child", str(read_end), str(log_fd)],
            pass_fds=(read_end, log_fd),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        return cls(popen.pid, write_end, "exec", popen)

    # --- state ---

    def _poll(self, block: bool = False) -> None:
        if self._reaped:
            return
        if self._popen is not None:
            code = self._popen.wait() if block else self._popen.poll()
            if code is not None:
                self._exitcode, self._reaped = code, True
            return
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self._reaped = True
            return
        if pid:
            self._exitcode, self._reaped = os.waitstatus_to_exitcode(status), True

    def is_alive(self) -> bool:
        self._poll()
        return not self._reaped

    @property
    def exitcode(self) -> int | None:
        self._poll()
        return self._exitcode

    def stop(self, timeout: float) -> None:
        """Close the lifeline (the child finishes its batch and exits), wait
        up to ``timeout`` seconds, then SIGKILL."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.is_alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._poll(block=True)

    def forget(self) -> None:
        """After the child died: close the lifeline's write end."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None


# --- the child ---


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


def _read_exact(fd: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.read(fd, size - len(out))
        if not chunk:
            raise EOFError("the service closed the lifeline before the configuration")
        out += chunk
    return bytes(out)


def _name_process() -> None:
    try:
        Path("/proc/self/comm").write_text(COMM)
    except OSError:
        pass


def child_main(lifeline: int, log_fd: int, how: str) -> int:
    """The indexer process: its configuration from ``lifeline``, then index
    until end of file on it.  Returns the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked child had the service's
    _name_process()
    cfg: Config = pickle.loads(_read_exact(lifeline, _LENGTH.unpack(_read_exact(lifeline, 8))[0]))
    limit_memory(cfg.indexer.memory_limit_mb)
    log_sock = socket.socket(fileno=log_fd)
    logs.setup_worker(log_sock, cfg.log)
    logs.uncaught_logged(_index)(cfg, lifeline, how)
    return 0


def _index(cfg: Config, lifeline: int, how: str) -> None:
    configure_libraries()
    stop = threading.Event()

    def watch() -> None:
        while os.read(lifeline, 4096):  # nothing more is sent: only EOF ends this
            pass
        stop.set()

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
    log.info("indexer process %d started (%s)", os.getpid(), how)
    spool = Spool(cfg.spool.dir)
    catalog = Catalog(spool.catalog_file)
    vault = Vault(spool.vault_file, cfg.vault.key_file)
    try:
        secret = load_site_secret(cfg.vault.secret_file)
        Indexer(cfg, spool, catalog, vault, secret).run(stop)
    finally:
        vault.close()
        catalog.close()


if __name__ == "__main__":  # the exec'd child: python -m ith_proxy.indexer_child LIFELINE LOGFD
    sys.exit(child_main(int(sys.argv[1]), int(sys.argv[2]), "exec"))
