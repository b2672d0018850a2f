"""STOW-RS client: Part 10 files to ``POST {url}/studies`` in bounded batches.

Each batch is one ``multipart/related; type="application/dicom"`` request
whose parts are the files' bytes as they are. The body is never built in
memory: its length is computed from the file sizes and the parts are sent
piece by piece (``sendfile`` on plain HTTP). One connection per batch, with
TCP_NODELAY; the timeout bounds the connect, every send and receive, and
the reading of the response body as a whole. HTTPS uses ``ssl``'s default
context (certificates and host names verified). The auth header goes out
as ``Authorization`` and is never logged nor put in a reason.

What a response means for each instance, and when the sending stops:
the table in ``dicom/stow_reply.py``. A file without a readable Part 10
meta is permanent and not sent (``status`` None); a file that changes while
it is being sent fails the request (transient).

An instance's ``sop_uid`` is its MediaStorageSOPInstanceUID (0002,0003), or
for a file without a readable meta its name's stem (spool files are named
``<SOPInstanceUID>.dcm``). ``Outcome.status`` is the HTTP status of the
response that decided it.
"""

from __future__ import annotations

import http.client
import logging
import os
import secrets
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ith_proxy.dicom.status import PERMANENT
from ith_proxy.dicom.stow_reply import MAX_RESPONSE, BatchFailed, classify_http, is_uid, judge
from ith_proxy.fsio import open_read

