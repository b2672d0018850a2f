"""The commands of forwarding and the SCU: ``echo NODE``, ``send STUDY NODE``,
``requeue STUDY [--node N]`` and ``retrieve NODE STUDY``.

``send`` and ``requeue`` only write outbox rows (``store/outbox.py``): the
running proxy's forwarder does the sending, with its retries and ledger, and
a stopped proxy sends them when it starts.  ``echo`` and ``retrieve`` open
an association themselves, bounded by the ``[scu]`` timeouts.  A node is
looked up in the registry of the catalog, or, before the proxy has ever
run, among the nodes of the configuration.
"""

from __future__ import annotations

import argparse
import re
import time

from ith_proxy.cli.common import Adder, CliError, Verbs, fail
from ith_proxy.config import Config, NodeConfig
from ith_proxy.control import echo_peer, scu_timeouts
from ith_proxy.dicom import scu
from ith_proxy.dicom.move import move
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.nodes import Node, Nodes
from ith_proxy.store.outbox import Outbox, OutboxError
from ith_proxy.store.settings import RuntimeSettings, effective
from ith_proxy.store.spool import Spool

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _uid(value: str) -> str:
    if len(value) > 64 or not _UID.fullmatch(value):
        raise CliError(f"not a DICOM UID: {value[:80]!r}")
    return value


def _catalog(cfg: Config, readonly: bool) -> Catalog:
    spool = Spool(cfg.spool.dir)
    if not spool.catalog_file.exists():
        raise CliError(f"no catalog in {cfg.spool.dir}: the proxy has not run here yet")
    return Catalog(spool.catalog_file, readonly=readonly)


def _node(cfg: Config, name: str) -> Node | NodeConfig:
    if Spool(cfg.spool.dir).catalog_file.exists():
        catalog = _catalog(cfg, readonly=True)
        try:
            node = Nodes(catalog).get(name)
        finally:
            catalog.close()
        if node is not None:
            return node
    for local in cfg.local_nodes():
        if local.name.lower() == name.lower():
            return local
    raise CliError(f"unknown node {name[:64]!r} (see docs/nodes.md)")


def _live(cfg: Config) -> Config:
    """``cfg`` with the persisted runtime settings on top: the AE title that
    calls out and that a C-MOVE names as destination is the one the SCP
    answers to now (it may have been set through the API or the backend)."""
    if not Spool(cfg.spool.dir).catalog_file.exists():
        return cfg
    catalog = _catalog(cfg, readonly=True)
    try:
        return effective(cfg, RuntimeSettings(catalog).persisted())
    finally:
        catalog.close()


def _peer(cfg: Config, name: str) -> scu.Peer:
    node = _node(cfg, name)
    if node.kind != "dicom":
        raise CliError(f"node {node.name} is a DICOMweb node: this command speaks DICOM")
    return scu.Peer(node.ae_title, node.host, node.port)


def cmd_echo(cfg: Config, args: argparse.Namespace) -> int:
    cfg = _live(cfg)
    peer = _peer(cfg, args.node)
    try:  # the same C-ECHO as the API's POST /api/nodes/<name>/echo/
        print(echo_peer(cfg, args.node, peer))
    except scu.ScuError as exc:  # no association, or a C-ECHO status other than success
        return fail(f"echo {args.node} ({peer}): {exc.reason}")
    return 0


def _outbox_call(cfg: Config, call: str, study: str, node: str | None) -> list[str]:
    catalog = _catalog(cfg, readonly=False)
    try:
        outbox = Outbox(catalog)
        if call == "send":
            assert node is not None  # the parser requires it
            return [outbox.enqueue(study, node, time.time()).node]
        return outbox.requeue(study, time.time(), node)
    except OutboxError as exc:
        raise CliError(f"{call} {study}: {exc}") from None
    finally:
        catalog.close()


def cmd_send(cfg: Config, args: argparse.Namespace) -> int:
    study = _uid(args.study)
    name = _node(cfg, args.node).name
    _outbox_call(cfg, "send", study, name)
    print(f"queued study {study} for {name}; the running proxy sends it")
    return 0


def cmd_requeue(cfg: Config, args: argparse.Namespace) -> int:
    study = _uid(args.study)
    name = _node(cfg, args.node).name if args.node else None
    nodes = _outbox_call(cfg, "requeue", study, name)
    print(f"requeued study {study} for {', '.join(nodes)}; the running proxy sends it")
    return 0


def cmd_retrieve(cfg: Config, args: argparse.Namespace) -> int:
    study = _uid(args.study)
    cfg = _live(cfg)
    peer = _peer(cfg, args.node)
    try:
        result = move(peer, cfg.scp.ae_title, study, cfg.scp.ae_title, scu_timeouts(cfg))
    except scu.ScuError as exc:  # association failures included
        return fail(f"retrieve from {args.node}: {exc.reason}")
    summary = f"{result.completed} completed, {result.failed} failed, {result.warning} warning"
    if result.failed or not result.ok:
        return fail(f"retrieve from {args.node}: {result.reason or 'failed'} ({summary})")
    print(f"retrieved study from {args.node}: {summary}; it is ingested as it arrives")
    return 0


def add_commands(add: Adder, sub: Verbs) -> None:
    """Register the commands with the parser's helper."""
    echo = add(sub, "echo", cmd_echo, "C-ECHO a DICOM node")
    echo.add_argument("node", metavar="NODE", help="node name")
    send = add(sub, "send", cmd_send, "queue a study to be sent to a node")
    send.add_argument("study", metavar="STUDY", help="anonymized StudyInstanceUID")
    send.add_argument("node", metavar="NODE", help="node name")
    requeue = add(
        sub, "requeue", cmd_requeue, "send a study again (failed instances, or all when delivered)"
    )
    requeue.add_argument("study", metavar="STUDY", help="anonymized StudyInstanceUID")
    requeue.add_argument("--node", metavar="N", help="only this destination")
    retrieve = add(
        sub, "retrieve", cmd_retrieve, "C-MOVE: ask a node to send a study to this proxy"
    )
    retrieve.add_argument("node", metavar="NODE", help="node name")
    retrieve.add_argument("study", metavar="STUDY", help="the study's StudyInstanceUID there")
