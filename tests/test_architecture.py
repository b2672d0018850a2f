"""The room rules of docs/architecture.md, enforced by reading imports with ``ast``.

A room is a module, named by its dotted path under ``ith_proxy`` (``store.spool``);
the ``deid`` package is one room.  A rule may name a room or a whole package
(``dicom`` covers ``dicom.scp``, ``dicom.ae`` ...).

- each room imports only the rooms it may;
- workers never import each other;
- each third-party package lives in its package (pynetdicom in ``dicom/``,
  bottle in ``web/``) or in one room (apsw in ``store.catalog``);
- no module is so large that it is no longer one room.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ith_proxy"

# room -> rooms or packages it may import (None: may import any room)
ALLOWED_ROOMS: dict[str, set[str] | None] = {
    "__init__": set(),
    "__main__": {"cli"},
    "config": {"config_types", "config_values"},
    # the configuration's dataclasses, one per INI section (re-exported by config)
    "config_types": set(),
    # the value parsers and validators of config and of node definitions (stdlib only)
    "config_values": set(),
    "logs": {"config"},
    # durable file primitives (fsync_dir, private write, whole append), stdlib only
    "fsio": set(),
    # retry timing (exponential backoff, equal jitter) for the forwarder and the link
    "backoff": set(),
    # what the health check, the metrics and the status page report: the policy reads
    # the spool and the catalog; worker liveness is passed in by the service
    "health": {"config", "store.spool", "store.catalog"},
    "service": None,  # wires everything
    # child processes: forked at start-up or exec'd later, the lifeline (stdlib + config)
    "children": {"config"},
    # the zygote: forked at start-up, single-threaded, forks the children started later
    "zygote": {"children"},
    # what each SCP worker process reports to the service: a shared page (stdlib only)
    "scp_stats": set(),
    # an SCP worker process ([scp] workers > 1): its own ServiceControl on the shared port
    "scp_worker": {
        "children",
        "config",
        "control",
        "logs",
        "dicom.libsetup",
        "dicom.scp",
        "scp_stats",
        "store.spool",
        "vault.keys",
        "vault.stream",
    },
    # the indexer's child process: its entry point (forked or exec'd through children)
    "indexer_child": {
        "children",
        "config",
        "logs",
        "dicom.libsetup",
        "store.catalog",
        "store.spool",
        "vault.keyfiles",
        "vault.records",
        "workers.indexer",
    },
    # the service's controls: the SCP under the runtime settings, its counters, C-ECHO of a node
    "control": {
        "config",
        "dicom.scp",
        "dicom.scu",
        "store.catalog",
        "store.nodes",
        "store.settings",
    },
    "cli": None,  # thin, may call any room
    # store/: the spool folders, the catalog (all SQL), the audit log
    "store": set(),
    "store.spool": {"config", "fsio", "store.attempts", "store.buckets", "store.quarantine"},
    "store.quarantine": {"fsio"},  # the quarantine folder's part of the spool
    "store.attempts": {"fsio"},  # the indexer's in-progress markers' part of the spool
    "store.buckets": set(),  # how several indexers share incoming/ (stdlib)
    "store.catalog": {"config", "store.schema"},
    # the catalog's user_version migration steps and the Q/R columns per level (no imports)
    "store.schema": set(),
    # the C-FIND queries: a query spec -> parameterized SQL over a Catalog's connection
    "store.qr_catalog": {"store.catalog"},
    # the forwarding outbox and its per-instance ledger (SQL over a Catalog's connection)
    "store.outbox": {"backoff", "store.catalog", "store.linkbox"},
    # the backend link's durable outgoing messages (SQL over a Catalog's connection)
    "store.linkbox": {"store.catalog"},
    # what retention may purge, the tombstones, the outbox restored by reindex
    "store.retention": {"store.catalog", "store.outbox"},
    "store.audit": {"config", "fsio"},
    # the node registry: its SQL over the catalog's connection, validated like config
    "store.nodes": {"config", "config_values", "store.catalog"},
    # the persisted runtime settings (ae_title, dicom_port, study_timeout, forward_to)
    "store.settings": {"config", "config_values", "store.catalog"},
    # the API's read queries: the study list (keyset pages), a study's detail, the site summary
    "store.browse": {"store.catalog", "store.outbox", "store.spool"},
    # retrieve's SQL: the unpurged instances a C-GET/C-MOVE identifier names
    "store.qr_files": {"store.catalog"},
    # vault/: keys (the only cryptography), key files, vault.phi, encrypted spool files
    "vault": set(),
    "vault.keyfiles": {"fsio"},
    "vault.keys": {"fsio", "vault.keyfiles"},
    "vault.records": {"fsio", "vault.keys"},
    "vault.stream": {"config", "fsio", "vault.keys"},
    "vault.rotate": {"config", "store.spool", "vault.keys", "vault.records", "vault.stream"},
    # deid/: one room, pure functions over data sets
    # the de-identifier; deid.flat walks the flat elements of dicom.flat (issue 11's fast lane)
    # and packs the output's meta group with dicom.file_meta
    "deid": {"config", "deid", "dicom.file_meta", "dicom.flat"},
    # dicom/: every pynetdicom import; the files we read and write
    "dicom": set(),
    "dicom.files": {"config", "fsio", "dicom.fastread", "dicom.file_meta", "dicom.scu_wire"},
    # the header's raw elements as pydicom's read_dataset gives them, parsed with struct
    "dicom.fastread": set(),
    # a header as flat elements, read and written without pydicom's Dataset (the fast lane)
    "dicom.flat": {"dicom.file_meta", "dicom.files", "dicom.scu_wire"},
    "dicom.file_meta": set(),  # an output's file meta group, packed by hand (pydicom otherwise)
    "dicom.codestream": set(),  # marker segments of JPEG / JPEG 2000 (stdlib only)
    "dicom.wake": set(),  # reactor wake-ups, for every room that makes associations
    "dicom.libsetup": set(),  # library settings, applied by explicit call only
    # replaces pynetdicom's data set assembly
    "dicom.scp_stream": {"config", "dicom.store_inline", "dicom.store_wire"},
    "dicom.store_inline": {"dicom.store_wire"},  # a plain C-STORE served on the DUL thread
    # the one replacement of pynetdicom's C-STORE-RSP sending (command set packed by hand)
    "dicom.store_wire": {"dicom.find_wire", "dicom.scu_wire"},
    "dicom.ae": {"config", "dicom.get_stream", "dicom.pdu_read", "dicom.scp_stream", "dicom.wake"},
    "dicom.pdu_read": {"dicom.wake"},  # PDUs read by hand; tells the DUL's wait of PDUs held
    "dicom.inflow": set(),  # C-STORE answers paced while the indexer drains a backlog
    # the SCP gets a stream-encryptor factory from the service; it imports no vault room
    "dicom.scp": {
        "config",
        "store.spool",
        "dicom.ae",
        "dicom.get_stream",
        "dicom.inflow",
        "dicom.qr",
        "dicom.qr_retrieve",
        "dicom.scp_stream",
    },
    # the one replacement of pynetdicom's C-GET/C-MOVE SCP (stored bytes as they are)
    "dicom.get_stream": {"dicom.scu_wire"},
    # who may find, get and move (stdlib + the config's rules)
    "dicom.qr_access": {"config"},
    # C-GET and C-MOVE over the catalog and studies/ (C-MOVE through the forwarder's SCU)
    "dicom.qr_retrieve": {
        "config",
        "fsio",
        "store.catalog",
        "store.nodes",
        "store.qr_files",
        "store.spool",
        "dicom.get_stream",
        "dicom.qr_access",
        "dicom.scu",
        "dicom.scu_assoc",
        "dicom.scu_wire",
        "dicom.status",
    },
    "dicom.qr": {
        "config",
        "store.spool",
        "store.catalog",
        "store.qr_catalog",
        "dicom.files",
        "dicom.find_wire",
        "dicom.qr_match",
    },
    # the one replacement of pynetdicom's C-FIND-RSP sending; identifiers packed by hand
    "dicom.find_wire": {"dicom.get_stream", "dicom.scu_wire"},
    # a C-FIND identifier as a pure-data query spec (PS3.4 C.2.2.2, C.4.1)
    "dicom.qr_match": {"store.qr_catalog"},
    # a DICOM status -> delivered / transient / permanent, for the SCU and STOW-RS (stdlib)
    "dicom.status": set(),
    # the STOW-RS client (stdlib HTTP) and what its responses mean (pure)
    "dicom.stow": {"fsio", "dicom.status", "dicom.stow_reply"},
    "dicom.stow_reply": {"dicom.status"},
    # outgoing associations (socket fixes, wake-ups, C-ECHO); C-STORE SCU; its bytes; C-MOVE SCU
    "dicom.scu_assoc": {"config", "dicom.wake"},
    "dicom.scu_wire": set(),  # stdlib only
    "dicom.scu": {"fsio", "dicom.scu_assoc", "dicom.scu_wire", "dicom.status"},
    "dicom.move": {"dicom.scu_assoc"},
    # workers/: processes and threads that move instances through the spool
    "workers": set(),
    "workers.indexer": {
        "config",
        "store.spool",
        "store.catalog",
        "vault.records",
        "vault.stream",
        "deid",
        "dicom.files",
        "dicom.codestream",
        "workers.index_checks",
        "workers.index_claim",
        "workers.index_flat",
        "workers.index_watch",
    },
    # which files an indexer takes next: batches, suspects, buckets
    "workers.index_claim": {"config", "store.buckets", "store.spool"},
    # what the indexer refuses and how: checks, quarantine reasons, quarantine (not a worker)
    "workers.index_checks": {"deid", "dicom.files", "vault.stream"},
    # the indexer's fast lane: checks, risk and de-identification of flat elements (not a worker)
    "workers.index_flat": {"deid", "dicom.codestream", "dicom.files", "dicom.flat"},
    # the indexer's wake-up on incoming/: watchdog's inotify reader, parked while it works
    "workers.index_watch": set(),
    "workers.scheduler": {
        "config",
        "store.spool",
        "store.catalog",
        "store.outbox",
        "store.retention",
        "store.settings",  # study_timeout and forward_to, read live each pass
    },
    # the offline rebuild of the catalog (`ith-proxy reindex`)
    "workers.reindex": {
        "store.spool",
        "store.catalog",
        "store.outbox",
        "store.retention",
        "vault.records",
        "dicom.files",
    },
    "workers.forwarder": {
        "config",
        "backoff",
        "store.spool",
        "store.catalog",
        "store.outbox",
        "store.nodes",
        "dicom",
    },
    # web/: the HTTP API
    "web": {"config", "health", "store.catalog", "store.audit", "vault.records", "web"},
    "web.app": {"config", "health", "store.catalog", "store.audit", "vault.records", "web"},
    # what every route module gets: the context, ApiError, JSON in and out, route()
    "web.context": {"config", "store.audit", "store.catalog", "vault.records"},
    "web.auth": {"config", "web.context"},  # JWT bearer tokens (PyJWT)
    # the api.log line of each request, anonymous refusals rate-limited
    "web.access": {"web.auth", "web.context"},
    # the OpenAPI document, joined from the route modules' fragments
    "web.openapi": {"__init__"},
    # the route modules, one per group of routes
    "web.status": {
        "__init__",  # the version
        "config",
        "health",
        "store.browse",
        "store.catalog",
        "store.outbox",
        "store.spool",
        "web.context",
    },
    "web.studies": {
        "store.browse",
        "store.catalog",
        "store.nodes",
        "store.outbox",
        "web.context",
        "web.openapi",
        "web.query",
    },
    # the read routes' inputs: the study list's query parameters, study UIDs
    "web.query": {"store.browse", "store.catalog", "web.context"},
    "web.phi": {
        "deid",
        "store.audit",
        "store.catalog",
        "vault.records",
        "web.context",
        "web.openapi",
    },
    "web.nodes": {
        "config_values",
        "store.audit",
        "store.catalog",
        "store.nodes",
        "web.context",
        "web.openapi",
    },
    "web.settings": {
        "store.audit",
        "store.catalog",
        "store.nodes",
        "store.settings",
        "web.context",
        "web.openapi",
    },
    "web.metrics": {
        "__init__",  # the version
        "health",
        "store.browse",
        "store.catalog",
        "store.outbox",
        "store.spool",
        "web.context",
        "web.status",
    },
    # link/: the backend WebSocket link
    "link": {"config", "store.catalog", "link"},
    # the backend's messages: parsing (untrusted) and building; the envelope is the linkbox's
    "link.protocol": {"__init__", "store.linkbox"},
    # what each backend command does, through catalog rows; node.echo is a C-ECHO SCU
    "link.commands": {
        "config",
        "dicom.scu",
        "link.protocol",
        "store.catalog",
        "store.nodes",
        "store.outbox",
        "store.settings",
    },
    # GET {ITH_URL}/api/proxy/config/ (stdlib HTTP) and its application
    "link.config_fetch": {
        "config",
        "link.commands",
        "link.protocol",
        "store.catalog",
        "store.nodes",
    },
    # the WebSocket session loop and reconnects (websocket-client)
    "link.client": {
        "backoff",
        "config",
        "link.commands",
        "link.config_fetch",
        "link.protocol",
        "store.audit",
        "store.catalog",
        "store.linkbox",
        "store.outbox",
    },
}

# a worker is a room (or package) that runs on its own; workers never import each other
WORKERS = {
    "dicom.scp",  # dicom.qr runs in the SCP's association threads: part of this worker
    "workers.indexer",
    "workers.scheduler",
    "workers.reindex",
    "workers.forwarder",
    "web",
    "link",
}

# third-party package -> the rooms or packages allowed to import it
THIRD_PARTY: dict[str, set[str]] = {
    "pynetdicom": {"dicom"},
    "pydicom": {"dicom", "deid"},
    "apsw": {"store.catalog"},
    "cryptography": {"vault.keys"},
    "bottle": {"web"},
    "jwt": {"web"},
    "waitress": {"web"},
    "websocket": {"link"},
    "watchdog": {"workers.index_watch"},
}


def _within(room: str, spec: str) -> bool:
    return room == spec or room.startswith(spec + ".")


def _allowed(room: str, specs: set[str]) -> bool:
    return any(_within(room, s) for s in specs)


def _room(dotted: str) -> str:
    """'ith_proxy.store.spool' -> 'store.spool'; the deid package is one room."""
    parts = dotted.split(".")[1:]
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts:
        return "__init__"
    if parts[0] in ("deid", "cli"):
        return parts[0]
    return ".".join(parts)


def _worker(room: str) -> str | None:
    return next((w for w in WORKERS if _within(room, w)), None)


def _dotted(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts)


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel).is_dir()


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute dotted module, line) for every import in a file; ``from pkg
    import mod`` counts as an import of ``pkg.mod``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _dotted(path).split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [
                f"{mod}.{a.name}"
                for a in node.names
                if mod.split(".")[0] == "ith_proxy" and _is_module(f"{mod}.{a.name}")
            ]
            out.extend((m, node.lineno) for m in subs or [mod])
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


def test_every_module_is_a_known_room() -> None:
    unknown = {_room(_dotted(p)) for p in _modules()} - set(ALLOWED_ROOMS)
    assert not unknown, (
        f"rooms missing from the rules (add them to docs/architecture.md): {unknown}"
    )


def test_rooms_import_only_what_they_may() -> None:
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for path in _modules():
        room = _room(_dotted(path))
        allowed = ALLOWED_ROOMS[room]
        for mod, line in _imports(path):
            top = mod.split(".")[0]
            where = f"{path.relative_to(PKG.parent)}:{line} imports {mod}"
            if top == "ith_proxy":
                target = _room(mod)
                if target == room:
                    continue
                if allowed is not None and not _allowed(target, allowed):
                    problems.append(f"{where}: room {room} may not import {target}")
                mine, theirs = _worker(room), _worker(target)
                if mine and theirs and mine != theirs:
                    problems.append(f"{where}: workers never import each other")
            elif top in THIRD_PARTY:
                if not _allowed(room, THIRD_PARTY[top]) and room != "service":
                    problems.append(f"{where}: {top} belongs to {sorted(THIRD_PARTY[top])}")
            elif top not in stdlib and top != "__future__":
                problems.append(f"{where}: unexpected third-party package {top}")
    assert not problems, "\n".join(problems)


def test_the_rules_catch_a_stray_import(tmp_path: Path) -> None:
    """The checker itself: a package-level rule covers its modules, a worker
    importing another is caught, and a third-party import outside its package is."""
    assert _room("ith_proxy.dicom.scp") == "dicom.scp"
    assert _room("ith_proxy.deid.engine") == "deid"
    assert _room("ith_proxy.store") == "store"
    assert _allowed("dicom.ae", THIRD_PARTY["pynetdicom"])
    assert not _allowed("workers.indexer", THIRD_PARTY["pynetdicom"])
    assert not _allowed("vault.records", THIRD_PARTY["cryptography"])
    assert _worker("web.app") == "web" and _worker("workers.indexer") == "workers.indexer"
    assert _worker("store.spool") is None
    assert ("ith_proxy.dicom.scp_stream", 1) in [
        (m, 1) for m, _ in _imports(PKG / "dicom" / "scp.py")
    ]


def test_rooms_stay_small() -> None:
    big = {
        str(p.relative_to(PKG.parent)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not big, f"a room over 500 lines is probably two rooms: {big}"


def test_no_module_level_mutable_state() -> None:
    """Module-level names bound to lists, dicts or sets must be constants (UPPER_CASE)."""
    problems = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            targets = []
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            if not isinstance(
                value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
            ):
                continue
            for t in targets:
                if isinstance(t, ast.Name) and not t.id.isupper() and t.id != "__all__":
                    problems.append(f"{_dotted(path)}:{node.lineno} {t.id}")
    assert not problems, f"module-level mutable state: {problems}"
