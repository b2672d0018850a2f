"""Raw input encrypted at rest: chunked AES-256-GCM files under the vault key.

Received instances (with ``[spool] encrypt_incoming``) and everything in
``quarantine/`` may hold PHI, so they are stored in this format (v2)::

    ITH-PROXY-ENCRYPTED v2\\n            magic line (23 bytes)
    >I chunk size, 8-byte key id, 16-byte random file id     (28 bytes)
    nonce(12) || AES-256-GCM(chunk 0) || tag(16)
    ...
    nonce(12) || AES-256-GCM(last chunk, 0..chunk bytes) || tag(16)

Every chunk but the last holds exactly ``chunk`` plaintext bytes, so chunk
*i* starts at ``51 + i * (chunk + 28)``: the file is seekable without an
index, the plaintext size follows from the file size, and a reader holds
one chunk at a time.  Each chunk's associated data is the whole header
(version, chunk size, key id, file id) plus its index and a last-chunk
flag, so a chunk that is flipped, moved, dropped, cut short or taken from
another file does not authenticate, nor does a file truncated at a chunk
boundary (its new last chunk was sealed as "not last").  The key id names
which key of the keyring sealed the file (``vault.Keyring``: the first key
writes, all keys read); the AES-GCM key is derived from the vault key in
``vault``, the only room that touches the cryptography library.

Files written before v2 (``ITH-PROXY-ENCRYPTED v1 chunk=N`` and one Fernet
token per line, each holding an 8-byte chunk index, a last-chunk flag and
the chunk) are still read; writers produce v2 only, and key rotation
rewrites v1 files as v2.  A plaintext DICOM file never starts with either
magic (its preamble is followed by ``DICM``; ours are zeroed), so both kinds
can sit side by side in ``incoming/`` and the setting can be toggled at any
time.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ith_proxy.fsio import fsync_dir, open_read, write_private
from ith_proxy.vault.keys import STREAM_KEY_ID, STREAM_OVERHEAD, DecryptError, Keyring

__all__ = [
    "CHUNK",
    "DecryptingReader",
    "EncryptedFileError",
    "EncryptingWriter",
    "Keyring",
    "decrypt_to",
    "digest",
    "encrypt_stream",
    "encryptor",
    "export_plain",
    "is_encrypted",
    "open_source",
    "reencrypt",
    "seal",
]

MAGIC = b"ITH-PROXY-ENCRYPTED v"  # common prefix of every version
MAGIC_V1 = b"ITH-PROXY-ENCRYPTED v1 chunk="
MAGIC_V2 = b"ITH-PROXY-ENCRYPTED v2\n"
CHUNK = 1 << 20
_MIN_CHUNK, _MAX_CHUNK = 4096, 64 << 20
_V2_FIELDS = struct.Struct(f">I{STREAM_KEY_ID}s16s")  # chunk size, key id, file id
HEADER_V2 = len(MAGIC_V2) + _V2_FIELDS.size
_CHUNK_HEAD = struct.Struct(">QB")  # chunk index, 1 if last (v2: in the AAD; v1: in the token)
_NO_BUFFER = memoryview(b"")  # a reader's reused buffers, for v1 and once closed


class EncryptedFileError(ValueError):
    """An encrypted file cannot be read (wrong key, corrupt, truncated).

    Messages name no content, only what is wrong and where.
    """


def _has_magic(head: bytes) -> bool:
    """Whether a file's first ``len(MAGIC_V1)`` bytes say it is encrypted (v1 or v2)."""
    return head.startswith(MAGIC_V2) or head == MAGIC_V1


def is_encrypted(path: Path | str) -> bool:
    with open_read(path) as fh:
        return _has_magic(fh.read(len(MAGIC_V1)))


def encrypt_stream(
    keyring: Keyring, pieces: Iterable[bytes | memoryview], chunk: int = CHUNK
) -> Iterator[bytes | bytearray]:
    """Yield the v2 encrypted file (header, then one sealed chunk at a time)
    for the concatenation of ``pieces``, under the keyring's first key.

    A chunk is sealed once it is known whether it is the last, straight from
    the pieces' memory (GCM runs over the parts of a chunk in turn).  Pieces
    given as a list or tuple are never copied; from any other iterable, the
    tail of a piece that must wait for the next piece is copied first, so a
    producer may reuse a piece's memory (the decrypting reader does).
    """
    header = MAGIC_V2 + _V2_FIELDS.pack(chunk, keyring.stream_key_id, os.urandom(16))
    yield header
    stable = isinstance(pieces, (list, tuple))
    index, fill = 0, 0
    held: list[bytes | memoryview] = []  # the parts of the chunk being filled

    def sealed(last: bool) -> bytes | bytearray:
        return keyring.seal_chunk(held, header + _CHUNK_HEAD.pack(index, last))

    for piece in pieces:
        mv = memoryview(piece).cast("B")
        while len(mv):
            if fill == chunk:  # a full chunk is held and more bytes follow: not the last
                yield sealed(False)
                index, fill, held = index + 1, 0, []
            take = min(chunk - fill, len(mv))
            part, mv = mv[:take], mv[take:]
            held.append(part if stable or len(mv) else bytes(part))
            fill += take
    yield sealed(True)


