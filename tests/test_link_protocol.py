"""The backend link in this process against a real backend simulator: hello,
the durable messages and their acks, every command with its command.result,
hostile backend messages, the config fetch (tests/backend_sim.py)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import pytest

import tools
from backend_sim import BackendSim
from helpers import wait_until
from ith_proxy.link import config_fetch
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.linkbox import Linkbox
from ith_proxy.store.nodes import Nodes
from ith_proxy.store.outbox import Outbox
from ith_proxy.store.settings import RuntimeSettings
from link_site import LinkSite


@pytest.fixture
def sim():
    with BackendSim() as s:
        yield s


@pytest.fixture
def site(tmp_path: Path, sim: BackendSim):
    s = LinkSite(tmp_path, sim).start()
    yield s
    s.stop()


def results(sim: BackendSim) -> dict[str, dict]:
    return {m["in_reply_to"]: m for m in sim.of_type("command.result")}


# --- the linkbox ---


def test_linkbox_keeps_order_acks_by_id_and_is_bounded(tmp_path: Path, caplog) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite3")
    box = Linkbox(catalog, limit=5)
    sent = [box.post("command.result", {"in_reply_to": str(i), "ok": True}) for i in range(8)]
    rows = box.unacked()
    assert [json.loads(body)["id"] for _, body in rows] == [m["id"] for m in sent[3:]]
    assert caplog.text.count("1 unacked message(s) dropped") == 3
    assert box.ack([sent[4]["id"], "unknown", 7, "x" * 1000, None]) == 1
    assert box.depth() == 4
    assert box.unacked(after=rows[-2][0]) == rows[-1:]
    with pytest.raises(ValueError):
        box.post("health", {})
    catalog.close()


def test_study_events_commit_with_the_state(tmp_path: Path, sim: BackendSim) -> None:
    """study.completed is written in the scheduler's completion transaction;
    study.forwarded / study.failed in the forwarder's (store/outbox.py)."""
    s = LinkSite(tmp_path, sim)  # the link is not running: rows wait
    try:
        study = s.site.complete(2)
        outbox = Outbox(s.rooms.catalog, link_events=True)
        ok = outbox.enqueue(study, "backend", s.site.clock.now)
        outbox.finish(ok.id, s.site.clock.now)  # nothing sent: still pending
        outbox.fail(ok.id, s.site.clock.now, "HTTP 401 Unauthorized")
        kinds = [json.loads(b) for _, b in Linkbox(s.rooms.catalog).unacked()]
        assert [m["type"] for m in kinds] == ["study.completed", "study.failed"]
        done, failed = kinds
        assert done["study_instance_uid"] == study and done["instances"] == 2
        assert done["series"] == 1 and done["modalities"] == ["CT"]
        assert failed["node"] == "backend" and failed["reason"] == "HTTP 401 Unauthorized"
    finally:
        s.rooms.close()


# --- the WebSocket ---


def test_hello_health_and_unacked_messages_sent_again_after_reconnect(
    tmp_path: Path, sim: BackendSim
) -> None:
    sim.auto_ack = False
    s = LinkSite(tmp_path, sim)
    study = s.site.complete(1)
    s.start()
    try:
        sim.wait_connected()
        hello = sim.of_type("hello")[0]
        assert hello["ae_title"] == "DICOMRCV" and hello["mode"] == "anonymize"
        assert set(hello) >= {"type", "id", "ts", "version"}
        event = sim.wait_for(lambda m: m["type"] == "study.completed", 30, "study.completed")
        assert event["study_instance_uid"] == study
        health = sim.wait_for(lambda m: m["type"] == "health", 30, "health")
        assert health["status"] == "ok" and health["studies"]["complete"] == 1
        assert health["linkbox_depth"] == 1 and "audit_head" in health
        sim.kill()  # never acked: sent again after the next hello
        sim.start()
        sim.wait_connected(connections=2)
        wait_until(lambda: len(sim.of_type("study.completed")) == 2, 30, "the resend")
        again = sim.of_type("study.completed")
        assert again[0]["id"] == again[1]["id"]
        order = [m["type"] for m in sim.received]
        assert order.index("study.completed", order.index("hello", 1)) > order.index("hello", 1)
        sim.ack([event["id"]])
        wait_until(lambda: Linkbox(s.rooms.catalog).depth() == 0, 30, "the ack")
        assert "connected" in s.status and "disconnected" in s.status
    finally:
        s.stop()


def test_ping_pong_and_unknown_types(site: LinkSite, sim: BackendSim) -> None:
    sim.wait_connected()
    ping = sim.command("ping")
    sim.wait_for(lambda m: m["type"] == "pong" and m["in_reply_to"] == ping, 30, "pong")
    unknown = sim.command("reboot.now", force=True)
    result = sim.result_for(unknown)
    assert result["ok"] is False and "unknown message type" in result["detail"]["message"]
    assert not [m for m in sim.of_type("command.result") if m["in_reply_to"] == ping]


