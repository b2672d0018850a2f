"""The PHI vault, ``spool/vault.phi``: an append-only file of encrypted
records (``Vault``), their line formats (v2 written today, v1 Fernet still
read), and re-encrypting either in place of itself for key rotation.

Every record is one line; its id is its byte offset, which the catalog keeps.
Records are never rewritten in place; a torn last line left by a crash is
sealed with a newline and reads as one corrupt record, while every other
record still decrypts.  Binary values are stored raw (4/3 of their size after
base64) and read back as ``bytes``.  The keys come from ``vault.keys``.
Two formats share the file:

- **v1** (read only): a Fernet token over the JSON record, in which a binary
  value was ``{"hex": "..."}``.  Read back, such a value is ``bytes``.
- **v2** (written): ``V2 `` + standard base64 of
  ``key id (8) || nonce (12) || AES-256-GCM(payload) || tag (16)`` + newline,
  under the keyring's AES-GCM key (the one ``vault.stream`` uses, named by
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
import fcntl
import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from io import BufferedReader
from pathlib import Path
from typing import BinaryIO

from ith_proxy.fsio import append_whole
from ith_proxy.vault.keys import Keyring

MAGIC = b"V2 "
RECORD_AAD = b"ith-proxy vault record v2"
PIECE = 3 << 18  # sealed bytes per base64 piece (768 KiB -> 1 MiB of text)
_HEAD = 8 + 12  # key id || nonce
_TAG = 16
_U32, _U64, _OFFSET = struct.Struct(">I"), struct.Struct(">Q"), struct.Struct(">Q")
_BIN = "bin"


class VaultRecordError(RuntimeError):
    """One record cannot be read (or, re-encrypted, would not keep its length);
    the others are unaffected."""


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


def seal(parts: Sequence[bytes | bytearray], keyring: Keyring, offset: int) -> Iterator[bytes]:
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


def read_line(fh: BufferedReader) -> bytes | bytearray:
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


def open_line(
    line: bytes | bytearray, keyring: Keyring, offset: int
) -> tuple[int, bytes | bytearray]:
    """(format, decrypted payload) of one line; ValueError if it does not open."""
    if not line.startswith(MAGIC):
        return 1, keyring.decrypt(bytes(line.strip()))
    text = memoryview(line)[len(MAGIC) : len(line) - line.endswith(b"\n")]
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
            piece = binascii.a2b_base64(text[i : i + step], strict_mode=True)
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
        values.append(bytes(view[at : at + n]))
        at += n

    def binary(obj: dict) -> object:
        return values[obj[_BIN]] if len(obj) == 1 and _BIN in obj else obj

    return json.loads(bytes(view[4:end]), object_hook=binary if values else None)


# --- key rotation ---


def reencrypt_records(
    src: BufferedReader, out: BinaryIO, keyring: Keyring
) -> tuple[int, list[int]]:
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
                    pieces: Iterable[bytes | bytearray] = [
                        line[:at],
                        keyring.encrypt(bytes(payload)),
                        line[at + len(token) :],
                    ]
                else:
                    del line
                    pieces = seal([payload], keyring, offset)
                written = 0
                for piece in pieces:
                    written += len(piece)
                    if written <= length:
                        out.write(piece)
                if written != length:
                    raise VaultRecordError(
                        f"re-encrypting the vault record at offset {offset} would move it "
                        f"({length} -> {written} bytes); the vault was not changed"
                    )
                done += 1
        else:
            out.write(line)
        offset += length
    return done, kept


class Vault:
    def __init__(self, path: Path, key_file: Path) -> None:
        self.path = Path(path)
        self.key_file = Path(key_file)
        self.keyring = Keyring.load(self.key_file)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def _open_append(self) -> int:
        if self._fd is None:
            self._fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600
            )
        return self._fd

    def put(self, record: dict) -> int:
        """Append one record; return its offset.  Call sync() before relying on it.

        The record is JSON plus ``bytes``/``bytearray`` values, which are stored
        raw (v2); a large one is sealed and written piece by
        piece, so memory never holds an encoded copy of it.

        Several processes may append (``[indexer] processes``): the file's
        ``flock`` is held from reading its length (the record's offset, which
        its seal authenticates) to the end of the write, and a tail torn by a
        writer that died mid-record is sealed with a newline first."""
        parts = frame(record)
        with self._lock:
            fd = self._open_append()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                offset = os.fstat(fd).st_size
                if offset and os.pread(fd, 1, offset - 1) != b"\n":
                    os.write(fd, b"\n")  # seal a torn record from a crash
                    offset += 1
                # one write if small, else one per ~1 MiB piece; all or nothing
                append_whole(fd, seal(parts, self.keyring, offset), offset)
            except BaseException:
                os.close(fd)  # drops the flock
                self._fd = None
                raise
            fcntl.flock(fd, fcntl.LOCK_UN)
        return offset

    def sync(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _open(self, offset: int, line: bytes | bytearray) -> tuple[int, bytes | bytearray]:
        try:
            return open_line(line, self.keyring, offset)
        except ValueError:  # DecryptError, base64, framing
            raise VaultRecordError(
                f"vault record at offset {offset} is corrupt or was written under an unknown key"
            ) from None

    def _parse(self, offset: int, opened: tuple[int, bytes | bytearray]) -> dict:
        try:
            return parse(*opened)
        except (ValueError, IndexError, KeyError, TypeError):
            raise VaultRecordError(f"vault record at offset {offset} is corrupt") from None

    def get(self, offset: int, study: str | None = None, sop: str | None = None) -> dict:
        """The record at ``offset``.  Given the (anonymized) study and SOP
        Instance UID of the instance that asks, a record that is another
        instance's is refused (VaultRecordError), never handed out."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                fh.seek(offset)  # the line is dropped before the record is parsed
                opened = self._open(offset, read_line(fh))
        except FileNotFoundError:
            raise VaultRecordError("the vault file does not exist") from None
        record = self._parse(offset, opened)
        if (sop is not None and record.get("sop") != sop) or (
            study is not None and record.get("study") != study
        ):
            raise VaultRecordError(f"vault record at offset {offset} belongs to another instance")
        return record

    def scan(self) -> Iterator[tuple[int, dict | VaultRecordError]]:
        """Yield (offset, record) for every record; a bad one yields its error."""
        try:
            fh = os.fdopen(os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW), "rb")
        except FileNotFoundError:
            return
        with fh:
            offset = 0
            opened: tuple[int, bytes | bytearray] | None
            while line := read_line(fh):
                length = len(line)
                if not line.isspace():  # (strip would copy a large line)
                    try:
                        opened = self._open(offset, line)
                        del line
                        yield offset, self._parse(offset, opened)
                    except VaultRecordError as exc:
                        yield offset, exc
                    opened = None
                offset += length
