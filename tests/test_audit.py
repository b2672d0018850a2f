"""The audit log of PHI access (logs/audit.log): hash chain and MACs on real
files, appends from concurrent processes, torn writes, and the CLI commands that
record before they touch PHI (quarantine export/release, vault rotate-key) plus
``audit verify``."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from pathlib import Path

import pytest

import dicomgen
from ith_proxy.store.audit import GENESIS, AuditBroken, AuditError, AuditLog, audit_key

KEY = audit_key(b"s" * 64)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _filled(tmp_path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(tmp_path / "logs" / "audit.log", KEY)
    for i in range(n):
        log.record("cli:test", "quarantine.export", f"unparseable/item-{i}", out=f"/tmp/{i}.dcm")
    return log


def test_records_chain_and_verify(tmp_path: Path) -> None:
    log = _filled(tmp_path)
    assert oct(log.path.stat().st_mode & 0o777) == "0o600"
    records = [json.loads(line) for line in _lines(log.path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["mac"] for a, b in itertools.pairwise(records))
    assert records[2]["target"] == "unparseable/item-2" and records[2]["actor"] == "cli:test"
    assert records[2]["detail"] == {"out": "/tmp/2.dcm"}
    summary = log.verify()
    assert (summary.records, summary.torn) == (5, 0)
    assert summary.first == records[0]["at"] and summary.last == records[-1]["at"]


@pytest.mark.parametrize(
    "tamper, line, reason",
    [
        ("edit", 3, "MAC mismatch"),
        ("delete", 3, "chain broken"),
        ("swap", 2, "chain broken"),
        ("truncate-head", 1, "chain broken"),
        ("garbage", 3, "unreadable record"),
    ],
)
def test_verify_points_at_the_tampered_line(
    tmp_path: Path, tamper: str, line: int, reason: str
) -> None:
    log = _filled(tmp_path)
    lines = _lines(log.path)
    if tamper == "edit":
        lines[2] = lines[2].replace(b"item-2", b"item-9")
    elif tamper == "delete":
        del lines[2]
    elif tamper == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "truncate-head":
        del lines[0]
    else:
        lines[2] = b"not a record\n"
    log.path.write_bytes(b"".join(lines))
    with pytest.raises(AuditBroken) as err:
        log.verify()
    assert err.value.line == line and reason in err.value.reason


def test_a_forged_chain_needs_the_site_secret(tmp_path: Path) -> None:
    log = _filled(tmp_path, 2)
    with pytest.raises(AuditBroken) as err:
        AuditLog(log.path, audit_key(b"x" * 64)).verify()
    assert err.value.line == 1 and "site secret" in err.value.reason
    # a whole log rewritten under another key does not verify under the site's key
    forged = AuditLog(tmp_path / "forged.log", audit_key(b"x" * 64))
    forged.record("cli:test", "quarantine.export", "x")
    with pytest.raises(AuditBroken):
        AuditLog(forged.path, KEY).verify()


def test_torn_last_line_is_reported_and_the_next_append_goes_on(tmp_path: Path) -> None:
    log = _filled(tmp_path, 3)
    with open(log.path, "ab") as fh:
        fh.write(b'{"actor":"cli:test","act')  # a crash in the middle of an append
    summary = log.verify()
    assert (summary.records, summary.torn) == (3, 1)
    record = log.record("cli:test", "quarantine.release", "unparseable/item-3")
    assert record["seq"] == 4 and record["after_torn"] is True
    summary = log.verify()
    assert (summary.records, summary.torn) == (4, 1)
    # a torn line in the middle without an after_torn record after it is a fault
    lines = _lines(log.path)
    lines.insert(1, b"torn\n")
    log.path.write_bytes(b"".join(lines))
    with pytest.raises(AuditBroken) as err:
        log.verify()
    assert err.value.line == 2


def test_a_whole_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    log = _filled(tmp_path, 2)
    log.path.write_bytes(log.path.read_bytes()[:-1])  # crash before the newline
    assert log.verify().records == 2
    assert log.record("cli:test", "quarantine.export", "x")["seq"] == 3
    assert log.verify().records == 3


def _append_many(path: str, n: int) -> None:
    log = AuditLog(Path(path), KEY)
    for i in range(n):
        log.record(f"cli:proc-{os.getpid()}", "quarantine.export", f"item-{i}")


def test_concurrent_processes_append_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), 60)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    summary = AuditLog(path, KEY).verify()
    assert (summary.records, summary.torn) == (180, 0)
    actors = {json.loads(line)["actor"] for line in _lines(path)}
    assert len(actors) == 3


def test_an_unwritable_log_raises(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.log"
    path.mkdir(parents=True)  # something in the way: open fails even as root
    with pytest.raises(AuditError, match="cannot open audit log"):
        AuditLog(path, KEY).record("cli:test", "quarantine.export", "x")


def test_cli_records_before_phi_access_and_verifies(rooms, tmp_path: Path) -> None:
    series = dicomgen.make_instance(tmp_path / "in")
    rooms.drop("garbage-1", b"\x00" * 132 + b"garbage")
    rooms.drop("garbage-2", b"\x00" * 132 + b"garbage too")
    rooms.indexer.run_once()
    audit = rooms.spool.logs / "audit.log"

    empty = rooms.cli("audit", "verify")
    assert empty.returncode == 0 and "no audit records yet" in empty.stdout

    out = tmp_path / "g1.dcm"
    assert rooms.cli("quarantine", "export", "garbage-1", "--out", str(out)).returncode == 0
    assert rooms.cli("quarantine", "release", "garbage-2").returncode == 0
    assert rooms.cli("vault", "rotate-key").returncode == 0
    records = [json.loads(line) for line in _lines(audit)]
    assert [(r["action"], r["target"]) for r in records] == [
        ("quarantine.export", "unparseable/garbage-1"),
        ("quarantine.release", "unparseable/garbage-2"),
        ("vault.rotate-key", str(rooms.cfg.vault.key_file)),
    ]
    assert records[0]["detail"] == {"out": str(out)}
    assert all(r["actor"].startswith("cli:") and "(uid " in r["actor"] for r in records)
    assert series.patient_name.encode() not in audit.read_bytes()

    ok = rooms.cli("audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert "3 records intact, chain unbroken" in ok.stdout

    lines = _lines(audit)
    audit.write_bytes(lines[0] + lines[2])
    broken = rooms.cli("audit", "verify")
    assert broken.returncode == 1 and broken.stderr.count("\n") == 1
    assert "is broken at line 2: chain broken" in broken.stderr


def test_cli_refuses_access_it_cannot_record(rooms, tmp_path: Path) -> None:
    rooms.drop("garbage-1", b"\x00" * 132 + b"garbage")
    rooms.indexer.run_once()
    (rooms.spool.logs / "audit.log").mkdir()
    out = tmp_path / "g1.dcm"
    result = rooms.cli("quarantine", "export", "garbage-1", "--out", str(out))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "refused: the audit record could not be written" in result.stderr
    assert not out.exists()
    released = rooms.cli("quarantine", "release", "garbage-1")
    assert released.returncode == 1 and "refused" in released.stderr
    assert (rooms.spool.quarantine_dir / "unparseable" / "garbage-1").exists()