def test_config_update_persists_and_refuses_anonymize(site: LinkSite, sim: BackendSim) -> None:
    sim.wait_connected()
    good = sim.command("config.update", study_timeout=7, ae_title="NEWAE")
    result = sim.result_for(good)
    assert result["ok"] is True and sorted(result["detail"]["applied"]) == [
        "ae_title",
        "study_timeout",
    ]
    persisted = RuntimeSettings(site.rooms.catalog).persisted()
    assert persisted["study_timeout"].value == 7.0 and persisted["ae_title"].value == "NEWAE"
    assert persisted["ae_title"].source == "backend"
    bad = sim.command("config.update", anonymize=False, dicom_port=70000, forward_to=[1])
    result = sim.result_for(bad)
    assert result["ok"] is False
    refused = result["detail"]["refused"]
    assert set(refused) == {"anonymize", "dicom_port", "forward_to"}
    assert "local only" in refused["anonymize"]
    assert "dicom_port" not in RuntimeSettings(site.rooms.catalog).persisted()
    health = sim.wait_for(
        lambda m: m["type"] == "health" and m["problems"], 30, "anonymize reported in health"
    )
    assert "anonymize is local only" in health["problems"][0]
    assert site.rooms.cfg.deid.anonymize is True


def test_nodes_sync_replaces_backend_nodes_and_refuses_local_ones(
    site: LinkSite, sim: BackendSim
) -> None:
    sim.wait_connected()
    nodes = [
        {"name": "pacs1", "kind": "dicom", "ae_title": "PACS1", "host": "127.0.0.1", "port": 104},
        {"name": "backend", "kind": "dicomweb", "url": "http://127.0.0.1:1/dicom-web"},
        {"name": "bad", "kind": "dicom"},
    ]
    result = sim.result_for(sim.command("nodes.sync", nodes=nodes))
    assert result["ok"] is False and result["detail"]["accepted"] == 1
    refused = result["detail"]["refused"]
    assert [r["node"] for r in refused] == ["#1", "#2"] and "reserved" in refused[0]["reason"]
    registry = {n.name: n.source for n in Nodes(site.rooms.catalog).list()}
    assert registry == {"pacs1": "backend", "backend": "derived"}
    result = sim.result_for(sim.command("nodes.sync", nodes=[]))
    assert result["ok"] is True
    assert [n.name for n in Nodes(site.rooms.catalog).list()] == ["backend"]
    result = sim.result_for(sim.command("nodes.sync", nodes="all"))
    assert result["ok"] is False and "expected a list" in result["detail"]["message"]


def test_study_dispatch_goes_through_the_outbox(site: LinkSite, sim: BackendSim) -> None:
    study = site.site.complete(1)
    sim.wait_connected()
    result = sim.result_for(sim.command("study.dispatch", study_instance_uid=study, node="backend"))
    assert result["ok"] is True and result["detail"]["state"] == "pending"
    assert [e.node for e in Outbox(site.rooms.catalog).entries(study)] == ["backend"]
    for fields, why in [
        ({"study_instance_uid": study, "node": "nowhere"}, "unknown node"),
        ({"study_instance_uid": "1.2.3.4", "node": "backend"}, "unknown study"),
        ({"study_instance_uid": "'; DROP TABLE studies", "node": "backend"}, "not a DICOM UID"),
        ({"node": "backend"}, "not a DICOM UID"),
    ]:
        result = sim.result_for(sim.command("study.dispatch", **fields))
        assert result["ok"] is False and why in result["detail"]["message"], (fields, result)


def test_node_echo(tmp_path: Path, site: LinkSite, sim: BackendSim) -> None:
    sim.wait_connected()
    with tools.StoreSCP(tmp_path / "scp", aet="ECHOME") as scp:
        node = {"name": "echome", "kind": "dicom", "ae_title": "ECHOME"}
        node.update(host="127.0.0.1", port=scp.port)
        assert sim.result_for(sim.command("nodes.sync", nodes=[node]))["ok"] is True
        result = sim.result_for(sim.command("node.echo", node="echome"))
        assert result["ok"] is True and result["detail"]["node"] == "echome"
    result = sim.result_for(sim.command("node.echo", node="echome"), timeout=60)
    assert result["ok"] is False and result["detail"]["message"]
    result = sim.result_for(sim.command("node.echo", node="backend"))
    assert result["ok"] is False and "DICOMweb" in result["detail"]["message"]
    result = sim.result_for(sim.command("node.echo", node=["x"]))
    assert result["ok"] is False and "unknown node" in result["detail"]["message"]


# --- hostile backend messages ---


