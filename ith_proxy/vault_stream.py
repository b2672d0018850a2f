"""Raw input encrypted at rest: chunked Fernet files under the vault key.

Received instances (with ``[spool] encrypt_incoming``) and everything in
``quarantine/`` may hold PHI, so they are stored in this format::

    ITH-PROXY-ENCRYPTED v1 chunk=1048576\\n      the magic first line
    <Fernet token>\\n                            one line per plaintext chunk
    ...

Each token holds an 8-byte chunk index, a last-chunk flag and up to ``chunk``
plaintext bytes.  Every chunk but the last is exactly ``chunk`` bytes, and a
Fernet token's length depends only on its plaintext's length, so every line
but the last has the same length: chunk *i* starts at a computable offset,
which makes the file seekable without an index and lets a reader decrypt
only the chunks it touches, one at a time (a 1 GB instance is never held in
memory).  The index and the flag catch reordered, dropped or truncated
chunks.  A plaintext DICOM file can never start with the magic line (its
preamble is followed by ``DICM``; ours are zeroed), so the two kinds can sit
side by side in ``incoming/`` and the setting can be toggled at any time.

Keys come from ``vault.Keyring``: the first key encrypts, all decrypt.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from .vault import DecryptError, Keyring

__all__ = ["CHUNK", "EncryptedFileError", "Keyring", "DecryptingReader", "decrypt_to",
           "digest", "encrypt_stream", "export_plain", "is_encrypted", "open_source",
           "reencrypt", "seal"]

MAGIC = b"ITH-PROXY-ENCRYPTED v1 chunk="
CHUNK = 1 << 20
_MIN_CHUNK, _MAX_CHUNK = 4096, 64 << 20
_CHUNK_HEAD = struct.Struct(">QB")  # chunk index, 1 if last


class EncryptedFileError(ValueError):
    """An encrypted file cannot be read (wrong key, corrupt, truncated).

    Messages name no content, only what is wrong and where.
    """


def token_line_length(chunk: int) -> int:
    """Bytes in the line of a full chunk: the Fernet token of (head + chunk) plus newline."""
    plain = _CHUNK_HEAD.size + chunk
    raw = 1 + 8 + 16 + (plain // 16 + 1) * 16 + 32  # version, time, IV, AES-CBC, HMAC
    return (raw + 2) // 3 * 4 + 1                    # urlsafe base64 with padding, "\n"


def header_line(chunk: int = CHUNK) -> bytes:
    return MAGIC + str(chunk).encode() + b"\n"


def is_encrypted(path: Path | str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def _parse_header(head: bytes) -> tuple[int, int]:
    """(chunk size, length of the header line) from a file's first bytes."""
    end = head.find(b"\n")
    if not head.startswith(MAGIC) or end < 0:
        raise EncryptedFileError("not an encrypted spool file")
    try:
        chunk = int(head[len(MAGIC):end])
    except ValueError:
        chunk = 0
    if not _MIN_CHUNK <= chunk <= _MAX_CHUNK:
        raise EncryptedFileError("encrypted file has a bad header line")
    return chunk, end + 1


def _token_line(keyring: Keyring, index: int, payload: bytes | memoryview, last: bool,
                chunk: int, line_len: int) -> bytes:
    token = keyring.encrypt(b"".join((_CHUNK_HEAD.pack(index, last), payload)))
    if len(payload) == chunk and len(token) + 1 != line_len:
        # the seek arithmetic relies on it; never write a file it would misread
        raise RuntimeError(f"Fernet token of a full chunk is {len(token)} bytes, "
                           f"expected {line_len - 1}")
    return token + b"\n"


