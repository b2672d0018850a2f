"""Retention (workers/scheduler.py, store/retention.py, Spool.purge_instances)
on real spool folders and a real catalog: only forwarded studies whose every
destination acknowledged them long enough ago lose their files; rows stay,
marked purged; study.json stays as the tombstone; reindex keeps them."""

from __future__ import annotations

import json
import os

import pytest

from ith_proxy.store.catalog import Catalog
from ith_proxy.store.outbox import Outbox
from ith_proxy.store.retention import Retention
from ith_proxy.workers.reindex import reindex
from outbox_site import Site

HOUR = 3600.0


@pytest.fixture
def site(rooms, tmp_path):
    return Site(rooms, tmp_path, destinations=("PACS", "BACKEND"), retention_hours=1)


def _forward(site: Site, study: str) -> float:
    for node in ("PACS", "BACKEND"):
        assert site.deliver(site.entry(study, node)) == "delivered"
    assert site.state(study) == "forwarded"
    return site.clock.now


def test_a_forwarded_study_is_purged_after_retention_and_only_once(site: Site) -> None:
    study = site.complete(3)
    files = site.files(study)
    assert len(files) == 3
    delivered = _forward(site, study)
    site.clock.now = delivered + HOUR - 1
    assert site.scheduler.run_once()["purged"] == []
    assert site.files(study) == files
    site.clock.now = delivered + HOUR
    result = site.scheduler.run_once()
    assert result["purged"] == [study]
    # the files and their series folders are gone; study.json stays
    assert site.files(study) == []
    assert [p.name for p in site.spool.study_dir(study).iterdir()] == ["study.json"]
    # every row is kept, marked purged
    row = site.catalog.study(study)
    assert row is not None
    assert (row["state"], row["instance_count"], row["purged_at"]) == (
        "forwarded",
        3,
        site.clock.now,
    )
    assert site.catalog.counts()["instances"] == 3
    assert len(site.outbox.study_destinations(study)) == 2
    summary = json.loads((site.spool.study_dir(study) / "study.json").read_text())
    assert summary["purged_at"] == site.clock.now and summary["purged_at_iso"]
    assert summary["state"] == "forwarded" and summary["instance_count"] == 3
    tomb = summary["tombstone"]
    assert tomb["fields"][:3] == ["series_instance_uid", "modality", "sop_instance_uid"]
    assert sorted(i[2] for i in tomb["instances"]) == sorted(p.stem for p in files)
    # never twice
    site.clock.now += 10 * HOUR
    assert site.scheduler.run_once()["purged"] == []
    events = [e["event"] for e in site.catalog.study(study)["events"]]
    assert events.count("purged") == 1
    # nothing left to send again
    with pytest.raises(ValueError, match="purged by retention"):
        site.outbox.requeue(study, site.clock.now)


def test_failed_pending_and_unforwarded_studies_are_never_purged(site: Site) -> None:
    failed = site.complete(2)
    pending = site.complete(2)
    half = site.complete(2)
    site.deliver(site.entry(failed, "PACS"))
    site.outbox.fail(site.entry(failed, "BACKEND").id, site.clock.now, "rejected (permanent)")
    site.deliver(site.entry(pending, "PACS"))  # BACKEND still pending
    site.outbox.record(site.entry(half, "PACS").id, [], site.clock.now)  # started, nothing sent
    assert [site.state(s) for s in (failed, pending, half)] == [
        "failed",
        "forwarding",
        "forwarding",
    ]
    quiet = Site(site.rooms, site.tmp, destinations=(), retention_hours=1)
    quiet.clock.now = site.clock.now
    complete = quiet.complete(1)  # no destination: complete, never acknowledged
    for s in (failed, pending, half, complete):
        before = site.files(s)
        assert before
        site.clock.now += 100 * HOUR
        assert site.scheduler.run_once()["purged"] == []
        assert site.files(s) == before
    assert site.catalog.study(complete)["purged_at"] is None
    # and the disk being full changes nothing: there is no such rule to trip
    assert Retention(site.catalog).purgeable(site.clock.now + 1e9) == []


def test_retention_zero_keeps_everything(rooms, tmp_path) -> None:
    site = Site(rooms, tmp_path, destinations=("PACS",), retention_hours=0)
    study = site.complete(1)
    site.deliver(site.entry(study, "PACS"))
    site.clock.now += 1e6
    assert site.scheduler.run_once()["purged"] == []
    assert len(site.files(study)) == 1


def test_purge_waits_for_the_last_destination_and_a_requeue(site: Site) -> None:
    study = site.complete(2)
    site.deliver(site.entry(study, "PACS"))
    bad = {site.outbox.pending_instances(site.entry(study, "BACKEND"))[0].sop_uid}
    site.deliver(site.entry(study, "BACKEND"), fail=bad, reason="0xC000")
    site.clock.now += 5 * HOUR
    assert site.scheduler.run_once()["purged"] == []
    site.outbox.requeue(study, site.clock.now, node="BACKEND")
    assert site.deliver(site.entry(study, "BACKEND")) == "delivered"
    last = site.clock.now
    site.clock.now = last + HOUR - 1  # the last delivery counts, not the first
    assert site.scheduler.run_once()["purged"] == []
    site.clock.now = last + HOUR
    assert site.scheduler.run_once()["purged"] == [study]


