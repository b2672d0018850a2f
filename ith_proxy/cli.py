"""``bin/ith-proxy [--config PATH] <command>``: thin argparse wiring.

Every failure the operator can fix is one line on stderr and a non-zero
exit: 2 for configuration errors, 1 for everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from datetime import datetime, timezone

from . import config as config_mod
from .catalog import Catalog
from .config import Config, ConfigError
from .spool import Spool
from .vault import Vault, VaultKeyError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="INI file (default: $ITH_PROXY_CONFIG or conf/proxy.ini)")
    parser = argparse.ArgumentParser(
        prog="ith-proxy", parents=[common],
        description="Edge DICOM proxy: receive, de-identify, catalog and forward studies.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    sub.add_parser("run", parents=[common], help="run all services in one process")
    st = sub.add_parser("status", parents=[common], help="print a human summary")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("reindex", parents=[common],
                   help="rebuild the catalog from studies/ and the vault (service stopped)")
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"ith-proxy: {message}", file=sys.stderr)
    return code


def cmd_run(cfg: Config) -> int:
    from .service import Service, StartupError
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


def cmd_status(cfg: Config, as_json: bool) -> int:
    from .service import catalog_path
    spool = Spool(cfg.spool.dir)
    if not catalog_path(cfg).exists():
        return _fail(f"no catalog in {cfg.spool.dir}: the proxy has not run here yet")
    cat = Catalog(catalog_path(cfg), readonly=True)
    try:
        counts = cat.counts()
    finally:
        cat.close()
    info = {
        "service": _api_health(cfg),
        "ae_title": cfg.scp.ae_title, "dicom_port": cfg.scp.port, "api_port": cfg.api.port,
        "spool": str(cfg.spool.dir),
        "mode": "offline" if cfg.link.offline else f"backend {cfg.link.ith_url}",
        "incoming": len(spool.incoming_names()),
        "quarantined": len(spool.quarantined()),
        "free_mb": int(spool.free_mb()),
        **counts,
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    states = ", ".join(f"{k} {v}" for k, v in counts["studies_by_state"].items())
    print(f"service:     {info['service']}\n"
          f"dicom:       {cfg.scp.ae_title} on port {cfg.scp.port}; API on port {cfg.api.port}\n"
          f"mode:        {info['mode']}\n"
          f"spool:       {info['spool']} ({info['free_mb']} MB free)\n"
          f"queues:      incoming {info['incoming']}, quarantined {info['quarantined']}\n"
          f"catalog:     {counts['patients']} patients, {counts['studies']} studies, "
          f"{counts['series']} series, {counts['instances']} instances "
          f"({counts['bytes'] / 2**20:.1f} MB)\n"
          f"studies:     {states}\n"
          f"as of:       {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    return 0


def cmd_reindex(cfg: Config) -> int:
    from .indexer import reindex
    from .service import catalog_path, vault_path
    spool = Spool(cfg.spool.dir)
    if not spool.studies.is_dir():
        return _fail(f"no spool at {cfg.spool.dir}")
    lock = spool.lock()
    if lock is None:
        return _fail("the proxy is running on this spool; stop it before reindex")
    vault = Vault(vault_path(cfg), cfg.vault.key_file) if vault_path(cfg).exists() else None
    cat = Catalog(catalog_path(cfg))
    try:
        counts = reindex(spool, cat, vault)
    finally:
        cat.close()
    print(f"reindexed: {counts['patients']} patients, {counts['studies']} studies, "
          f"{counts['series']} series, {counts['instances']} instances")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config_mod.load(getattr(args, "config", None))
    except ConfigError as exc:
        return _fail(f"config error: {exc}", EXIT_CONFIG)
    try:
        if args.command == "run":
            return cmd_run(cfg)
        if args.command == "status":
            return cmd_status(cfg, args.json)
        if args.command == "reindex":
            return cmd_reindex(cfg)
    except VaultKeyError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return _fail(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
