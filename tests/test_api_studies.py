"""GET /api/studies/ (keyset cursor, filters), GET /api/studies/<uid>/ and
POST /api/studies/<uid>/dispatch/ on a real site: real spool, catalog, indexer
and audit log, the real app in a real waitress server, real HTTP."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

import tokens
from api_read_site import ApiSite
from ith_proxy.store.browse import Browse, Filters
from ith_proxy.store.nodes import Nodes
from ith_proxy.store.outbox import Outbox
from outbox_site import Site

T0 = 1_700_000_000.0


@pytest.fixture
def site(tmp_path):
    s = ApiSite(tmp_path / "site")
    yield s
    s.close()


def _key(summary: dict) -> tuple[str, str]:
    return summary["last_received"], summary["study_instance_uid"]


def _audit(site: ApiSite) -> list[dict]:
    path = site.rooms.spool.audit_file
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_cursor_walks_every_study_once_while_new_ones_arrive(site: ApiSite) -> None:
    """120 studies, three to each receive time (ties broken by UID); pages of 7
    while new studies arrive between pages, some newer than everything (above
    the cursor) and some older (still ahead of it): no study twice, every
    study that was there at the start seen, the order strictly descending."""
    original: set[str] = set()
    for k in range(40):
        original.update(site.studies(3, T0 + k))
    assert len(original) == 120
    arrived: list[str] = []

    def between(page: int) -> None:
        arrived.extend(site.studies(1, time.time()))  # newer: lands above the cursor
        if page % 4 == 0:
            arrived.extend(site.studies(1, T0 - 1000 - page))  # older: still ahead

    seen = site.walk(limit=7, between=between)
    uids = [s["study_instance_uid"] for s in seen]
    assert len(uids) == len(set(uids)), "a study came twice"
    assert original <= set(uids)
    keys = [_key(s) for s in seen]
    assert keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)
    old_arrivals = {u for u in arrived if site.rooms.catalog.study(u)["last_received"] < T0}
    assert old_arrivals and old_arrivals <= set(uids)  # inserted ahead of the cursor: seen
    # a fresh walk sees everything, once, in pages of the default size
    everything = site.walk()
    assert len(everything) == 120 + len(arrived)
    assert {s["study_instance_uid"] for s in everything} == original | set(arrived)


def test_a_page_of_summaries(site: ApiSite) -> None:
    (study,) = site.studies(1, T0, modality="MR")
    status, body = site.call("GET", "/api/studies/")
    assert status == 200
    assert body["next_cursor"] is None and body["limit"] == 50
    (summary,) = body["studies"]
    assert summary == {
        "study_instance_uid": study,
        "state": "receiving",
        "purged": False,
        "purged_at": None,
        "first_received": datetime.fromtimestamp(T0, UTC).isoformat(timespec="milliseconds"),
        "last_received": datetime.fromtimestamp(T0, UTC).isoformat(timespec="milliseconds"),
        "completed_at": None,
        "reopened": 0,
        "series_count": 1,
        "instance_count": 1,
        "modalities": ["MR"],
    }


def test_filters_state_modality_since(site: ApiSite) -> None:
    ct_old = set(site.studies(12, T0, modality="CT"))
    mr_old = set(site.studies(9, T0 + 10, modality="MR"))
    ct_new = set(site.studies(8, T0 + 100, modality="CT"))
    completed = sorted(ct_old)[:5] + sorted(mr_old)[:2]
    for uid in completed:
        assert site.rooms.catalog.complete_study(uid, T0 + 200, 0)

    def uids(query: str, limit: int = 4) -> set[str]:
        found = site.walk(query, limit=limit)
        assert len(found) == len({s["study_instance_uid"] for s in found})
        return {s["study_instance_uid"] for s in found}

    assert uids("modality=CT") == ct_old | ct_new
    assert uids("modality=mr") == mr_old  # the code is matched upper-case
    assert uids("modality=US") == set()
    assert uids("state=complete") == set(completed)
    assert uids("state=receiving", limit=500) == (ct_old | mr_old | ct_new) - set(completed)
    assert uids("state=failed") == set()
    assert uids("state=complete&modality=MR") == set(sorted(mr_old)[:2])
    assert uids(f"since={T0 + 10:.0f}") == mr_old | ct_new
    iso = datetime.fromtimestamp(T0 + 50, UTC).isoformat()
    assert uids(f"since={iso.replace('+00:00', 'Z')}") == ct_new
    assert uids("since=" + iso.replace("+00:00", "")) == ct_new  # no zone: UTC
    assert uids(f"since={T0 + 10:.0f}&modality=CT&state=receiving") == ct_new


def test_every_list_query_is_served_by_an_index(site: ApiSite) -> None:
    """No filter combination scans the studies table or sorts in a temporary
    B-tree: the keyset pages come straight off an index (migration 6)."""
    site.studies(3, T0)
    browse = Browse(site.rooms.catalog)
    cases = [
        Filters(),
        Filters(state="complete"),
        Filters(modality="CT"),
        Filters(since=T0),
        Filters(state="complete", modality="CT"),
        Filters(state="forwarded", since=T0),
        Filters(modality="MR", since=T0),
        Filters(state="failed", modality="MR", since=T0),
    ]
    for filters in cases:
        for after in (None, (T0, "1.2.3")):
            plan = browse.plan(filters, after)
            assert not any("TEMP B-TREE" in line for line in plan), (filters, plan)
            scans = [line for line in plan if line.startswith("SCAN") and "INDEX" not in line]
            assert not scans, (filters, plan)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=bogus", "state"),
        ("state=complete'%20OR%201=1--", "state"),
        ("modality=CT'%20OR%20'1'='1", "modality"),
        ("modality=", "modality"),
        ("modality=" + "A" * 17, "modality"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=99999999999999999999", "limit"),
        ("limit=-1", "limit"),
        ("limit=1e3", "limit"),
        ("limit=%EF%BC%95", "limit"),  # a full-width digit 5
        ("since=yesterday", "since"),
        ("since=nan", "since"),
        ("since=inf", "since"),
        ("since=-5", "since"),
        ("since=" + "1" * 65, "since"),
        ("cursor=not-a-cursor!", "cursor"),
        ("cursor=1.5", "cursor"),
        ("cursor=1.5_", "cursor"),
        ("cursor=_1.2", "cursor"),
        ("cursor=1e999_1.2", "cursor"),
        ("cursor=nan_1.2", "cursor"),
        ("cursor=inf_1.2", "cursor"),
        ("cursor=1_1.2'%20OR%201=1%20--", "cursor"),
        ("cursor=1_1.2%00", "cursor"),
        ("cursor=1_" + "1" * 119, "cursor"),
        ("offset=10", "offset"),
        ("state=complete&state=failed", "state"),
        ("limit=5&limit=6", "limit"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(site: ApiSite, query: str, field: str) -> None:
    status, body = site.call("GET", f"/api/studies/?{query}")
    assert (status, body.get("field")) == (400, field), body
    assert set(body) == {"error", "field"} and "Traceback" not in body["error"]


def test_the_list_needs_a_token(site: ApiSite) -> None:
    status, body = site.call("GET", "/api/studies/", token=None)
    assert status == 401 and body == {"error": body["error"]}
    status, _ = site.call("GET", "/api/studies/", token=tokens.mint(key="x" * 48))
    assert status == 401


def test_study_detail_and_timeline(site: ApiSite) -> None:
    (study,) = site.studies(1, T0, modality="CT")
    assert site.rooms.catalog.complete_study(study, T0 + 60, 0)
    status, body = site.call("GET", f"/api/studies/{study}/")
    assert status == 200
    assert body["study_instance_uid"] == study and body["state"] == "complete"
    assert (body["series_count"], body["instance_count"], body["modalities"]) == (1, 1, ["CT"])
    assert body["bytes"] > 0 and body["purged"] is False and body["destinations"] == []
    assert [e["event"] for e in body["timeline"]] == ["first-received", "complete"]
    assert body["timeline"][1]["at"] == body["completed_at"]
    assert body["patient_id"]  # the pseudonym, never an original value
    assert site.call("GET", "/api/studies/1.2.3.4/") == (
        404,
        {"error": "no such study", "field": "study_instance_uid"},
    )
    for bad in ("abc", "1..2", "1." + "2" * 70, "1.2%00", "%2e%2e"):
        status, body = site.call("GET", f"/api/studies/{bad}/")
        assert status in (400, 404), (bad, status)
        if status == 400:
            assert body["field"] == "study_instance_uid"
    assert site.call("GET", "/api/studies/abc/")[0] == 400


def _pacs(site: ApiSite) -> None:
    Nodes(site.rooms.catalog).put(
        {"name": "PACS", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    )


def test_dispatch_queues_through_the_outbox_and_is_audited(site: ApiSite) -> None:
    (study,) = site.studies(1, T0)
    _pacs(site)
    status, entry = site.call("POST", f"/api/studies/{study}/dispatch/", {"node": "pacs"})
    assert status == 202, entry
    assert (entry["study_instance_uid"], entry["node"], entry["state"], entry["reason"]) == (
        study,
        "PACS",
        "pending",
        "manual",
    )
    (row,) = Outbox(site.rooms.catalog).entries(study)
    assert (row.node, row.state, row.reason) == ("PACS", "pending", "manual")
    detail = site.call("GET", f"/api/studies/{study}/")[1]
    assert [d["node"] for d in detail["destinations"]] == ["PACS"]
    assert "queued PACS (manual)" in [e["event"] for e in detail["timeline"]]
    (record,) = _audit(site)
    assert (record["actor"], record["action"], record["target"]) == (
        "api:tester",
        "study.dispatch",
        study,
    )
    assert record["detail"]["outcome"] == "success" and record["detail"]["node"] == "PACS"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"node": "NOPE"}, 400, "node"),
        ({"node": ""}, 400, "node"),
        ({"node": "x" * 65}, 400, "node"),
        ({"node": "a\nb"}, 400, "node"),
        ({"node": 7}, 400, "node"),
        ({}, 400, "node"),
        ({"node": "PACS", "extra": 1}, 400, "extra"),
        (["PACS"], 400, "body"),
        (b"{not json", 400, "body"),
    ],
)
def test_dispatch_refusals_name_the_field_and_are_audited(
    site: ApiSite, body, status: int, field: str
) -> None:
    (study,) = site.studies(1, T0)
    _pacs(site)
    got, answer = site.call("POST", f"/api/studies/{study}/dispatch/", body)
    assert (got, answer["field"]) == (status, field), answer
    assert Outbox(site.rooms.catalog).entries(study) == []
    (record,) = _audit(site)
    assert (record["action"], record["target"], record["detail"]["outcome"]) == (
        "study.dispatch",
        study,
        str(status),
    )


def test_dispatch_of_an_unknown_or_malformed_study(site: ApiSite) -> None:
    _pacs(site)
    assert site.call("POST", "/api/studies/1.2.3/dispatch/", {"node": "PACS"}) == (
        404,
        {"error": "no such study", "field": "study_instance_uid"},
    )
    assert [r["detail"]["outcome"] for r in _audit(site)] == ["404"]
    status, body = site.call("POST", "/api/studies/x'y/dispatch/", {"node": "PACS"})
    assert (status, body["field"]) == (400, "study_instance_uid")
    assert len(_audit(site)) == 1  # a malformed UID names nothing: no record
    # no token: 401 before anything, and no audit record either
    assert site.call("POST", "/api/studies/1.2.3/dispatch/", {"node": "PACS"}, token=None)[0] == 401
    assert len(_audit(site)) == 1


def test_purged_studies_are_listed_as_tombstones_and_cannot_be_dispatched(
    site: ApiSite, tmp_path
) -> None:
    Nodes(site.rooms.catalog).put(
        {"name": "PACS", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    )
    forwarding = Site(site.rooms, tmp_path, destinations=("PACS",), retention_hours=1)
    study = forwarding.complete(2)
    assert forwarding.deliver(forwarding.entry(study, "PACS")) == "delivered"
    forwarding.clock.now += 3600
    assert forwarding.scheduler.run_once()["purged"] == [study]
    (summary,) = site.call("GET", "/api/studies/")[1]["studies"]
    assert (summary["study_instance_uid"], summary["purged"], summary["state"]) == (
        study,
        True,
        "forwarded",
    )
    assert summary["purged_at"] is not None and summary["instance_count"] == 2
    detail = site.call("GET", f"/api/studies/{study}/")[1]
    assert detail["purged"] is True and detail["destinations"][0]["state"] == "delivered"
    status, body = site.call("POST", f"/api/studies/{study}/dispatch/", {"node": "PACS"})
    assert (status, body["field"]) == (409, "study_instance_uid")
    assert "purged" in body["error"]
