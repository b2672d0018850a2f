"""The node registry: every peer the proxy sends to or retrieves from.

Nodes come from four sources (DESIGN.md §5) and live in one catalog table,
the one source of truth at run time:

- ``ini``: ``[node:NAME]`` sections, loaded at start-up by ``load_local``;
- ``derived``: ``backend``, made from ``ITH_URL``, loaded with them;
- ``api``: added, changed and deleted through the REST API (``put``, ``delete``);
- ``backend``: the backend's list, replaced whole by ``nodes.sync`` (``sync``).

Rules: names are unique in any case; AE titles are unique among dicom nodes
(C-MOVE destinations are looked up by AE title).  Local nodes (ini, derived,
api) are made on this box, so the backend cannot take their name or AE
title: a sync entry that would is refused, logged and returned.  The API
changes only api nodes.  At start-up the configuration wins: an api or
backend node that collides with an ini or derived one is removed, with a
warning.

Everything that reaches this module is validated again with the rules of
``config_values``: the API and the backend are untrusted input.  All SQL for
nodes lives here; the table is made by the catalog's migration step 2.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from ith_proxy import config_values as v
from ith_proxy.config import BACKEND_NODE, Config, NodeConfig
from ith_proxy.store.catalog import Catalog

log = logging.getLogger("ith_proxy.nodes")

SOURCES = ("ini", "api", "backend", "derived")
LOCAL_SOURCES = ("ini", "derived", "api")  # made on this box: a sync cannot touch them
MAX_SYNC_NODES = 1000  # a larger nodes.sync is refused whole

_COLUMNS = "name, kind, source, ae_title, host, port, url, auth_header, updated_at"
_WHERE_FROM = {"ini": "comes from the INI file", "derived": "is derived from ITH_URL"}


class NodeError(ValueError):
    """A node definition or change is refused; the one-line message says why."""


class NodeNotFound(NodeError):
    """No node has that name."""


class NodeConflict(NodeError):
    """The change collides with a node of another source (a name or an AE title)."""


@dataclass(frozen=True)
class Node:
    name: str
    kind: str  # dicom | dicomweb
    source: str  # ini | api | backend | derived
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""
    auth_header: str = field(default="", repr=False)  # a secret
    updated_at: float = 0.0

    def public(self) -> dict[str, Any]:
        """What status and the API may show: everything but the secret."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "source": self.source}
        if self.kind == "dicom":
            out.update(ae_title=self.ae_title, host=self.host, port=self.port)
        else:
            out.update(url=self.url, auth_header_set=bool(self.auth_header))
        out["updated_at"] = self.updated_at
        return out


@dataclass(frozen=True)
class Refusal:
    """A nodes.sync entry that was not taken: its name (or ``#index``) and why."""

    name: str
    reason: str


def validate(raw: Mapping[str, object], source: str) -> Node:
    """A node from untrusted fields (API, backend) or from config; NodeError if bad."""
    if source not in SOURCES:
        raise NodeError(f"unknown node source {source!r}")
    try:
        values = v.node_fields(raw)
    except ValueError as exc:
        raise NodeError(f"invalid node: {exc}") from None
    reserved = values["name"].lower() in v.RESERVED_NODE_NAMES
    if reserved and not (source == "derived" and values["name"] == BACKEND_NODE):
        raise NodeError(f"the node name {values['name']!r} is reserved")
    return Node(source=source, **values)


def _from_config(node: NodeConfig, source: str) -> Node:
    if node.source != source:
        raise NodeError(f"node {node.name!r}: expected source {source}, got {node.source}")
    fields = {
        "name": node.name,
        "kind": node.kind,
        "ae_title": node.ae_title,
        "host": node.host,
        "port": node.port or "",
        "url": node.url,
        "auth_header": node.auth_header,
    }
    return validate(fields, source)


def _row(row: tuple) -> Node:
    return Node(*row)


