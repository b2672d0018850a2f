"""What each backend command does (DESIGN.md §5, "Backend → proxy").

Every command comes from the network and is untrusted.  Each handler
returns ``(ok, detail)`` for the ``command.result``; none raises for bad
input.  The link talks to the rest of the proxy only through catalog rows:
the runtime settings (``store.settings``; the service applies them live),
the node registry (``store.nodes``) and the forwarding outbox
(``store.outbox``).  ``node.echo`` is the one command that opens an
association itself, bounded by the ``[scu]`` timeouts.

``anonymize`` is local only: a backend value is never applied; one that
differs from the local setting is logged and reported.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from ith_proxy.config import Config
from ith_proxy.dicom import scu
from ith_proxy.link.protocol import Incoming, safe
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.nodes import NodeError, Nodes
from ith_proxy.store.outbox import Outbox, OutboxError
from ith_proxy.store.settings import KEYS, LOCAL_ONLY, RuntimeSettings, SettingsError

log = logging.getLogger("ith_proxy.link")

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
Result = tuple[bool, dict[str, Any]]


def anonymize_problem(cfg: Config, value: object) -> str | None:
    """The report for a backend ``anonymize`` that differs from the local one."""
    if value == cfg.deid.anonymize:
        return None
    shown = value if isinstance(value, bool) else safe(value, 16)
    return f"backend asked for anonymize={shown}; ignored: anonymize is local only"


def apply_settings(cfg: Config, catalog: Catalog, body: Mapping[str, object]) -> Result:
    """Persist each runtime setting of ``body`` on its own (source backend):
    a refused field does not stop the others.  ``anonymize`` is refused
    (reported, never applied); other keys are not settings and are ignored
    here (the caller decides what else the body may hold)."""
    applied: list[str] = []
    changed: list[str] = []
    refused: dict[str, str] = {}
    store = RuntimeSettings(catalog)
    for key in KEYS:
        if key not in body:
            continue
        try:
            changed += store.update({key: body[key]}, source="backend")
            applied.append(key)
        except SettingsError as exc:
            refused[key] = str(exc)
            log.warning("link: backend setting %s refused: %s", key, safe(str(exc), 120))
    for key in LOCAL_ONLY:
        if key in body:
            problem = anonymize_problem(cfg, body[key])
            refused[key] = problem or "local only; never changed remotely"
            if problem:
                log.warning("link: %s", problem)
    detail: dict[str, Any] = {"applied": applied, "changed": changed}
    if refused:
        detail["refused"] = refused
    return not refused, detail


def config_update(cfg: Config, catalog: Catalog, cmd: Incoming) -> Result:
    unknown = sorted(k for k in cmd.body if k not in KEYS and k not in LOCAL_ONLY)
    ok, detail = apply_settings(cfg, catalog, cmd.body)
    if unknown:
        detail.setdefault("refused", {}).update(
            {safe(k): "is not a runtime setting" for k in unknown[:20]}
        )
        ok = False
    if not detail["applied"] and not detail.get("refused"):
        return False, {"message": "no runtime setting given", **detail}
    return ok, detail


def nodes_sync(catalog: Catalog, cmd: Incoming) -> Result:
    try:
        refusals = Nodes(catalog).sync(cmd.body.get("nodes"))
    except NodeError as exc:
        return False, {"message": str(exc)}
    total = len(cmd.body["nodes"])
    detail: dict[str, Any] = {"accepted": total - len(refusals)}
    if refusals:
        detail["refused"] = [{"node": safe(r.name), "reason": r.reason} for r in refusals[:100]]
    return not refusals, detail


def study_dispatch(catalog: Catalog, cmd: Incoming) -> Result:
    uid, node = cmd.body.get("study_instance_uid"), cmd.body.get("node")
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.fullmatch(uid):
        return False, {"message": "study_instance_uid: not a DICOM UID"}
    if not isinstance(node, str) or Nodes(catalog).get(node) is None:
        return False, {"message": f"node: unknown node {safe(node)!r}"}
    try:
        entry = Outbox(catalog, link_events=True).enqueue(uid, node, time.time())
    except OutboxError as exc:
        return False, {"message": str(exc)}
    return True, {"study_instance_uid": uid, "node": entry.node, "state": entry.state}


def node_echo(cfg: Config, catalog: Catalog, cmd: Incoming) -> Result:
    name = cmd.body.get("node")
    node = Nodes(catalog).get(name) if isinstance(name, str) else None
    if node is None:
        return False, {"message": f"node: unknown node {safe(name)!r}"}
    if node.kind != "dicom":
        return False, {"message": f"node {node.name} is a DICOMweb node: C-ECHO speaks DICOM"}
    timeouts = scu.Timeouts(
        connect=cfg.scu.connect_timeout, acse=cfg.scu.acse_timeout, dimse=cfg.scu.dimse_timeout
    )
    started = time.monotonic()
    try:
        scu.echo(scu.Peer(node.ae_title, node.host, node.port), ae_title(cfg, catalog), timeouts)
    except scu.ScuError as exc:
        return False, {"node": node.name, "message": exc.reason}
    return True, {"node": node.name, "seconds": round(time.monotonic() - started, 3)}


def ae_title(cfg: Config, catalog: Catalog) -> str:
    """The AE title in force: the persisted runtime setting, else the config's."""
    persisted = RuntimeSettings(catalog).persisted().get("ae_title")
    return str(persisted.value) if persisted is not None else cfg.scp.ae_title


def handler(cfg: Config, catalog: Catalog, kind: str) -> Callable[[Incoming], Result] | None:
    handlers: dict[str, Callable[[Incoming], Result]] = {
        "config.update": lambda c: config_update(cfg, catalog, c),
        "nodes.sync": lambda c: nodes_sync(catalog, c),
        "study.dispatch": lambda c: study_dispatch(catalog, c),
        "node.echo": lambda c: node_echo(cfg, catalog, c),
    }
    return handlers.get(kind)


def run(cfg: Config, catalog: Catalog, cmd: Incoming) -> Result:
    """Run one command; an unknown type, or any failure, is ok=false."""
    handle = handler(cfg, catalog, cmd.type)
    if handle is None:
        return False, {"message": f"unknown message type {safe(cmd.type)!r}"}
    try:
        return handle(cmd)
    except Exception as exc:  # a bug must not end the link; logged by type only
        log.error("link: %s failed: %s", cmd.type, type(exc).__name__)
        return False, {"message": f"{cmd.type} failed ({type(exc).__name__})"}
