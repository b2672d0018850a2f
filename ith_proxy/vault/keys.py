"""The vault keys: the one ``cryptography`` import of the project.

The vault key file lives outside the spool (how it and the secrets beside it
are found, checked and, only for a new spool or by ``ith-proxy init``,
created is ``vault.keyfiles``' job).  It may hold several keys, one per line:
the first encrypts, all decrypt (``Keyring``, a MultiFernet).  Key rotation
(``vault.rotate``) adds a new first key, re-encrypts, then drops the old
ones; the key file steps live here.

Bulk data (raw input at rest, ``vault.stream``) is not Fernet-encrypted: the
keyring also holds, per vault key, an AES-256-GCM key derived from it with
HKDF-SHA256 (its own info string, so it is never the Fernet key itself) and
named by a key id (the first 8 bytes of SHA-256 over the derived key), and
seals and opens single chunks with it.  The chunk layout, its associated
data and the file format belong to ``vault.stream``.  The same key seals
v2 vault records (``seal_record``/``open_record`` in pieces, a small one
opened with ``open_chunk``) under the record's own associated data, which
``vault.records`` defines.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ith_proxy.fsio import replace_private
from ith_proxy.vault.keyfiles import VaultKeyError, load_secret_file, new_vault_key

log = logging.getLogger("ith_proxy.vault")


class DecryptError(ValueError):
    """A token is corrupt or was made under a key that is not in the key file."""


STREAM_INFO = b"ith-proxy stream v2"  # HKDF info: the AES-GCM key is for this use only
STREAM_NONCE, STREAM_TAG = 12, 16  # a sealed chunk is nonce || ciphertext || tag
STREAM_OVERHEAD = STREAM_NONCE + STREAM_TAG
STREAM_KEY_ID = 8  # bytes of SHA-256(derived key) naming it in a header
RECORD_PIECE = 1 << 20  # a large record goes through GCM in slices this size
SEAL_JOINED = 1 << 16  # a stream chunk up to this size is joined and sealed in one call


def _stream_key(key: bytes) -> tuple[bytes, bytes]:
    """(key id, AES-256 key) derived from one Fernet key with HKDF-SHA256."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=STREAM_INFO).derive(
        base64.urlsafe_b64decode(key)
    )
    return hashlib.sha256(derived).digest()[:STREAM_KEY_ID], derived


def load_keys(key_file: Path, create: bool = False) -> list[bytes]:
    raw = load_secret_file(Path(key_file), new_vault_key, "vault key", create)
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
    replace_private(key_file, b"".join(k + b"\n" for k in keys))


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
        self._stream_secrets = dict(reversed(streams))

    @staticmethod
    def generate_key() -> bytes:
        return Fernet.generate_key()

    @classmethod
    def load(cls, key_file: Path, create: bool = False) -> Keyring:
        return cls(load_keys(key_file, create))

    def encrypt(self, data: bytes) -> bytes:
        """A Fernet token; its length depends only on len(data)."""
        return self._primary.encrypt(data)

    def decrypt(self, token: bytes) -> bytes:
        try:
            return self._all.decrypt(token)
        except (InvalidToken, TypeError, ValueError):
            raise DecryptError(
                "corrupt, or encrypted under a key that is not in the key file"
            ) from None

    def has_stream_key(self, key_id: bytes) -> bool:
        return key_id in self._streams

    def seal_chunk(
        self, parts: Sequence[bytes | bytearray | memoryview], aad: bytes
    ) -> bytes | bytearray:
        """nonce || AES-256-GCM(concatenated parts, aad) || tag under the first
        key's stream key, with a fresh random 96-bit nonce.  A small chunk is
        joined and sealed in one call of the key's AESGCM (a GCM context set
        up per chunk cost more than the sealing: issue 11); for a larger one
        GCM runs over the parts in turn, so they are never joined."""
        size = sum(len(p) for p in parts)
        nonce = os.urandom(STREAM_NONCE)
        if size <= SEAL_JOINED:
            return nonce + self._streams[self.stream_key_id].encrypt(nonce, b"".join(parts), aad)
        out = bytearray(STREAM_OVERHEAD + size)
        out[:STREAM_NONCE] = nonce
        enc = Cipher(algorithms.AES(self._stream_secret), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        with memoryview(out) as view:
            at = STREAM_NONCE
            for part in parts:  # GCM is a stream mode: n bytes in, n bytes out
                # (the 15 bytes of slack update_into asks for fall in what follows)
                at += enc.update_into(part, view[at : at + len(part) + 15])
            enc.finalize()
            view[at:] = enc.tag
        return out

    def open_chunk(
        self, key_id: bytes, sealed: bytes | memoryview, aad: bytes, out: bytearray | memoryview
    ) -> None:
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
            raise DecryptError(
                "corrupt, or not the chunk that belongs here (authentication failed)"
            ) from None

    def seal_record(self, parts: Sequence[bytes | bytearray], aad: bytes) -> Iterator[bytes]:
        """key id || nonce || AES-256-GCM(concatenated parts, aad) || tag under
        the first key's stream key, in pieces: a small record in one call, a
        large one in slices of RECORD_PIECE, so no part is ever copied whole."""
        nonce = os.urandom(STREAM_NONCE)
        yield self.stream_key_id + nonce
        if sum(len(p) for p in parts) <= RECORD_PIECE:
            yield self._streams[self.stream_key_id].encrypt(nonce, b"".join(parts), aad)
            return
        enc = Cipher(algorithms.AES(self._stream_secret), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        for part in parts:
            view = memoryview(part)
            for at in range(0, len(view), RECORD_PIECE):
                yield enc.update(view[at : at + RECORD_PIECE])
        enc.finalize()
        yield enc.tag

    def open_record(
        self,
        key_id: bytes,
        nonce: bytes,
        pieces: Iterable[bytes | memoryview],
        tag: bytes,
        aad: bytes,
        out: bytearray,
    ) -> None:
        """Decrypt a record's ciphertext, given in pieces, into ``out`` (exactly
        its length) and authenticate it; DecryptError if it does not."""
        secret = self._stream_secrets.get(bytes(key_id))
        if secret is None:
            raise DecryptError("encrypted under a key that is not in the key file")
        dec = Cipher(algorithms.AES(secret), modes.GCM(nonce, tag)).decryptor()
        dec.authenticate_additional_data(aad)
        at = 0
        with memoryview(out) as view:
            for piece in pieces:  # too much: update_into raises ValueError
                at += dec.update_into(piece, view[at : at + len(piece)])
        try:
            dec.finalize()
        except InvalidTag:
            raise DecryptError(
                "corrupt, or not the record that belongs here (authentication failed)"
            ) from None
        if at != len(out):
            raise DecryptError("corrupt (too short)")
