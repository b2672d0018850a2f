"""Every outgoing association: the peer, the timeouts, the failures, the
socket fixes the SCP already has (dicom/ae.py), for the SCU side; and C-ECHO,
which tests exactly that.

**The hook.**  The SCP's fixes hang on its RequestHandler; an SCU has none.
Every outgoing association is made by ``_AE``, whose ``_create_socket`` is the
one factory pynetdicom's ``AE.associate`` calls per association: after the
Association and its DUL exist, before the DUL thread starts and before the
TCP connect.  So there, in the requesting thread and with no race:

- the socket is a ``_Socket``, which sets TCP_NODELAY before connecting
  (Nagle plus delayed ACK cost ~40 ms per exchange: stock ``send_c_store``
  takes 5.6 s for the 200-slice CT, 2.6 s with it), keeps why a connect
  failed, bounds every read and write by the DIMSE timeout once connected
  (pynetdicom leaves the socket blocking forever after the connect), and
  serialises writes under a lock, so the C-STORE sender (dicom/scu.py) and
  the DUL thread never interleave PDUs;
- ``wake_on_work`` (dicom/wake.py) makes both reactor threads wake on work
  instead of polling every 1 ms; the DUL's loop delay then goes from 1 ms
  to 10 ms (``DUL_LOOP_DELAY``): it still answers the socket and its queue at
  once, and only its timers and its exit are checked at that pace.

An EVT_CONN_OPEN handler would come too late for the wake-ups (the DUL thread
is running by then) and never runs for a failed connect.  Like wake.py, this
leans on pynetdicom 3.0.4 internals (``AE._create_socket``,
``AssociationSocket``); tests/test_scu.py exercises each of them.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket

from ith_proxy.config import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from ith_proxy.dicom.wake import supported, wake_on_work

log = logging.getLogger("ith_proxy.dicom")

# With the wake-ups, a DUL thread's loop delay only paces its timer checks and
# its exit; 1 ms (pynetdicom's) would wake an idle SCU 1000 times a second.
DUL_LOOP_DELAY = 0.01
# an A-ASSOCIATE-RJ PDU: type, reserved, length (4), reserved, result, source, reason
_RJ_LENGTH = 10
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    connect: float  # TCP connect
    acse: float  # association request / release answers
    dimse: float  # each response; also every socket read and write once connected

    def __post_init__(self) -> None:
        for name in ("connect", "acse", "dimse"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} timeout must be a positive number of seconds")


class ScuError(Exception):
    """An SCU operation failed; ``reason`` is one line, ``transient`` says
    whether trying again later may help."""

    def __init__(self, reason: str, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class AssociationFailed(ScuError):
    """No association: rejected permanently (transient False); rejected
    transiently, refused, timed out or aborted (transient True)."""


class ContextsRefused(AssociationFailed):
    """The peer accepted the association but none of its presentation contexts."""

    def __init__(self, reason: str = "the peer refused every proposed presentation context"):
        super().__init__(reason, transient=False)


class EchoFailed(ScuError):
    """The peer answered C-ECHO with a status other than success."""


def valid_ae_title(value: object) -> bool:
    """1-16 ASCII characters, not all spaces, no backslash or control character."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 16
        and value.isascii()
        and value.strip() != ""
        and value.isprintable()
        and "\\" not in value
    )


class _TCP(socket.socket):
    """A socket that keeps the exception of its failed connect (pynetdicom logs
    and drops it)."""

    connect_error: OSError | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            self.connect_error = exc
            raise


class _Socket(AssociationSocket):
    def __init__(self, assoc: Association, address: Any, io_timeout: float) -> None:
        self.lock = threading.Lock()  # one writer at a time: whole PDUs never interleave
        self.io_timeout = io_timeout
        self.tcp: _TCP | None = None
        self.connected = False
        self.first_pdu = bytearray()
        super().__init__(assoc, address=address)

    def _create_socket(self, address: Any) -> socket.socket:
        # pynetdicom's version, with our socket class and TCP_NODELAY
        family = socket.AF_INET if address.is_ipv4 else socket.AF_INET6
        sock = _TCP(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address.as_tuple)
        self._is_connected = False
        self.tcp = sock
        return sock

    def connect(self, primitive: Any) -> None:
        super().connect(primitive)  # in the DUL thread, before it sends anything
        if self.socket is not None and self._is_connected:
            self.connected = True
            self.socket.settimeout(self.io_timeout)

    def recv(self, nr_bytes: int) -> bytearray:
        data = super().recv(nr_bytes)
        if len(self.first_pdu) < _RJ_LENGTH:  # the answer's first bytes, for rejection()
            self.first_pdu += data[: _RJ_LENGTH - len(self.first_pdu)]
        return data

    def rejection(self) -> A_ASSOCIATE | None:
        """The A-ASSOCIATE-RJ the peer answered with, read from the bytes received.

        A peer that rejects and closes at once (Orthanc does) races pynetdicom's
        state machine: the RJ PDU arrives whole, but the closed connection can
        be handled first, and pynetdicom then reports an abort (seen about 1 in
        300 against Orthanc).  The PDU's own result says what it was."""
        pdu = self.first_pdu
        if len(pdu) < _RJ_LENGTH or pdu[0] != 0x03:
            return None
        rsp = A_ASSOCIATE()
        try:
            rsp.result, rsp.result_source, rsp.diagnostic = pdu[7], pdu[8], pdu[9]
        except ValueError:  # values the standard does not define: an invalid answer
            return None
        return rsp

    def send(self, bytestream: bytes) -> None:
        with self.lock:
            super().send(bytestream)

    def send_block(self, data: bytes) -> None:
        """Write whole PDUs from the SCU's thread; OSError when the connection is gone."""
        with self.lock:
            sock = self.socket
            if sock is None:
                raise ConnectionError("the connection is closed")
            sock.sendall(data)


