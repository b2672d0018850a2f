"""The zygote: a process forked at start-up that forks every later child.

The service forks children directly only while it has no thread (at
start-up); a restart later would otherwise be a fresh interpreter with none
of the service's pages shared (``children``).  The zygote is forked first,
before any thread and any lifeline exists, and stays single-threaded for
ever: it waits on one socket, and for each request (a kind, the child's
lifeline and descriptors, SCM_RIGHTS) forks a child that runs that kind's
entry with ``how="zygote"``, sharing the pages copy-on-write like the first
children.  It answers with the child's pid and a pidfd (the service polls
and signals the child through it; the child is the zygote's, not the
service's), and reports each exit code when it reaps the child.

It exits at end of file on its socket: the service stopped it, or died.
Its children stop on their own lifelines.  If it dies, the service falls
back to exec'd children (``children.ChildProcess``).
"""

from __future__ import annotations

import gc
import os
import select
import socket
import threading
import time
from collections.abc import Mapping, Sequence

from ith_proxy.children import Entry, exit_with, prepare_child

COMM = "ith-zygote"
_MAX_FDS = 8


class Zygote:
    """The service's end (``children.Spawner``)."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self._lock = threading.Lock()
        self._exits: dict[int, int] = {}
        self._dead = False

    @classmethod
    def start(
        cls,
        entries: Mapping[str, Entry],
        log_sock: socket.socket,
        close_in_child: Sequence[socket.socket | int],
    ) -> Zygote:
        """Fork it (this process must have no other thread).  ``entries``:
        the child kinds it may start; ``close_in_child``: as for a child."""
        assert threading.active_count() == 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gc.collect()
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(ours.detach())
                for item in close_in_child:
                    os.close(item.detach() if isinstance(item, socket.socket) else item)
                prepare_child(COMM)
                code = _serve(theirs, entries, log_sock.fileno())
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    # --- the service's side ---

    def alive(self) -> bool:
        if not self._dead:
            try:
                self._dead = os.waitpid(self.pid, os.WNOHANG)[0] != 0
            except ChildProcessError:
                self._dead = True
        return not self._dead

    def spawn(self, kind: str, fds: Sequence[int], args: Sequence[int]) -> tuple[int, int] | None:
        """A new child: (pid, pidfd), or None when the zygote cannot answer."""
        if not self.alive():
            return None
        with self._lock:
            try:
                self.sock.settimeout(10)
                text = " ".join([kind, *map(str, args)]).encode()
                socket.send_fds(self.sock, [text], list(fds))
                while True:
                    msg, got, _, _ = socket.recv_fds(self.sock, 256, 1)
                    if not msg:
                        return None
                    if self._note(msg) is None and got:
                        return int(msg.split()[1]), got[0]
            except OSError:
                return None

    def _note(self, msg: bytes) -> int | None:
        """Record an exit report; the pid of a report, None for anything else."""
        parts = msg.decode().split()
        if parts[:1] == ["exit"]:
            self._exits[int(parts[1])] = int(parts[2])
            return int(parts[1])
        return None

    def exit_of(self, pid: int) -> int | None:
        """The exit code the zygote reported for ``pid`` (None: not yet)."""
        with self._lock:
            try:
                self.sock.setblocking(False)
                while True:
                    msg = self.sock.recv(256)
                    if not msg:
                        break
                    self._note(msg)
            except OSError:
                pass
            return self._exits.get(pid)

    def stop(self, timeout: float = 5) -> None:
        self.sock.close()  # end of file: it exits (its children have their own lifelines)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            self._dead = True


# --- the zygote's side ---


def _serve(sock: socket.socket, entries: Mapping[str, Entry], log_fd: int) -> int:
    kids: dict[int, int] = {}  # pidfd -> pid
    while True:
        ready = select.select([sock.fileno(), *kids], [], [])[0]
        for fd in ready:
            if fd == sock.fileno():
                try:
                    msg, fds, _, _ = socket.recv_fds(sock, 256, _MAX_FDS)
                except OSError:
                    return 0
                if not msg:
                    return 0  # the service closed its end, or died
                kind, *args = msg.decode().split()
                pid = _fork_child(sock, kids, entries[kind], fds, [int(a) for a in args], log_fd)
                for f in fds:
                    os.close(f)
                pidfd = os.pidfd_open(pid)
                kids[pidfd] = pid
                socket.send_fds(sock, [f"pid {pid}".encode()], [pidfd])
            else:
                pid = kids.pop(fd)  # a pidfd: that child has exited
                os.close(fd)
                status = os.waitpid(pid, 0)[1]
                code = os.waitstatus_to_exitcode(status)
                try:
                    sock.send(f"exit {pid} {code}".encode())
                except OSError:
                    return 0


def _fork_child(
    sock: socket.socket,
    kids: dict[int, int],
    entry: Entry,
    fds: list[int],
    args: list[int],
    log_fd: int,
) -> int:
    pid = os.fork()
    if pid:
        return pid

    def run() -> int:
        os.close(sock.detach())
        for pidfd in kids:
            os.close(pidfd)
        return entry(fds[0], log_fd, "zygote", *fds[1:], *args)

    exit_with(run)
