"""``bin/ith-proxy [--config PATH] <command>``: thin argparse wiring.

Every failure the operator can fix is one line on stderr and a non-zero
exit: 2 for configuration errors, 1 for everything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TypeAlias

from ith_proxy import config as config_mod
from ith_proxy.config import Config, ConfigError
from ith_proxy.store.audit import AuditBroken, AuditError, AuditKeys, AuditLog, audit_key, cli_actor
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.keyfiles import (
    VaultKeyError,
    add_audit_key,
    init_secrets,
    load_audit_keys,
    load_site_secret,
    secret_files,
    shared_volume_warning,
)
from ith_proxy.vault.keys import Keyring
from ith_proxy.vault.records import Vault, VaultRecordError
from ith_proxy.vault.stream import EncryptedFileError

EXIT_CONFIG = 2
Command = Callable[[Config, argparse.Namespace], int]  # set_defaults(func=...) of each verb
Verbs: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="INI file (default: $ITH_PROXY_CONFIG or conf/proxy.ini)",
    )
    parser = argparse.ArgumentParser(
        prog="ith-proxy",
        parents=[common],
        description="Edge DICOM proxy: receive, de-identify, catalog and forward studies.",
    )

    def verbs(
        group: argparse.ArgumentParser, dest: str = "action", metavar: str = "<action>"
    ) -> Verbs:
        return group.add_subparsers(dest=dest, metavar=metavar, required=True)

    def add(subs: Verbs, name: str, func: Command | None, text: str) -> argparse.ArgumentParser:
        cmd = subs.add_parser(name, parents=[common], help=text)
        if func is not None:  # a group of verbs has none: each verb sets its own
            cmd.set_defaults(func=func)
        return cmd

    sub = verbs(parser, "command", "<command>")
    add(sub, "run", cmd_run, "run all services in one process")
    add(
        sub,
        "init",
        cmd_init,
        "create the vault key, site secret and audit key for a new "
        "site (refused when any of them exists)",
    )
    add(sub, "status", cmd_status, "print a human summary").add_argument(
        "--json", action="store_true", help="machine-readable output"
    )
    add(
        sub,
        "reindex",
        cmd_reindex,
        "rebuild the catalog from studies/ and the vault (service stopped)",
    )
    vsub = verbs(add(sub, "vault", None, "vault key management"))
    add(
        vsub,
        "rotate-key",
        cmd_vault_rotate,
        "re-encrypt the vault and encrypted spool "
        "files under a new key and drop the old one (service stopped)",
    )
    qsub = verbs(add(sub, "quarantine", None, "inspect, export and release quarantined input"))
    add(qsub, "list", cmd_quarantine_list, "one line per quarantined item")
    exp = add(
        qsub,
        "export",
        cmd_quarantine_export,
        "write a readable (decrypted) copy of an item, mode 0600",
    )
    exp.add_argument("name", metavar="NAME", help="item name, or REASON/NAME")
    exp.add_argument("--out", metavar="PATH", help="output file (default: ./NAME.dcm)")
    rel = add(
        qsub,
        "release",
        cmd_quarantine_release,
        "move an item back to incoming/ for another attempt",
    )
    rel.add_argument("name", metavar="NAME", help="item name, or REASON/NAME")
    asub = verbs(add(sub, "audit", None, "the audit log of PHI access"))
    add(
        asub,
        "verify",
        cmd_audit_verify,
        "check every record's MAC and the hash chain of logs/audit.log",
    )
    add(
        asub,
        "rotate-key",
        cmd_audit_rotate,
        "sign new audit records under a new key (the old ones stay, to verify)",
    )
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"ith-proxy: {message}", file=sys.stderr)
    return code


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from ith_proxy.service import Service, StartupError

    service = Service(cfg)
    try:
        service.run_forever()
    except (StartupError, VaultKeyError) as exc:
        return _fail(str(exc))
    return 0


def _api_health(cfg: Config) -> str:
    host = "127.0.0.1" if cfg.api.bind_address in ("0.0.0.0", "::", "") else cfg.api.bind_address
    try:
        with urllib.request.urlopen(f"http://{host}:{cfg.api.port}/api/health/", timeout=2) as r:
            return json.loads(r.read()).get("status", "?")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
            return f"{body.get('status')}: {'; '.join(body.get('problems', []))}"
        except ValueError:
            return f"HTTP {exc.code}"
    except (OSError, ValueError):
        return "not running (API not reachable)"


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    spool = Spool(cfg.spool.dir)
    if not spool.catalog_file.exists():
        return _fail(f"no catalog in {cfg.spool.dir}: the proxy has not run here yet")
    cat = Catalog(spool.catalog_file, readonly=True)
    try:
        counts = cat.counts()
    finally:
        cat.close()
    info = {
        "service": _api_health(cfg),
        "ae_title": cfg.scp.ae_title,
        "dicom_port": cfg.scp.port,
        "api_port": cfg.api.port,
        "spool": str(cfg.spool.dir),
        "mode": "offline" if cfg.link.offline else f"backend {cfg.link.ith_url}",
        "incoming": len(spool.incoming_names()),
        "quarantined": len(spool.quarantined()),
        "free_mb": int(spool.free_mb()),
        **counts,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    states = ", ".join(f"{k} {v}" for k, v in counts["studies_by_state"].items())
    print(
        f"service:     {info['service']}\n"
        f"dicom:       {cfg.scp.ae_title} on port {cfg.scp.port}; API on port {cfg.api.port}\n"
        f"mode:        {info['mode']}\n"
        f"spool:       {info['spool']} ({info['free_mb']} MB free)\n"
        f"queues:      incoming {info['incoming']}, quarantined {info['quarantined']}\n"
        f"catalog:     {counts['patients']} patients, {counts['studies']} studies, "
        f"{counts['series']} series, {counts['instances']} instances "
        f"({counts['bytes'] / 2**20:.1f} MB)\n"
        f"studies:     {states}\n"
        f"as of:       {datetime.now(UTC).isoformat(timespec='seconds')}"
    )
    return 0


def cmd_reindex(cfg: Config, args: argparse.Namespace) -> int:
    from ith_proxy.dicom.libsetup import configure_libraries
    from ith_proxy.workers.reindex import reindex

    configure_libraries()  # reindex reads every stored header
    if not Spool(cfg.spool.dir).studies.is_dir():
        return _fail(f"no spool at {cfg.spool.dir}")
    with _locked_spool(cfg, "reindex") as spool:
        vault = Vault(spool.vault_file, cfg.vault.key_file) if spool.vault_file.exists() else None
        cat = Catalog(spool.catalog_file)
        try:
            counts = reindex(spool, cat, vault)
        finally:
            cat.close()
            if vault is not None:
                vault.close()
    print(
        f"reindexed: {counts['patients']} patients, {counts['studies']} studies, "
        f"{counts['series']} series, {counts['instances']} instances"
    )
    return 0


@contextmanager
def _locked_spool(cfg: Config, what: str) -> Iterator[Spool]:
    """The spool, under its run lock for the whole block: offline commands
    refuse to run while the proxy (or another of them) is using it."""
    spool = Spool(cfg.spool.dir)
    if not spool.root.is_dir():
        raise _CliError(f"no spool at {cfg.spool.dir}")
    try:
        lock = spool.lock()
    except OSError as exc:  # e.g. ELOOP: .lock is a symbolic link
        raise _CliError(
            f"cannot take the spool lock {spool.root / '.lock'}: {exc.strerror or exc}"
        ) from None
    if lock is None:
        raise _CliError(f"the proxy is running on this spool; stop it before {what}")
    try:
        spool.ensure()
        yield spool
    finally:
        os.close(lock)


class _CliError(Exception):
    """A one-line message for the operator (exit 1)."""


def cmd_init(cfg: Config, args: argparse.Namespace) -> int:
    """Create the keys of a new site; never replace one (no partial creation)."""
    spool = Spool(cfg.spool.dir)
    files = secret_files(cfg.vault.key_file)
    present = [str(p) for p in files.values() if p.exists() or p.is_symlink()]
    if present:
        return _fail(
            f"keys already exist ({', '.join(present)}); init never replaces a "
            "key: nothing was changed"
        )
    os.umask(0o077)
    made = init_secrets(cfg.vault.key_file)
    print(
        f"created {', '.join(str(p) for p in made)}: back them up now, apart from the "
        "spool; they cannot be recovered"
    )
    if spool.vault_file.exists() or spool.catalog_file.exists():
        print(
            f"warning: {cfg.spool.dir} already holds a vault or catalog; what was written "
            "under the old keys cannot be read with the new ones",
            file=sys.stderr,
        )
    warning = (
        shared_volume_warning(cfg.vault.key_file, cfg.spool.dir) if cfg.spool.dir.is_dir() else None
    )
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _audit_log(cfg: Config, append: bool = False) -> AuditLog:
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


def _audit(cfg: Config, action: str, target: str, **detail: object) -> None:
    """Record the access before it happens; no record, no access."""
    try:
        _audit_log(cfg, append=True).record(cli_actor(), action, target, **detail)
    except AuditError as exc:
        raise _CliError(f"refused: the audit record could not be written ({exc})") from None


def cmd_audit_verify(cfg: Config, args: argparse.Namespace) -> int:
    try:
        log = _audit_log(cfg)
    except AuditError as exc:
        return _fail(str(exc))
    anchored = log.anchor is not None and log.anchor.exists()
    if not log.path.exists() and not log.path.is_symlink() and not anchored:
        print(f"{log.path}: no audit records yet")
        return 0
    try:
        summary = log.verify()
    except AuditBroken as exc:
        where = f"at {exc}" if exc.line else f"({exc})"
        return _fail(f"audit log {log.path} is broken {where}")
    except (AuditError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return _fail(f"cannot read audit log {log.path}: {why}")
    torn = f"; {summary.torn} torn line(s) from interrupted writes" if summary.torn else ""
    anchor = (
        f"; matches its anchor {log.anchor}"
        if summary.anchored
        else "; no anchor yet (written before anchors existed: truncation cannot be checked)"
    )
    print(
        f"{log.path}: {summary.records} records intact, chain unbroken "
        f"({summary.first or '-'} .. {summary.last or '-'}){torn}{anchor}"
    )
    return 0


def cmd_audit_rotate(cfg: Config, args: argparse.Namespace) -> int:
    """A new first line in audit.key; the record of it is the first one signed
    by the new key, after a key-change record signed by the old one."""
    key_file = cfg.vault.audit_key_file
    if not key_file.exists():
        return _fail(f"no audit key at {key_file}: nothing to rotate")
    with _locked_spool(cfg, "audit rotate-key"):  # one rotation at a time
        add_audit_key(key_file)
        _audit(cfg, "audit.rotate-key", str(key_file))
    print(f"audit key rotated; back up {key_file} (its older keys verify older records: keep them)")
    return 0


def cmd_vault_rotate(cfg: Config, args: argparse.Namespace) -> int:
    from ith_proxy.vault.rotate import rotate

    if not cfg.vault.key_file.exists():
        return _fail(f"no vault key at {cfg.vault.key_file}: nothing to rotate")
    with _locked_spool(cfg, "vault rotate-key") as spool:
        try:
            _audit(cfg, "vault.rotate-key", str(cfg.vault.key_file))
            rotation = rotate(spool, spool.vault_file, cfg.vault.key_file)
        except (VaultRecordError, OSError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return _fail(
                f"vault key rotation stopped: {detail}; everything still decrypts "
                "with the key file as it is now; fix the cause and run it again"
            )
    print(rotation.summary())
    print(
        f"back up the new key file {cfg.vault.key_file}; old copies of it can be destroyed",
        file=sys.stderr,
    )
    return 0


def cmd_quarantine_list(cfg: Config, args: argparse.Namespace) -> int:
    spool = Spool(cfg.spool.dir)
    if not spool.quarantine_dir.is_dir():
        return _fail(f"no spool at {cfg.spool.dir}")
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
        raise _CliError(
            f"no quarantined item named {name!r} (see: ith-proxy quarantine list)"
        ) from None


def cmd_quarantine_export(cfg: Config, args: argparse.Namespace) -> int:
    with _locked_spool(cfg, "quarantine export") as spool:
        return _quarantine_export(cfg, spool, args.name, args.out)


def _quarantine_export(cfg: Config, spool: Spool, name: str, out: str | None) -> int:
    data, info = _quarantined(spool, name)
    dest = Path(out) if out else Path.cwd() / f"{data.name}.dcm"
    if dest.exists():
        return _fail(f"{dest} already exists; choose another --out")
    keyring = Keyring.load(cfg.vault.key_file, create=False)
    _audit(cfg, "quarantine.export", f"{data.parent.name}/{data.name}", out=str(dest.resolve()))
    try:
        written = vault_stream.export_plain(data, dest, keyring, info.get("sha256"))
    except EncryptedFileError as exc:
        return _fail(f"cannot export {name}: {exc}")
    except OSError as exc:
        return _fail(f"cannot write {dest}: {exc.strerror or exc}")
    print(f"wrote {dest} ({written['size']} bytes); it holds plaintext PHI: delete it when done")
    return 0


def cmd_quarantine_release(cfg: Config, args: argparse.Namespace) -> int:
    with _locked_spool(cfg, "quarantine release") as spool:
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
    _audit(cfg, "quarantine.release", f"{data.parent.name}/{data.name}")
    try:
        spool.release(name, write)
    except EncryptedFileError as exc:
        return _fail(f"cannot release {name}: {exc}")
    except FileExistsError as exc:
        return _fail(f"cannot release {name}: {exc}")
    state = "encrypted" if cfg.spool.encrypt_incoming else "decrypted"
    print(
        f"released {data.parent.name}/{data.name} to incoming/ ({state}); "
        "the proxy processes it when it starts"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config_mod.load(getattr(args, "config", None))
    except ConfigError as exc:
        return _fail(f"config error: {exc}", EXIT_CONFIG)
    try:
        return args.func(cfg, args)
    except (VaultKeyError, AuditError, _CliError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