def test_a_late_instance_after_the_purge_is_kept_until_it_is_forwarded(site: Site) -> None:
    original = site.index(2, site.clock.now)
    (study,) = site.catalog.study_uids()
    site.clock.now += site.timeout
    site.scheduler.run_once()
    _forward(site, study)
    site.clock.now += HOUR
    assert site.scheduler.run_once()["purged"] == [study]
    site.index(1, site.clock.now, like=original)  # reopens the purged study
    (late,) = site.files(study)
    site.clock.now += 10 * HOUR  # receiving, then complete: never purged meanwhile
    assert site.scheduler.run_once() | {"summaries": 0} == {
        "completed": [study],
        "summaries": 0,
        "tmp_cleaned": 0,
        "purged": [],
    }
    assert late.exists()
    for node in ("PACS", "BACKEND"):
        entry = site.entry(study, node)
        assert [p.sop_uid for p in site.outbox.pending_instances(entry)] == [late.stem]
    _forward(site, study)
    site.clock.now += HOUR
    assert site.scheduler.run_once()["purged"] == [study]
    assert not late.exists()
    summary = site.summary(study)
    assert len(summary["tombstone"]["instances"]) == 3


def test_purge_removes_only_what_every_destination_acknowledged(site: Site) -> None:
    """Even if the study changed after it was picked: an instance without a
    'delivered' row for every node keeps its file."""
    study = site.complete(3)
    _forward(site, study)
    (kept,) = site.catalog.conn.execute(
        "SELECT sop_uid FROM instances WHERE study_uid = ? ORDER BY sop_uid LIMIT 1", (study,)
    ).fetchone()
    site.catalog.conn.execute(
        "DELETE FROM deliveries WHERE node = 'BACKEND' AND sop_uid = ?", (kept,)
    )
    site.clock.now += HOUR
    assert site.scheduler.run_once()["purged"] == [study]
    assert [p.stem for p in site.files(study)] == [kept]


def test_the_spool_purge_never_follows_a_link(site: Site, tmp_path) -> None:
    study = site.complete(1)
    (path,) = site.files(study)
    series, sop = path.parent.name, path.stem
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / f"{sop}.dcm"
    victim.write_bytes(b"not ours")
    real = site.spool.study_dir(study) / series
    os.rename(real, tmp_path / "moved")
    os.symlink(outside, real)
    assert site.spool.purge_instances(study, [(series, sop)]) == 0
    assert victim.read_bytes() == b"not ours"


def test_reindex_keeps_a_purged_study(site: Site) -> None:
    study = site.complete(3)
    _forward(site, study)
    site.clock.now += HOUR
    site.scheduler.run_once()
    before = site.catalog.study(study)
    offsets = site.catalog.instance_vault_offsets(study)
    assert len(offsets) == 3 and site.files(study) == []
    # into the same catalog file: the outbox and its ledger survive
    reindex(site.spool, site.catalog, site.rooms.vault, now=site.clock.now)
    _same_study(site.catalog, study, before, offsets)
    # into a new catalog file: the outbox comes back from study.json
    site.catalog.close()
    for suffix in ("", "-wal", "-shm"):
        path = site.spool.catalog_file.with_name(site.spool.catalog_file.name + suffix)
        path.unlink(missing_ok=True)
    fresh = Catalog(site.spool.catalog_file)
    site.rooms.catalog = fresh  # closed by the fixture
    reindex(site.spool, fresh, site.rooms.vault, now=site.clock.now)
    _same_study(fresh, study, before, offsets)
    outbox = Outbox(fresh)
    assert [(d["node"], d["state"]) for d in outbox.study_destinations(study)] == [
        ("BACKEND", "delivered"),
        ("PACS", "delivered"),
    ]
    assert Retention(fresh).purgeable(site.clock.now + 1e9) == []  # nothing left to purge


def _same_study(catalog: Catalog, study: str, before: dict, offsets: list) -> None:
    after = catalog.study(study)
    assert after is not None
    for key in (
        "state",
        "purged_at",
        "instance_count",
        "series_count",
        "modalities",
        "patient_id",
        "patient_name",
        "first_received",
        "completed_at",
    ):
        assert after[key] == before[key], key
    assert sorted(catalog.instance_vault_offsets(study)) == sorted(offsets)
    assert (
        catalog.conn.execute(
            "SELECT count(*) FROM instances WHERE study_uid = ? AND purged_at IS NULL", (study,)
        ).get
        == 0
    )


def test_reindex_reads_a_hostile_tombstone_safely(site: Site) -> None:
    study = site.complete(2)
    _forward(site, study)
    site.clock.now += HOUR
    site.scheduler.run_once()
    path = site.spool.study_dir(study) / "study.json"
    summary = json.loads(path.read_text())
    good = summary["tombstone"]["instances"][0]
    summary["tombstone"]["instances"][1:] = [
        ["1.2", "CT"],
        [1, 2, 3, 4, 5, 6, 7],
        [*good[:5], "big", 0],
        None,
    ]
    summary["destinations"] = [{"node": "x\ny"}, "junk", {"node": "PACS", "state": "bogus"}]
    os.unlink(path)
    path.write_text(json.dumps(summary))
    fresh_path = site.spool.root / "other.sqlite3"
    fresh = Catalog(fresh_path)
    try:
        counts = reindex(site.spool, fresh, site.rooms.vault, now=site.clock.now)
        assert counts["instances"] == 1 and counts["studies"] == 1
        (entry,) = Outbox(fresh).entries(study)
        assert (entry.node, entry.state) == ("PACS", "pending")  # sent again, at least once
    finally:
        fresh.close()