def encrypt_stream(keyring: Keyring, pieces: Iterable[bytes | memoryview],
                   chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield the encrypted file (header line, then token lines) for the
    concatenation of ``pieces``.  Holds at most two chunks at a time: a full
    chunk waits until the next byte shows whether it was the last."""
    line_len = token_line_length(chunk)
    yield header_line(chunk)
    index = 0
    held: bytes | memoryview | None = None
    buf = bytearray()
    for piece in pieces:
        mv = memoryview(piece).cast("B")
        while len(mv):
            if not buf and len(mv) >= chunk:
                full, mv = mv[:chunk], mv[chunk:]
            else:
                take = chunk - len(buf)
                buf += mv[:take]
                mv = mv[take:]
                if len(buf) < chunk:
                    continue
                full, buf = bytes(buf), bytearray()
            if held is not None:
                yield _token_line(keyring, index, held, False, chunk, line_len)
                index += 1
            held = full
    if held is not None and buf:
        yield _token_line(keyring, index, held, False, chunk, line_len)
        index += 1
        held = None
    yield _token_line(keyring, index, held if held is not None else bytes(buf), True,
                      chunk, line_len)


class DecryptingReader(io.RawIOBase):
    """A seekable, read-only plaintext view of an encrypted file.

    Only the chunk being read is decrypted and held.  Opening it decrypts
    the last chunk (which gives the plaintext size and proves the key and
    the file's completeness) and the first (where the DICOM header is).
    """

    def __init__(self, path: Path | str, keyring: Keyring) -> None:
        super().__init__()
        self.name = str(path)  # pydicom records it as the dataset's filename
        self._keyring = keyring
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._chunk, self._base = _parse_header(os.pread(self._fd, 64, 0))
            self._line = token_line_length(self._chunk)
            self._end = os.fstat(self._fd).st_size
            body = self._end - self._base
            if body <= 0:
                raise EncryptedFileError("encrypted file has no content")
            self._count = -(-body // self._line)
            self._cached: tuple[int, memoryview] | None = None
            last = self.payload(self._count - 1)
            self._size = (self._count - 1) * self._chunk + len(last)
            self.payload(0)
        except BaseException:
            self.close()
            raise
        self._pos = 0

    @property
    def size(self) -> int:
        return self._size

    def payload(self, i: int) -> memoryview:
        """Plaintext of chunk ``i`` (valid until the next call)."""
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
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
        data = memoryview(plain)[_CHUNK_HEAD.size:]
        if index != i or flag != last or (not last and len(data) != self._chunk):
            raise EncryptedFileError(f"encrypted file has chunks missing or out of order "
                                     f"at chunk {i}")
        self._cached = (i, data)
        return data

    def chunks(self) -> Iterator[memoryview]:
        """Every chunk's plaintext, in order (each valid until the next)."""
        for i in range(self._count):
            yield self.payload(i)

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

    def readinto(self, b) -> int:  # type: ignore[override]
        if self._pos >= self._size:
            return 0
        i, off = divmod(self._pos, self._chunk)
        data = self.payload(i)
        out = memoryview(b).cast("B")
        n = min(len(out), len(data) - off)
        out[:n] = data[off:off + n]
        self._pos += n
        return n

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)
        self._cached = None
        super().close()


def open_source(path: Path | str, keyring: Keyring) -> BinaryIO:
    """Open a raw input file for reading plaintext, whichever kind it is.

    A plaintext file comes back as a plain file object (so the kernel can
    copy its pixel bytes); an encrypted one as a buffered decrypting reader.
    """
    fh = open(path, "rb")
    if fh.read(len(MAGIC)) != MAGIC:
        fh.seek(0)
        return fh
    fh.close()
    return io.BufferedReader(DecryptingReader(path, keyring), buffer_size=1 << 16)


def _plain_chunks(path: Path, keyring: Keyring) -> Iterator[bytes | memoryview]:
    if is_encrypted(path):
        with DecryptingReader(path, keyring) as reader:
            yield from reader.chunks()
    else:
        with open(path, "rb") as fh:
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
    """Encrypt a raw input file (plaintext or already encrypted) into ``out``;
    return the plaintext's ``size`` and ``sha256``."""
    info: dict = {}
    for part in encrypt_stream(keyring, _hashed(_plain_chunks(Path(src), keyring), info)):
        out.write(part)
    return info


def reencrypt(src: Path, out: BinaryIO, keyring: Keyring) -> dict:
    """Key rotation: the same plaintext under the keyring's first key."""
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
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            info = decrypt_to(src, fh, keyring)
            fh.flush()
            os.fsync(fh.fileno())
        if sha256 and info["sha256"] != sha256:
            raise EncryptedFileError("the decrypted copy does not match the sha256 "
                                     "recorded at quarantine time")
        os.link(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return info