__all__ = ["Endpoint", "Outcome", "RequestFailed", "classify_http", "plan_batches", "store"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_MAX_META = 64 * 1024  # a file meta group larger than this is not ours
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb service: the base URL (``http://host:8042/dicom-web``) and
    the value of the Authorization header, if any."""

    url: str
    auth_header: str = field(default="", repr=False)


@dataclass(frozen=True)
class Outcome:
    sop_uid: str
    status: int | None  # HTTP status of the deciding response; None: not sent
    result: str  # "delivered" | "transient" | "permanent"
    reason: str
    warning: str = ""


class RequestFailed(Exception):
    """A whole request failed; ``outcomes`` holds what earlier batches of the
    same ``store`` call settled (also given to ``on_outcome``)."""

    def __init__(self, reason: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.status = status
        self.outcomes: list[Outcome] = []


@dataclass(frozen=True)
class _Item:
    index: int
    path: Path
    size: int
    sop_uid: str


@dataclass(frozen=True)
class _Target:
    https: bool
    host: str
    port: int
    path: str
    auth: str

    @property
    def where(self) -> str:
        return f"{'https' if self.https else 'http'}://{self.host}:{self.port}"


def store(
    endpoint: Endpoint,
    files: Sequence[Path],
    *,
    batch_bytes: int,
    batch_instances: int,
    timeout: float,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Send ``files`` and return one Outcome per file, in their order.

    A request that fails as a whole raises RequestFailed and the remaining
    batches are not sent. ``on_outcome`` sees each outcome as it is settled."""
    if batch_bytes < 1 or batch_instances < 1 or not timeout > 0:
        raise ValueError("batch_bytes, batch_instances and timeout must be positive")
    target = _target(endpoint)
    settled: list[Outcome | None] = [None] * len(files)

    def record(index: int, outcome: Outcome) -> None:
        settled[index] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    items = []
    for index, path in enumerate(files):
        try:
            items.append(_item(index, Path(path)))
        except _Unsendable as e:
            record(index, Outcome(Path(path).stem, None, PERMANENT, e.reason))
    for indices in plan_batches([i.size for i in items], batch_bytes, batch_instances):
        try:
            for item, outcome in _send_batch(target, [items[i] for i in indices], timeout):
                record(item.index, outcome)
        except RequestFailed as e:
            e.outcomes = [o for o in settled if o is not None]
            raise
    return [o for o in settled if o is not None]


def plan_batches(sizes: Sequence[int], batch_bytes: int, batch_instances: int) -> list[range]:
    """Files (by size, in order) cut into consecutive batches of at most
    batch_instances files and batch_bytes bytes; a file larger than
    batch_bytes goes alone."""
    batches: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= batch_instances or total + size > batch_bytes):
            batches.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        batches.append(range(start, len(sizes)))
    return batches


# --- files ---


class _Unsendable(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _item(index: int, path: Path) -> _Item:
    try:
        with open_read(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(132 + _MAX_META)
    except OSError as e:
        raise _Unsendable(f"file unreadable ({type(e).__name__})") from None
    uid = _meta_sop_uid(head)
    if not uid:
        raise _Unsendable("not a DICOM Part 10 file (no readable file meta): not sent")
    return _Item(index, path, size, uid)


def _meta_sop_uid(head: bytes) -> str:
    """MediaStorageSOPInstanceUID from the file meta (explicit VR little
    endian by definition), or "" when the file has none."""
    if head[128:132] != b"DICM":
        return ""
    pos = 132
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return ""
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                return ""
            (length,) = struct.unpack_from("<I", head, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            pos += 8
        if elem == 0x0003:
            uid = head[pos : pos + length].rstrip(b"\0 ").decode("ascii", "replace")
            return uid if pos + length <= len(head) and is_uid(uid) else ""
        pos += length
    return ""


# --- the request ---


def _target(endpoint: Endpoint) -> _Target:
    def bad(why: str) -> RequestFailed:
        return RequestFailed(f"bad DICOMweb endpoint: {why}", transient=False)

    try:
        parts = urlsplit(endpoint.url)
        port = parts.port
    except ValueError:
        raise bad("URL does not parse") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad("the URL must be http:// or https:// with a host")
    if parts.username is not None or parts.query or parts.fragment:
        raise bad("the URL may not hold credentials, a query or a fragment")
    if any(ord(c) <= 32 or ord(c) == 127 for c in endpoint.url):
        raise bad("the URL holds spaces or control characters")
    auth = endpoint.auth_header
    if len(auth) > 8192 or any(ord(c) < 32 or ord(c) == 127 for c in auth):
        raise bad("the auth header holds control characters or is too long")
    https = parts.scheme == "https"
    path = parts.path.rstrip("/") + "/studies"
    return _Target(https, parts.hostname, port or (443 if https else 80), path, auth)


def _send_batch(target: _Target, batch: list[_Item], timeout: float) -> list[tuple[_Item, Outcome]]:
    body = _Body.new(batch)
    conn: http.client.HTTPConnection
    if target.https:
        ctx = ssl.create_default_context()
        conn = http.client.HTTPSConnection(target.host, target.port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        status, reply, problem = _exchange(conn, target, body, batch, timeout)
    finally:
        conn.close()
    log.debug(
        "STOW-RS to %s: %d instances, %d bytes -> HTTP %d",
        target.where,
        len(batch),
        body.length,
        status,
    )
    uids = [item.sop_uid for item in batch]
    try:
        verdicts = judge(status, reply, problem, uids, target.auth)
    except BatchFailed as e:
        raise RequestFailed(e.reason, transient=e.transient, status=status) from None
    return [
        (item, Outcome(item.sop_uid, status, v.result, v.reason, v.warning))
        for item, v in zip(batch, verdicts, strict=True)
    ]


@dataclass(frozen=True)
class _Body:
    """The multipart framing of one batch: head file ("\\r\\n" head file)* tail."""

    boundary: str
    head: bytes
    tail: bytes
    length: int

    @staticmethod
    def new(batch: list[_Item]) -> _Body:
        boundary = "ith-proxy-" + secrets.token_hex(24)  # 192 random bits: in no payload
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = sum(len(head) + i.size for i in batch) + 2 * (len(batch) - 1) + len(tail)
        return _Body(boundary, head, tail, length)


def _exchange(
    conn: http.client.HTTPConnection,
    target: _Target,
    body: _Body,
    batch: list[_Item],
    timeout: float,
) -> tuple[int, bytes, str]:
    """Send one batch; (status, response body, problem reading it)."""
    try:
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.putrequest("POST", target.path, skip_accept_encoding=True)
        conn.putheader(
            "Content-Type", f'multipart/related; type="application/dicom"; boundary={body.boundary}'
        )
        conn.putheader("Content-Length", str(body.length))
        conn.putheader("Accept", "application/dicom+json")
        conn.putheader("User-Agent", "ith-proxy")
        if target.auth:
            conn.putheader("Authorization", target.auth)
        conn.endheaders()
    except OSError as e:
        why = _oserror(e)
        raise RequestFailed(f"cannot connect to {target.where}: {why}", transient=True) from None
    send_error = ""
    try:
        _send_body(conn.sock, body, batch)
    except _FileProblem as e:
        raise RequestFailed(str(e), transient=True) from None
    except OSError as e:  # the server may have answered early (401, 413): read that
        send_error = _oserror(e)
    try:
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException) as e:
        why = send_error or _oserror(e)
        raise RequestFailed(f"no response from {target.where}: {why}", transient=True) from None
    deadline = time.monotonic() + timeout
    data = bytearray()
    try:
        while len(data) <= MAX_RESPONSE:
            if time.monotonic() > deadline:
                return resp.status, bytes(data), "response too slow"
            piece = resp.read1(min(65536, MAX_RESPONSE + 1 - len(data)))
            if not piece:
                return resp.status, bytes(data), ""
            data += piece
    except (OSError, http.client.HTTPException) as e:
        return resp.status, bytes(data), f"response cut short ({_oserror(e)})"
    return resp.status, bytes(data), f"response over {MAX_RESPONSE} bytes"


class _FileProblem(Exception):
    """A local file failed during the send: the request is abandoned (the
    server would wait for the missing bytes)."""


def _send_body(sock: socket.socket, body: _Body, batch: list[_Item]) -> None:
    pending = body.head
    for item in batch:
        sock.sendall(pending)
        try:
            f = open_read(item.path)
        except OSError as e:
            raise _FileProblem(f"a file became unreadable ({type(e).__name__})") from None
        with f:
            if os.fstat(f.fileno()).st_size != item.size:
                raise _FileProblem("a file changed while it was being sent")
            if isinstance(sock, ssl.SSLSocket):
                sent = _copy(f, sock, item.size)
            else:
                sent = sock.sendfile(f, 0, item.size)
            if sent != item.size:
                raise _FileProblem("a file changed while it was being sent")
        pending = b"\r\n" + body.head
    sock.sendall(body.tail)


def _copy(f: Any, sock: socket.socket, size: int) -> int:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    sent = 0
    while sent < size:
        n = f.readinto(view[: min(_CHUNK, size - sent)])
        if not n:
            break
        sock.sendall(view[:n])
        sent += n
    return sent


def _oserror(e: Exception) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted ({e.verify_message})"
    name = type(e).__name__
    errno = getattr(e, "errno", None)
    return f"{name} ({os.strerror(errno)})" if isinstance(errno, int) and errno > 0 else name
