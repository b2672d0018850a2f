"""Symbolic links planted in the spool are never followed (O_NOFOLLOW, only
regular files listed or handed out, start-up refused on a linked log, vault or
catalog), and ``quarantine export|release`` take the spool lock like
``vault rotate-key``.  Real folders, real processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import tools

SECRET = b"root:x:0:0:PHIMARK-target-outside-the-spool\n"


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """A file outside the spool that a planted link points at (like /etc/passwd)."""
    path = tmp_path / "outside" / "passwd"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def _unchanged(target: Path) -> bool:
    return target.is_file() and not target.is_symlink() and target.read_bytes() == SECRET


def test_a_link_in_incoming_is_never_read(rooms, target) -> None:
    link = rooms.spool.incoming / "evil"
    link.symlink_to(target)
    rooms.drop("garbage-1", b"\x00" * 132 + b"garbage")
    rooms.indexer.run_once()
    assert rooms.spool.incoming_names() == []
    assert [q["name"] for q in rooms.spool.quarantined()] == ["garbage-1"]
    assert link.is_symlink() and _unchanged(target)


def test_a_link_in_quarantine_is_never_exported_or_released(rooms, target, tmp_path) -> None:
    qdir = rooms.spool.quarantine_dir / "unparseable"
    qdir.mkdir(mode=0o700)
    (qdir / "evil").symlink_to(target)
    (qdir / "evil.json").write_text('{"name": "evil", "reason": "unparseable"}\n')
    out = tmp_path / "evil.dcm"
    exported = rooms.cli("quarantine", "export", "evil", "--out", str(out))
    assert exported.returncode == 1 and exported.stderr.count("\n") == 1
    assert "no quarantined item named 'evil'" in exported.stderr
    assert not out.exists()
    released = rooms.cli("quarantine", "release", "unparseable/evil")
    assert released.returncode == 1 and "no quarantined item" in released.stderr
    assert not (rooms.spool.incoming / "evil").exists()
    assert (qdir / "evil").is_symlink() and _unchanged(target)


def test_a_linked_audit_log_is_refused(rooms, target, tmp_path) -> None:
    rooms.drop("garbage-1", b"\x00" * 132 + b"garbage")
    rooms.indexer.run_once()
    (rooms.spool.logs / "audit.log").symlink_to(target)
    out = tmp_path / "g1.dcm"
    result = rooms.cli("quarantine", "export", "garbage-1", "--out", str(out))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "refused" in result.stderr and "symbolic link" in result.stderr
    assert not out.exists() and _unchanged(target)


@pytest.mark.parametrize(
    "name", ["logs/main.log", "logs/error.log", "vault.phi", "catalog.sqlite3", "incoming", ".lock"]
)
def test_start_is_refused_on_a_linked_spool_file(tmp_path: Path, target, name: str) -> None:
    work = tmp_path / "p"
    link = work / "spool" / name
    link.parent.mkdir(parents=True)
    if name == "incoming":
        link.symlink_to(target.parent, target_is_directory=True)
    else:
        link.symlink_to(target)
    err = tools.refused_start(work)
    assert f"{link} is a symbolic link" in err
    assert _unchanged(target) and os.listdir(target.parent) == ["passwd"]


@pytest.mark.parametrize("action", ["export", "release"])
def test_quarantine_commands_take_the_spool_lock(rooms, tmp_path, action: str) -> None:
    rooms.drop("garbage-1", b"\x00" * 132 + b"garbage")
    rooms.indexer.run_once()
    args = ["quarantine", action, "garbage-1"] + (
        ["--out", str(tmp_path / "g1.dcm")] if action == "export" else []
    )
    lock = rooms.spool.lock()  # as the running proxy holds it
    assert lock is not None
    try:
        refused = rooms.cli(*args)
    finally:
        os.close(lock)
    assert refused.returncode == 1
    assert refused.stderr == (
        f"ith-proxy: the proxy is running on this spool; stop it before quarantine {action}\n"
    )
    assert (rooms.spool.quarantine_dir / "unparseable" / "garbage-1").is_file()
    assert not (tmp_path / "g1.dcm").exists()
    assert not (rooms.spool.logs / "audit.log").exists()  # refused before any record
    done = rooms.cli(*args)  # the proxy stopped: the lock is free
    assert done.returncode == 0, done.stderr


def test_readers_of_spool_files_do_not_follow_a_link_swapped_in(rooms, target) -> None:
    """A name the indexer already listed, swapped for a link before it is
    opened: the raw-input reader, the header reader, the vault and the
    attempt markers all refuse the link (ELOOP) instead of reading the target."""
    from ith_proxy.dicom import files as dicomfile
    from ith_proxy.vault import stream as vault_stream

    link = rooms.spool.incoming / "swapped"
    link.symlink_to(target)
    with pytest.raises(OSError):
        vault_stream.open_source(link, rooms.vault.keyring)
    with pytest.raises(OSError):
        dicomfile.read_split(link)
    with pytest.raises(OSError):
        vault_stream.digest(link, rooms.vault.keyring)
    (rooms.spool.root / "attempts").mkdir(exist_ok=True)
    (rooms.spool.root / "attempts" / "swapped").symlink_to(target)
    assert rooms.spool.attempts("swapped") == 1  # counted in flight, never read
    rooms.vault.close()
    rooms.vault.path.unlink(missing_ok=True)
    rooms.vault.path.symlink_to(target)
    with pytest.raises(OSError):
        rooms.vault.get(0)
    with pytest.raises(OSError):  # scan must not read the target either
        list(rooms.vault.scan())
    assert _unchanged(target)
