"""The runtime settings applied live: the persisted layer (store/settings.py),
the scheduler reading it each pass, and a real proxy whose SCP moves, holds
and starts, and whose study timeout and destinations change, without a
restart of the process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import dicomgen
import tokens
import tools
from helpers import study_summary, wait_indexed, wait_until
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.outbox import Outbox
from ith_proxy.store.settings import RuntimeSettings, SettingsError
from ith_proxy.workers.scheduler import Scheduler
from worker_rooms import Rooms

TOKEN = tokens.mint()


# --- the persisted layer ---


def test_every_accepted_write_moves_the_fingerprint_and_a_refused_one_writes_nothing(
    rooms: Rooms,
) -> None:
    settings = RuntimeSettings(rooms.catalog)
    start = settings.fingerprint()
    assert settings.update({"study_timeout": 30}, "backend", now=1.0) == ["study_timeout"]
    first = settings.fingerprint()
    assert first != start
    # the same value again: nothing changed, but the write is seen (a held SCP starts on it)
    assert settings.update({"study_timeout": 30}, "backend", now=2.0) == []
    assert settings.fingerprint() != first
    with pytest.raises(SettingsError) as refused:
        settings.update({"ae_title": "NEW", "anonymize": False}, "backend", now=3.0)
    assert refused.value.field == "anonymize"
    assert set(settings.persisted()) == {"study_timeout"}


def test_restore_puts_back_only_what_nobody_has_changed_since(rooms: Rooms) -> None:
    settings = RuntimeSettings(rooms.catalog)
    settings.update({"dicom_port": 4000}, "backend", now=1.0)
    previous = settings.persisted()
    settings.update({"dicom_port": 5000, "ae_title": "NEWAE"}, "api", now=2.0)
    settings.update({"ae_title": "LATER"}, "backend", now=3.0)  # another writer, after us
    written = {"dicom_port": 5000, "ae_title": "NEWAE"}
    restored = settings.restore({k: previous.get(k) for k in written}, written)
    assert restored == ["dicom_port"]
    now = settings.persisted()
    assert (now["dicom_port"].value, now["dicom_port"].source) == (4000, "backend")
    assert now["ae_title"].value == "LATER"


# --- the scheduler reads them each pass ---


def test_the_scheduler_takes_a_new_timeout_and_destinations_on_its_next_pass(
    rooms: Rooms, tmp_path: Path
) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 2, rows=32, cols=32)
    t0 = time.time() - 1000
    for f in series.files:
        name = rooms.spool.deliver_incoming(f.read_bytes())
        os.utime(rooms.spool.incoming_path(name), (t0, t0))
    assert rooms.indexer.run_once() == 2
    assert rooms.cfg.scheduler.study_timeout == 60
    now = [t0 + 20]
    scheduler = Scheduler(rooms.cfg, rooms.spool, rooms.catalog, clock=lambda: now[0])
    assert scheduler.run_once()["completed"] == []
    # another connection (the API's, the link's) writes the persisted layer
    other = Catalog(rooms.spool.catalog_file)
    try:
        RuntimeSettings(other).update({"study_timeout": 10, "forward_to": ["pacs"]}, "api")
    finally:
        other.close()
    [study] = scheduler.run_once()["completed"]
    assert [d["node"] for d in Outbox(rooms.catalog).study_destinations(study)] == ["pacs"]


# --- a real proxy ---


def _start(proxy: tools.ProxyProcess) -> None:
    proxy.start(wait_dicom=False, timeout=60)


def test_a_real_proxy_moves_its_scp_remembers_it_and_says_where_it_came_from(
    tmp_path: Path,
) -> None:
    proxy = tools.ProxyProcess(tmp_path / "proxy", env=tokens.ENV)
    with proxy:
        old = proxy.dicom_port
        assert tools.echoscu(old, aec="DICOMRCV").returncode == 0
        new = tools.free_port()
        status, body = proxy.api(
            "PUT", "/api/config/", {"ae_title": "EDGE7", "dicom_port": new}, token=TOKEN
        )
        assert status == 200, body
        assert body["scp"]["port"] == new and body["scp"]["ae_title"] == "EDGE7"
        assert tools.echoscu(new, aec="EDGE7").returncode == 0
        assert tools.echoscu(new, aec="DICOMRCV").returncode != 0
        assert tools.echoscu(old, aec="DICOMRCV").returncode != 0
        pid = proxy.pid
        status, config = proxy.api("GET", "/api/config/", token=TOKEN)
        assert proxy.pid == pid and status == 200  # the same process throughout
        assert config["settings"]["dicom_port"] == {"value": new, "source": "api"}
        assert proxy.health()[0] == 200
        shown = proxy.cli("status")
        assert shown.returncode == 0, shown.stderr
        assert f"dicom_port    {new}  (api)" in shown.stdout
        assert "study_timeout 60.0  (default)" in shown.stdout
        assert "anonymize     True  (default; local only)" in shown.stdout
    # the persisted layer survives a restart and sits above the environment's DICOM_PORT
    _start(proxy)
    try:
        tools.wait_listening(new, timeout=30)
        assert not tools.port_listening(old)
        assert tools.echoscu(new, aec="EDGE7").returncode == 0
    finally:
        proxy.stop()


def test_auto_start_off_holds_the_scp_until_the_settings_are_written(tmp_path: Path) -> None:
    proxy = tools.ProxyProcess(tmp_path / "proxy", env={**tokens.ENV, "DICOM_AUTO_START": "false"})
    _start(proxy)
    try:
        port = proxy.dicom_port
        time.sleep(1.5)  # a supervise pass or two: nothing may start it
        assert not tools.port_listening(port)
        assert proxy.health() == (200, {"status": "ok"})  # held on purpose is not a problem
        status, config = proxy.api("GET", "/api/config/", token=TOKEN)
        assert config["scp"]["state"] == "stopped" and config["scp"]["held"] is True
        status, body = proxy.api("PUT", "/api/config/", {"study_timeout": 120}, token=TOKEN)
        assert status == 200 and body["scp"]["state"] == "running"
        assert tools.echoscu(port, aec="DICOMRCV").returncode == 0
    finally:
        proxy.stop()
    # held again after a restart, until a write from another connection (as the
    # backend link's config.update makes it): the service polls and starts the SCP
    _start(proxy)
    try:
        time.sleep(1.5)
        assert not tools.port_listening(proxy.dicom_port)
        other = Catalog(proxy.spool / "catalog.sqlite3")
        try:
            RuntimeSettings(other).update({"ae_title": "FROMBACKEND"}, "backend")
        finally:
            other.close()
        tools.wait_listening(proxy.dicom_port, timeout=30)
        assert tools.echoscu(proxy.dicom_port, aec="FROMBACKEND").returncode == 0
        status, config = proxy.api("GET", "/api/config/", token=TOKEN)
        assert config["settings"]["ae_title"] == {"value": "FROMBACKEND", "source": "backend"}
        assert config["scp"]["held"] is False
    finally:
        proxy.stop()


def test_a_real_proxy_forwards_after_a_shorter_timeout_to_a_node_set_through_the_api(
    tmp_path: Path,
) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 3)
    ini = "[scheduler]\nstudy_timeout = 3600\ninterval = 0.2\n"
    with (
        tools.StoreSCP(tmp_path / "pacs", aet="LIVEPACS") as pacs,
        tools.ProxyProcess(tmp_path / "proxy", env=tokens.ENV, config_text=ini) as proxy,
    ):
        node = {
            "name": "live",
            "kind": "dicom",
            "ae_title": "LIVEPACS",
            "host": "127.0.0.1",
            "port": pacs.port,
        }
        assert proxy.api("POST", "/api/nodes/", node, token=TOKEN)[0] == 201
        sent = tools.storescu(proxy.dicom_port, series.files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_indexed(proxy.spool, 3)
        time.sleep(1.0)  # several scheduler passes under the long timeout
        [study] = [p.name for p in (proxy.spool / "studies").iterdir()]
        assert study_summary(proxy.spool, study)["state"] == "receiving"
        status, body = proxy.api(
            "PUT", "/api/config/", {"study_timeout": 0.5, "forward_to": ["live"]}, token=TOKEN
        )
        assert status == 200, body
        wait_until(lambda: len(pacs.received()) == 3, 60, "3 instances at the PACS")
        wait_until(
            lambda: study_summary(proxy.spool, study).get("state") == "forwarded", 60, "forwarded"
        )
        status, scp = proxy.api("GET", "/api/config/", token=TOKEN)
        assert scp["scp"]["instances_received"] == 3
        assert scp["scp"]["bytes_received"] > 3 * 64 * 64 * 2


# --- the service's Control, in this process ---


def test_a_backend_port_that_cannot_be_bound_is_a_health_line_until_it_can(tmp_path: Path) -> None:
    """A change written by another connection (the link) is applied by poll();
    a port in use keeps the old listener, says so in health, and is tried
    again on each poll until it is free."""
    import socket

    from ith_proxy.control import ServiceControl
    from ith_proxy.dicom.scp import StorageSCP

    port = tools.free_port()
    rooms = Rooms(
        tmp_path / "site", env={"DICOM_PORT": str(port), "DICOM_BIND_ADDRESS": "127.0.0.1"}
    )
    control = ServiceControl(
        rooms.cfg,
        rooms.spool.catalog_file,
        lambda cfg, counters: StorageSCP(cfg, rooms.spool, None, counters),
        lambda: "offline",
    )
    control.start()
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        RuntimeSettings(rooms.catalog).update({"dicom_port": busy}, "backend")
        control.poll()
        [line] = control.problems()
        assert line.startswith(f"dicom listener cannot listen as DICOMRCV on 127.0.0.1:{busy}: ")
        assert line.endswith(f"; still DICOMRCV on port {port}")
        assert tools.echoscu(port).returncode == 0
        taken.close()
        control.poll()
        assert control.problems() == []
        assert control.scp_status()["port"] == busy
        assert tools.echoscu(busy).returncode == 0
        assert not tools.port_listening(port)
    finally:
        taken.close()
        control.stop()
        rooms.close()


def test_the_cli_calls_out_with_the_ae_title_set_at_run_time(tmp_path: Path) -> None:
    """`echo` (and `retrieve`, whose C-MOVE names it as destination) use the
    AE title the SCP answers to now, not the one of the INI file."""
    from ith_proxy.dicom.scp import StorageSCP
    from ith_proxy.store.nodes import Nodes

    port = tools.free_port()
    rooms = Rooms(
        tmp_path / "site",
        "[scp]\nallowed_calling_aes = CALLER7\n",
        {"DICOM_PORT": str(port), "DICOM_BIND_ADDRESS": "127.0.0.1"},
    )
    scp = StorageSCP(rooms.cfg, rooms.spool)  # admits only the calling AE CALLER7
    scp.start()
    try:
        Nodes(rooms.catalog).put(
            {
                "name": "strict",
                "kind": "dicom",
                "ae_title": "DICOMRCV",
                "host": "127.0.0.1",
                "port": port,
            }
        )
        refused = rooms.cli("echo", "strict")
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        RuntimeSettings(rooms.catalog).update({"ae_title": "CALLER7"}, "api")
        done = rooms.cli("echo", "strict")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("echo strict: ok (DICOMRCV@127.0.0.1:")
    finally:
        scp.stop()
        rooms.close()
