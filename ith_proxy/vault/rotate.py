"""``ith-proxy vault rotate-key``: move the vault and every encrypted spool
file to a new key, crash-safely, so that the old key can be deleted.

Three steps, each durable before the next begins (the service is stopped:
the caller holds the spool's run lock):

a. ``vault.add_new_key``: the key file is replaced atomically by [new, old...].
   The new key encrypts from now on; every key still decrypts.
b. ``step_reencrypt``: ``vault.phi`` is re-encrypted line by line into
   ``tmp/`` and renamed over the old file (fsync file and directory); then
   every encrypted raw input file (``incoming/``, ``quarantine/``) the same
   way, one at a time, written in the current format (v2, AES-GCM) whatever
   format it was in (a v1 Fernet file is read with the Fernet keys, a v2
   file with the AES-GCM key its header names).  Every re-encrypted vault line has the length of the
   old one, so record offsets (which the catalog stores) do not move; this
   is checked per line.  Records and files that do not decrypt are kept
   unchanged and reported, never dropped.
c. ``vault.drop_old_keys``: the key file is replaced by [new].

At every point between these writes each record and file decrypts with the
key file as it is on disk: before (c) it holds the old keys too, after (c)
everything that could be decrypted is under the new key.  After a crash,
run the command again: it adds another key, re-encrypts everything under
it (whatever key each part is under now) and drops the rest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ith_proxy.store.spool import Spool
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.keys import Keyring, add_new_key, drop_old_keys
from ith_proxy.vault.records import reencrypt_records
from ith_proxy.vault.stream import EncryptedFileError

log = logging.getLogger("ith_proxy.vault")


@dataclass
class Rotation:
    records: int = 0  # vault records re-encrypted
    corrupt_records: list[int] = field(default_factory=list)  # offsets kept unchanged
    files: int = 0  # spool files re-encrypted
    corrupt_files: list[str] = field(default_factory=list)  # spool paths kept unchanged
    keys_removed: int = 0

    def summary(self) -> str:
        def n(count: int, what: str) -> str:
            return f"{count} {what}{'' if count == 1 else 's'}"

        text = (
            f"vault key rotated: {n(self.records, 'record')} re-encrypted, "
            f"{n(len(self.corrupt_records), 'corrupt record')} kept unchanged"
        )
        if self.corrupt_records:
            shown = ", ".join(str(o) for o in self.corrupt_records[:10])
            more = ", ..." if len(self.corrupt_records) > 10 else ""
            text += f" (offsets {shown}{more})"
        text += f"; {n(self.files, 'spool file')} re-encrypted"
        if self.corrupt_files:
            text += (
                f", {n(len(self.corrupt_files), 'unreadable spool file')} kept unchanged "
                f"({', '.join(self.corrupt_files[:10])})"
            )
        return text + f"; {n(self.keys_removed, 'old key')} removed"


def step_reencrypt(spool: Spool, vault_path: Path, key_file: Path) -> Rotation:
    """(b) the vault, then every encrypted raw input file, under the first key."""
    keyring = Keyring.load(key_file, create=False)
    rotation = Rotation()
    vault_path = Path(vault_path)
    if vault_path.exists():
        with os.fdopen(os.open(vault_path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as src:

            def write(out) -> None:
                rotation.records, rotation.corrupt_records = reencrypt_records(src, out, keyring)

            spool.rewrite(vault_path, write)
    for path in spool.raw_input_files():
        try:
            if not vault_stream.is_encrypted(path):
                continue
            spool.rewrite(path, partial(vault_stream.reencrypt, path, keyring=keyring))
        except FileNotFoundError:
            continue
        except EncryptedFileError as exc:
            where = str(path.relative_to(spool.root))
            log.error("kept %s unchanged: %s", where, exc)
            rotation.corrupt_files.append(where)
            continue
        rotation.files += 1
    return rotation


def rotate(spool: Spool, vault_path: Path, key_file: Path) -> Rotation:
    """All three steps.  The caller holds the spool's run lock."""
    add_new_key(key_file)  # (a)
    rotation = step_reencrypt(spool, vault_path, key_file)  # (b)
    rotation.keys_removed = drop_old_keys(key_file)  # (c)
    return rotation
