"""The service puts the configured nodes in the registry at start-up: a real
proxy started with a [node:NAME] section and ITH_URL has both rows."""

from __future__ import annotations

from pathlib import Path

import tools
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.nodes import Nodes

INI = """
[node:pacs]
kind = dicom
ae_title = PACSAE
host = 127.0.0.1
port = 4242
"""


def test_configured_nodes_are_in_the_registry_after_start(tmp_path: Path) -> None:
    env = {"ITH_URL": "http://127.0.0.1:9/", "ITH_TOKEN": "secret-token-value"}
    with tools.ProxyProcess(tmp_path / "p", config_text=INI, env=env) as proxy:
        catalog = Catalog(Path(proxy.workdir) / "spool" / "catalog.sqlite3", readonly=True)
        try:
            nodes = {n.name: n for n in Nodes(catalog).list()}
        finally:
            catalog.close()
        logs = "".join(
            p.read_text() for p in (Path(proxy.workdir) / "spool" / "logs").glob("*.log")
        )
    assert nodes["pacs"].source == "ini" and nodes["pacs"].ae_title == "PACSAE"
    assert nodes["backend"].source == "derived" and nodes["backend"].kind == "dicomweb"
    assert "secret-token-value" not in logs