def test_hostile_messages_are_answered_not_obeyed(site: LinkSite, sim: BackendSim) -> None:
    sim.wait_connected()
    before = len(sim.of_type("command.result"))
    for text in ["not json", "[1,2]", '{"type": 5}', '{"type": "ping", "id": {"a": 1}}',
                 '{"type": "x", "n": NaN}', "[" * 100_000 + "]" * 100_000]:  # fmt: skip
        if len(text) > 64 * 1024:
            continue  # over the size limit: see the next test
        sim.send_raw(text)
    sim.send_raw("[" * 30_000 + "]" * 30_000)  # nested too deeply, under the size limit
    sim.send_bytes(b"\xff\xfe")
    wait_until(lambda: len(sim.of_type("command.result")) >= before + 7, 30, "7 refusals")
    refusals = sim.of_type("command.result")[before:]
    assert all(r["ok"] is False and r["in_reply_to"] is None for r in refusals)
    assert {r["detail"]["message"] for r in refusals} >= {
        "not JSON",
        "not a JSON object",
        "'type' is not a short printable string",
        "'id' is not a short printable string",
        "JSON nested too deeply",
        "not UTF-8 text",
    }
    wrong = sim.command("ack", ids="all")
    assert sim.result_for(wrong)["ok"] is False
    many = sim.command("ack", ids=["x"] * 10_001)
    assert "at most 10000" in sim.result_for(many)["detail"]["message"]
    assert sim.connections == 1  # all of it on one connection


def test_a_message_over_the_size_limit_closes_the_connection(
    site: LinkSite, sim: BackendSim
) -> None:
    """max_message_kb = 64 here: an ack of 10^6 ids (~40 MB) is refused before
    it is read; the link reconnects and goes on."""
    sim.wait_connected()
    ids = json.dumps({"type": "ack", "id": "a", "ids": [f"{i:036d}" for i in range(10**6)]})
    with contextlib.suppress(Exception):  # the proxy hangs up while this is sent
        sim.send_raw(ids)
    sim.wait_connected(connections=2)
    ping = sim.command("ping")
    sim.wait_for(lambda m: m["type"] == "pong" and m["in_reply_to"] == ping, 30, "pong")


def test_the_token_is_never_logged(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with BackendSim(token="right-token") as sim:
        s = LinkSite(tmp_path, sim, env={"ITH_TOKEN": "wrong-token-SECRET"}).start()
        try:
            wait_until(lambda: len(sim.requests) >= 3, 30, "refused handshakes")
            assert not sim.connected()
            assert "HTTP 401" in caplog.text
        finally:
            s.stop()
    assert "SECRET" not in caplog.text
    assert ("GET", "/ws/proxy/", "Token wrong-token-SECRET") in sim.requests


# --- the config fetch ---


def test_config_fetch_applies_each_field_on_its_own(tmp_path: Path, caplog) -> None:
    config = {
        "ae_title": "FROMBACKEND",
        "dicom_port": "eleven",
        "study_timeout": 5,
        "anonymize": False,
        "forward_to": ["pacs9"],
        "nodes": [
            {"name": "pacs9", "kind": "dicom", "ae_title": "P9", "host": "10.0.0.9", "port": 104}
        ],
        "something_new": {"x": 1},
    }
    with BackendSim(config=config) as sim:
        s = LinkSite(tmp_path, sim)
        try:
            report = config_fetch.fetch_and_apply(s.rooms.cfg, s.rooms.catalog)
            persisted = RuntimeSettings(s.rooms.catalog).persisted()
            assert {k: p.value for k, p in persisted.items()} == {
                "ae_title": "FROMBACKEND",
                "study_timeout": 5.0,
                "forward_to": ["pacs9"],
            }
            assert set(report["refused"]) == {"dicom_port", "anonymize"}
            assert Nodes(s.rooms.catalog).get("pacs9") is not None
            assert "anonymize=False; ignored" in caplog.text
            for body, why in [
                ("{not json", "not JSON"),
                ("[]", "not a JSON object"),
                ('{"ae_title": NaN}', "not JSON"),
                ("x" * 70_000, "larger than 64 KiB"),
            ]:
                sim.config = body
                with pytest.raises(config_fetch.FetchError, match=why):
                    config_fetch.fetch(s.rooms.cfg)
            sim.config = None
            with pytest.raises(config_fetch.FetchError, match="HTTP 503"):
                config_fetch.fetch(s.rooms.cfg)
        finally:
            s.rooms.close()
        assert sim.requests[0][2] == f"Token {sim.token}"
    with pytest.raises(config_fetch.FetchError, match="unreachable"):
        config_fetch.fetch(s.rooms.cfg)


def test_a_config_fetch_that_failed_is_retried_while_connected(
    tmp_path: Path, sim: BackendSim
) -> None:
    """The config endpoint fails while the WebSocket works: the link keeps
    fetching, in the session, and reports it in health until it succeeds."""
    sim.config_status = 500
    s = LinkSite(tmp_path, sim).start()
    try:
        sim.wait_connected()
        sim.wait_for(
            lambda m: m["type"] == "health" and "backend config not fetched yet" in m["problems"],
            30,
            "the pending fetch in health",
        )
        sim.config, sim.config_status = {"study_timeout": 8}, 200
        wait_until(
            lambda: "study_timeout" in RuntimeSettings(s.rooms.catalog).persisted(),
            30,
            "the fetch during the session",
        )
        sim.wait_for(
            lambda m: m["type"] == "health" and m["status"] == "ok", 30, "a healthy heartbeat"
        )
        assert sim.connections == 1
    finally:
        s.stop()
