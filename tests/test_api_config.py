"""GET|PUT /api/config/ on the real app served by waitress, over a real site,
with the service's real Control running a real SCP in this process (DCMTK
echoscu checks where it listens)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

import tokens
import tools
from api_served import Served, served
from helpers import wait_until
from ith_proxy.control import ServiceControl
from ith_proxy.dicom.scp import StorageSCP
from ith_proxy.store.nodes import Nodes
from ith_proxy.store.settings import RuntimeSettings
from worker_rooms import Rooms

INI = """
[forward]
destinations = pacs

[node:pacs]
kind = dicom
ae_title = PACS
host = 127.0.0.1
port = 4242
"""
TOKEN = tokens.mint()


@pytest.fixture
def site(tmp_path: Path):
    port = tools.free_port()
    env = {**tokens.ENV, "DICOM_PORT": str(port), "DICOM_BIND_ADDRESS": "127.0.0.1"}
    rooms = Rooms(tmp_path / "site", INI, env)
    Nodes(rooms.catalog).load_local(rooms.cfg.nodes, rooms.cfg.derived_nodes)
    control = ServiceControl(
        rooms.cfg,
        rooms.spool.catalog_file,
        lambda cfg, counters: StorageSCP(cfg, rooms.spool, None, counters),
        lambda: "offline",
    )
    control.start()
    with served(rooms.api(control=control), rooms.spool.root) as api:
        yield rooms, api, control
    control.stop()
    rooms.close()


def _put(api: Served, body, token: str | None = TOKEN):
    return api.call("PUT", "/api/config/", body, token=token)


def test_get_shows_each_value_and_where_it_came_from(site) -> None:
    rooms, api, _control = site
    status, body = api.call("GET", "/api/config/", token=TOKEN)
    assert status == 200
    settings = body["settings"]
    assert settings["dicom_port"] == {
        "value": rooms.cfg.scp.port,
        "source": "environment DICOM_PORT",
    }
    assert settings["ae_title"] == {"value": "DICOMRCV", "source": "default"}
    assert settings["study_timeout"] == {"value": 60.0, "source": "default"}
    assert settings["forward_to"] == {"value": ["pacs"], "source": str(rooms.ini)}
    assert settings["anonymize"] == {"value": True, "source": "default", "read_only": True}
    assert body["nodes"] == "/api/nodes/"
    assert body["scp"]["state"] == "running" and body["scp"]["port"] == rooms.cfg.scp.port
    assert api.call("GET", "/api/config/")[0] == 401
    assert api.audit() == []  # reading is not audited


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"anonymize": False}, "anonymize"),
        ({"study_timeout": 5, "anonymize": False}, "anonymize"),
        ({"verbose": True}, "verbose"),
        ({}, "body"),
        ({"ae_title": "EVIL\x1b[2J"}, "ae_title"),
        ({"ae_title": "BAD\\AE"}, "ae_title"),
        ({"ae_title": "   "}, "ae_title"),
        ({"ae_title": 42}, "ae_title"),
        ({"dicom_port": 0}, "dicom_port"),
        ({"dicom_port": 65536}, "dicom_port"),
        ({"dicom_port": "11112"}, "dicom_port"),
        ({"dicom_port": True}, "dicom_port"),
        ({"dicom_port": 8080}, "dicom_port"),  # the API's own port
        ({"study_timeout": 0}, "study_timeout"),
        ({"study_timeout": -5}, "study_timeout"),
        ({"study_timeout": 10**9}, "study_timeout"),
        ({"forward_to": "pacs"}, "forward_to"),
        ({"forward_to": ["pacs", 3]}, "forward_to"),
        ({"forward_to": ["../x"]}, "forward_to"),
        ({"forward_to": ["nosuchnode"]}, "forward_to"),
        ({"forward_to": [f"n{i}" for i in range(10_000)]}, "forward_to"),
    ],
)
def test_refused_puts_name_the_field_change_nothing_and_are_audited(site, body, field) -> None:
    rooms, api, control = site
    before = control.scp_status()
    status, answer = _put(api, body)
    assert status == 400, answer
    assert answer["field"] == field
    assert "\n" not in answer["error"] and "\x1b" not in answer["error"]
    assert RuntimeSettings(rooms.catalog).persisted() == {}
    assert control.scp_status() == before
    [record] = api.audit()
    assert record["action"] == "config.put" and record["detail"]["outcome"] == "400"


@pytest.mark.parametrize("raw", [b'{"study_timeout": NaN}', b'{"study_timeout": Infinity}'])
def test_json_nan_and_infinity_are_refused(site, raw: bytes) -> None:
    _rooms, api, _control = site
    status, answer = _put(api, raw)
    assert status == 400 and answer["field"] == "study_timeout"


def test_not_an_object_and_oversized_bodies(site) -> None:
    _rooms, api, _control = site
    assert _put(api, b"[1, 2]")[0] == 400
    assert _put(api, b"{nope")[0] == 400
    # just over 1 MB reaches the route: refused and audited (a body far over it is
    # refused by waitress before any caller is known: tests/test_api_errors.py)
    assert _put(api, {"forward_to": ["x" * 64] * 15_900})[0] == 413
    assert [r["detail"]["outcome"] for r in api.audit()] == ["400", "400", "413"]
    assert _put(api, {"study_timeout": 5}, token=None)[0] == 401
    assert len(api.audit()) == 3  # a 401 has no identity to audit


def test_put_persists_applies_and_moves_the_scp(site) -> None:
    rooms, api, _control = site
    old_port = rooms.cfg.scp.port
    assert tools.echoscu(old_port, aec="DICOMRCV").returncode == 0
    new_port = tools.free_port()
    status, body = _put(api, {"ae_title": "MOVEDAE", "dicom_port": new_port, "study_timeout": 2.5})
    assert status == 200, body
    assert sorted(body["changed"]) == ["ae_title", "dicom_port", "study_timeout"]
    assert body["settings"]["dicom_port"] == {"value": new_port, "source": "api"}
    assert body["settings"]["study_timeout"] == {"value": 2.5, "source": "api"}
    assert body["scp"]["state"] == "running" and body["scp"]["ae_title"] == "MOVEDAE"
    assert tools.echoscu(new_port, aec="MOVEDAE").returncode == 0
    assert tools.echoscu(new_port, aec="DICOMRCV").returncode != 0  # the old AE title is gone
    assert tools.echoscu(old_port, aec="DICOMRCV").returncode != 0  # the old port is closed
    persisted = RuntimeSettings(rooms.catalog).persisted()
    assert {k: (p.value, p.source) for k, p in persisted.items()} == {
        "ae_title": ("MOVEDAE", "api"),
        "dicom_port": (new_port, "api"),
        "study_timeout": (2.5, "api"),
    }
    [record] = api.audit()
    assert record["action"] == "config.put" and record["target"] == "config"
    assert record["detail"]["outcome"] == "success"
    assert record["detail"]["keys"] == ["ae_title", "dicom_port", "study_timeout"]
    # the AE title alone: the same port is released and taken again
    assert _put(api, {"ae_title": "SECONDAE"})[0] == 200
    assert tools.echoscu(new_port, aec="SECONDAE").returncode == 0


def test_a_port_that_cannot_be_bound_keeps_the_old_scp(site) -> None:
    rooms, api, control = site
    old_port = rooms.cfg.scp.port
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        status, body = _put(api, {"dicom_port": port, "ae_title": "NEWAE"})
        assert status == 409 and body["field"] == "dicom_port"
        assert f"127.0.0.1:{port}" in body["error"] and "still DICOMRCV" in body["error"]
    finally:
        taken.close()
    assert tools.echoscu(old_port, aec="DICOMRCV").returncode == 0
    assert RuntimeSettings(rooms.catalog).persisted() == {}  # put back
    status, now = api.call("GET", "/api/config/", token=TOKEN)
    assert now["settings"]["dicom_port"]["value"] == old_port
    assert now["scp"] | {"associations": 0} == control.scp_status() | {"associations": 0}
    assert control.problems() == []
    assert [r["detail"]["outcome"] for r in api.audit()] == ["409"]


def test_concurrent_puts_all_answer_and_the_scp_ends_where_the_catalog_says(site) -> None:
    rooms, api, control = site
    ports = [tools.free_port() for _ in range(6)]
    results: list[int] = []

    def put(port: int) -> None:
        results.append(_put(api, {"dicom_port": port, "study_timeout": 30})[0])

    threads = [threading.Thread(target=put, args=(p,)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(200) + results.count(409) == len(ports), results
    final = RuntimeSettings(rooms.catalog).persisted()["dicom_port"].value
    assert control.scp_status()["port"] == final
    assert tools.echoscu(final, aec="DICOMRCV").returncode == 0
    assert len(api.audit()) == len(ports)


def test_an_audit_log_that_cannot_be_written_refuses_the_change(site) -> None:
    rooms, api, control = site
    log = rooms.spool.root / "logs" / "audit.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    anchor = rooms.cfg.vault.audit_anchor_file
    anchor.parent.mkdir(parents=True, exist_ok=True)
    anchor.write_text(json.dumps({"seq": 99, "mac": "0" * 64}))  # log shorter than its anchor
    before = control.scp_status()
    status, body = _put(api, {"ae_title": "XAE", "study_timeout": 9})
    assert status == 500 and "audit" in body["error"]
    assert RuntimeSettings(rooms.catalog).persisted() == {}  # no record, no change
    assert control.scp_status() == before
    status, body = api.call(
        "POST",
        "/api/nodes/",
        {"name": "n1", "kind": "dicom", "ae_title": "N1", "host": "10.0.0.1", "port": 104},
        token=TOKEN,
    )
    assert status == 500
    assert Nodes(rooms.catalog).get("n1") is None


def test_an_association_in_progress_finishes_on_the_old_listener(site) -> None:
    """Moving the SCP closes the old listening socket, not the associations
    it accepted: one in progress goes on, is counted, and is then released."""
    from pynetdicom import AE

    rooms, api, control = site
    ae = AE(ae_title="DRAINER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", rooms.cfg.scp.port, ae_title="DICOMRCV")
    assert assoc.is_established
    try:
        new_port = tools.free_port()
        assert _put(api, {"dicom_port": new_port})[0] == 200
        assert not tools.port_listening(rooms.cfg.scp.port)
        assert control.scp_status()["associations"] == 1  # the old one, draining
        status = assoc.send_c_echo()
        assert status.Status == 0x0000
    finally:
        assoc.release()
    assert tools.echoscu(new_port).returncode == 0
    wait_until(lambda: control.scp_status()["associations"] == 0, 30, "the old association ends")
    control.poll()  # prunes the drained listener
    assert control._retired == []


def test_a_key_with_control_characters_is_named_printably(site) -> None:
    _rooms, api, _control = site
    status, body = _put(api, {"a\nb\x1b[31m": 1})
    assert status == 400 and body["field"] == "a\\nb\\x1b[31m"
    assert "\n" not in body["error"] and "\x1b" not in body["error"]
