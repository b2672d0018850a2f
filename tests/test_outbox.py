"""The durable outbox and its per-instance ledger (store/outbox.py), on a real
catalog and spool: completion queues every destination in the same
transaction, follow-ups, resume after a partial ledger, finish and the study
state rule, requeue and manual send, backoff, and what study.json shows."""

from __future__ import annotations

import math

import pytest

from ith_proxy.backoff import Backoff
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.outbox import Outbox, OutboxError, Outcome
from outbox_site import T0, Site


@pytest.fixture
def site(rooms, tmp_path):
    return Site(rooms, tmp_path, destinations=("PACS", "BACKEND"))


# --- completion ---------------------------------------------------------------


def test_completion_queues_one_entry_per_destination(site: Site) -> None:
    study = site.complete(3)
    entries = site.outbox.entries(study)
    assert [(e.node, e.reason, e.state, e.attempts) for e in entries] == [
        ("BACKEND", "complete", "pending", 0),
        ("PACS", "complete", "pending", 0),
    ]
    assert all(e.next_at == site.clock.now for e in entries)
    # the scheduler writes 'complete'; 'forwarding' is the forwarder's first change
    assert site.state(study) == "complete"
    events = [e["event"] for e in site.catalog.study(study)["events"]]
    assert events[-3:] == ["complete", "queued PACS (complete)", "queued BACKEND (complete)"]
    assert site.outbox.counts() == {"pending": 2, "delivered": 0, "failed": 0}


def test_a_failed_entry_write_rolls_back_the_state_change(site: Site) -> None:
    """Both or neither: an insert that fails after the state UPDATE and after
    the first entry leaves the study receiving with no entry at all."""
    site.index(2, site.clock.now)
    (study,) = site.catalog.study_uids()
    site.clock.now += site.timeout
    conn = site.catalog.conn
    conn.execute(
        "CREATE TEMP TRIGGER boom BEFORE INSERT ON outbox WHEN NEW.node = 'BOOM'"
        " BEGIN SELECT RAISE(ABORT, 'constraint failed on purpose'); END"
    )
    with pytest.raises(Exception, match="on purpose"):
        site.outbox.complete_study(study, site.clock.now, site.timeout, ["PACS", "BOOM"])
    assert site.state(study) == "receiving"
    assert site.outbox.entries(study) == []
    assert "complete" not in [e["event"] for e in site.catalog.study(study)["events"]]
    conn.execute("DROP TRIGGER boom")
    for bad in (["PACS", "PACS"], ["PACS", ""], ["x" * 65]):
        with pytest.raises(OutboxError):
            site.outbox.complete_study(study, site.clock.now, site.timeout, bad)
        assert site.state(study) == "receiving" and site.outbox.entries(study) == []
    assert site.scheduler.run_once()["completed"] == [study]
    assert len(site.outbox.entries(study)) == 2


def test_no_destinations_leaves_the_study_complete(rooms, tmp_path) -> None:
    site = Site(rooms, tmp_path, destinations=())
    study = site.complete(2)
    assert site.state(study) == "complete"
    assert site.outbox.entries(study) == []
    assert site.outbox.due(site.clock.now + 1e6) == []
    assert site.summary(study)["destinations"] == []


def test_the_scheduler_refuses_a_bad_node_name_at_start(rooms, tmp_path) -> None:
    with pytest.raises(OutboxError, match="not a node name"):
        Site(rooms, tmp_path, destinations=("PACS", "bad\nname"))
    site = Site(rooms, tmp_path, destinations=("PACS", "PACS"))  # queued once
    assert site.scheduler.destinations == ("PACS",)


# --- the forwarder's side -----------------------------------------------------


def test_due_entries_wait_for_their_time_and_for_a_completed_study(site: Site) -> None:
    study = site.complete(2)
    now = site.clock.now
    assert [e.node for e in site.outbox.due(now)] == ["PACS", "BACKEND"]  # by next_at, id
    assert site.outbox.due(now - 1) == []
    assert len(site.outbox.due(now, limit=1)) == 1
    pacs = site.entry(study, "PACS")
    assert site.outbox.retry_later(pacs.id, now, "connection refused", now + 30) == "pending"
    assert [e.node for e in site.outbox.due(now)] == ["BACKEND"]
    assert {e.node for e in site.outbox.due(now + 30)} == {"PACS", "BACKEND"}


