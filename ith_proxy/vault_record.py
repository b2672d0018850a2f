"""The record lines of ``spool/vault.phi``: the v2 format written today, the
v1 (Fernet) format still read, and re-encrypting either in place of itself.

Every record is one line; its id is its byte offset.  Two formats share the
file:

- **v1** (read only): a Fernet token over the JSON record, in which a binary
  value was ``{"hex": "..."}``.  Read back, such a value is ``bytes``.
- **v2** (written): ``V2 `` + standard base64 of
  ``key id (8) || nonce (12) || AES-256-GCM(payload) || tag (16)`` + newline,
  under the keyring's AES-GCM key (the one ``vault_stream`` uses, named by
  the same key id) with associated data ``ith-proxy vault record v2`` and the
  record's offset (8 bytes, big-endian): a record moved to another offset, or
  a raw-input chunk pasted in, does not authenticate.  The payload is
  ``u32 length || JSON`` followed by the binary values raw, each ``u64
  length || bytes``; in the JSON a binary value is ``{"bin": i}`` (its
  index), so a dict whose only key is ``"bin"`` may not be stored.

A v2 line is 4/3 of the value plus a small constant (a 20 MB value makes a
26.7 MB line, not the 53 MB of hex in Fernet), and it is sealed and encoded
in pieces of ``PIECE`` bytes, so writing it costs memory for one piece, not
for copies of the value.  GCM and base64 keep lengths, so a re-encrypted
line is as long as the old one and every offset stays valid.
"""

from __future__ import annotations

import binascii
import json
import struct
from typing import BinaryIO, Iterable, Iterator, Protocol, Sequence

MAGIC = b"V2 "
RECORD_AAD = b"ith-proxy vault record v2"
PIECE = 3 << 18            # sealed bytes per base64 piece (768 KiB -> 1 MiB of text)
_HEAD = 8 + 12             # key id || nonce
_TAG = 16
_U32, _U64, _OFFSET = struct.Struct(">I"), struct.Struct(">Q"), struct.Struct(">Q")
_BIN = "bin"


class LengthChanged(RuntimeError):
    """A re-encrypted record would not keep its length (vault.VaultRecordError)."""


class _Keyring(Protocol):  # vault.Keyring, without importing it
    def decrypt(self, token: bytes) -> bytes: ...
    def encrypt(self, data: bytes) -> bytes: ...
    def seal_record(self, parts: Sequence[bytes | bytearray], aad: bytes) -> Iterator[bytes]: ...
    def open_record(self, key_id: bytes, nonce: bytes, pieces: Iterable[bytes | memoryview],
                    tag: bytes, aad: bytes, out: bytearray) -> None: ...
    def open_chunk(self, key_id: bytes, sealed: bytes | memoryview, aad: bytes,
                   out: bytearray | memoryview) -> None: ...


def _aad(offset: int) -> bytes:
    return RECORD_AAD + _OFFSET.pack(offset)


# --- writing ---

def frame(record: dict) -> list[bytes | bytearray]:
    """The v2 payload of a record, as parts (the binary values are not copied)."""
    values: list[bytes | bytearray] = []

    def binary(obj: object) -> dict:
        if isinstance(obj, (bytes, bytearray)):
            values.append(obj)
            return {_BIN: len(values) - 1}
        raise TypeError(f"a vault record cannot hold a {type(obj).__name__}")
    text = json.dumps(record, sort_keys=True, default=binary).encode()
    # sort_keys puts "bin" first; a quote inside a string is escaped, so each
    # '{"bin": ' is a dict that starts with that key
    if text.count(b'{"bin": ') != len(values) and _reserved(record):
        raise ValueError('a vault record may not hold a dict whose only key is "bin"')
    parts: list[bytes | bytearray] = [_U32.pack(len(text)) + text]
    for value in values:
        parts += [_U64.pack(len(value)), value]
    return parts


