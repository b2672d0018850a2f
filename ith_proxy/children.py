"""Child processes of the service: started forked or exec'd, stopped by a lifeline.

``ChildProcess.start`` forks while the service has no thread yet (at
start-up): the child shares every page the service had imported
(copy-on-write; ``gc.freeze`` first, so the collector does not write to
them) and costs only what it dirties.  Forking a process that has threads
would copy the locks other threads hold (SQLite's, OpenSSL's, an import's)
locked, so later starts (restarts) ask the zygote (``zygote``), which is
single-threaded and forks the child with the same sharing; without it they
exec a fresh interpreter that runs the child's module (``python -m``),
which imports only what that child needs.

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
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, Protocol

from ith_proxy.config import Config

_LENGTH = struct.Struct("!Q")
# (lifeline, log_fd, "fork" | "zygote" | "exec", *pass_fds, *args) -> exit code
Entry = Callable[..., int]


class Spawner(Protocol):
    """Forks children once the service has threads (``zygote.Zygote``)."""

    def spawn(self, kind: str, fds: Sequence[int], args: Sequence[int]) -> tuple[int, int] | None:
        """(pid, pidfd) of a new child of that kind, or None."""

    def exit_of(self, pid: int) -> int | None:
        """The exit code of a child it started (None: not known yet)."""


class ChildProcess:
    """The service's handle on one child (forked, from the zygote, or exec'd)."""

    def __init__(
        self,
        pid: int,
        lifeline: int,
        how: str,
        popen: subprocess.Popen | None = None,
        pidfd: int | None = None,
        spawner: Spawner | None = None,
    ) -> None:
        self.pid = pid
        self.how = how  # "fork" | "zygote" | "exec"
        self._lifeline: int | None = lifeline
        self._popen = popen
        self._pidfd = pidfd  # a zygote's child: polled and signalled through it
        self._spawner = spawner
        self._exitcode: int | None = None
        self._reaped = False
        self._lock = threading.Lock()  # health() asks from API threads, the supervisor too

    @classmethod
    def start(
        cls,
        cfg: Config,
        log_sock: socket.socket,
        entry: Entry,
        module: str,
        close_in_child: Sequence[socket.socket | int] = (),
        pass_fds: Sequence[int] = (),
        args: Sequence[int] = (),
        spawner: Spawner | None = None,
        kind: str = "",
    ) -> ChildProcess:
        """Fork a child that runs ``entry(lifeline, log_fd, "fork", *pass_fds, *args)``
        if this process has no other thread, else exec ``python -m module
        LIFELINE LOGFD FD... ARG...`` (whose ``__main__`` calls the same entry with
        "exec").  ``close_in_child``: sockets and fds of the service a forked
        child must not keep (the log socket's reading end, the spool lock,
        other children's lifelines); ``pass_fds``: descriptors the child gets.
        Once there are threads, ``spawner`` (the zygote) forks a child of
        ``kind`` instead of an exec, when it can."""
        read_end, write_end = os.pipe()  # both close-on-exec
        try:
            got = None
            if threading.active_count() == 1:
                extra = (*pass_fds, *args)
                proc = cls._fork(read_end, write_end, log_sock, close_in_child, entry, extra)
            elif spawner is not None and (got := spawner.spawn(kind, (read_end, *pass_fds), args)):
                proc = cls(got[0], write_end, "zygote", pidfd=got[1], spawner=spawner)
            else:
                proc = cls._exec(read_end, write_end, log_sock, module, pass_fds, args)
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
        cls,
        read_end: int,
        write_end: int,
        log_sock: socket.socket,
        close: Sequence[socket.socket | int],
        entry: Entry,
        extra: Sequence[int],
    ) -> ChildProcess:
        gc.collect()
        gc.freeze()  # the collector never writes to the objects both processes share
        pid = os.fork()
        if pid == 0:  # the child: never returns into the service's code

            def run() -> int:
                os.close(write_end)
                for item in close:
                    os.close(item.detach() if isinstance(item, socket.socket) else item)
                return entry(read_end, log_sock.detach(), "fork", *extra)

            exit_with(run)
        return cls(pid, write_end, "fork")

    @classmethod
    def _exec(
        cls,
        read_end: int,
        write_end: int,
        log_sock: socket.socket,
        module: str,
        pass_fds: Sequence[int],
        args: Sequence[int],
    ) -> ChildProcess:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        log_fd = log_sock.fileno()
        fds = (read_end, log_fd, *pass_fds)
        popen = subprocess.Popen(
            [sys.executable, "-m", module, *map(str, (*fds, *args))],
            pass_fds=fds,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        return cls(popen.pid, write_end, "exec", popen=popen)

    # --- state ---

    def _poll(self, block: bool = False) -> None:
        with self._lock:
            self._poll_locked(block)

    def _poll_locked(self, block: bool) -> None:
        if self._reaped:
            return
        if self._pidfd is not None:  # readable once the child has exited
            if select.select([self._pidfd], [], [], None if block else 0)[0]:
                self._reaped = True
                os.close(self._pidfd)
                self._pidfd = None
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
        if self._reaped and self._exitcode is None and self._spawner is not None:
            self._exitcode = self._spawner.exit_of(self.pid)
        return self._exitcode

    def let_go(self) -> None:
        """Close the lifeline: the child finishes its batch and exits."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None

    def stop(self, timeout: float) -> None:
        """``let_go``, wait up to ``timeout`` seconds, then SIGKILL."""
        self.let_go()
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.is_alive():
            try:
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
            self._poll(block=True)

    @property
    def lifeline(self) -> int | None:
        """The lifeline's write end (a later forked child must close its copy)."""
        return self._lifeline

    def forget(self) -> None:
        """After the child died: close the lifeline's write end."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None


def read_config(lifeline: int) -> Config:
    """In a child: the configuration the service wrote first on the lifeline."""
    size = _LENGTH.unpack(_read_exact(lifeline, _LENGTH.size))[0]
    return pickle.loads(_read_exact(lifeline, size))


def _read_exact(fd: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.read(fd, size - len(out))
        if not chunk:
            raise EOFError("the service closed the lifeline before the configuration")
        out += chunk
    return bytes(out)


def watch_lifeline(lifeline: int, stop: threading.Event) -> None:
    """In a child: a thread that sets ``stop`` at end of file on the lifeline
    (the service stopped us, or died)."""

    def watch() -> None:
        while os.read(lifeline, 4096):  # nothing more is sent: only EOF ends this
            pass
        stop.set()

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def prepare_child(comm: str) -> None:
    """In a child, first: signals as the service wants them, and a name."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked child had the service's
    try:
        Path("/proc/self/comm").write_text(comm)
    except OSError:
        pass


def exit_with(run: Callable[[], int]) -> NoReturn:
    """A forked child's body: run it and end the process with its exit code
    (an exception is 1), never returning into the forking process's stack."""
    code = 1
    try:
        code = run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        code = 1
    finally:
        os._exit(code)