class EncryptingWriter:
    """Push-style twin of ``encrypt_stream``: the same v2 file, written as
    plaintext arrives (the SCP feeds it received fragments).

    ``out(parts)`` gets what to append to the file, as a list of buffers: the
    header with the first sealed chunk, then one sealed chunk at a time.  A
    chunk is sealed once it is known whether it is the last (``close()``
    seals the last, possibly empty).  The writer keeps the buffers given to
    ``write`` until their chunk is sealed, without copying them, so they must
    not change meanwhile (bytes do not); it holds at most one chunk.
    """

    def __init__(self, keyring: Keyring, out: Callable[[list], object], chunk: int = CHUNK) -> None:
        self._keyring, self._out, self._chunk = keyring, out, chunk
        self._header = MAGIC_V2 + _V2_FIELDS.pack(chunk, keyring.stream_key_id, os.urandom(16))
        self._pending: list[bytes | bytearray] = [self._header]  # not yet handed to out
        self._held: list[bytes | memoryview] = []  # the parts of the chunk being filled
        self._fill = self._index = 0

    def _seal(self, last: bool) -> None:
        aad = self._header + _CHUNK_HEAD.pack(self._index, last)
        self._pending.append(self._keyring.seal_chunk(self._held, aad))
        self._out(self._pending)
        self._pending, self._held, self._fill = [], [], 0
        self._index += 1

    def write(self, data: bytes | memoryview) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            if self._fill == self._chunk:  # full, and more bytes follow: not the last
                self._seal(False)
            take = min(self._chunk - self._fill, len(mv))
            self._held.append(mv[:take])
            mv = mv[take:]
            self._fill += take

    def close(self) -> None:
        """Seal the last chunk and hand it out; the file is then complete."""
        self._seal(True)


def encryptor(keyring: Keyring) -> Callable[[Callable[[list], object]], EncryptingWriter]:
    """A stream-encryptor factory for the SCP: ``factory(out)`` makes an
    ``EncryptingWriter`` under the keyring's first key."""
    return lambda out: EncryptingWriter(keyring, out)


