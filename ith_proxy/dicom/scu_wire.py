"""The bytes of an outgoing C-STORE: a file's meta, the command set, and the
P-DATA-TF PDUs that carry the data set, streamed from the file as it is.

Why not pynetdicom's ``send_c_store``: given a path it decodes the whole
file with ``dcmread`` and encodes it again (unless the process-wide
``STORE_SEND_CHUNKED_DATASET`` is set), builds the command set through
pydicom (~1 ms per instance), and hands every PDU (16 kB with Orthanc or
DCMTK) to its DUL thread through a queue and the state machine.  Here the
command set is packed with ``struct``, the data set is read in ~1 MiB blocks
and framed into PDUs of the peer's maximum length, and each block goes out
in one ``sendall`` (dicom/scu.py holds the socket lock).  Nothing is decoded
and memory stays at one block whatever the instance size.

The responses come back through pynetdicom's DUL thread; a C-STORE-RSP in
one PDV (every one seen from DCMTK and Orthanc) is read here with ``struct``
(``parse_store_response``) instead of through pydicom (~0.4 ms each, on the
path from one instance to the next).

Stdlib only; every check here is against hostile or broken input: a bad
file raises ``WireError`` with a short reason (no path, no file content).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 1 << 20  # bytes read and sent per sendall
META_MAX = 1 << 16  # a file meta group is a few hundred bytes
MIN_PDU = 1024  # smaller peer maximum PDU lengths are refused (DCMTK's own floor is 4096)
_UID = re.compile(rb"[0-9]+(\.[0-9]+)*")
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_META_HEAD = b"\x02\x00\x00\x00UL\x04\x00"  # (0002,0000) UL, length 4, explicit VR LE
_WANTED = {0x0002: "sop_class", 0x0003: "sop_instance", 0x0010: "transfer_syntax"}
_PDU_HEAD = struct.Struct(">BBLLBB")  # type, reserved, PDU length, PDV length, context, control


class WireError(ValueError):
    """The file cannot be sent as it is (the reason names no path or value)."""


@dataclass(frozen=True)
class FileMeta:
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    offset: int  # where the data set starts
    size: int  # file size


def _uid(raw: bytes, what: str) -> str:
    value = raw.rstrip(b"\x00 ")
    if not 0 < len(value) <= 64 or not _UID.fullmatch(value):
        raise WireError(f"invalid {what} in the file meta")
    return value.decode("ascii")


def meta_group(fh: BinaryIO) -> tuple[bytes, bytes]:
    """(preamble + "DICM" + group length element, the rest of the file meta
    group) of a Part 10 file read from ``fh``'s position: exactly the group
    length's bytes, however the data set after it starts.  WireError if the
    file is not Part 10 or its meta is implausible or cut."""
    head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM":
        raise WireError("not a DICOM Part 10 file (no DICM prefix)")
    if head[132:140] != _META_HEAD:
        raise WireError("the file meta has no group length")
    length = struct.unpack("<L", head[140:144])[0]
    if length > META_MAX:
        raise WireError("the file meta group length is implausible")
    raw = fh.read(length)
    if len(raw) < length:
        raise WireError("the file meta is truncated")
    return head, raw


def read_meta(fh: BinaryIO) -> FileMeta:
    """The file meta of a Part 10 file, from its group length, without pydicom;
    ``fh`` is left at the start of the data set."""
    size = fh.seek(0, 2)
    fh.seek(0)
    _, raw = meta_group(fh)
    length = len(raw)
    found: dict[str, str] = {}
    pos = 0
    while pos < length:
        if pos + 8 > length:
            raise WireError("the file meta is malformed")
        group, elem = struct.unpack_from("<HH", raw, pos)
        vr = raw[pos + 4 : pos + 6]
        if group != 0x0002:
            raise WireError("the file meta holds elements outside group 0002")
        if vr in _LONG_VRS:
            if pos + 12 > length:
                raise WireError("the file meta is malformed")
            n, start = struct.unpack_from("<L", raw, pos + 8)[0], pos + 12
        else:
            n, start = struct.unpack_from("<H", raw, pos + 6)[0], pos + 8
        if start + n > length:
            raise WireError("the file meta is malformed")
        if elem in _WANTED:
            found[_WANTED[elem]] = _uid(raw[start : start + n], _WANTED[elem].replace("_", " "))
        pos = start + n
    missing = [w.replace("_", " ") for w in _WANTED.values() if w not in found]
    if missing:
        raise WireError("the file meta has no " + ", no ".join(missing))
    offset = 144 + length
    if size <= offset:
        raise WireError("the file has no data set")
    return FileMeta(
        found["sop_class"], found["sop_instance"], found["transfer_syntax"], offset, size
    )


def command_set(*elements: tuple[int, bytes]) -> bytes:
    """A command set (group 0000, Implicit VR Little Endian, PS3.7 6.3): the
    (element, value) pairs, given in tag order, after their group length.
    The C-STORE-RQ here, the C-STORE-RSP (store_wire) and the pending
    C-FIND-RSP (find_wire) are all packed by it."""
    body = b"".join(struct.pack("<HHL", 0x0000, el, len(value)) + value for el, value in elements)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def ui(uid: str) -> bytes:
    """A UID value, padded to even length with NUL."""
    raw = str(uid).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def store_command(msg_id: int, sop_class: str, sop_instance: str, priority: int = 0) -> bytes:
    """The C-STORE-RQ command set, Implicit VR Little Endian (PS3.7 9.3.1.1):
    a data set follows; priority 0 is MEDIUM, as DCMTK's storescu sends."""
    return command_set(
        (0x0002, ui(sop_class)),  # Affected SOP Class UID
        (0x0100, struct.pack("<H", 0x0001)),  # Command Field: C-STORE-RQ
        (0x0110, struct.pack("<H", msg_id)),  # Message ID
        (0x0700, struct.pack("<H", priority)),  # Priority
        (0x0800, struct.pack("<H", 0x0001)),  # Command Data Set Type: present
        (0x1000, ui(sop_instance)),  # Affected SOP Instance UID
    )


