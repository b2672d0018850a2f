"""The audit log under a key of its own (not one derived from the site secret
that every audited user reads), key-change records that keep older records
verifiable, an anchor beside the keys that catches a deleted or shortened log,
and the actor taken from the real uid.  CLI commands on real spool folders."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pwd
import stat
from pathlib import Path

import pytest

from ith_proxy.store.audit import AuditLog, audit_key
from worker_rooms import Rooms


@pytest.fixture
def rooms(tmp_path: Path):
    r = Rooms(tmp_path / "site")
    for i in range(1, 5):
        r.drop(f"garbage-{i}", b"\x00" * 132 + b"garbage %d" % i)
    r.indexer.run_once()
    yield r
    r.close()


def _records(rooms: Rooms) -> list[dict]:
    return [json.loads(line) for line in (rooms.spool.logs / "audit.log").read_bytes().splitlines()]


def _export(rooms: Rooms, name: str, tmp_path: Path, **env: str):
    saved = dict(rooms.env)
    rooms.env.update(env)
    try:
        return rooms.cli("quarantine", "export", name, "--out", str(tmp_path / f"{name}.dcm"))
    finally:
        rooms.env = saved


def _site_secret(rooms: Rooms) -> bytes:
    return rooms.cfg.vault.secret_file.read_bytes().strip()


def _forge(rooms: Rooms, after: dict) -> None:
    """Append a record MACed under the site-secret-derived key, as anyone who
    reads the site secret could (the algorithm is public)."""
    body = {
        "seq": after["seq"] + 1,
        "at": after["at"],
        "actor": "cli:mallory",
        "action": "quarantine.export",
        "target": "unparseable/garbage-4",
        "prev": after["mac"],
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    body["mac"] = hmac.new(
        audit_key(_site_secret(rooms)), text.encode(), hashlib.sha256
    ).hexdigest()
    with open(rooms.spool.logs / "audit.log", "ab") as fh:
        fh.write(json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n")


def test_records_are_macd_under_the_audit_key_not_the_site_secret(rooms, tmp_path) -> None:
    assert _export(rooms, "garbage-1", tmp_path).returncode == 0
    audit_key_file = rooms.cfg.vault.key_file.with_name("audit.key")
    assert stat.S_IMODE(audit_key_file.stat().st_mode) == 0o600
    record = _records(rooms)[-1]
    assert record["action"] == "quarantine.export" and record.get("kid")
    # whoever reads the site secret (every audited user) cannot forge a record
    _forge(rooms, record)
    broken = rooms.cli("audit", "verify")
    assert broken.returncode == 1 and broken.stderr.count("\n") == 1
    assert "is broken at line 2" in broken.stderr, broken.stderr


def test_a_log_from_the_site_secret_era_still_verifies_after_the_key_change(
    rooms, tmp_path
) -> None:
    legacy = AuditLog(rooms.spool.logs / "audit.log", audit_key(_site_secret(rooms)))
    legacy.record("cli:old", "quarantine.export", "unparseable/garbage-1")
    legacy.record("cli:old", "quarantine.release", "unparseable/garbage-2")
    assert rooms.cli("audit", "verify").returncode == 0
    assert _export(rooms, "garbage-3", tmp_path).returncode == 0
    records = _records(rooms)
    assert [r["action"] for r in records] == [
        "quarantine.export",
        "quarantine.release",
        "audit.key-change",
        "quarantine.export",
    ]
    change, export = records[2], records[3]
    assert "kid" not in change  # signed by the old (site-secret-derived) key
    assert change["detail"]["new"] == export["kid"] == change["target"]
    ok = rooms.cli("audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert "4 records intact, chain unbroken" in ok.stdout
    # after the change, a record under the old key is refused, even at the end
    _forge(rooms, export)
    forged = rooms.cli("audit", "verify")
    assert forged.returncode == 1 and "line 5" in forged.stderr, forged.stderr


def test_verify_fails_when_records_are_cut_off_the_end(rooms, tmp_path) -> None:
    for name in ("garbage-1", "garbage-2", "garbage-3"):
        assert _export(rooms, name, tmp_path).returncode == 0
    anchor = rooms.cfg.vault.key_file.with_name("audit.anchor")
    assert stat.S_IMODE(anchor.stat().st_mode) == 0o600
    assert json.loads(anchor.read_bytes())["seq"] == 3
    log = rooms.spool.logs / "audit.log"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:2]))  # a valid chain, one record short
    cut = rooms.cli("audit", "verify")
    assert cut.returncode == 1 and cut.stderr.count("\n") == 1, cut.stderr
    assert "ends at record 2" in cut.stderr and "cut off" in cut.stderr
    # and nothing may be appended over the gap (the new record would hide it)
    refused = _export(rooms, "garbage-4", tmp_path)
    assert refused.returncode == 1 and "refused" in refused.stderr
    assert not (tmp_path / "garbage-4.dcm").exists()
    log.write_bytes(b"".join(lines[:2]) + lines[2][:40])  # cut in the middle of a record
    assert rooms.cli("audit", "verify").returncode == 1


def test_verify_fails_when_the_log_is_deleted(rooms, tmp_path) -> None:
    assert _export(rooms, "garbage-1", tmp_path).returncode == 0
    (rooms.spool.logs / "audit.log").unlink()
    gone = rooms.cli("audit", "verify")
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1, gone.stderr
    assert "missing" in gone.stderr and "audit.anchor" in gone.stderr


def test_actor_is_the_real_uid_not_user(rooms, tmp_path) -> None:
    result = _export(
        rooms,
        "garbage-1",
        tmp_path,
        USER="mallory",
        LOGNAME="mallory",
        LNAME="mallory",
        USERNAME="mallory",
        SUDO_USER="alice",
    )
    assert result.returncode == 0, result.stderr
    actor = _records(rooms)[-1]["actor"]
    me = pwd.getpwuid(os.getuid()).pw_name
    assert actor == f"cli:{me}(uid {os.getuid()}) via sudo from alice"
    assert "mallory" not in actor


def test_audit_key_rotation_is_recorded_and_old_records_still_verify(rooms, tmp_path) -> None:
    assert _export(rooms, "garbage-1", tmp_path).returncode == 0
    key_file = rooms.cfg.vault.key_file.with_name("audit.key")
    rotated = rooms.cli("audit", "rotate-key")
    assert rotated.returncode == 0, rotated.stderr
    assert len(key_file.read_bytes().split()) == 2 and oct(key_file.stat().st_mode)[-3:] == "600"
    assert _export(rooms, "garbage-2", tmp_path).returncode == 0
    records = _records(rooms)
    assert [r["action"] for r in records] == [
        "quarantine.export",
        "audit.key-change",
        "audit.rotate-key",
        "quarantine.export",
    ]
    old, new = records[0]["kid"], records[2]["kid"]
    assert old != new and records[1]["kid"] == old and records[1]["detail"]["new"] == new
    assert records[3]["kid"] == new
    ok = rooms.cli("audit", "verify")
    assert ok.returncode == 0 and "4 records intact" in ok.stdout, ok.stderr
