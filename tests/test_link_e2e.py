"""The backend link end to end: real proxy processes (tools.ProxyProcess)
with ITH_URL pointing at a real backend simulator (tests/backend_sim.py).

- the config fetched and persisted at start; a start with the backend down
  runs on the persisted config and fetches again in the background;
- a burst of 50 studies with the backend killed and restarted: every
  study.completed and study.forwarded arrives, duplicates only by id;
- config.update changing the study timeout and the AE title live;
- the heartbeat and audit.head carry the audit chain's head;
- no message and no upload carries PHI (the canary study).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest

import canary
import dicomgen
import tools
from backend_sim import BackendSim
from helpers import wait_until
from ith_proxy import config as config_mod
from ith_proxy.cli.common import audit_log
from ith_proxy.store.audit import read_anchor
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.linkbox import Linkbox
from ith_proxy.store.nodes import Nodes
from ith_proxy.store.settings import RuntimeSettings

FAST = """
[scheduler]
interval = 0.2
[forward]
max_attempts = 1000
backoff_base = 0.2
backoff_cap = 0.5
[link]
heartbeat_interval = 0.5
connect_timeout = 5
reconnect_base = 0.2
reconnect_cap = 1
"""


def proxy_for(
    work: Path, sim: BackendSim, timeout: str = "1", extra: str = ""
) -> tools.ProxyProcess:
    return tools.ProxyProcess(
        work, config_text=FAST + extra, env={**sim.env(), "DICOM_STUDY_TIMEOUT": timeout}
    )


def read_catalog(proxy: tools.ProxyProcess, what):
    catalog = Catalog(proxy.spool / "catalog.sqlite3", readonly=True)
    try:
        return what(catalog)
    finally:
        catalog.close()


def persisted(proxy: tools.ProxyProcess) -> dict[str, Any]:
    rows = read_catalog(proxy, lambda c: RuntimeSettings(c).persisted())
    return {k: (p.value, p.source) for k, p in rows.items()}


def main_log(proxy: tools.ProxyProcess) -> str:
    return "".join(p.read_text() for p in (proxy.spool / "logs").glob("*.log*"))


def test_config_at_start_and_fallback_when_the_backend_is_down(tmp_path: Path) -> None:
    config = {
        "ae_title": "BACKENDAE",
        "study_timeout": 2.5,
        "anonymize": False,
        "forward_to": ["pacs7"],
        "nodes": [
            {"name": "pacs7", "kind": "dicom", "ae_title": "PACS7", "host": "10.1.2.7", "port": 104}
        ],
    }
    sim = BackendSim(config=config).start()
    proxy = proxy_for(tmp_path / "proxy", sim)
    try:
        proxy.start()
        sim.wait_connected()
        assert sim.of_type("hello")[0]["ae_title"] == "BACKENDAE"
        assert persisted(proxy) == {
            "ae_title": ("BACKENDAE", "backend"),
            "study_timeout": (2.5, "backend"),
            "forward_to": (["pacs7"], "backend"),
        }
        node = read_catalog(proxy, lambda c: Nodes(c).get("pacs7"))
        assert node is not None and node.source == "backend"
        health = sim.wait_for(lambda m: m["type"] == "health", 30, "health")
        assert any("anonymize is local only" in p for p in health["problems"])
        assert "asked for anonymize=False; ignored" in main_log(proxy)
        proxy.stop()

        sim.kill()  # the backend is down: the proxy starts on what was persisted
        proxy.start()
        wait_until(lambda: "backend config not fetched" in main_log(proxy), 30, "a failed fetch")
        assert persisted(proxy)["ae_title"] == ("BACKENDAE", "backend")
        status, body = tools.http_json("GET", proxy.api_url + "/api/health/")
        assert status in (200, 503), body

        sim.config = {"study_timeout": 4}
        sim.start()  # back: fetched in the background, without a restart
        wait_until(
            lambda: persisted(proxy)["study_timeout"] == (4, "backend"), 60, "the late fetch"
        )
        sim.wait_connected(connections=2)
        assert proxy.running
    finally:
        proxy.stop()
        sim.kill()


def test_a_burst_of_50_studies_across_a_backend_crash(tmp_path: Path) -> None:
    # The backend stores nothing before its crash (no acks): however fast the
    # proxy sends and however late this test looks, the crash loses acks and
    # the events wait in the linkbox until the backend is back.
    sim = BackendSim(auto_ack=False).start()
    proxy = proxy_for(tmp_path / "proxy", sim)
    try:
        proxy.start()
        sim.wait_connected()
        inputs = tmp_path / "in"
        for i in range(50):
            dicomgen.make_series(inputs / f"s{i:02d}", 1, rows=16, cols=16, seed=i)
        result = tools.storescu(proxy.dicom_port, inputs)
        assert len(tools.acked_files(result)) == 50, result.stderr[-2000:]
        wait_until(lambda: len(sim.of_type("study.completed")) >= 5, 60, "the first events")
        sim.kill()  # a crash: the acks still pending are lost
        wait_until(
            lambda: read_catalog(proxy, lambda c: Linkbox(c).depth()) >= 10,
            60,
            "events waiting in the linkbox",
        )
        sim.auto_ack = True
        sim.start()

        def arrived(kind: str) -> set[str]:
            with sim.lock:
                acked = set(sim.acked)
            return {m["study_instance_uid"] for m in sim.of_type(kind) if m["id"] in acked}

        wait_until(lambda: len(arrived("study.completed")) == 50, 120, "50 study.completed")
        wait_until(lambda: len(arrived("study.forwarded")) == 50, 120, "50 study.forwarded")
        wait_until(lambda: read_catalog(proxy, lambda c: Linkbox(c).depth()) == 0, 60, "all acked")
        by_id: dict[str, list[str]] = collections.defaultdict(list)
        ids_of: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        for raw, message in zip(sim.raw, sim.received, strict=True):
            if message["type"].startswith("study."):
                by_id[message["id"]].append(raw)
                ids_of[message["type"], message["study_instance_uid"]].add(message["id"])
        assert all(len(set(copies)) == 1 for copies in by_id.values())  # a copy is the same
        assert all(len(ids) == 1 for ids in ids_of.values())  # one event, one id
        assert len(ids_of) == 100 and not sim.of_type("study.failed")
        assert len(set(sim.stow_sop_uids)) == 50
        assert sim.connections >= 2
    finally:
        proxy.stop()
        sim.kill()


def test_every_command_answered_end_to_end(tmp_path: Path) -> None:
    sim = BackendSim().start()
    proxy = proxy_for(tmp_path / "proxy", sim)
    try:
        proxy.start()
        sim.wait_connected()
        series = dicomgen.make_series(tmp_path / "in", 1, rows=16, cols=16)
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        done = sim.wait_for(lambda m: m["type"] == "study.forwarded", 60, "study.forwarded")
        study = done["study_instance_uid"]
        with tools.StoreSCP(tmp_path / "scp", aet="PACSX") as scp:
            node = {"name": "pacsx", "kind": "dicom", "ae_title": "PACSX"}
            node.update(host="127.0.0.1", port=scp.port)
            commands = [
                ("config.update", {"forward_to": ["backend"]}, True),
                ("config.update", {"anonymize": False}, False),
                ("nodes.sync", {"nodes": [node]}, True),
                ("node.echo", {"node": "pacsx"}, True),
                ("study.dispatch", {"study_instance_uid": study, "node": "pacsx"}, True),
                ("firmware.update", {}, False),
            ]
            for kind, fields, ok in commands:
                result = sim.result_for(sim.command(kind, **fields), timeout=60)
                assert result["ok"] is ok, (kind, result)
            wait_until(lambda: list(scp.out_dir.glob("*")), 60, "the dispatched study")
        sim.wait_for(
            lambda m: m["type"] == "study.forwarded" and m["node"] == "pacsx", 60, "forwarded"
        )
        ping = sim.command("ping")
        sim.wait_for(lambda m: m["type"] == "pong" and m["in_reply_to"] == ping, 30, "pong")
    finally:
        proxy.stop()
        sim.kill()


def test_heartbeat_and_audit_head(tmp_path: Path) -> None:
    sim = BackendSim().start()
    proxy = proxy_for(tmp_path / "proxy", sim)
    try:
        proxy.start()
        sim.wait_connected()
        cfg = config_mod.load(env=proxy.env, cwd=proxy.workdir)
        audit_log(cfg, append=True).record("tester", "phi.read", "2.25.1", outcome="ok")
        head = read_anchor(cfg.vault.audit_anchor_file)
        assert head is not None
        moved = sim.wait_for(lambda m: m["type"] == "audit.head", 30, "audit.head")
        assert moved["audit_head"] == {"seq": head["seq"], "mac": head["mac"]}
        beat = sim.wait_for(
            lambda m: m["type"] == "health" and m["audit_head"] is not None, 30, "a heartbeat"
        )
        assert beat["audit_head"]["seq"] == head["seq"]
        assert {"status", "problems", "studies", "outbox_depth"} <= set(beat)
    finally:
        proxy.stop()
        sim.kill()
    logs = main_log(proxy) + proxy.stdout_path.read_text() + proxy.stderr_path.read_text()
    assert "link: connected to the backend" in logs
    assert sim.token not in logs  # the token is never logged


@pytest.mark.timeout(300)
def test_no_message_carries_phi(tmp_path: Path) -> None:
    corpus = canary.build_canary(tmp_path / "in", drop=False, exclude=canary.excluded_rows())
    sim = BackendSim().start()
    proxy = proxy_for(tmp_path / "proxy", sim)
    try:
        proxy.start()
        sim.wait_connected()
        result = tools.storescu(proxy.dicom_port, corpus.network_files, aet="CANARYSCU")
        assert len(tools.acked_files(result)) == len(corpus.network_files)
        done = sim.wait_for(lambda m: m["type"] == "study.forwarded", 120, "study.forwarded")
        for kind, fields in [
            (
                "study.dispatch",
                {"study_instance_uid": done["study_instance_uid"], "node": "backend"},
            ),
            ("node.echo", {"node": "backend"}),
            ("config.update", {"anonymize": False}),
        ]:
            sim.result_for(sim.command(kind, **fields), timeout=60)
        sim.wait_for(lambda m: m["type"] == "health", 30, "health")
    finally:
        proxy.stop()
        sim.kill()
    needles = sorted(n.encode() for n in corpus.needles(network_only=True) if n)
    recorded = {
        "websocket": "\n".join(sim.raw).encode(),
        "requests": json.dumps(sim.requests).encode(),
        "stow": b"".join(sim.stow_parts),
    }
    hits = [
        (where, n) for where, data in recorded.items() for n in needles if canary._hits(data, n)
    ]
    assert not hits, hits[:10]
    assert sim.stow_parts and len(sim.raw) > 5


def test_config_update_changes_timeout_and_ae_title_live(tmp_path: Path) -> None:
    """Needs the service's live application of the runtime settings (the ops
    part of issue 10): the persisted layer is this branch's, the restart of
    the SCP and the scheduler's new timeout are the service's."""
    sim = BackendSim().start()
    proxy = proxy_for(tmp_path / "proxy", sim, timeout="3600")
    try:
        proxy.start()
        sim.wait_connected()
        series = dicomgen.make_series(tmp_path / "in", 1, rows=16, cols=16)
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_until(lambda: read_catalog(proxy, lambda c: c.study_uids()), 30, "the study indexed")
        result = sim.result_for(sim.command("config.update", study_timeout=1, ae_title="LIVEAE"))
        assert result["ok"] is True, result
        assert persisted(proxy)["ae_title"] == ("LIVEAE", "backend")
        assert persisted(proxy)["study_timeout"] == (1, "backend")
        sim.wait_for(lambda m: m["type"] == "study.completed", 60, "completion under 1 s")
        wait_until(
            lambda: tools.echoscu(proxy.dicom_port, aec="LIVEAE", timeout=10).returncode == 0,
            60,
            "the SCP answering as LIVEAE",
        )
        assert tools.echoscu(proxy.dicom_port, aec="DICOMRCV", timeout=10).returncode != 0
    finally:
        proxy.stop()
        sim.kill()
