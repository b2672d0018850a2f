"""The key folder's files: the vault key, the site secret, the audit key.

They live together outside the spool (``VAULT_KEY_FILE``'s folder), each 0600,
and are never made silently: the readers here refuse a missing file, and only
``ensure_secrets`` (a new spool: no vault, no catalog) and ``init_secrets``
(``ith-proxy init``) create them, never over an existing one.  A key file is
checked by ownership and mode, following links, because the folder may be a
mounted link (Kubernetes' ``..data``).  Parsing a vault key (Fernet) stays in
``vault.keys``; this module holds the files and the policy, not the cryptography.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from ith_proxy.fsio import fsync_dir, replace_private, write_private

log = logging.getLogger("ith_proxy.vault")


class VaultKeyError(RuntimeError):
    """The key file is missing, unreadable, malformed or too open."""


def _check_secret(path: Path, what: str) -> os.stat_result:
    """Ownership and mode of a secret file, following links: the key folder may
    itself be a mounted link (Kubernetes' ..data), so it is checked, not refused."""
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise VaultKeyError(
            f"{what} {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}"
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise VaultKeyError(
            f"{what} {path} is owned by uid {st.st_uid}, not by this "
            f"user (uid {os.geteuid()}) or root"
        )
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
    log.warning(
        "generated a new %s at %s; back it up apart from the spool, it cannot be recovered",
        what,
        path,
    )
    return True


def load_secret_file(
    path: Path, make: Callable[[], bytes], what: str, create: bool = False
) -> bytes:
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


def load_site_secret(secret_file: Path, create: bool = False) -> bytes:
    """The HMAC key behind pseudonyms and UID remapping (stable for the site's
    life); older audit logs were MACed under a key derived from it."""
    raw = load_secret_file(secret_file, _new_hex_secret, "site secret", create)
    value = raw.strip()
    if len(value) < 32:
        raise VaultKeyError(f"site secret {secret_file} is too short")
    return value


def load_audit_keys(key_file: Path, create: bool = False) -> list[bytes]:
    """The audit log's own MAC keys (``audit.key``, one hex key a line): the
    first signs new records, every one verifies.  Only the operator and the
    service need to read it, unlike the site secret."""
    raw = load_secret_file(Path(key_file), _new_hex_secret, "audit key", create)
    try:
        keys = [bytes.fromhex(line.strip().decode()) for line in raw.splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError):
        raise VaultKeyError(f"audit key {key_file} holds a malformed key") from None
    if not keys or any(len(k) < 32 for k in keys):
        raise VaultKeyError(f"audit key {key_file} is empty or too short")
    return keys


def add_audit_key(key_file: Path) -> None:
    """Put a fresh audit key first, keep the old ones after it (they verify the
    records they signed); the next append records the change."""
    keys = load_audit_keys(key_file)
    replace_private(
        Path(key_file), _new_hex_secret() + b"".join(k.hex().encode() + b"\n" for k in keys)
    )


def new_vault_key() -> bytes:
    """A Fernet key (what Fernet.generate_key makes: 32 random bytes, urlsafe base64)."""
    return base64.urlsafe_b64encode(os.urandom(32)) + b"\n"


def _new_hex_secret() -> bytes:
    return secrets.token_hex(32).encode() + b"\n"


SECRET_MAKERS: dict[str, Callable[[], bytes]] = {
    "vault key": new_vault_key,
    "site secret": _new_hex_secret,
    "audit key": _new_hex_secret,
}


def secret_files(key_file: Path) -> dict[str, Path]:
    """The key folder's secrets, by name: all live beside the vault key."""
    key_file = Path(key_file)
    return {
        "vault key": key_file,
        "site secret": key_file.with_name("site.secret"),
        "audit key": key_file.with_name("audit.key"),
    }


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
    return (
        f"the keys in {key_dir} and the spool {spool_dir} are on the same filesystem: "
        "one backup or snapshot of it holds the ciphertext and its key together; "
        "put the keys on a separate volume (README, Deployment)"
    )


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
        lost = [
            f"{what} {path}"
            for what, path in missing.items()
            if what != "audit key" or audit_in_use
        ]
        if lost:
            verb = "is" if len(lost) == 1 else "are"
            raise VaultKeyError(
                f"{' and '.join(lost)} {verb} missing but the spool already holds a vault "
                "or catalog; nothing was created (a new key would make them unreadable): "
                "check VAULT_KEY_FILE and that the key volume is mounted, or restore "
                "from backup; `ith-proxy init` creates new keys deliberately"
            )
    made = []
    for what, path in missing.items():
        if _create_secret(path, SECRET_MAKERS[what](), what):
            made.append(path)
    return made
