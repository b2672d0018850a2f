"""``bin/ith-proxy [--config PATH] <command>``: thin argparse wiring.

Every failure the operator can fix is one line on stderr and a non-zero
exit: 2 for configuration errors, 1 for everything else.
"""

from __future__ import annotations

import argparse

from ith_proxy import config as config_mod
from ith_proxy.cli.common import EXIT_CONFIG, CliError, Command, Verbs, fail
from ith_proxy.cli.forward import add_commands as add_forward_commands
from ith_proxy.cli.quarantine import (
    cmd_quarantine_export,
    cmd_quarantine_list,
    cmd_quarantine_release,
)
from ith_proxy.cli.site import (
    cmd_audit_rotate,
    cmd_audit_verify,
    cmd_init,
    cmd_reindex,
    cmd_run,
    cmd_status,
    cmd_vault_rotate,
)
from ith_proxy.config import ConfigError
from ith_proxy.store.audit import AuditError
from ith_proxy.vault.keyfiles import VaultKeyError


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
    ).add_argument(
        "--head",
        metavar="SEQ:MAC",
        help="a chain head the backend kept (from its health or audit.head "
        "messages): the log must still hold record SEQ with that MAC",
    )
    add(
        asub,
        "rotate-key",
        cmd_audit_rotate,
        "sign new audit records under a new key (the old ones stay, to verify)",
    )
    add_forward_commands(add, sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config_mod.load(getattr(args, "config", None))
    except ConfigError as exc:
        return fail(f"config error: {exc}", EXIT_CONFIG)
    try:
        return args.func(cfg, args)
    except (VaultKeyError, AuditError, CliError) as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