def token_line_length(chunk: int) -> int:
    """v1: bytes in the line of a full chunk (Fernet token of head + chunk, newline)."""
    plain = _CHUNK_HEAD.size + chunk
    raw = 1 + 8 + 16 + (plain // 16 + 1) * 16 + 32  # version, time, IV, AES-CBC, HMAC
    return (raw + 2) // 3 * 4 + 1  # urlsafe base64 with padding, "\n"


def _parse_v1_header(head: bytes) -> tuple[int, int]:
    """(chunk size, length of the header line) from a v1 file's first bytes."""
    end = head.find(b"\n")
    if not head.startswith(MAGIC_V1) or end < 0:
        raise EncryptedFileError("not an encrypted spool file")
    try:
        chunk = int(head[len(MAGIC_V1) : end])
    except ValueError:
        chunk = 0
    if not _MIN_CHUNK <= chunk <= _MAX_CHUNK:
        raise EncryptedFileError("encrypted file has a bad header line")
    return chunk, end + 1


class DecryptingReader(io.RawIOBase):
    """A seekable, read-only plaintext view of an encrypted file (v1 or v2).

    Only the chunk being read is decrypted and held (v2: in buffers reused
    from chunk to chunk).  Opening it decrypts the last chunk, which proves
    the key and the file's completeness (and, for v1, gives the size), and
    the first, where the DICOM header is.
    """

    def __init__(self, path: Path | str, keyring: Keyring) -> None:
        super().__init__()
        self.name = str(path)  # pydicom records it as the dataset's filename
        self._keyring = keyring
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        self._cached: tuple[int, memoryview] | None = None
        self._last = self._sealed = self._plain = _NO_BUFFER  # v2: views of one reused buffer
        try:
            head = os.pread(self._fd, 64, 0)
            self._end = os.fstat(self._fd).st_size
            if head.startswith(MAGIC_V2):
                self._open_v2(head)
            else:
                self._open_v1(head)
            self.payload(0)
        except BaseException:
            self.close()
            raise
        self._pos = 0

    def _open_v1(self, head: bytes) -> None:
        self.version = 1
        self._chunk, self._base = _parse_v1_header(head)
        self._line = token_line_length(self._chunk)
        body = self._end - self._base
        if body <= 0:
            raise EncryptedFileError("encrypted file has no content")
        self._count = -(-body // self._line)
        last = self.payload(self._count - 1)
        self._size = (self._count - 1) * self._chunk + len(last)

    def _open_v2(self, head: bytes) -> None:
        self.version = 2
        if len(head) < HEADER_V2:
            raise EncryptedFileError("encrypted file has a bad header")
        self._header = head[:HEADER_V2]
        self._chunk, self._key_id, _ = _V2_FIELDS.unpack_from(head, len(MAGIC_V2))
        if not _MIN_CHUNK <= self._chunk <= _MAX_CHUNK:
            raise EncryptedFileError("encrypted file has a bad header")
        if not self._keyring.has_stream_key(self._key_id):
            raise EncryptedFileError(
                f"the encrypted file was written under a key that is "
                f"not in the key file (key id {self._key_id.hex()})"
            )
        self._base, self._line = HEADER_V2, self._chunk + STREAM_OVERHEAD
        body = self._end - self._base
        if body <= 0:
            raise EncryptedFileError("encrypted file has no content")
        self._count = -(-body // self._line)
        last_line = body - (self._count - 1) * self._line
        if last_line < STREAM_OVERHEAD:
            raise EncryptedFileError(f"encrypted file is damaged at chunk {self._count - 1}")
        self._size = (self._count - 1) * self._chunk + last_line - STREAM_OVERHEAD
        # one allocation per file, reused for every chunk: a sealed record, the
        # plaintext of the chunk being read and (if it is another) of the last
        line_cap = min(self._line, body)
        work = self._chunk if self._count > 1 else 0
        buf = memoryview(bytearray(line_cap + work + last_line - STREAM_OVERHEAD))
        self._sealed, self._plain = buf[:line_cap], buf[line_cap : line_cap + work]
        self._last = self._open_chunk(self._count - 1, buf[line_cap + work :])

    def _open_chunk(self, i: int, out: memoryview) -> memoryview:
        """v2: read chunk ``i``'s record, authenticate and decrypt it into ``out``."""
        n = len(out) + STREAM_OVERHEAD
        sealed = self._sealed[:n]
        if os.preadv(self._fd, [sealed], self._base + i * self._line) != n:
            raise EncryptedFileError(f"encrypted file is damaged at chunk {i}")
        aad = self._header + _CHUNK_HEAD.pack(i, i == self._count - 1)
        try:
            self._keyring.open_chunk(self._key_id, sealed, aad, out)
        except DecryptError as exc:
            raise EncryptedFileError(f"chunk {i} of the encrypted file is {exc}") from None
        return out

    @property
    def size(self) -> int:
        return self._size

    def payload(self, i: int) -> memoryview:
        """Plaintext of chunk ``i`` (valid until the next call)."""
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        if self.version == 2:
            if i == self._count - 1:
                return self._last
            data = self._open_chunk(i, self._plain)
        else:
            data = self._payload_v1(i)
        self._cached = (i, data)
        return data

    def _payload_v1(self, i: int) -> memoryview:
        start = self._base + i * self._line
        line = os.pread(self._fd, min(self._line, self._end - start), start)
        last = i == self._count - 1
        if not line.endswith(b"\n") or (not last and len(line) != self._line):
            raise EncryptedFileError(f"encrypted file is damaged at chunk {i}")
        try:
            plain = self._keyring.decrypt(line[:-1])
        except DecryptError as exc:
            raise EncryptedFileError(f"chunk {i} of the encrypted file is {exc}") from None
        if len(plain) < _CHUNK_HEAD.size:
            raise EncryptedFileError(f"encrypted file is damaged at chunk {i}")
        index, flag = _CHUNK_HEAD.unpack_from(plain)
        data = memoryview(plain)[_CHUNK_HEAD.size :]
        if index != i or flag != last or (not last and len(data) != self._chunk):
            raise EncryptedFileError(
                f"encrypted file has chunks missing or out of order at chunk {i}"
            )
        return data

    def chunks(self) -> Iterator[memoryview]:
        """Every chunk's plaintext, in order (each valid until the next)."""
        for i in range(self._count):
            yield self.payload(i)

    def copy_range(self, out: BinaryIO, start: int, length: int) -> None:
        """Write plaintext bytes [start, start + length) to ``out``, a chunk at a
        time straight from the decrypted chunk (no copy through a read buffer)."""
        if start + length > self._size:
            raise EncryptedFileError("read past the end of the encrypted file")
        while length > 0:
            i, off = divmod(start, self._chunk)
            piece = self.payload(i)[off : off + length]
            out.write(piece)
            start, length = start + len(piece), length - len(piece)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:  # b: any writable buffer (typeshed: WriteableBuffer)
        if self._pos >= self._size:
            return 0
        i, off = divmod(self._pos, self._chunk)
        data = self.payload(i)
        out = memoryview(b).cast("B")
        n = min(len(out), len(data) - off)
        out[:n] = data[off : off + n]
        self._pos += n
        return n

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)
        self._cached = None
        self._last = self._sealed = self._plain = _NO_BUFFER
        super().close()


class _BufferedDecrypting(io.BufferedReader):
    """A buffered decrypting reader (cheap small reads for the header parser)
    that can also write a byte range straight to a file: ``copy_to``, which
    ``dicom.files`` uses for pixel data instead of read()/write() pairs."""

    def __init__(self, reader: DecryptingReader, buffer_size: int) -> None:
        super().__init__(reader, buffer_size)
        self._reader = reader  # self.raw, typed

    def copy_to(self, out: BinaryIO, length: int) -> None:
        """Write the next ``length`` plaintext bytes to ``out``; advance past them."""
        pos = self.tell()
        self._reader.copy_range(out, pos, length)
        self.seek(pos + length)


def open_source(path: Path | str, keyring: Keyring) -> BinaryIO:
    """Open a raw input file for reading plaintext, whichever kind it is.

    A plaintext file comes back as a plain file object (so the kernel can
    copy its pixel bytes); an encrypted one as a buffered decrypting reader
    with ``copy_to``.
    """
    fh = open_read(path)
    if not _has_magic(fh.read(len(MAGIC_V1))):
        fh.seek(0)
        return fh
    fh.close()
    return _BufferedDecrypting(DecryptingReader(path, keyring), buffer_size=1 << 16)


def _plain_chunks(path: Path, keyring: Keyring) -> Iterator[bytes | memoryview]:
    if is_encrypted(path):
        with DecryptingReader(path, keyring) as reader:
            yield from reader.chunks()
    else:
        with open_read(path) as fh:
            while block := fh.read(CHUNK):
                yield block


def _hashed(pieces: Iterable[bytes | memoryview], info: dict) -> Iterator[bytes | memoryview]:
    h, size = hashlib.sha256(), 0
    for piece in pieces:
        h.update(piece)
        size += len(piece)
        yield piece
    info.update(size=size, sha256=h.hexdigest())


def seal(src: Path, out: BinaryIO, keyring: Keyring) -> dict:
    """Encrypt a raw input file (plaintext, or encrypted in any version) into
    ``out`` as v2 under the keyring's first key; return the plaintext's
    ``size`` and ``sha256``."""
    info: dict = {}
    for part in encrypt_stream(keyring, _hashed(_plain_chunks(Path(src), keyring), info)):
        out.write(part)
    return info


def reencrypt(src: Path, out: BinaryIO, keyring: Keyring) -> dict:
    """Key rotation: the same plaintext, as v2 under the keyring's first key."""
    return seal(src, out, keyring)


def decrypt_to(src: Path, out: BinaryIO, keyring: Keyring) -> dict:
    """Write the plaintext of a raw input file to ``out``; return size and sha256."""
    info: dict = {}
    for piece in _hashed(_plain_chunks(Path(src), keyring), info):
        out.write(piece)
    return info


def digest(src: Path, keyring: Keyring) -> dict:
    """Plaintext size and sha256 of a raw input file, without writing anything."""
    info: dict = {}
    for _ in _hashed(_plain_chunks(Path(src), keyring), info):
        pass
    return info


def export_plain(src: Path, dest: Path, keyring: Keyring, sha256: str | None = None) -> dict:
    """Write a readable copy of ``src`` to ``dest`` (0600, never over an
    existing file): tmp beside it, fsync, checked against ``sha256``, link."""
    dest = Path(dest)
    info: dict = {}
    tmp = write_private(dest, lambda fh: info.update(decrypt_to(src, fh, keyring)))
    try:
        if sha256 and info["sha256"] != sha256:
            raise EncryptedFileError(
                "the decrypted copy does not match the sha256 recorded at quarantine time"
            )
        os.link(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dest.parent)
    return info