def test_pending_instances_resume_after_a_partial_ledger(site: Site) -> None:
    """kill -9 mid-send: what was recorded is skipped, the rest is sent, in the
    same stable order; another node's ledger does not count."""
    study = site.complete(5)
    pacs = site.entry(study, "PACS")
    todo = site.outbox.pending_instances(pacs)
    assert len(todo) == 5 and todo == site.outbox.pending_instances(pacs)
    assert {p.sop_class for p in todo} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert all(p.size > 0 and p.transfer_syntax for p in todo)
    now = site.clock.now
    site.outbox.record(pacs.id, [Outcome(p.sop_uid, True, 0) for p in todo[:2]], now)
    assert site.state(study) == "forwarding"  # the forwarder started
    # a new Outbox on a new connection: the process that resumes after the kill
    resumed = Outbox(Catalog(site.catalog.path))
    try:
        assert resumed.pending_instances(resumed.entry(pacs.id)) == todo[2:]
        assert len(resumed.pending_instances(site.entry(study, "BACKEND"))) == 5
    finally:
        resumed.catalog.close()
    # a replay of the same outcomes is harmless (at least once)
    site.outbox.record(pacs.id, [Outcome(p.sop_uid, True, 0) for p in todo[:2]], now)
    assert site.deliver(site.entry(study, "PACS")) == "delivered"
    assert site.outbox.pending_instances(site.entry(study, "PACS")) == []


def test_record_refuses_an_instance_of_another_study(site: Site) -> None:
    first = site.complete(1)
    second = site.complete(1)
    (other,) = site.outbox.pending_instances(site.entry(second, "PACS"))
    entry = site.entry(first, "PACS")
    with pytest.raises(OutboxError, match="not part of"):
        site.outbox.record(entry.id, [Outcome(other.sop_uid, True)], site.clock.now)
    with pytest.raises(OutboxError, match="not part of"):
        site.outbox.record(entry.id, [Outcome("1.2.3", True)], site.clock.now)
    assert len(site.outbox.pending_instances(entry)) == 1
    with pytest.raises(OutboxError, match="no outbox entry"):
        site.outbox.record(99999, [], site.clock.now)


def test_finish_and_the_study_state_rule(site: Site) -> None:
    study = site.complete(4)
    pacs, backend = site.entry(study, "PACS"), site.entry(study, "BACKEND")
    assert site.deliver(pacs) == "delivered"
    assert site.entry(study, "PACS").delivered_at == site.clock.now
    assert site.state(study) == "forwarding"  # BACKEND still pending
    bad = {site.outbox.pending_instances(backend)[0].sop_uid}
    assert site.deliver(backend, fail=bad, reason="0xC000 cannot understand") == "failed"
    assert site.state(study) == "failed"
    dead = site.entry(study, "BACKEND")
    assert dead.last_error == "1 of 4 instance(s) failed: 0xC000 cannot understand (x1)"
    assert site.outbox.due(site.clock.now + 1e9) == []  # the dead letter waits for requeue
    # a finished entry stays finished
    assert site.outbox.finish(dead.id, site.clock.now) == "failed"
    assert site.outbox.fail(pacs.id, site.clock.now, "late") == "delivered"
    assert site.outbox.retry_later(pacs.id, site.clock.now, "late", 0) == "delivered"
    events = [e["event"] for e in site.catalog.study(study)["events"]]
    assert "delivered PACS" in events and "failed BACKEND" in events
    assert events.index("forwarding") < events.index("failed")


def test_finish_keeps_an_entry_pending_while_instances_are_unsent(site: Site) -> None:
    study = site.complete(3)
    entry = site.entry(study, "PACS")
    first = site.outbox.pending_instances(entry)[0]
    site.outbox.record(entry.id, [Outcome(first.sop_uid, True, 0)], site.clock.now)
    assert site.outbox.finish(entry.id, site.clock.now) == "pending"
    assert len(site.outbox.pending_instances(entry)) == 2
    assert site.state(study) == "forwarding"


def test_a_whole_entry_fails_permanently(site: Site) -> None:
    study = site.complete(2)
    entry = site.entry(study, "PACS")
    reason = "association rejected (permanent): called AE title not recognized\n\x00"
    assert site.outbox.fail(entry.id, site.clock.now, reason) == "failed"
    assert site.state(study) == "forwarding"  # BACKEND pending
    stored = site.entry(study, "PACS").last_error
    assert stored is not None and stored.isprintable() and "not recognized" in stored
    assert site.deliver(site.entry(study, "BACKEND")) == "delivered"
    assert site.state(study) == "failed"


# --- follow-ups ---------------------------------------------------------------


