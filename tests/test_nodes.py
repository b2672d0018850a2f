"""The node registry (store/nodes.py) on a real catalog file: the rules of
DESIGN.md §5, each with a test, and hostile input from the API and the backend."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from ith_proxy import config
from ith_proxy.config import NodeConfig
from ith_proxy.store import catalog as catalog_mod
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.nodes import (
    MAX_SYNC_NODES,
    Node,
    NodeConflict,
    NodeError,
    NodeNotFound,
    Nodes,
    load_config_nodes,
)

SECRET = "Bearer s3cr3t-never-shown"
PACS = NodeConfig("pacs", "dicom", ae_title="MAINPACS", host="pacs.example.org", port=104)
WEB = NodeConfig(
    "research", "dicomweb", url="https://web.example.org/dicom-web", auth_header=SECRET
)
BACKEND = NodeConfig(
    "backend",
    "dicomweb",
    url="https://ith.example/dicom-web",
    auth_header="Token tok",
    source="derived",
)


@pytest.fixture
def catalog(tmp_path: Path):
    cat = Catalog(tmp_path / "catalog.sqlite3")
    yield cat
    cat.close()


@pytest.fixture
def nodes(catalog: Catalog) -> Nodes:
    reg = Nodes(catalog)
    reg.load_local([PACS, WEB], [BACKEND])
    return reg


def dicom(name: str, ae: str, port: int = 104) -> dict:
    return {"name": name, "kind": "dicom", "ae_title": ae, "host": "10.0.0.9", "port": port}


def sources(reg: Nodes) -> dict[str, str]:
    return {n.name: n.source for n in reg.list()}


def test_the_migration_adds_the_table_to_an_existing_catalog(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    with sqlite3.connect(path) as old:  # a catalog of before: schema step 1 only
        old.executescript(catalog_mod._MIGRATIONS[0] + "PRAGMA user_version = 1;")
    old.close()
    cat = Catalog(path)
    assert cat.schema_version() == len(catalog_mod._MIGRATIONS)
    assert Nodes(cat).list() == []
    cat.close()


def test_load_local_stores_ini_and_derived_nodes(nodes: Nodes) -> None:
    assert sources(nodes) == {"backend": "derived", "pacs": "ini", "research": "ini"}
    pacs = nodes.get("pacs")
    assert pacs is not None
    assert (pacs.kind, pacs.ae_title, pacs.host, pacs.port) == (
        "dicom",
        "MAINPACS",
        "pacs.example.org",
        104,
    )
    web = nodes.get("research")
    assert web is not None and web.auth_header == SECRET and web.url.endswith("/dicom-web")
    assert pacs.updated_at > 0


def test_load_local_replaces_the_previous_configuration_only(nodes: Nodes) -> None:
    nodes.put(dicom("modality", "CT1"))
    assert nodes.sync([dicom("remote", "REMOTE")]) == []
    # the next start-up: `research` gone from the INI, ITH_URL unset
    moved = NodeConfig("pacs", "dicom", ae_title="NEWPACS", host="10.1.1.1", port=11112)
    assert nodes.load_local([moved], []) == []
    assert sources(nodes) == {"pacs": "ini", "modality": "api", "remote": "backend"}
    pacs = nodes.get("pacs")
    assert pacs is not None and pacs.ae_title == "NEWPACS"
    assert nodes.by_ae_title("MAINPACS") is None


def test_the_configuration_wins_over_api_and_backend_nodes(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    nodes.put(dicom("archive", "ARCHIVE"))
    nodes.sync([dicom("Other", "OTHER"), dicom("remote", "REMOTE")])
    clash_name = NodeConfig("other", "dicom", ae_title="X1", host="h", port=1)
    clash_ae = NodeConfig("arch2", "dicom", ae_title="ARCHIVE", host="h", port=2)
    with caplog.at_level(logging.WARNING, logger="ith_proxy.nodes"):
        removed = nodes.load_local([PACS, clash_name, clash_ae], [])
    assert sorted(removed) == ["Other", "archive"]
    assert sources(nodes) == {"pacs": "ini", "other": "ini", "arch2": "ini", "remote": "backend"}
    assert "node Other (source backend) removed" in caplog.text
    assert "node archive (source api) removed" in caplog.text and "AE title" in caplog.text


def test_load_local_refuses_duplicates(catalog: Catalog) -> None:
    reg = Nodes(catalog)
    with pytest.raises(NodeConflict, match="twice"):
        reg.load_local([PACS, NodeConfig("PACS", "dicom", ae_title="B", host="h", port=1)])
    with pytest.raises(NodeConflict, match="AE title"):
        reg.load_local([PACS, NodeConfig("b", "dicom", ae_title="MAINPACS", host="h", port=1)])
    with pytest.raises(NodeError, match="reserved"):
        reg.load_local([NodeConfig("backend", "dicomweb", url="http://x")])
    assert reg.list() == []  # nothing half done


def test_names_are_unique_in_any_case(nodes: Nodes) -> None:
    nodes.put(dicom("Modality", "CT1"))
    nodes.put(dicom("MODALITY", "CT2"))  # the same node, changed
    found = [n for n in nodes.list() if n.name.lower() == "modality"]
    assert len(found) == 1 and found[0].ae_title == "CT2" and found[0].name == "MODALITY"
    got = nodes.get("modality")
    assert got is not None and got.ae_title == "CT2"
    with pytest.raises(NodeConflict, match="comes from the INI file"):
        nodes.put(dicom("PACS", "NEWAE"))


def test_ae_titles_are_unique_among_dicom_nodes(nodes: Nodes) -> None:
    with pytest.raises(NodeConflict, match="already used by node 'pacs'"):
        nodes.put(dicom("second", "MAINPACS"))
    nodes.put(dicom("second", "SECOND"))
    with pytest.raises(NodeConflict, match="already used by node 'second'"):
        nodes.put(dicom("third", "SECOND"))
    # a dicomweb node has no AE title: any number of them
    nodes.put({"name": "w1", "kind": "dicomweb", "url": "http://a.example"})
    nodes.put({"name": "w2", "kind": "dicomweb", "url": "http://b.example"})
    found = nodes.by_ae_title("SECOND")
    assert found is not None and found.name == "second"
    assert nodes.by_ae_title(" SECOND ") == found  # AE titles compare without padding
    assert nodes.by_ae_title("second") is None  # but in their case
    assert nodes.by_ae_title("") is None


def test_ini_and_derived_nodes_cannot_be_changed_or_deleted_through_the_api(nodes: Nodes) -> None:
    before = nodes.list()
    with pytest.raises(NodeConflict, match="'pacs' comes from the INI file"):
        nodes.put(dicom("pacs", "MAINPACS", port=11112))
    with pytest.raises(NodeConflict, match="'research' comes from the INI file"):
        nodes.delete("research")
    with pytest.raises(NodeConflict, match="'backend' is derived from ITH_URL"):
        nodes.delete("Backend")
    with pytest.raises(NodeError, match="reserved"):
        nodes.put({"name": "backend", "kind": "dicomweb", "url": "http://evil.example"})
    assert nodes.list() == before


def test_api_nodes_are_put_and_deleted(nodes: Nodes) -> None:
    made = nodes.put(dicom("modality", "CT1", port=4242))
    assert made.source == "api" and made.port == 4242 and made.updated_at > 0
    assert nodes.get("modality") == made
    nodes.delete("MODALITY")
    assert nodes.get("modality") is None
    with pytest.raises(NodeNotFound):
        nodes.delete("modality")


def test_backend_nodes_are_not_changed_through_the_api(nodes: Nodes) -> None:
    nodes.sync([dicom("remote", "REMOTE")])
    with pytest.raises(NodeConflict, match="managed by the backend"):
        nodes.put(dicom("remote", "REMOTE", port=1))
    with pytest.raises(NodeConflict, match="managed by the backend"):
        nodes.delete("remote")
    with pytest.raises(NodeConflict, match="already used by node 'remote'"):
        nodes.put(dicom("mine", "REMOTE"))


def test_sync_replaces_only_backend_nodes(nodes: Nodes) -> None:
    nodes.put(dicom("modality", "CT1"))
    assert nodes.sync([dicom("old1", "OLD1"), dicom("old2", "OLD2")]) == []
    local_before = [n for n in nodes.list() if n.source != "backend"]
    web = {"name": "cloud", "kind": "dicomweb", "url": "https://c.example/dw"}
    assert nodes.sync([dicom("old2", "OLD2B"), web]) == []
    assert sources(nodes) == {
        "backend": "derived",
        "pacs": "ini",
        "research": "ini",
        "modality": "api",
        "old2": "backend",
        "cloud": "backend",
    }
    assert [n for n in nodes.list() if n.source != "backend"] == local_before  # untouched
    old2 = nodes.get("old2")
    assert old2 is not None and old2.ae_title == "OLD2B"
    assert nodes.sync([]) == []  # an empty list removes every backend node
    assert sorted(sources(nodes).values()) == ["api", "derived", "ini", "ini"]


def test_sync_refuses_local_names_and_bad_entries_alone(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    nodes.put(dicom("modality", "CT1"))
    hostile = "Bearer ok\r\nX-Injected: yes"
    entries = [
        dicom("PACS", "ELSEWHERE"),  # an ini node's name, in another case
        dicom("modality", "CT9"),  # an api node's name
        {"name": "backend", "kind": "dicomweb", "url": "http://evil.example"},  # derived
        dicom("thief", "MAINPACS"),  # an ini node's AE title
        dicom("good", "GOOD"),
        dicom("good", "GOOD2"),  # twice in the list
        dicom("copy", "GOOD"),  # an AE title twice in the list
        "not an object",
        {**dicom("tls", "TLS"), "tls": True},  # a field we do not know: not half used
        {"name": "inj", "kind": "dicomweb", "url": "http://x.example", "auth_header": hostile},
        {"name": "creds", "kind": "dicomweb", "url": "http://u:pw@x.example"},
        {"name": "../../etc", "kind": "dicomweb", "url": "http://x.example"},
        {
            "name": "w",
            "kind": "dicomweb",
            "url": "https://w.example/dicom-web",
            "auth_header": SECRET,
        },
    ]
    with caplog.at_level(logging.INFO, logger="ith_proxy.nodes"):
        refusals = nodes.sync(entries)
    refused = {r.name: r.reason for r in refusals}
    assert list(refused) == [
        "PACS",
        "modality",
        "#2",
        "thief",
        "good",
        "copy",
        "#7",
        "#8",
        "#9",
        "#10",
        "#11",
    ]
    assert "names a local node (source ini)" in refused["PACS"]
    assert "names a local node (source api)" in refused["modality"]
    assert "reserved" in refused["#2"]
    assert "belongs to local node pacs" in refused["thief"]
    assert "twice" in refused["good"] and "twice" in refused["copy"]
    assert "unknown key tls" in refused["#8"]
    assert "credentials" in refused["#10"]
    assert {n.name: n.source for n in nodes.list() if n.source == "backend"} == {
        "good": "backend",
        "w": "backend",
    }
    modality = nodes.get("modality")
    assert modality is not None and modality.ae_title == "CT1"  # the local node kept
    for r in refusals:  # each refusal is logged
        assert f"node {r.name} refused" in caplog.text
    assert "s3cr3t" not in caplog.text and "X-Injected" not in caplog.text
    assert "pw@" not in caplog.text and "pw@" not in repr(refusals)


def test_a_sync_that_is_no_list_changes_nothing(nodes: Nodes) -> None:
    nodes.sync([dicom("remote", "REMOTE")])
    before = nodes.list()
    for payload in ({"name": "x"}, "nodes", None, 42):
        with pytest.raises(NodeError, match="expected a list"):
            nodes.sync(payload)
    with pytest.raises(NodeError, match="more than"):
        nodes.sync([dicom(f"n{i}", f"AE{i}") for i in range(MAX_SYNC_NODES + 1)])
    assert nodes.list() == before


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**dicom("a", "A"), "port": 70000}, "outside 1..65535"),
        ({**dicom("a", "A"), "port": "abc"}, "not an integer"),
        ({**dicom("a", "A"), "port": True}, "port must be a string"),
        ({**dicom("a", "A"), "host": "pacs.example.org/x"}, "not a host name"),
        ({**dicom("a", "A"), "host": "a b"}, "not a host name"),
        ({**dicom("a", "A"), "ae_title": "A" * 17}, "longer than 16"),
        ({**dicom("a", "A"), "ae_title": "A\\B"}, "not allowed in an AE title"),
        ({**dicom("a", "A"), "url": "http://x.example"}, "url is not a field of a dicom node"),
        ({"name": "a", "kind": "dicom", "host": "h", "port": 1}, "needs ae_title"),
        ({"name": "a", "kind": "dicomweb"}, "needs url"),
        ({"name": "a", "kind": "DIMSE", "url": "http://x"}, "kind must be one of"),
        ({"name": "a", "kind": "dicomweb", "url": "ftp://x.example"}, "http:// or https://"),
        ({"name": "a", "kind": "dicomweb", "url": "http://x.example/?t=1"}, "query"),
        ({"name": "a", "kind": "dicomweb", "url": "http://x.example:99999"}, "invalid port"),
        ({"name": "a", "kind": "dicomweb", "url": "http://x y"}, "spaces"),
        ({"name": "a", "kind": "dicomweb", "url": "http://x", "auth_header": "tok"}, "Scheme"),
        ({"name": "a b", "kind": "dicomweb", "url": "http://x"}, "node name"),
        ({"name": "x" * 65, "kind": "dicomweb", "url": "http://x"}, "node name"),
        ({"name": "-a", "kind": "dicomweb", "url": "http://x"}, "node name"),
        ({"name": "NONE", "kind": "dicomweb", "url": "http://x"}, "reserved"),
        ({"name": 7, "kind": "dicomweb", "url": "http://x"}, "name must be a string"),
    ],
)
def test_api_input_is_validated_like_the_configuration(
    nodes: Nodes, raw: dict, message: str
) -> None:
    before = nodes.list()
    with pytest.raises(NodeError, match=message) as caught:
        nodes.put(raw)
    assert "\n" not in str(caught.value)
    assert nodes.list() == before


def test_the_auth_header_is_never_shown(nodes: Nodes) -> None:
    web = nodes.get("research")
    assert web is not None
    assert "s3cr3t" not in repr(web) and "s3cr3t" not in repr(nodes.list())
    assert "s3cr3t" not in str(web.public()) and web.public()["auth_header_set"] is True
    assert "s3cr3t" not in repr(WEB)
    with pytest.raises(NodeError) as caught:
        nodes.put({"name": "w", "kind": "dicomweb", "url": "http://x", "auth_header": "s3cr3t\n"})
    assert "s3cr3t" not in str(caught.value)


def test_one_registry_across_connections_and_restarts(tmp_path: Path) -> None:
    """Each thread opens its own catalog: what one writes the other reads, and
    api and backend nodes survive a restart while the configuration reloads."""
    path = tmp_path / "catalog.sqlite3"
    a, b = Catalog(path), Catalog(path)
    Nodes(a).load_local([PACS], [])
    Nodes(a).put(dicom("modality", "CT1"))
    Nodes(b).sync([dicom("remote", "REMOTE")])
    assert (
        sources(Nodes(a))
        == sources(Nodes(b))
        == {"pacs": "ini", "modality": "api", "remote": "backend"}
    )
    a.close()
    b.close()
    again = Catalog(path)
    Nodes(again).load_local([], [BACKEND])
    assert sources(Nodes(again)) == {"backend": "derived", "modality": "api", "remote": "backend"}
    again.close()


def test_the_service_loads_the_configured_nodes(tmp_path: Path, catalog: Catalog) -> None:
    ini = tmp_path / "proxy.ini"
    ini.write_text("[node:pacs]\nkind = dicom\nae_title = MAINPACS\nhost = 127.0.0.1\nport = 104\n")
    cfg = config.load(
        str(ini), env={"ITH_URL": "https://ith.example", "ITH_TOKEN": "t0k"}, cwd=tmp_path
    )
    assert load_config_nodes(catalog, cfg) == []
    reg = Nodes(catalog)
    assert sources(reg) == {"backend": "derived", "pacs": "ini"}
    backend = reg.get("backend")
    assert backend == Node(
        "backend",
        "dicomweb",
        "derived",
        url="https://ith.example/dicom-web",
        auth_header="Token t0k",
        updated_at=backend.updated_at if backend else 0,
    )