def _reserved(obj: object) -> bool:
    if isinstance(obj, dict):
        return set(obj) == {_BIN} or any(_reserved(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_reserved(v) for v in obj)
    return False


def seal(parts: Sequence[bytes | bytearray], keyring: _Keyring, offset: int) -> Iterator[bytes]:
    """The v2 line for the payload ``parts`` at ``offset``, in pieces (one, if small)."""
    sealed = keyring.seal_record(parts, _aad(offset))
    if sum(len(p) for p in parts) <= PIECE:
        return iter((MAGIC + binascii.b2a_base64(b"".join(sealed), newline=False) + b"\n",))
    return _encoded(sealed)


def _encoded(sealed: Iterable[bytes]) -> Iterator[bytes]:
    yield MAGIC
    carry = b""
    for piece in sealed:
        if carry:
            piece = carry + piece
        cut = len(piece) - len(piece) % 3
        if cut:
            yield binascii.b2a_base64(memoryview(piece)[:cut], newline=False)
        carry = piece[cut:]
    yield binascii.b2a_base64(carry, newline=False) + b"\n"


# --- reading ---

def read_line(fh: BinaryIO) -> bytes | bytearray:
    """The line at ``fh``'s position (newline included; b"" at the end),
    read once into one buffer: a long line is measured in pieces first, so
    it is never also held as a list of chunks being joined."""
    first = fh.readline(PIECE)
    if len(first) < PIECE or first.endswith(b"\n"):
        return first
    start, length = fh.tell() - len(first), len(first)
    while True:
        piece = fh.readline(PIECE)
        length += len(piece)
        if len(piece) < PIECE or piece.endswith(b"\n"):
            break
    fh.seek(start)
    line = bytearray(length)
    got = fh.readinto(line)
    return line if got == length else line[:got]


def open_line(line: bytes, keyring: _Keyring, offset: int) -> tuple[int, bytes | bytearray]:
    """(format, decrypted payload) of one line; ValueError if it does not open."""
    if not line.startswith(MAGIC):
        return 1, keyring.decrypt(bytes(line.strip()))
    text = memoryview(line)[len(MAGIC):len(line) - line.endswith(b"\n")]
    size = len(text) // 4 * 3 - bytes(text[-2:]).count(b"=")
    if len(text) % 4 or size < _HEAD + 4 + _TAG:
        raise ValueError("torn or malformed")
    if len(text) <= PIECE // 3 * 4:  # small: decode, then open in one call
        blob = binascii.a2b_base64(text, strict_mode=True)
        out = bytearray(size - _HEAD - _TAG)
        keyring.open_chunk(blob[:8], memoryview(blob)[8:], _aad(offset), out)
        return 2, out
    head = binascii.a2b_base64(text[:28], strict_mode=True)
    tail = binascii.a2b_base64(text[-28:], strict_mode=True)
    out = bytearray(size - _HEAD - _TAG)

    def ciphertext() -> Iterator[memoryview]:
        at, step = 0, PIECE // 3 * 4
        for i in range(0, len(text), step):
            piece = binascii.a2b_base64(text[i:i + step], strict_mode=True)
            lo, hi = max(_HEAD - at, 0), min(size - _TAG - at, len(piece))
            if hi > lo:
                yield memoryview(piece)[lo:hi]
            at += len(piece)
    keyring.open_record(head[:8], head[8:_HEAD], ciphertext(), tail[-_TAG:], _aad(offset), out)
    return 2, out


def _from_hex(obj: dict) -> object:
    if len(obj) == 1 and isinstance(obj.get("hex"), str):
        return bytes.fromhex(obj["hex"])
    return obj


def parse(version: int, payload: bytes | bytearray) -> dict:
    """The record from an opened payload; binary values are ``bytes`` in both formats."""
    if version == 1:
        return json.loads(payload, object_hook=_from_hex)
    view = memoryview(payload)
    end = 4 + _U32.unpack_from(view)[0]
    values, at = [], end
    while at < len(view):
        n = _U64.unpack_from(view, at)[0]
        at += 8
        if at + n > len(view):
            raise ValueError("payload framing")
        values.append(bytes(view[at:at + n]))
        at += n

    def binary(obj: dict) -> object:
        return values[obj[_BIN]] if len(obj) == 1 and _BIN in obj else obj
    return json.loads(bytes(view[4:end]), object_hook=binary if values else None)


# --- key rotation ---

def reencrypt_records(src: BinaryIO, out: BinaryIO, keyring: _Keyring) -> tuple[int, list[int]]:
    """Rotation step (b) for vault.phi: copy every record line to ``out`` under
    the keyring's first key, each in its own format; return (records
    re-encrypted, offsets kept as they were).

    Every re-encrypted line has the length of the original (a Fernet token's
    length depends only on the plaintext's, GCM and base64 keep lengths), so
    every record keeps its byte offset and the catalog stays valid; this is
    checked for each line, and a mismatch aborts before anything is replaced.
    A line that does not decrypt (torn by a crash, corrupt) is copied unchanged.
    """
    offset, done, kept = 0, 0, []
    while line := read_line(src):
        length = len(line)
        if not line.isspace():  # (strip would copy a large line)
            try:
                version, payload = open_line(line, keyring, offset)
            except ValueError:
                kept.append(offset)
                out.write(line)
            else:
                if version == 1:
                    token = line.strip()
                    at = line.index(token)
                    pieces: Iterable[bytes] = [
                        line[:at], keyring.encrypt(payload), line[at + len(token):]]
                else:
                    del line
                    pieces = seal([payload], keyring, offset)
                written = 0
                for piece in pieces:
                    written += len(piece)
                    if written <= length:
                        out.write(piece)
                if written != length:
                    raise LengthChanged(
                        f"re-encrypting the vault record at offset {offset} would move it "
                        f"({length} -> {written} bytes); the vault was not changed")
                done += 1
        else:
            out.write(line)
        offset += length
    return done, kept