def test_a_late_instance_is_forwarded_as_a_follow_up_of_only_itself(site: Site) -> None:
    original = site.index(3, site.clock.now)
    (study,) = site.catalog.study_uids()
    site.clock.now += site.timeout
    site.scheduler.run_once()
    for node in ("PACS", "BACKEND"):
        assert site.deliver(site.entry(study, node)) == "delivered"
    assert site.state(study) == "forwarded"
    # a late instance of the same original study: the same anonymized study, reopened
    site.index(1, site.clock.now, like=original)
    assert site.catalog.study_uids() == [study]
    assert site.state(study) == "receiving"
    assert site.outbox.due(site.clock.now + 1e9) == []  # waits for the new completion
    site.clock.now += site.timeout
    assert site.scheduler.run_once()["completed"] == [study]
    assert site.state(study) == "complete"
    for node in ("PACS", "BACKEND"):
        entry = site.entry(study, node)
        assert (entry.reason, entry.state, entry.attempts) == ("followup", "pending", 0)
        (new,) = site.outbox.pending_instances(entry)
        place = site.catalog.instance_place(new.sop_uid)
        assert place is not None and place[0] == study
        assert site.deliver(entry) == "delivered"
    assert site.state(study) == "forwarded"
    row = site.catalog.study(study)
    assert row is not None and (row["reopened"], row["instance_count"]) == (1, 4)


def test_a_follow_up_joins_an_entry_still_pending(site: Site) -> None:
    """Reopened mid-send: the pending entry is not duplicated; after the new
    completion it sends the rest, new instance included."""
    original = site.index(2, site.clock.now)
    (study,) = site.catalog.study_uids()
    site.clock.now += site.timeout
    site.scheduler.run_once()
    entry = site.entry(study, "PACS")
    first = site.outbox.pending_instances(entry)[0]
    site.outbox.record(entry.id, [Outcome(first.sop_uid, True, 0)], site.clock.now)
    site.index(1, site.clock.now, like=original)
    assert site.outbox.finish(entry.id, site.clock.now) == "pending"
    assert site.state(study) == "receiving"  # the rule leaves a receiving study alone
    site.clock.now += site.timeout
    site.scheduler.run_once()
    again = site.entry(study, "PACS")
    assert again.id == entry.id and again.reason == "complete"
    assert len(site.outbox.pending_instances(again)) == 2
    assert site.deliver(again) == "delivered"


# --- requeue and manual send --------------------------------------------------


def test_requeue_retries_the_failed_instances_of_a_dead_letter(site: Site) -> None:
    study = site.complete(4)
    pacs = site.entry(study, "PACS")
    todo = site.outbox.pending_instances(pacs)
    failed = {todo[1].sop_uid, todo[3].sop_uid}
    assert site.deliver(pacs, fail=failed, reason="0xA900 dataset does not match") == "failed"
    assert site.deliver(site.entry(study, "BACKEND")) == "delivered"
    assert site.state(study) == "failed"
    site.clock.now += 100
    assert site.outbox.requeue(study, site.clock.now, node="PACS") == ["PACS"]
    again = site.entry(study, "PACS")
    assert (again.state, again.reason, again.attempts, again.last_error) == (
        "pending",
        "requeue",
        0,
        None,
    )
    assert again.id == pacs.id and again.next_at == site.clock.now
    assert {p.sop_uid for p in site.outbox.pending_instances(again)} == failed
    assert site.state(study) == "forwarding"
    assert site.deliver(again) == "delivered"
    assert site.state(study) == "forwarded"
    assert "requeued PACS" in [e["event"] for e in site.catalog.study(study)["events"]]


def test_requeue_of_a_delivered_destination_sends_the_whole_study(site: Site) -> None:
    study = site.complete(3)
    for node in ("PACS", "BACKEND"):
        site.deliver(site.entry(study, node))
    assert site.outbox.requeue(study, site.clock.now) == ["BACKEND", "PACS"]
    assert len(site.outbox.pending_instances(site.entry(study, "PACS"))) == 3
    assert site.state(study) == "forwarding"


def test_requeue_refusals(site: Site, rooms, tmp_path) -> None:
    with pytest.raises(OutboxError, match="unknown study"):
        site.outbox.requeue("1.2.3.4", site.clock.now)
    quiet = Site(rooms, tmp_path, destinations=())
    study = quiet.complete(1)
    with pytest.raises(OutboxError, match="no destination"):
        quiet.outbox.requeue(study, quiet.clock.now)
    with pytest.raises(OutboxError, match="not a node name"):
        quiet.outbox.requeue(study, quiet.clock.now, node="a\x1bb")
    assert quiet.outbox.requeue(study, quiet.clock.now, node="PACS") == ["PACS"]
    assert quiet.entry(study, "PACS").reason == "requeue"


