"""What every command shares: the one-line failure, the spool lock of the
offline commands, and the audit record written before PHI is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeAlias

from ith_proxy.config import Config
from ith_proxy.store.audit import AuditError, AuditKeys, AuditLog, audit_key, cli_actor
from ith_proxy.store.spool import Spool
from ith_proxy.vault.keyfiles import VaultKeyError, load_audit_keys, load_site_secret

EXIT_CONFIG = 2

Command = Callable[[Config, argparse.Namespace], int]  # set_defaults(func=...) of each verb
Verbs: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
# the parser's helper: add(verbs, name, command or None for a group, help) -> its parser
Adder = Callable[[Verbs, str, Command | None, str], argparse.ArgumentParser]


class CliError(Exception):
    """A one-line message for the operator (exit 1)."""


def fail(message: str, code: int = 1) -> int:
    print(f"ith-proxy: {message}", file=sys.stderr)
    return code


@contextmanager
def locked_spool(cfg: Config, what: str) -> Iterator[Spool]:
    """The spool, under its run lock for the whole block: offline commands
    refuse to run while the proxy (or another of them) is using it."""
    spool = Spool(cfg.spool.dir)
    if not spool.root.is_dir():
        raise CliError(f"no spool at {cfg.spool.dir}")
    try:
        lock = spool.lock()
    except OSError as exc:  # e.g. ELOOP: .lock is a symbolic link
        raise CliError(
            f"cannot take the spool lock {spool.root / '.lock'}: {exc.strerror or exc}"
        ) from None
    if lock is None:
        raise CliError(f"the proxy is running on this spool; stop it before {what}")
    try:
        spool.ensure()
        yield spool
    finally:
        os.close(lock)


def audit_log(cfg: Config, append: bool = False) -> AuditLog:
    """The audit log with its keys and anchor.  Appending signs with audit.key;
    on a site from before audit.key existed (no anchor yet) the key is made
    here, and the first append records the change from the old key."""
    key_file, anchor = cfg.vault.audit_key_file, cfg.vault.audit_anchor_file
    try:
        legacy = audit_key(load_site_secret(cfg.vault.secret_file))
    except VaultKeyError:
        if append:
            raise
        legacy = None  # verify can still check records under audit.key
    absent = not key_file.exists() and not key_file.is_symlink()
    if absent and not append:
        if legacy is None:
            raise VaultKeyError(f"audit key {key_file} does not exist")
        keys = AuditKeys.legacy_only(legacy)
    else:
        create = append and absent and not anchor.exists()
        keys = AuditKeys.of(load_audit_keys(key_file, create=create), legacy)
    return AuditLog(Spool(cfg.spool.dir).audit_file, keys, anchor)


def audit(cfg: Config, action: str, target: str, **detail: object) -> None:
    """Record the access before it happens; no record, no access."""
    try:
        audit_log(cfg, append=True).record(cli_actor(), action, target, **detail)
    except AuditError as exc:
        raise CliError(f"refused: the audit record could not be written ({exc})") from None
