"""``quarantine list|export|release``: inspect, export (audited) and release
quarantined input.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ith_proxy.cli.common import CliError, audit, fail, locked_spool
from ith_proxy.config import Config
from ith_proxy.store.spool import Spool
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.keys import Keyring
from ith_proxy.vault.stream import EncryptedFileError


def cmd_quarantine_list(cfg: Config, args: argparse.Namespace) -> int:
    spool = Spool(cfg.spool.dir)
    if not spool.quarantine_dir.is_dir():
        return fail(f"no spool at {cfg.spool.dir}")
    items = spool.quarantined()
    for it in items:
        size = it.get("size")
        size_text = "? bytes" if size is None else f"{size} bytes"
        state = "" if it.get("present", True) else " [file missing]"
        if it.get("present", True) and not it.get("encrypted"):
            state = " [not encrypted]"
        error = " ".join(str(it.get("error", "")).split())
        print(
            f"{it.get('reason', '?')}  {it.get('name', '?')}  {it.get('quarantined_at', '?')}"
            f"  {size_text}  {error}{state}"
        )
    if not items:
        print("quarantine is empty")
    return 0


def _quarantined(spool: Spool, name: str) -> tuple[Path, dict]:
    try:
        return spool.quarantined_item(name)
    except (KeyError, FileNotFoundError):
        raise CliError(
            f"no quarantined item named {name!r} (see: ith-proxy quarantine list)"
        ) from None


def cmd_quarantine_export(cfg: Config, args: argparse.Namespace) -> int:
    with locked_spool(cfg, "quarantine export") as spool:
        return _quarantine_export(cfg, spool, args.name, args.out)


def _quarantine_export(cfg: Config, spool: Spool, name: str, out: str | None) -> int:
    data, info = _quarantined(spool, name)
    dest = Path(out) if out else Path.cwd() / f"{data.name}.dcm"
    if dest.exists():
        return fail(f"{dest} already exists; choose another --out")
    keyring = Keyring.load(cfg.vault.key_file, create=False)
    audit(cfg, "quarantine.export", f"{data.parent.name}/{data.name}", out=str(dest.resolve()))
    try:
        written = vault_stream.export_plain(data, dest, keyring, info.get("sha256"))
    except EncryptedFileError as exc:
        return fail(f"cannot export {name}: {exc}")
    except OSError as exc:
        return fail(f"cannot write {dest}: {exc.strerror or exc}")
    print(f"wrote {dest} ({written['size']} bytes); it holds plaintext PHI: delete it when done")
    return 0


def cmd_quarantine_release(cfg: Config, args: argparse.Namespace) -> int:
    with locked_spool(cfg, "quarantine release") as spool:
        return _quarantine_release(cfg, spool, args.name)


def _quarantine_release(cfg: Config, spool: Spool, name: str) -> int:
    data, _info = _quarantined(spool, name)
    encrypted = vault_stream.is_encrypted(data)
    write: Callable[[Path, BinaryIO], object] | None = None
    if encrypted != cfg.spool.encrypt_incoming:
        keyring = Keyring.load(cfg.vault.key_file, create=False)
        transform = vault_stream.seal if cfg.spool.encrypt_incoming else vault_stream.decrypt_to

        def transformed(src: Path, out: BinaryIO) -> object:
            return transform(src, out, keyring)

        write = transformed
    audit(cfg, "quarantine.release", f"{data.parent.name}/{data.name}")
    try:
        spool.release(name, write)
    except EncryptedFileError as exc:
        return fail(f"cannot release {name}: {exc}")
    except FileExistsError as exc:
        return fail(f"cannot release {name}: {exc}")
    state = "encrypted" if cfg.spool.encrypt_incoming else "decrypted"
    print(
        f"released {data.parent.name}/{data.name} to incoming/ ({state}); "
        "the proxy processes it when it starts"
    )
    return 0
