"""The room rules of DESIGN.md §3, enforced by reading imports with ``ast``.

- each room imports only the rooms it may;
- workers never import each other;
- each third-party package lives in few rooms;
- no module is so large that it is no longer one room.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ith_proxy"

# room -> project rooms it may import (config is everyone's)
ALLOWED_ROOMS: dict[str, set[str]] = {
    "config": set(),
    "logs": {"config"},
    # durable file primitives (fsync_dir, private write, writev), stdlib only
    "fsio": set(),
    "spool": {"config", "fsio"},
    "catalog": {"config"},
    "vault": {"config", "keyfiles", "vault_record"},
    # the key folder's files (vault key, site secret, audit key) and when to create them
    "keyfiles": {"config", "fsio"},
    # the record lines of vault.phi (v2 AES-GCM, v1 Fernet); keys come in as an argument
    "vault_record": set(),
    # chunked Fernet files for raw input at rest (keys from vault.Keyring)
    "vault_stream": {"config", "vault", "fsio"},
    # key rotation: the key file, vault.phi and the encrypted spool files
    "vault_rotate": {"config", "spool", "vault", "vault_stream"},
    "deid": {"config", "deid"},
    "dicomfile": {"config", "fsio"},
    # pynetdicom reactor wake-ups, for every room that makes associations
    "assoc_wake": set(),
    # the pydicom/pynetdicom process-wide settings, applied by explicit call only
    "libsetup": set(),
    "audit": {"config", "fsio"},
    # scp gets a stream-encryptor factory from the service; it imports no vault room
    "scp": {"spool", "catalog", "config", "scp_stream", "assoc_wake"},
    # the one replacement of pynetdicom's data set assembly (docs/architecture.md)
    "scp_stream": {"config"},
    "qr": {"spool", "catalog", "config", "dicomfile", "assoc_wake"},
    "indexer": {"spool", "catalog", "vault", "vault_stream", "deid", "dicomfile", "codestream",
                "config"},
    # marker segments of encapsulated JPEG / JPEG 2000 pixel data (stdlib only)
    "codestream": set(),
    "scheduler": {"spool", "catalog", "config"},
    "forwarder": {"spool", "catalog", "config", "dicomfile", "assoc_wake"},
    "api": {"catalog", "vault", "audit", "config", "auth"},
    "auth": {"config"},
    "link": {"catalog", "config"},
    "service": None,  # wires everything
    "cli": None,      # thin, may call any room
    "__init__": set(),
    "__main__": {"cli"},
}

WORKERS = {"scp", "qr", "indexer", "scheduler", "forwarder", "api", "link"}

# third-party package -> rooms allowed to import it
THIRD_PARTY: dict[str, set[str]] = {
    "pynetdicom": {"scp", "scp_stream", "qr", "forwarder", "assoc_wake", "libsetup"},
    "apsw": {"catalog"},
    "cryptography": {"vault"},
    "bottle": {"api", "auth"},
    "jwt": {"api", "auth"},
    "waitress": {"api"},
    "websocket": {"link"},
    "watchdog": {"indexer"},
    "pydicom": {"deid", "dicomfile", "scp", "qr", "forwarder", "libsetup"},
}


def _room(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute dotted module, line) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    out.extend((f"{mod}.{a.name}", node.lineno) for a in node.names)
                    continue
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


def test_every_module_is_a_known_room() -> None:
    unknown = {_room(p) for p in _modules()} - set(ALLOWED_ROOMS)
    assert not unknown, f"rooms missing from the rules (add them to DESIGN/architecture): {unknown}"


def test_rooms_import_only_what_they_may() -> None:
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for path in _modules():
        room = _room(path)
        allowed = ALLOWED_ROOMS[room]
        for mod, line in _imports(path):
            top = mod.split(".")[0]
            where = f"{path.relative_to(PKG.parent)}:{line} imports {mod}"
            if top == "ith_proxy":
                target = mod.split(".")[1] if "." in mod else "__init__"
                if target == room:
                    continue
                if allowed is not None and target not in allowed:
                    problems.append(f"{where}: room {room} may not import {target}")
                if room in WORKERS and target in WORKERS:
                    problems.append(f"{where}: workers never import each other")
            elif top in THIRD_PARTY:
                if room not in THIRD_PARTY[top] and room not in ("service",):
                    problems.append(f"{where}: {top} belongs to {sorted(THIRD_PARTY[top])}")
            elif top not in stdlib and top != "__future__":
                problems.append(f"{where}: unexpected third-party package {top}")
    assert not problems, "\n".join(problems)


def test_rooms_stay_small() -> None:
    big = {str(p.relative_to(PKG.parent)): n for p in _modules()
           if (n := len(p.read_text().splitlines())) > 500}
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
            if not isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp,
                                      ast.DictComp, ast.SetComp)):
                continue
            for t in targets:
                if isinstance(t, ast.Name) and not t.id.isupper() and t.id != "__all__":
                    problems.append(f"{path.name}:{node.lineno} {t.id}")
    assert not problems, f"module-level mutable state: {problems}"
