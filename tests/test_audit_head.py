"""The audit chain's head kept off the box: records cut off the end of the log
*and* its anchor (which the anchor alone cannot see) are caught by
``audit verify --head SEQ:MAC`` with a head the backend kept.  Real audit
logs of a real site, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ith_proxy.cli.common import audit_log
from ith_proxy.store.audit import AuditBroken, AuditLog, format_head, head, parse_head
from worker_rooms import Rooms


@pytest.fixture
def site(tmp_path: Path):
    r = Rooms(tmp_path / "site")
    yield r
    r.close()


def _log(site: Rooms) -> AuditLog:
    return audit_log(site.cfg, append=True)


def _write(site: Rooms, n: int) -> list[dict]:
    log = _log(site)
    return [
        log.record("api:tester", "phi.read", f"2.25.{i}", outcome="success", ip="127.0.0.1")
        for i in range(n)
    ]


def _cut(site: Rooms, keep: int, anchor: str = "rewrite") -> None:
    """What an attacker with the box does: keep the first ``keep`` records, and
    make the anchor agree (rewrite it from the last kept record: it holds no
    secret) or delete it."""
    path = site.spool.logs / "audit.log"
    lines = path.read_bytes().splitlines(keepends=True)[:keep]
    path.write_bytes(b"".join(lines))
    anchor_file = site.cfg.vault.audit_anchor_file
    if anchor == "delete":
        anchor_file.unlink()
        return
    last = json.loads(lines[-1])
    anchor_file.write_text(json.dumps({"seq": last["seq"], "mac": last["mac"], "kid": last["kid"]}))


def _verify(site: Rooms, *args: str):
    return site.cli("audit", "verify", *args)


def test_head_is_the_anchor_seq_and_mac(site: Rooms) -> None:
    assert head(site.cfg.vault.audit_anchor_file) is None  # no record yet
    records = _write(site, 3)
    found = head(site.cfg.vault.audit_anchor_file)
    assert found == {"seq": 3, "mac": records[-1]["mac"]}
    assert parse_head(format_head(found)) == (3, records[-1]["mac"])


@pytest.mark.parametrize("anchor", ["rewrite", "delete"])
def test_cutting_the_log_and_its_anchor_is_caught_only_by_the_head(site: Rooms, anchor) -> None:
    records = _write(site, 8)
    kept = format_head(head(site.cfg.vault.audit_anchor_file))  # what the backend holds
    _cut(site, 5, anchor)
    # the attack the anchor cannot see: the shortened log and its anchor agree
    plain = _verify(site)
    assert plain.returncode == 0, plain.stderr
    assert "5 records intact" in plain.stdout
    # the head the backend kept catches it
    caught = _verify(site, "--head", kept)
    assert caught.returncode == 1 and caught.stderr.count("\n") == 1, caught.stderr
    assert "ends at record 5" in caught.stderr and "names record 8" in caught.stderr
    assert "cut off the end" in caught.stderr
    # a head the cut log still holds passes
    early = _verify(site, "--head", f"4:{records[3]['mac']}")
    assert early.returncode == 0 and "holds the head record 4" in early.stdout, early.stderr
    with pytest.raises(AuditBroken, match="names record 8"):
        _log(site).verify(parse_head(kept))


def test_records_appended_after_the_cut_have_another_mac_at_the_head(site: Rooms) -> None:
    """The service goes on writing after the cut: the log reaches SEQ again,
    but record SEQ is a different one."""
    _write(site, 6)
    kept = format_head(head(site.cfg.vault.audit_anchor_file))
    _cut(site, 4)
    _write(site, 3)  # records 5, 6, 7: a valid chain, a valid anchor
    assert _verify(site).returncode == 0
    caught = _verify(site, "--head", kept)
    assert caught.returncode == 1 and caught.stderr.count("\n") == 1, caught.stderr
    assert "broken at line 6" in caught.stderr
    assert "record 6 is not the one the head" in caught.stderr


def test_the_current_head_passes(site: Rooms) -> None:
    _write(site, 4)
    ok = _verify(site, "--head", format_head(head(site.cfg.vault.audit_anchor_file)))
    assert ok.returncode == 0, ok.stderr
    assert "4 records intact" in ok.stdout and "holds the head record 4" in ok.stdout


def test_a_missing_log_fails_against_a_head(site: Rooms) -> None:
    records = _write(site, 2)
    (site.spool.logs / "audit.log").unlink()
    site.cfg.vault.audit_anchor_file.unlink()
    assert _verify(site).returncode == 0  # "no audit records yet": nothing to compare
    caught = _verify(site, "--head", f"2:{records[-1]['mac']}")
    assert caught.returncode == 1 and caught.stderr.count("\n") == 1, caught.stderr
    assert "missing" in caught.stderr and "record 2" in caught.stderr


@pytest.mark.parametrize(
    "value",
    [
        "",
        "5",
        ":" + "a" * 64,
        "5:",
        "0:" + "a" * 64,
        "-1:" + "a" * 64,
        "05:" + "a" * 64,
        "5:" + "a" * 63,
        "5:" + "a" * 65,
        "5:" + "g" * 64,
        "x:" + "a" * 64,
        "5:" + "a" * 64 + ":6",
        "1" * 19 + ":" + "a" * 64,
        "5:" + "a" * 64 + "\n6",
    ],
)
def test_a_malformed_head_is_a_one_line_usage_error(site: Rooms, value: str) -> None:
    _write(site, 1)
    bad = _verify(site, f"--head={value}")
    assert bad.returncode == 2, (value, bad.stdout, bad.stderr)
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("ith-proxy: usage:"), bad.stderr
    assert "SEQ:MAC" in bad.stderr and not bad.stdout


def test_a_head_in_upper_case_hex_or_with_spaces_is_read(site: Rooms) -> None:
    records = _write(site, 1)
    ok = _verify(site, "--head", f" 1:{records[0]['mac'].upper()} ")
    assert ok.returncode == 0, ok.stderr
