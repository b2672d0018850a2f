"""The PHI vault: an append-only file of Fernet-encrypted JSON records, and
the vault keys.

``spool/vault.phi`` holds one record per line (a Fernet token).  A record's
id is its byte offset, which the catalog keeps.  Records are never rewritten
in place; a torn last line left by a crash is sealed with a newline and reads
as one corrupt record, while every other record still decrypts.

The key file lives outside the spool, is created 0600 only for a new spool or
by ``ith-proxy init`` (never silently beside an existing vault), and is
refused when group or others can read it or another user owns it.  It may hold several keys, one per
line: the first encrypts, all decrypt (``Keyring``, a MultiFernet).  Key
rotation (``vault_rotate``) adds a new first key, re-encrypts, then drops the
old ones; the helpers for the key file and for re-encrypting the record file
live here, with the only ``cryptography`` import of the project.  A second
secret beside the key keys the pseudonyms.

Bulk data (raw input at rest, ``vault_stream``) is not Fernet-encrypted: the
keyring also holds, per vault key, an AES-256-GCM key derived from it with
HKDF-SHA256 (its own info string, so it is never the Fernet key itself) and
named by a key id (the first 8 bytes of SHA-256 over the derived key), and
seals and opens single chunks with it.  The chunk layout, its associated
data and the file format belong to ``vault_stream``.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import secrets
import stat
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger("ith_proxy.vault")


class VaultKeyError(RuntimeError):
    """The key file is missing, unreadable, malformed or too open."""


class VaultRecordError(RuntimeError):
    """One record cannot be read; the others are unaffected."""


class DecryptError(ValueError):
    """A token is corrupt or was made under a key that is not in the key file."""


STREAM_INFO = b"ith-proxy stream v2"  # HKDF info: the AES-GCM key is for this use only
STREAM_NONCE, STREAM_TAG = 12, 16     # a sealed chunk is nonce || ciphertext || tag
STREAM_OVERHEAD = STREAM_NONCE + STREAM_TAG
STREAM_KEY_ID = 8                     # bytes of SHA-256(derived key) naming it in a header


def _stream_key(key: bytes) -> tuple[bytes, bytes]:
    """(key id, AES-256 key) derived from one Fernet key with HKDF-SHA256."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=STREAM_INFO).derive(base64.urlsafe_b64decode(key))
    return hashlib.sha256(derived).digest()[:STREAM_KEY_ID], derived


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write a 0600 file beside ``path`` under a unique name, fsynced; return it.

    ``data`` is the content, or a writer that fills the open file.  The caller
    renames or links the result into place and fsyncs the directory.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _check_secret(path: Path, what: str) -> os.stat_result:
    """Ownership and mode of a secret file, following links: the key folder may
    itself be a mounted link (Kubernetes' ..data), so it is checked, not refused."""
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise VaultKeyError(
            f"{what} {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}")
    if st.st_uid not in (os.geteuid(), 0):
        raise VaultKeyError(f"{what} {path} is owned by uid {st.st_uid}, not by this "
                            f"user (uid {os.geteuid()}) or root")
    if not stat.S_ISREG(st.st_mode):
        raise VaultKeyError(f"{what} {path} is not a regular file")
    return st


def _create_secret(path: Path, content: bytes, what: str) -> bool:
    """Create one 0600 secret file (and its 0700 folder); never replace one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = write_private(path, content)
    try:
        os.link(tmp, path)  # never overwrite a key another process just made
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
    log.warning("generated a new %s at %s; back it up apart from the spool, "
                "it cannot be recovered", what, path)
    return True


def _load_secret_file(path: Path, make: Callable[[], bytes], what: str,
                      create: bool = False) -> bytes:
    """Read a 0600 secret file.  A missing one is an error (VaultKeyError) unless
    ``create``: only ``ensure_secrets`` on a new spool and ``ith-proxy init`` ask
    for that, so a typo or an unmounted volume never yields a fresh key."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise VaultKeyError(f"{what} {path} does not exist")
        _create_secret(path, make(), what)
    try:
        _check_secret(path, what)
        return path.read_bytes()
    except OSError as exc:
        raise VaultKeyError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_keys(key_file: Path, create: bool = False) -> list[bytes]:
    raw = _load_secret_file(Path(key_file), _new_vault_key, "vault key", create)
    keys = [line.strip() for line in raw.splitlines() if line.strip()]
    if not keys:
        raise VaultKeyError(f"vault key {key_file} is empty")
    for k in keys:
        try:
            Fernet(k)
        except (ValueError, TypeError):
            raise VaultKeyError(f"vault key {key_file} holds a malformed key") from None
    return keys


