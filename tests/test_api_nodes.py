"""The node registry through the API: GET|POST|PUT|DELETE /api/nodes/... and
POST /api/nodes/<name>/echo/, on the real app served by waitress, over a real
site's catalog and audit log; the echo goes through the service's Control to
a real DCMTK storescp (and to a dead port)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import pytest

import tokens
import tools
from api_served import Served, served
from ith_proxy.control import ServiceControl
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.nodes import Nodes
from ith_proxy.web.context import MAX_BODY
from worker_rooms import Rooms

SECRET_HEADER = "Bearer node-secret-QX7Z-do-not-show"
INI = f"""
[node:pacs]
kind = dicom
ae_title = PACS
host = 127.0.0.1
port = 4242

[node:web]
kind = dicomweb
url = https://dicomweb.example.org/dicom-web
auth_header = {SECRET_HEADER}
"""
TOKEN = tokens.mint()
DICOM_NODE = {
    "name": "modality1",
    "kind": "dicom",
    "ae_title": "MOD1",
    "host": "127.0.0.1",
    "port": 11113,
}


def _no_scp(cfg: Any, counters: Any) -> NoReturn:
    raise AssertionError("these tests start no SCP")


@pytest.fixture
def site(tmp_path: Path):
    env = {**tokens.ENV, "ITH_URL": "https://backend.example.org"}
    rooms = Rooms(tmp_path / "site", INI, env)
    Nodes(rooms.catalog).load_local(rooms.cfg.nodes, rooms.cfg.derived_nodes)
    control = ServiceControl(rooms.cfg, rooms.spool.catalog_file, _no_scp, lambda: "offline")
    with served(rooms.api(control=control), rooms.spool.root) as api:
        api.control = control
        yield rooms, api
    control.stop()
    rooms.close()


def _call(api: Served, method: str, path: str, body=None, token: str | None = TOKEN):
    return api.call(method, path, body, token=token)


def _records(api: Served, action: str) -> list[tuple[str, str]]:
    return [(r["target"], r["detail"]["outcome"]) for r in api.audit() if r["action"] == action]


def test_list_and_get_show_every_source_and_never_the_secret(site) -> None:
    _rooms, api = site
    status, body = _call(api, "GET", "/api/nodes/")
    assert status == 200
    by_name = {n["name"]: n for n in body["nodes"]}
    assert {n: by_name[n]["source"] for n in by_name} == {
        "backend": "derived",
        "pacs": "ini",
        "web": "ini",
    }
    assert by_name["web"]["auth_header_set"] is True
    assert "auth_header" not in by_name["web"]
    status, one = _call(api, "GET", "/api/nodes/PACS/")  # names in any case
    assert status == 200 and one["ae_title"] == "PACS" and one["port"] == 4242
    for path in ("/api/nodes/", "/api/nodes/web/", "/api/nodes/backend/"):
        status, raw = _call(api, "GET", path)
        assert status == 200 and "node-secret" not in str(raw)


def test_every_route_needs_a_token(site) -> None:
    _rooms, api = site
    for method, path, body in [
        ("GET", "/api/nodes/", None),
        ("GET", "/api/nodes/pacs/", None),
        ("POST", "/api/nodes/", DICOM_NODE),
        ("PUT", "/api/nodes/x/", DICOM_NODE),
        ("DELETE", "/api/nodes/pacs/", None),
        ("POST", "/api/nodes/pacs/echo/", None),
    ]:
        status, _ = _call(api, method, path, body, token=None)
        assert status == 401, (method, path)
    assert api.audit() == []  # no identity, no audit record (api.log has them)


def test_create_replace_delete_an_api_node_audited(site) -> None:
    rooms, api = site
    status, created = _call(api, "POST", "/api/nodes/", DICOM_NODE)
    assert status == 201 and created["source"] == "api"
    status, again = _call(api, "POST", "/api/nodes/", {**DICOM_NODE, "ae_title": "OTHER"})
    assert status == 409 and again["field"] == "name"
    status, replaced = _call(api, "PUT", "/api/nodes/modality1/", {**DICOM_NODE, "port": 104})
    assert status == 200 and replaced["port"] == 104
    status, new = _call(
        api, "PUT", "/api/nodes/archive/", {"kind": "dicomweb", "url": "http://10.0.0.9/dcm"}
    )
    assert status == 201 and new["name"] == "archive" and new["auth_header_set"] is False
    stored = Nodes(rooms.catalog).get("modality1")
    assert stored is not None and stored.port == 104
    status, _ = _call(api, "DELETE", "/api/nodes/modality1/")
    assert status == 200
    status, gone = _call(api, "GET", "/api/nodes/modality1/")
    assert status == 404 and gone["field"] == "name"
    status, _ = _call(api, "DELETE", "/api/nodes/modality1/")
    assert status == 404
    assert _records(api, "node.put") == [
        ("modality1", "success"),
        ("modality1", "409"),
        ("modality1", "success"),
        ("archive", "success"),
    ]
    assert _records(api, "node.delete") == [("modality1", "success"), ("modality1", "404")]
    assert all(r["actor"] == "api:tester" and r["detail"]["request_id"] for r in api.audit())


def test_local_and_backend_nodes_cannot_be_changed_through_the_api(site) -> None:
    rooms, api = site
    Nodes(rooms.catalog).sync(
        [
            {
                "name": "central",
                "kind": "dicom",
                "ae_title": "CENTRAL",
                "host": "10.1.1.1",
                "port": 104,
            }
        ]
    )
    for name in ("pacs", "web", "backend", "central"):
        status, body = _call(api, "DELETE", f"/api/nodes/{name}/")
        assert status == 409 and body["field"] == "name", (name, body)
        status, body = _call(
            api, "PUT", f"/api/nodes/{name}/", {"kind": "dicomweb", "url": "http://evil.example/x"}
        )
        assert status in (400, 409), (name, body)  # backend is a reserved name: 400
        assert body["field"] == "name"
    status, body = _call(api, "POST", "/api/nodes/", {**DICOM_NODE, "name": "PACS"})
    assert status == 409
    status, body = _call(api, "POST", "/api/nodes/", {**DICOM_NODE, "ae_title": "PACS"})
    assert status == 409 and body["field"] == "ae_title" and "pacs" in body["error"]
    status, body = _call(api, "POST", "/api/nodes/", {**DICOM_NODE, "ae_title": "CENTRAL"})
    assert status == 409 and body["field"] == "ae_title"
    listed = {n.name: (n.source, n.url or n.host) for n in Nodes(rooms.catalog).list()}
    assert listed == {
        "backend": ("derived", "https://backend.example.org/dicom-web"),
        "central": ("backend", "10.1.1.1"),
        "pacs": ("ini", "127.0.0.1"),
        "web": ("ini", "https://dicomweb.example.org/dicom-web"),
    }
    refused = [o for _t, o in _records(api, "node.put") + _records(api, "node.delete")]
    assert len(refused) == 11 and "success" not in refused  # every refusal audited


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**DICOM_NODE, "port": 0}, "port"),
        ({**DICOM_NODE, "port": "11113; rm -rf /"}, "port"),
        ({**DICOM_NODE, "ae_title": "BAD\r\nAE"}, "ae_title"),
        ({**DICOM_NODE, "ae_title": "A" * 17}, "ae_title"),
        ({**DICOM_NODE, "host": "x" * 100_000}, "host"),
        ({**DICOM_NODE, "host": "evil host"}, "host"),
        ({**DICOM_NODE, "name": "../../etc/passwd"}, "name"),
        ({**DICOM_NODE, "name": "backend"}, "name"),
        ({**DICOM_NODE, "name": 7}, "name"),
        ({**DICOM_NODE, "url": "http://x"}, "url"),
        ({**DICOM_NODE, "tls": True}, "body"),
        ({"name": "w", "kind": "dicomweb", "url": "file:///etc/passwd"}, "url"),
        ({"name": "w", "kind": "dicomweb", "url": "https://user:pw@pacs.example/dcm"}, "url"),
        ({"name": "w", "kind": "dicomweb", "url": "https://pacs.example/dcm?x=1"}, "url"),
        ({"name": "w", "kind": "dicomweb", "url": "https://pacs.example/" + "a" * 5000}, "url"),
        (
            {
                "name": "w",
                "kind": "dicomweb",
                "url": "http://p/x",
                "auth_header": "Bearer a\r\nX: y",
            },
            "auth_header",
        ),
        ({"name": "w", "kind": "gopher", "url": "http://p/x"}, "kind"),
        ({"name": "w", "kind": "dicomweb"}, "url"),
    ],
)
def test_bad_node_bodies_are_400_naming_the_field(site, body, field) -> None:
    rooms, api = site
    status, answer = _call(api, "POST", "/api/nodes/", body)
    assert status == 400, answer
    assert answer["field"] == field, answer
    assert "\n" not in answer["error"] and len(answer["error"]) < 400
    assert {n.name for n in Nodes(rooms.catalog).list()} == {"backend", "pacs", "web"}
    [record] = api.audit()  # a refused change is audited too
    assert record["action"] == "node.put" and record["detail"]["outcome"] == "400"


def test_bodies_that_are_not_objects_or_too_large(site) -> None:
    _rooms, api = site
    assert _call(api, "POST", "/api/nodes/", b"{not json")[0] == 400
    assert api.audit()[-1]["detail"]["outcome"] == "400"
    assert _call(api, "POST", "/api/nodes/", [DICOM_NODE])[0] == 400
    status, body = _call(api, "PUT", "/api/nodes/other/", DICOM_NODE)  # body names modality1
    assert status == 400 and body["field"] == "name"
    big = {**DICOM_NODE, "host": "a" * (MAX_BODY + 1000)}  # within waitress's read limit
    assert _call(api, "POST", "/api/nodes/", big)[0] == 413
    assert api.audit()[-1]["detail"]["outcome"] == "413"


@pytest.mark.parametrize("path", ["..%2F..%2Fetc", "a%00b", "a%0Ab", "%C3%A9", "-x", "a%20b"])
def test_node_names_with_path_or_control_characters_are_not_found(site, path) -> None:
    _rooms, api = site
    for method in ("GET", "DELETE"):
        status, body = _call(api, method, f"/api/nodes/{path}/")
        assert status == 404 and body["error"], (method, path)
    status, body = _call(api, "PUT", f"/api/nodes/{path}/", DICOM_NODE)
    assert status == 404
    # the refused changes are audited, without the name that could not be one
    # (a name with a slash matches no route at all: no caller, no record)
    expected = [("node.delete", "-", "404"), ("node.put", "-", "404")]
    got = [(r["action"], r["target"], r["detail"]["outcome"]) for r in api.audit()]
    assert got == ([] if "%2F" in path else expected)


def test_concurrent_creates_of_one_name_give_one_node(site) -> None:
    import threading

    rooms, api = site
    results: list[int] = []

    def create(i: int) -> None:
        node = {**DICOM_NODE, "name": "race", "ae_title": f"RACE{i}"}
        results.append(_call(api, "POST", "/api/nodes/", node)[0])

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [201] + [409] * 7
    assert [n.name for n in Nodes(rooms.catalog).list() if n.source == "api"] == ["race"]


def test_echo_a_live_node_a_dead_one_and_the_wrong_kinds(site, tmp_path: Path) -> None:
    _rooms, api = site
    with tools.StoreSCP(tmp_path / "scp-out", aet="LIVESCP") as scp:
        node = {
            "name": "live",
            "kind": "dicom",
            "ae_title": "LIVESCP",
            "host": "127.0.0.1",
            "port": scp.port,
        }
        assert _call(api, "POST", "/api/nodes/", node)[0] == 201
        status, body = _call(api, "POST", "/api/nodes/live/echo/")
        assert status == 200 and body["ok"] is True and body["node"] == "live"
        assert "LIVESCP@127.0.0.1" in body["detail"]
    dead = {
        "name": "dead",
        "kind": "dicom",
        "ae_title": "DEAD",
        "host": "127.0.0.1",
        "port": tools.free_port(),
    }
    assert _call(api, "POST", "/api/nodes/", dead)[0] == 201
    status, body = _call(api, "POST", "/api/nodes/dead/echo/")
    assert status == 502 and body["ok"] is False
    assert body["error"].startswith("echo dead (DEAD@127.0.0.1:") and "\n" not in body["error"]
    status, body = _call(api, "POST", "/api/nodes/web/echo/")
    assert status == 409 and "DICOMweb" in body["error"]
    assert _call(api, "POST", "/api/nodes/nosuch/echo/")[0] == 404
    # an echo changes nothing: not audited
    assert [r["action"] for r in api.audit()] == ["node.put", "node.put"]


def test_a_node_made_through_the_api_survives_a_new_catalog_connection(site) -> None:
    rooms, api = site
    assert _call(api, "POST", "/api/nodes/", DICOM_NODE)[0] == 201
    other = Catalog(rooms.spool.catalog_file, readonly=True)
    try:
        node = Nodes(other).get("modality1")
    finally:
        other.close()
    assert node is not None and node.source == "api" and node.ae_title == "MOD1"


def test_echoes_at_once_are_bounded(site, tmp_path: Path) -> None:
    """Each echo may hold an API thread for the [scu] timeouts; past two at
    once the answer is 429 at once, so echoes cannot take every thread."""
    _rooms, api = site
    control = api.control
    assert control._echoes.acquire(blocking=False) and control._echoes.acquire(blocking=False)
    try:
        status, body = _call(api, "POST", "/api/nodes/pacs/echo/")
        assert status == 429 and "already running" in body["error"]
    finally:
        control._echoes.release()
        control._echoes.release()
    status, body = _call(api, "POST", "/api/nodes/pacs/echo/")
    assert status == 502  # nothing listens on 4242: the slots were given back