class Nodes:
    """The registry over one catalog connection (each thread opens its own)."""

    def __init__(self, catalog: Catalog) -> None:
        self._conn = catalog.conn

    # --- reading ---

    def list(self) -> builtins.list[Node]:  # annotations below say builtins.list
        rows = self._conn.execute(f"SELECT {_COLUMNS} FROM nodes ORDER BY name").fetchall()
        return [_row(r) for r in rows]

    def get(self, name: str) -> Node | None:
        """The node of that name, in any case."""
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM nodes WHERE name = ?", (str(name),)
        ).fetchone()
        return None if row is None else _row(row)

    def by_ae_title(self, ae_title: str) -> Node | None:
        """The dicom node with that AE title (a C-MOVE destination), or None."""
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM nodes WHERE kind = 'dicom' AND ae_title = ?",
            (str(ae_title).strip(),),
        ).fetchone()
        return None if row is None else _row(row)

    # --- writing ---

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, taken at once (no read-then-upgrade race)."""
        if self._conn.in_transaction:
            with self._conn:
                yield
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One write transaction around several calls (the API writes its audit
        record inside it: no record, no change)."""
        return self._write()

    def _insert(self, node: Node, now: float) -> None:
        self._conn.execute(
            f"INSERT INTO nodes({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                node.name,
                node.kind,
                node.source,
                node.ae_title,
                node.host,
                node.port,
                node.url,
                node.auth_header,
                now,
            ),
        )

    def _delete(self, name: str) -> None:
        self._conn.execute("DELETE FROM nodes WHERE name = ?", (name,))

    def load_local(
        self, ini_nodes: Iterable[NodeConfig], derived: Iterable[NodeConfig] = ()
    ) -> builtins.list[str]:
        """Replace the ini and derived nodes with the configuration's, in one
        transaction.  The configuration wins: an api or backend node with the
        same name or AE title is removed (logged).  Returns the removed names."""
        local = [_from_config(n, "ini") for n in ini_nodes]
        local += [_from_config(n, "derived") for n in derived]
        names: set[str] = set()
        aes: set[str] = set()
        for node in local:
            if node.name.lower() in names:
                raise NodeConflict(f"node {node.name!r} is defined twice")
            names.add(node.name.lower())
            if node.kind == "dicom":
                if node.ae_title in aes:
                    raise NodeConflict(f"AE title {node.ae_title!r} is used by two nodes")
                aes.add(node.ae_title)
        removed: builtins.list[str] = []
        now = time.time()
        with self._write():
            self._conn.execute("DELETE FROM nodes WHERE source IN ('ini', 'derived')")
            for node in local:
                for other in self._collisions(node):
                    log.warning(
                        "node %s (source %s) removed: %s node %s now has its %s",
                        other.name,
                        other.source,
                        node.source,
                        node.name,
                        "name" if other.name.lower() == node.name.lower() else "AE title",
                    )
                    self._delete(other.name)
                    removed.append(other.name)
                self._insert(node, now)
        log.info("nodes: %d from the configuration loaded", len(local))
        return removed

    def _collisions(self, node: Node) -> builtins.list[Node]:
        """Stored nodes with the same name (any case) or, for dicom, AE title."""
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM nodes WHERE name = ? OR (kind = 'dicom' AND ? = 'dicom'"
            " AND ae_title = ?)",
            (node.name, node.kind, node.ae_title),
        ).fetchall()
        return [_row(r) for r in rows]

    def put(self, raw: Mapping[str, object], create_only: bool = False) -> Node:
        """Add or replace an api node (from the API: untrusted); with
        ``create_only`` a node of that name, whatever its source, is a conflict."""
        if not isinstance(raw, Mapping):
            raise NodeError("a node must be an object")
        node = validate(raw, "api")
        with self._write():
            for other in self._collisions(node):
                if create_only and other.name.lower() == node.name.lower():
                    raise NodeConflict(f"a node named {other.name!r} exists")
                if other.name.lower() != node.name.lower():
                    raise NodeConflict(
                        f"AE title {node.ae_title!r} is already used by node {other.name!r}"
                    )
                if other.source != "api":
                    raise NodeConflict(_not_api(other, "changed"))
            self._delete(node.name)
            now = time.time()
            self._insert(node, now)
        return replace(node, updated_at=now)

    def delete(self, name: str) -> None:
        """Delete an api node (from the API)."""
        with self._write():
            node = self.get(name)
            if node is None:
                raise NodeNotFound(f"no node named {str(name)[:80]!r}")
            if node.source != "api":
                raise NodeConflict(_not_api(node, "deleted"))
            self._delete(node.name)

    def sync(self, entries: object) -> builtins.list[Refusal]:
        """Replace the backend nodes with a ``nodes.sync`` list (untrusted).

        Each bad entry is refused alone, logged and returned: invalid, a
        reserved name, a duplicate in the list, or the name or AE title of a
        local (ini, derived, api) node.  The rest replace every backend node
        in one transaction; local nodes are never touched."""
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Iterable):
            raise NodeError("nodes.sync: expected a list of nodes")
        entries = list(entries)
        if len(entries) > MAX_SYNC_NODES:
            raise NodeError(f"nodes.sync: more than {MAX_SYNC_NODES} nodes")
        refusals: builtins.list[Refusal] = []
        accepted: builtins.list[Node] = []
        with self._write():
            local = [n for n in self.list() if n.source in LOCAL_SOURCES]
            names = {n.name.lower(): n for n in local}
            aes = {n.ae_title: n for n in local if n.kind == "dicom"}
            seen_names: set[str] = set()
            seen_aes: set[str] = set()
            for index, entry in enumerate(entries):
                label = f"#{index}"
                try:
                    if not isinstance(entry, Mapping):
                        raise NodeError("not an object")
                    node = validate(entry, "backend")
                    label = node.name
                    key = node.name.lower()
                    if key in names:
                        raise NodeConflict(f"names a local node (source {names[key].source})")
                    if key in seen_names:
                        raise NodeConflict("the name appears twice in the list")
                    if node.kind == "dicom":
                        if node.ae_title in aes:
                            owner = aes[node.ae_title]
                            raise NodeConflict(
                                f"AE title {node.ae_title!r} belongs to local node "
                                f"{owner.name} (source {owner.source})"
                            )
                        if node.ae_title in seen_aes:
                            raise NodeConflict(f"AE title {node.ae_title!r} appears twice")
                        seen_aes.add(node.ae_title)
                    seen_names.add(key)
                    accepted.append(node)
                except NodeError as exc:
                    refusals.append(Refusal(label, str(exc)))
            self._conn.execute("DELETE FROM nodes WHERE source = 'backend'")
            now = time.time()
            for node in accepted:
                self._insert(node, now)
        for refusal in refusals:
            log.warning("nodes.sync: node %s refused: %s", refusal.name, refusal.reason)
        log.info("nodes.sync: %d backend nodes, %d refused", len(accepted), len(refusals))
        return refusals


def _not_api(node: Node, verb: str) -> str:
    if node.source == "backend":
        return (
            f"node {node.name!r} is managed by the backend (source backend)"
            f" and cannot be {verb} through the API"
        )
    where = _WHERE_FROM.get(node.source, f"has source {node.source}")
    return f"node {node.name!r} {where} and cannot be {verb} through the API"


def load_config_nodes(catalog: Catalog, cfg: Config) -> list[str]:
    """Start-up: put the configuration's nodes (INI and derived) in the registry.

    The service calls this once, before the forwarder and the SCP's C-MOVE
    start; it returns the api/backend node names the configuration displaced."""
    return Nodes(catalog).load_local(cfg.nodes, cfg.derived_nodes)