class _AE(AE):
    def __init__(self, ae_title: str, io_timeout: float) -> None:
        super().__init__(ae_title=ae_title)
        self._io_timeout = io_timeout

    def _create_socket(self, assoc: Association, address: Any, tls_args: Any) -> _Socket:
        sock = _Socket(assoc, address, self._io_timeout)
        sock.tls_args = tls_args
        if supported():
            wake_on_work(assoc)  # the DUL thread has not started yet
            assoc.dul._run_loop_delay = DUL_LOOP_DELAY  # it wakes on work now
        return sock


def _connect_reason(peer: Peer, sock: _Socket, timeouts: Timeouts) -> str:
    exc = sock.tcp.connect_error if sock.tcp is not None else None
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {peer.host}:{peer.port}"
    if isinstance(exc, TimeoutError):
        return f"no TCP connection to {peer.host}:{peer.port} within {timeouts.connect:g} s"
    if exc is not None:
        return f"cannot connect to {peer.host}:{peer.port}: {exc.strerror or type(exc).__name__}"
    return f"cannot connect to {peer.host}:{peer.port}"


def associate(
    peer: Peer, calling_ae: str, timeouts: Timeouts, contexts: list[PresentationContext]
) -> Association:
    """An established association with ``peer``, made through ``_AE``; raises
    AssociationFailed (ContextsRefused when every context was refused)."""
    if not valid_ae_title(calling_ae):
        raise AssociationFailed(f"invalid calling AE title {calling_ae!r}", transient=False)
    if not valid_ae_title(peer.ae_title):
        raise AssociationFailed(f"invalid called AE title {peer.ae_title!r}", transient=False)
    if not isinstance(peer.host, str) or not peer.host.strip():
        raise AssociationFailed("no host given", transient=False)  # "" would mean this host
    if not isinstance(peer.port, int) or not 0 < peer.port < 65536:
        raise AssociationFailed(f"invalid port {peer.port!r}", transient=False)
    ae = _AE(calling_ae, timeouts.dimse)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION
    ae.connection_timeout = timeouts.connect
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.dimse
    started = time.monotonic()
    try:
        assoc = ae.associate(peer.host, peer.port, contexts, ae_title=peer.ae_title)
    except OSError as exc:  # name resolution (getaddrinfo) happens before any socket
        raise AssociationFailed(
            f"cannot resolve {peer.host!r}: {exc.strerror or type(exc).__name__}", transient=True
        ) from None
    if assoc.is_established:
        return assoc
    sock = assoc.dul.socket
    rsp = assoc.acceptor.primitive
    rejected = rsp if assoc.is_rejected and isinstance(rsp, A_ASSOCIATE) else None
    if rejected is None and isinstance(sock, _Socket):
        rejected = sock.rejection()  # a rejection pynetdicom read as an abort
    if rejected is not None:
        permanent = rejected.result == 0x01
        raise AssociationFailed(
            f"association rejected {'permanently' if permanent else 'transiently'} by the "
            f"{rejected.source_str}: {rejected.reason_str}",
            transient=not permanent,
        )
    if isinstance(sock, _Socket) and not sock.connected:
        raise AssociationFailed(_connect_reason(peer, sock, timeouts), transient=True)
    if isinstance(rsp, A_ASSOCIATE) and rsp.result == 0x00:
        raise ContextsRefused()
    if time.monotonic() - started >= timeouts.acse:
        raise AssociationFailed(
            f"no answer to the association request within {timeouts.acse:g} s", transient=True
        )
    raise AssociationFailed(
        "the association request was aborted (an abort or an invalid answer from the peer)",
        transient=True,
    )


def writer(assoc: Association) -> Callable[[bytes], None]:
    """Writes whole PDUs to the association's connection under its socket lock."""
    sock = assoc.dul.socket
    if not isinstance(sock, _Socket):
        raise TypeError("not an association made by scu_assoc.associate")
    return sock.send_block


def close(assoc: Association, clean: bool = True) -> None:
    """Release the association, or abort it when ``clean`` is false or it broke."""
    if assoc.is_established and clean and not assoc.acse.is_aborted():
        assoc.release()
    elif not assoc.is_released:
        assoc.abort()


def echo(peer: Peer, calling_ae: str, timeouts: Timeouts) -> None:
    """C-ECHO ``peer``; raises AssociationFailed, or EchoFailed for a status
    other than success (0x0000)."""
    try:
        assoc = associate(
            peer, calling_ae, timeouts, [build_context(VERIFICATION, [IMPLICIT_LE, EXPLICIT_LE])]
        )
    except ContextsRefused:
        raise ContextsRefused("the peer refused the Verification SOP class") from None
    ok = False
    try:
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise AssociationFailed(
                f"no C-ECHO response within {timeouts.dimse:g} s, or the association was aborted",
                transient=True,
            )
        code = int(status.Status)
        if code != 0x0000:
            raise EchoFailed(f"C-ECHO answered with status 0x{code:04X}", transient=False)
        ok = True
    finally:
        close(assoc, clean=ok)
    log.info("C-ECHO %s: success", peer)