def write_keys(key_file: Path, keys: list[bytes]) -> None:
    """Replace the key file atomically: tmp beside it (0600), fsync, rename, fsync dir."""
    key_file = Path(key_file)
    for k in keys:
        Fernet(k)  # never write a key file that would not load
    tmp = write_private(key_file, b"".join(k + b"\n" for k in keys))
    try:
        os.rename(tmp, key_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(key_file.parent)


def add_new_key(key_file: Path) -> bytes:
    """Rotation step (a): put a fresh key first, keep every existing key after it."""
    keys = load_keys(key_file, create=False)
    new = Keyring.generate_key()
    write_keys(key_file, [new, *[k for k in keys if k != new]])
    return new


def drop_old_keys(key_file: Path) -> int:
    """Rotation step (c): keep only the first (encrypting) key; return how many went."""
    keys = load_keys(key_file, create=False)
    if len(keys) > 1:
        write_keys(key_file, keys[:1])
    return len(keys) - 1


def load_site_secret(secret_file: Path, create: bool = False) -> bytes:
    """The HMAC key behind pseudonyms and UID remapping (stable for the site's
    life); older audit logs were MACed under a key derived from it."""
    raw = _load_secret_file(secret_file, _new_hex_secret, "site secret", create)
    value = raw.strip()
    if len(value) < 32:
        raise VaultKeyError(f"site secret {secret_file} is too short")
    return value


def load_audit_keys(key_file: Path, create: bool = False) -> list[bytes]:
    """The audit log's own MAC keys (``audit.key``, one hex key a line): the
    first signs new records, every one verifies.  Only the operator and the
    service need to read it, unlike the site secret."""
    raw = _load_secret_file(Path(key_file), _new_hex_secret, "audit key", create)
    try:
        keys = [bytes.fromhex(line.strip().decode()) for line in raw.splitlines()
                if line.strip()]
    except (ValueError, UnicodeDecodeError):
        raise VaultKeyError(f"audit key {key_file} holds a malformed key") from None
    if not keys or any(len(k) < 32 for k in keys):
        raise VaultKeyError(f"audit key {key_file} is empty or too short")
    return keys


def add_audit_key(key_file: Path) -> None:
    """Put a fresh audit key first, keep the old ones after it (they verify the
    records they signed); the next append records the change."""
    keys = load_audit_keys(key_file)
    tmp = write_private(Path(key_file), _new_hex_secret() + b"".join(
        k.hex().encode() + b"\n" for k in keys))
    try:
        os.rename(tmp, key_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(Path(key_file).parent)


def _new_vault_key() -> bytes:
    return Fernet.generate_key() + b"\n"


def _new_hex_secret() -> bytes:
    return secrets.token_hex(32).encode() + b"\n"


SECRET_MAKERS: dict[str, Callable[[], bytes]] = {
    "vault key": _new_vault_key, "site secret": _new_hex_secret, "audit key": _new_hex_secret}


def secret_files(key_file: Path) -> dict[str, Path]:
    """The key folder's secrets, by name: all live beside the vault key."""
    key_file = Path(key_file)
    return {"vault key": key_file, "site secret": key_file.with_name("site.secret"),
            "audit key": key_file.with_name("audit.key")}


def shared_volume_warning(key_file: Path, spool_dir: Path) -> str | None:
    """One line when the key folder and the spool are on the same filesystem
    (same st_dev), so one backup or snapshot of it would hold the ciphertext
    and its key together; None when they are apart (or cannot be compared)."""
    key_dir = Path(key_file).parent
    try:
        same = key_dir.stat().st_dev == Path(spool_dir).stat().st_dev
    except OSError:
        return None
    if not same:
        return None
    return (f"the keys in {key_dir} and the spool {spool_dir} are on the same filesystem: "
            "one backup or snapshot of it holds the ciphertext and its key together; "
            "put the keys on a separate volume (README, Deployment)")


def _absent(path: Path) -> bool:
    return not path.exists() and not path.is_symlink()


def init_secrets(key_file: Path) -> list[Path]:
    """Create every secret beside ``key_file`` that does not exist yet; return
    the ones created.  No policy here: callers decide when that is allowed."""
    made = []
    for what, path in secret_files(key_file).items():
        if _absent(path) and _create_secret(path, SECRET_MAKERS[what](), what):
            made.append(path)
    return made


def ensure_secrets(key_file: Path, new_spool: bool, audit_in_use: bool) -> list[Path]:
    """Check the secrets before a start; create them only where that is safe.

    On a new spool (no vault, no catalog) every missing secret is created.
    Otherwise a missing vault key or site secret is an error naming it, and
    nothing at all is created (everything is checked first).  A missing audit
    key is created on an existing spool only while no audit key was ever in
    use there (``audit_in_use``: the audit anchor names one), which is how a
    site moves from the site-secret-derived audit MAC to a key of its own.
    Returns the files created."""
    files = secret_files(key_file)
    missing = {what: path for what, path in files.items() if _absent(path)}
    if not new_spool:
        lost = [f"{what} {path}" for what, path in missing.items()
                if what != "audit key" or audit_in_use]
        if lost:
            verb = "is" if len(lost) == 1 else "are"
            raise VaultKeyError(
                f"{' and '.join(lost)} {verb} missing but the spool already holds a vault "
                "or catalog; nothing was created (a new key would make them unreadable): "
                "check VAULT_KEY_FILE and that the key volume is mounted, or restore "
                "from backup; `ith-proxy init` creates new keys deliberately")
    made = []
    for what, path in missing.items():
        if _create_secret(path, SECRET_MAKERS[what](), what):
            made.append(path)
    return made


class Keyring:
    """The vault keys: the first encrypts, every one decrypts."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise VaultKeyError("no vault key")
        self.count = len(keys)
        self._primary = Fernet(keys[0])
        self._all = MultiFernet([Fernet(k) for k in keys])
        streams = [_stream_key(k) for k in keys]
        self.stream_key_id, self._stream_secret = streams[0]  # new files are written under it
        self._streams = {kid: AESGCM(secret) for kid, secret in reversed(streams)}

    @staticmethod
    def generate_key() -> bytes:
        return Fernet.generate_key()

    @classmethod
    def load(cls, key_file: Path, create: bool = False) -> "Keyring":
        return cls(load_keys(key_file, create))

    def encrypt(self, data: bytes) -> bytes:
        """A Fernet token; its length depends only on len(data)."""
        return self._primary.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        try:
            return self._all.decrypt(token)
        except (InvalidToken, TypeError, ValueError):
            raise DecryptError("corrupt, or encrypted under a key that is not in "
                               "the key file") from None

    def has_stream_key(self, key_id: bytes) -> bool:
        return key_id in self._streams

    def seal_chunk(self, parts: Sequence[bytes | bytearray | memoryview],
                   aad: bytes) -> bytearray:
        """nonce || AES-256-GCM(concatenated parts, aad) || tag under the first
        key's stream key, with a fresh random 96-bit nonce.  GCM runs over the
        parts in turn, so they are never joined into one buffer first."""
        out = bytearray(STREAM_OVERHEAD + sum(len(p) for p in parts))
        nonce = os.urandom(STREAM_NONCE)
        out[:STREAM_NONCE] = nonce
        enc = Cipher(algorithms.AES(self._stream_secret), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        with memoryview(out) as view:
            at = STREAM_NONCE
            for part in parts:  # GCM is a stream mode: n bytes in, n bytes out
                # (the 15 bytes of slack update_into asks for fall in what follows)
                at += enc.update_into(part, view[at:at + len(part) + 15])
            enc.finalize()
            view[at:] = enc.tag
        return out

    def open_chunk(self, key_id: bytes, sealed: bytes | memoryview, aad: bytes,
                   out: bytearray | memoryview) -> None:
        """Decrypt and authenticate a sealed chunk into ``out`` (exactly
        ``len(sealed) - STREAM_OVERHEAD`` bytes) under the key named ``key_id``."""
        aead = self._streams.get(bytes(key_id))
        if aead is None:
            raise DecryptError("encrypted under a key that is not in the key file")
        if len(sealed) < STREAM_OVERHEAD:
            raise DecryptError("corrupt (too short)")
        sealed = memoryview(sealed)
        try:
            aead.decrypt_into(sealed[:STREAM_NONCE], sealed[STREAM_NONCE:], aad, out)
        except InvalidTag:
            raise DecryptError("corrupt, or not the chunk that belongs here "
                               "(authentication failed)") from None


def reencrypt_records(src: BinaryIO, out: BinaryIO, keyring: Keyring) -> tuple[int, list[int]]:
    """Rotation step (b) for vault.phi: copy every record line to ``out`` under
    the keyring's first key; return (records re-encrypted, offsets kept as they were).

    Every re-encrypted line has the length of the original (a Fernet token's
    length depends only on the plaintext's), so every record keeps its byte
    offset and the catalog stays valid; this is checked for each line, and a
    mismatch aborts before anything is replaced.  A line that does not
    decrypt (torn by a crash, corrupt) is copied unchanged.
    """
    offset, done, kept = 0, 0, []
    for line in src:
        token = line.strip()
        if token:
            try:
                plain = keyring.decrypt(token)
            except DecryptError:
                kept.append(offset)
            else:
                at = line.index(token)
                new = line[:at] + keyring.encrypt(plain) + line[at + len(token):]
                if len(new) != len(line):
                    raise VaultRecordError(
                        f"re-encrypting the vault record at offset {offset} would move it "
                        f"({len(line)} -> {len(new)} bytes); the vault was not changed")
                line = new
                done += 1
        out.write(line)
        offset += len(line)
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
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")  # seal a torn record from a crash
            self._fd = fd
        return self._fd

    def put(self, record: dict) -> int:
        """Append one record; return its offset.  Call sync() before relying on it."""
        line = self.keyring.encrypt(json.dumps(record, sort_keys=True).encode()) + b"\n"
        with self._lock:
            fd = self._open_append()
            offset = os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):  # a full disk gives a short write
                    raise OSError(errno.ENOSPC, "short write to the vault")
            except OSError:
                try:  # drop the torn tail so the vault stays whole records
                    os.ftruncate(fd, offset)
                except OSError:
                    pass
                os.close(fd)  # a reopen seals whatever tail is left with a newline
                self._fd = None
                raise
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
            return json.loads(self.keyring.decrypt(line.strip()))
        except (DecryptError, ValueError):
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
