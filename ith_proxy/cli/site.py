"""The site's commands: run, status, init, reindex, and the vault and audit keys."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from datetime import UTC, datetime

from ith_proxy.cli.common import EXIT_CONFIG, audit, audit_log, fail, locked_spool
from ith_proxy.config import Config
from ith_proxy.store.audit import HEAD_USAGE, AuditBroken, AuditError, parse_head
from ith_proxy.store.browse import site_counts
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.settings import RuntimeSettings, describe
from ith_proxy.store.spool import Spool
from ith_proxy.vault.keyfiles import (
    VaultKeyError,
    add_audit_key,
    init_secrets,
    secret_files,
    shared_volume_warning,
)
from ith_proxy.vault.records import Vault, VaultRecordError


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from ith_proxy.service import Service, StartupError

    service = Service(cfg)
    try:
        service.run_forever()
    except (StartupError, VaultKeyError) as exc:
        return fail(str(exc))
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
        return fail(f"no catalog in {cfg.spool.dir}: the proxy has not run here yet")
    cat = Catalog(spool.catalog_file, readonly=True)
    try:
        runtime = describe(cfg, RuntimeSettings(cat).persisted())  # value + where it came from
        counts = site_counts(cat)  # what GET /api/status/ shows too
    finally:
        cat.close()
    forwarding, dead = counts.pop("outbox"), counts.pop("failed_forwards")
    runtime["anonymize"] = {
        "value": cfg.deid.anonymize,
        "source": cfg.origins.get("deid.anonymize", "default") + "; local only",
    }
    ae_title, dicom_port = runtime["ae_title"]["value"], runtime["dicom_port"]["value"]
    info = {
        "service": _api_health(cfg),
        "ae_title": ae_title,
        "dicom_port": dicom_port,
        "runtime": runtime,
        "api_port": cfg.api.port,
        "spool": str(cfg.spool.dir),
        "mode": "offline" if cfg.link.offline else f"backend {cfg.link.ith_url}",
        "incoming": len(spool.incoming_names()),
        "quarantined": len(spool.quarantined()),
        "free_mb": int(spool.free_mb()),
        **counts,
        "outbox": forwarding,
        "failed_forwards": dead,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    states = ", ".join(f"{k} {v}" for k, v in counts["studies_by_state"].items())
    print(
        f"service:     {info['service']}\n"
        f"dicom:       {ae_title} on port {dicom_port}; API on port {cfg.api.port}\n"
        f"mode:        {info['mode']}\n"
        f"spool:       {info['spool']} ({info['free_mb']} MB free)\n"
        f"queues:      incoming {info['incoming']}, quarantined {info['quarantined']}\n"
        f"catalog:     {counts['patients']} patients, {counts['studies']} studies, "
        f"{counts['series']} series, {counts['instances']} instances "
        f"({counts['bytes'] / 2**20:.1f} MB)\n"
        f"studies:     {states}\n"
        f"forwarding:  pending {forwarding['pending']}, delivered {forwarding['delivered']}, "
        f"failed {forwarding['failed']}"
    )
    for d in dead:  # the dead letter, newest first: `requeue STUDY` sends it again
        print(f"  failed:    {d['study_instance_uid']} to {d['node']} after {d['attempts']} "
              f"attempt(s): {d['last_error']}")  # fmt: skip
    print("runtime settings (value, where it came from):")
    for key, item in runtime.items():
        value = item["value"]
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        print(f"  {key:<13} {value}  ({item['source']})")
    print(f"as of:       {datetime.now(UTC).isoformat(timespec='seconds')}")
    return 0


def cmd_reindex(cfg: Config, args: argparse.Namespace) -> int:
    from ith_proxy.dicom.libsetup import configure_libraries
    from ith_proxy.workers.reindex import reindex

    configure_libraries()  # reindex reads every stored header
    if not Spool(cfg.spool.dir).studies.is_dir():
        return fail(f"no spool at {cfg.spool.dir}")
    with locked_spool(cfg, "reindex") as spool:
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


def cmd_init(cfg: Config, args: argparse.Namespace) -> int:
    """Create the keys of a new site; never replace one (no partial creation)."""
    spool = Spool(cfg.spool.dir)
    files = secret_files(cfg.vault.key_file)
    present = [str(p) for p in files.values() if p.exists() or p.is_symlink()]
    if present:
        return fail(
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


def cmd_audit_verify(cfg: Config, args: argparse.Namespace) -> int:
    head = None
    if getattr(args, "head", None) is not None:
        try:
            head = parse_head(args.head)
        except ValueError:
            return fail(f"usage: ith-proxy audit verify --head {HEAD_USAGE}", EXIT_CONFIG)
    try:
        log = audit_log(cfg)
    except AuditError as exc:
        return fail(str(exc))
    anchored = log.anchor is not None and log.anchor.exists()
    if not log.path.exists() and not log.path.is_symlink() and not anchored and head is None:
        print(f"{log.path}: no audit records yet")
        return 0
    try:
        summary = log.verify(head)
    except AuditBroken as exc:
        where = f"at {exc}" if exc.line else f"({exc})"
        return fail(f"audit log {log.path} is broken {where}")
    except (AuditError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return fail(f"cannot read audit log {log.path}: {why}")
    torn = f"; {summary.torn} torn line(s) from interrupted writes" if summary.torn else ""
    anchor = (
        f"; matches its anchor {log.anchor}"
        if summary.anchored
        else "; no anchor yet (written before anchors existed: truncation cannot be checked)"
    )
    headed = f"; holds the head record {summary.headed}" if summary.headed else ""
    print(
        f"{log.path}: {summary.records} records intact, chain unbroken "
        f"({summary.first or '-'} .. {summary.last or '-'}){torn}{anchor}{headed}"
    )
    return 0


def cmd_audit_rotate(cfg: Config, args: argparse.Namespace) -> int:
    """A new first line in audit.key; the record of it is the first one signed
    by the new key, after a key-change record signed by the old one."""
    key_file = cfg.vault.audit_key_file
    if not key_file.exists():
        return fail(f"no audit key at {key_file}: nothing to rotate")
    with locked_spool(cfg, "audit rotate-key"):  # one rotation at a time
        add_audit_key(key_file)
        audit(cfg, "audit.rotate-key", str(key_file))
    print(f"audit key rotated; back up {key_file} (its older keys verify older records: keep them)")
    return 0


def cmd_vault_rotate(cfg: Config, args: argparse.Namespace) -> int:
    from ith_proxy.vault.rotate import rotate

    if not cfg.vault.key_file.exists():
        return fail(f"no vault key at {cfg.vault.key_file}: nothing to rotate")
    with locked_spool(cfg, "vault rotate-key") as spool:
        try:
            audit(cfg, "vault.rotate-key", str(cfg.vault.key_file))
            rotation = rotate(spool, spool.vault_file, cfg.vault.key_file)
        except (VaultRecordError, OSError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return fail(
                f"vault key rotation stopped: {detail}; everything still decrypts "
                "with the key file as it is now; fix the cause and run it again"
            )
    print(rotation.summary())
    print(
        f"back up the new key file {cfg.vault.key_file}; old copies of it can be destroyed",
        file=sys.stderr,
    )
    return 0
