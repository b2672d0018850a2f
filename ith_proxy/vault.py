"""The PHI vault: an append-only file of Fernet-encrypted JSON records.

``spool/vault.phi`` holds one record per line (a Fernet token).  A record's
id is its byte offset, which the catalog keeps.  Records are never rewritten;
a torn last line left by a crash is sealed with a newline and reads as one
corrupt record, while every other record still decrypts.

The key file lives outside the spool, is created 0600 on first run, and is
refused when group or others can read it.  It may hold several keys, one per
line: the first encrypts, all decrypt (MultiFernet), which is what key
rotation builds on.  A second secret beside it keys the pseudonyms.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import threading
from pathlib import Path
from typing import Iterator

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger("ith_proxy.vault")


class VaultKeyError(RuntimeError):
    """The key file is missing, unreadable, malformed or too open."""


class VaultRecordError(RuntimeError):
    """One record cannot be read; the others are unaffected."""


def _load_secret_file(path: Path, make: "callable", what: str) -> bytes:
    """Read a 0600 secret file, creating it (and its 0700 folder) on first use."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(make())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # never overwrite a key another process just made
            log.warning("generated a new %s at %s; back it up, it cannot be recovered", what, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise VaultKeyError(
                f"{what} {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}")
        return path.read_bytes()
    except OSError as exc:
        raise VaultKeyError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_keys(key_file: Path) -> list[bytes]:
    raw = _load_secret_file(key_file, lambda: Fernet.generate_key() + b"\n", "vault key")
    keys = [line.strip() for line in raw.splitlines() if line.strip()]
    if not keys:
        raise VaultKeyError(f"vault key {key_file} is empty")
    for k in keys:
        try:
            Fernet(k)
        except (ValueError, TypeError):
            raise VaultKeyError(f"vault key {key_file} holds a malformed key") from None
    return keys


def load_site_secret(secret_file: Path) -> bytes:
    """The HMAC key behind pseudonyms and UID remapping (stable for the site's life)."""
    raw = _load_secret_file(secret_file, lambda: secrets.token_hex(32).encode() + b"\n",
                            "site secret")
    value = raw.strip()
    if len(value) < 32:
        raise VaultKeyError(f"site secret {secret_file} is too short")
    return value


class Vault:
    def __init__(self, path: Path, key_file: Path) -> None:
        self.path = Path(path)
        self.key_file = Path(key_file)
        self._fernet = MultiFernet([Fernet(k) for k in load_keys(self.key_file)])
        self._lock = threading.Lock()
        self._fd: int | None = None

    def _open_append(self) -> int:
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")  # seal a torn record from a crash
            self._fd = fd
        return self._fd

    def put(self, record: dict) -> int:
        """Append one record; return its offset.  Call sync() before relying on it."""
        token = self._fernet.encrypt(json.dumps(record, sort_keys=True).encode())
        with self._lock:
            fd = self._open_append()
            offset = os.fstat(fd).st_size
            os.write(fd, token + b"\n")
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

    def _decrypt(self, offset: int, line: bytes) -> dict:
        try:
            return json.loads(self._fernet.decrypt(line.strip()))
        except (InvalidToken, ValueError):
            raise VaultRecordError(f"vault record at offset {offset} is corrupt "
                                   "or was written under an unknown key") from None

    def get(self, offset: int) -> dict:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(offset)
                line = fh.readline()
        except FileNotFoundError:
            raise VaultRecordError("the vault file does not exist") from None
        return self._decrypt(offset, line)

    def scan(self) -> Iterator[tuple[int, dict | VaultRecordError]]:
        """Yield (offset, record) for every record; a bad one yields its error."""
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return
        with fh:
            offset = 0
            for line in fh:
                if line.strip():
                    try:
                        yield offset, self._decrypt(offset, line)
                    except VaultRecordError as exc:
                        yield offset, exc
                offset += len(line)
