"""GET /api/status/: in-process on a real site (real catalog, outbox, spool and
app in a real waitress server), and end to end on a real proxy process that
receives a study with DCMTK storescu and dead-letters its forward to a DICOM
node on a dead port."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import dicomgen
import tokens
import tools
from api_read_site import ApiSite
from helpers import wait_until
from ith_proxy import __version__
from ith_proxy.store.browse import site_counts
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.outbox import Outbox
from outbox_site import Site

# the service's Control (the ops part of issue 10) reports the SCP's state and
# counters; until it is merged the running proxy has none and says "unknown"

DEAD_NODE_INI = """
[scheduler]
study_timeout = 1
interval = 0.2
[scu]
connect_timeout = 2
acse_timeout = 5
dimse_timeout = 5
[forward]
destinations = deadpacs
max_attempts = 1
backoff_base = 0.2
backoff_cap = 0.5
[node:deadpacs]
kind = dicom
ae_title = DEADPACS
host = 127.0.0.1
port = {port}
"""


@pytest.fixture
def site(tmp_path):
    s = ApiSite(tmp_path / "site", health=lambda: ["indexer is not running"])
    yield s
    s.close()


def test_status_of_a_site_with_a_dead_letter(site: ApiSite, tmp_path: Path) -> None:
    forwarding = Site(site.rooms, tmp_path, destinations=("PACS",))
    study = forwarding.complete(2)
    forwarding.complete(1)
    entry = forwarding.entry(study, "PACS")
    Outbox(site.rooms.catalog).fail(entry.id, entry.updated_at + 1, "association rejected")
    stuck = site.rooms.drop("waiting", b"not yet indexed")
    os.utime(stuck, (time.time() - 120, time.time() - 120))
    status, body = site.call("GET", "/api/status/")
    assert status == 200, body
    assert body["version"] == __version__
    assert body["health"] == {"status": "degraded", "problems": ["indexer is not running"]}
    assert body["scp"] == {"state": "unknown"}  # no service runs here: nothing to ask
    assert body["link"] == {"state": "unknown", "mode": "offline"}
    assert body["catalog"]["studies"] == 2 and body["catalog"]["instances"] == 3
    assert body["studies_by_state"] == {
        "receiving": 0,
        "complete": 1,
        "forwarding": 0,
        "forwarded": 0,
        "failed": 1,
    }
    assert body["queues"]["incoming"] == 1
    assert 119 <= body["queues"]["incoming_oldest_seconds"] < 3600
    assert body["queues"]["quarantined"] == 0
    assert body["queues"]["outbox"] == {"pending": 1, "delivered": 0, "failed": 1}
    (dead,) = body["dead_letter"]
    assert (dead["study_instance_uid"], dead["node"], dead["attempts"], dead["last_error"]) == (
        study,
        "PACS",
        0,
        "association rejected",
    )
    assert dead["failed_at"].endswith("+00:00")
    disk = body["disk"]
    assert 0 < disk["free_bytes"] <= disk["total_bytes"]
    assert disk["min_free_bytes"] == site.rooms.cfg.spool.min_free_mb * 2**20
    assert disk["below_minimum"] == (disk["free_bytes"] < disk["min_free_bytes"])
    # the CLI's `status --json` reports the same counts (one function, store/browse.py)
    cli = site.rooms.cli("status", "--json")
    assert cli.returncode == 0, cli.stderr
    info = json.loads(cli.stdout)
    assert info["outbox"] == body["queues"]["outbox"]
    assert info["failed_forwards"] == body["dead_letter"]
    assert info["studies_by_state"] == body["studies_by_state"]


def test_status_needs_a_valid_token(site: ApiSite) -> None:
    assert site.call("GET", "/api/status/", token=None)[0] == 401
    expired = tokens.mint(exp=int(time.time()) - 3600)
    assert site.call("GET", "/api/status/", token=expired)[0] == 401
    assert site.call("GET", "/api/status/", token=tokens.mint("phi:read"))[0] == 200


def _proxy(tmp_path: Path) -> tools.ProxyProcess:
    dead = tools.free_port()  # nothing listens there
    return tools.ProxyProcess(
        tmp_path / "proxy", env=tokens.ENV, config_text=DEAD_NODE_INI.format(port=dead)
    )


def test_a_dead_lettered_forward_shows_in_status_end_to_end(tmp_path: Path) -> None:
    src = dicomgen.make_small_series(tmp_path / "src", 2)
    token = tokens.mint()
    with _proxy(tmp_path) as proxy:
        sent = tools.storescu(proxy.dicom_port, src.files)
        assert sent.returncode == 0, sent.stdout + sent.stderr

        def dead_letter():
            status, body = proxy.api("GET", "/api/status/", token=token)
            assert status == 200, body
            return body if body["dead_letter"] else None

        body = wait_until(dead_letter, 120, "the dead letter in /api/status/")
        listed = proxy.api("GET", "/api/studies/?state=failed", token=token)[1]["studies"]
        assert isinstance(body, dict)
        (dead,) = body["dead_letter"]
        assert [s["study_instance_uid"] for s in listed] == [dead["study_instance_uid"]]
        assert (dead["node"], dead["attempts"]) == ("deadpacs", 1)
        assert dead["last_error"]  # the SCU's one line on the refused connection
        assert body["studies_by_state"]["failed"] == 1
        assert body["queues"]["outbox"]["failed"] == 1
        assert body["catalog"]["instances"] == 2
        detail = proxy.api("GET", f"/api/studies/{dead['study_instance_uid']}/", token=token)[1]
        assert detail["state"] == "failed" and detail["destinations"][0]["state"] == "failed"
        # no PHI in what the API shows: none of the originals' marker strings
        shown = json.dumps([body, listed, detail])
        assert not [s for s in src.leak_strings() if s in shown]
        assert src.study_uid not in shown


def test_the_scp_and_link_state_of_a_running_proxy(tmp_path: Path) -> None:
    """With the service's Control the SCP reads running, its AE title and port,
    and the link offline (no ITH_URL)."""
    token = tokens.mint()
    with _proxy(tmp_path) as proxy:
        body = proxy.api("GET", "/api/status/", token=token)[1]
    assert body["scp"]["state"] == "running"
    assert (body["scp"]["ae_title"], body["scp"]["port"]) == ("DICOMRCV", proxy.dicom_port)
    assert body["link"] == {"state": "offline", "mode": "offline"}


def test_the_counts_are_one_snapshot(site: ApiSite, tmp_path: Path) -> None:
    """A forward that fails while the counts are read shows in all of them or
    in none: never a dead letter beside study counts read before it."""
    forwarding = Site(site.rooms, tmp_path, destinations=("PACS",))
    study = forwarding.complete(2)
    entry = forwarding.entry(study, "PACS")
    reader = Catalog(site.rooms.spool.catalog_file)
    read_counts = reader.counts

    def counts_then_a_failure() -> dict:  # the forwarder commits right after this read
        counts = read_counts()
        Outbox(site.rooms.catalog).fail(entry.id, entry.updated_at + 1, "association rejected")
        return counts

    reader.counts = counts_then_a_failure  # type: ignore[method-assign]  # the race, on cue
    try:
        torn = site_counts(reader)
        del reader.counts  # the class's again
        after = site_counts(reader)
    finally:
        reader.close()
    for counts, failed in ((torn, 0), (after, 1)):
        assert counts["studies_by_state"]["failed"] == failed
        assert counts["outbox"]["failed"] == failed
        assert len(counts["failed_forwards"]) == failed