def parse_store_response(pdv: bytes) -> tuple[int, int] | None:
    """(message ID responded to, status) of a C-STORE-RSP carried whole in
    one command PDV (control byte first), or None for anything else, which
    then goes to pynetdicom's own decoder (it validates and rejects)."""
    if len(pdv) < 13 or pdv[0] != 0x03 or len(pdv) > 1 + 4096:
        return None
    values: dict[int, bytes] = {}
    pos, end = 1, len(pdv)
    while pos < end:
        if pos + 8 > end:
            return None
        group, elem, n = struct.unpack_from("<HHL", pdv, pos)
        pos += 8
        if group != 0x0000 or pos + n > end or elem in values:
            return None
        values[elem] = pdv[pos : pos + n]
        pos += n
    fields = [values.get(e, b"") for e in (0x0100, 0x0800, 0x0120, 0x0900)]
    if any(len(f) != 2 for f in fields):
        return None
    command, data_set, msg_id, status = (struct.unpack("<H", f)[0] for f in fields)
    if command != 0x8001 or data_set != 0x0101:
        return None
    return msg_id, status


def fragment_size(max_pdu: int) -> int:
    """Data bytes per PDV for the peer's maximum PDU length (0: no limit)."""
    if max_pdu == 0:
        return BLOCK
    if max_pdu < MIN_PDU:
        raise WireError(f"the peer's maximum PDU length {max_pdu} is below {MIN_PDU}")
    return min(max_pdu - 6, BLOCK)


def _frame(
    parts: list[bytes | memoryview],
    ctx: int,
    data: memoryview,
    frag: int,
    more: int,
    last: int | None,
) -> None:
    """Append PDUs carrying ``data``: each fragment flagged ``more``, the very
    last one ``last`` (None: the message continues after this data)."""
    end = len(data)
    for off in range(0, end, frag):
        chunk = data[off : off + frag]
        n = len(chunk)
        control = last if last is not None and off + n == end else more
        parts.append(_PDU_HEAD.pack(0x04, 0, n + 6, n + 2, ctx, control))
        parts.append(chunk)


def send_message(
    send: Callable[[bytes], None],
    ctx: int,
    max_pdu: int,
    command: bytes,
    source: BinaryIO,
    length: int,
) -> None:
    """Send a command set and ``length`` data set bytes read from ``source``'s
    position, as P-DATA-TF PDUs no longer than ``max_pdu``; raises WireError
    if the source ends early (the message is then cut: abort the association)."""
    frag = fragment_size(max_pdu)
    per_block = max(1, BLOCK // frag) * frag
    parts: list[bytes | memoryview] = []
    _frame(parts, ctx, memoryview(command), frag, 0x01, 0x03)
    remaining = length
    while remaining > 0:
        want = min(per_block, remaining)
        data = source.read(want)
        while len(data) < want:  # a file read is short only at its end
            more = source.read(want - len(data))
            if not more:
                raise WireError("the file shrank while it was sent")
            data += more
        remaining -= want
        _frame(parts, ctx, memoryview(data), frag, 0x00, 0x02 if remaining == 0 else None)
        send(b"".join(parts))
        parts = []