def test_a_manual_send_queues_the_whole_study(site: Site) -> None:
    study = site.complete(3)
    for node in ("PACS", "BACKEND"):
        site.deliver(site.entry(study, node))
    entry = site.outbox.enqueue(study, "ARCHIVE", site.clock.now)
    assert (entry.node, entry.reason, entry.state) == ("ARCHIVE", "manual", "pending")
    assert len(site.outbox.pending_instances(entry)) == 3
    # sending again to a node that has it all: everything goes again
    again = site.outbox.enqueue(study, "PACS", site.clock.now)
    assert len(site.outbox.pending_instances(again)) == 3
    # a pending entry is only hurried, not reset
    site.outbox.retry_later(again.id, site.clock.now, "timeout", site.clock.now + 600)
    hurried = site.outbox.enqueue(study, "PACS", site.clock.now + 1)
    assert hurried.id == again.id and hurried.attempts == 1
    assert hurried.next_at == site.clock.now + 1
    with pytest.raises(OutboxError, match="unknown study"):
        site.outbox.enqueue("1.2.3.4", "PACS", site.clock.now)


# --- backoff ------------------------------------------------------------------


def test_backoff_bounds() -> None:
    b = Backoff(base=2.0, cap=60.0, max_attempts=5)
    for attempts, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (500, 60.0)]:
        assert b.ceiling(attempts) == ceiling
        assert b.delay(attempts, rand=lambda: 0.0) == ceiling / 2
        assert b.delay(attempts, rand=lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)
        assert ceiling / 2 <= b.delay(attempts) <= ceiling
    assert b.delay(3, rand=lambda: 7.0) == 8.0  # a bad source of randomness is clamped
    assert b.ceiling(0) == 2.0 and math.isfinite(b.ceiling(10**9))
    assert [b.exhausted(n) for n in (4, 5, 6)] == [False, True, True]
    assert not Backoff(max_attempts=0).exhausted(10**6)
    for bad in (
        {"base": 0},
        {"base": -1},
        {"cap": 1, "base": 2},
        {"cap": math.inf},
        {"base": math.nan},
        {"max_attempts": -1},
    ):
        with pytest.raises(ValueError):
            Backoff(**bad)  # type: ignore[arg-type]  # the bad values are the point


def test_retry_or_fail_backs_off_then_gives_up(site: Site) -> None:
    study = site.complete(1)
    entry = site.entry(study, "PACS")
    backoff = Backoff(base=10.0, cap=40.0, max_attempts=3)
    now = site.clock.now
    assert site.outbox.retry_or_fail(entry.id, now, "refused", backoff, rand=lambda: 0.5) == (
        "pending"
    )
    e = site.entry(study, "PACS")
    assert (e.attempts, e.next_at, e.last_error) == (1, now + 7.5, "refused")
    assert site.outbox.retry_or_fail(entry.id, now, "refused", backoff, rand=lambda: 0.0) == (
        "pending"
    )
    assert site.entry(study, "PACS").next_at == now + 10.0
    assert site.outbox.retry_or_fail(entry.id, now, "refused again", backoff) == "failed"
    dead = site.entry(study, "PACS")
    assert dead.attempts == 3 and dead.last_error == "attempts exhausted (3): refused again"
    assert site.outbox.requeue(study, now, node="PACS") == ["PACS"]
    assert site.entry(study, "PACS").attempts == 0


# --- study.json ---------------------------------------------------------------


def test_study_json_shows_each_destination(site: Site) -> None:
    study = site.complete(3)
    pacs, backend = site.entry(study, "PACS"), site.entry(study, "BACKEND")
    site.clock.now += 5
    site.deliver(pacs)
    bad = {site.outbox.pending_instances(backend)[0].sop_uid}
    site.outbox.retry_later(backend.id, site.clock.now, "association aborted", site.clock.now + 5)
    site.deliver(site.entry(study, "BACKEND"), fail=bad, reason="0x0122 SOP class not supported")
    summary = site.summary(study)
    assert summary["state"] == "failed" and summary["purged_at"] is None
    by_node = {d["node"]: d for d in summary["destinations"]}
    assert by_node["PACS"]["state"] == "delivered"
    assert by_node["PACS"]["delivered_at"] == T0 + site.timeout + 5
    assert by_node["PACS"]["delivered_at_iso"].startswith("2023-11-14T22:")
    assert (by_node["PACS"]["delivered"], by_node["PACS"]["failed"]) == (3, 0)
    b = by_node["BACKEND"]
    assert (b["state"], b["attempts"], b["delivered"], b["failed"]) == ("failed", 1, 2, 1)
    assert b["last_error"] == "1 of 3 instance(s) failed: 0x0122 SOP class not supported (x1)"
    assert b["failures"] == [
        {
            "sop_instance_uid": next(iter(bad)),
            "status": 0xC000,
            "reason": b["failures"][0]["reason"],
        }
    ]
    assert b["delivered_at"] is None and b["next_at"] is None
    assert "tombstone" not in summary
