"""Quarantine encrypted at rest, its commands (list, export, release), and
the phi-risk quarantine for burned-in annotation; workers driven through
run_once() on real spool folders, plus one end-to-end run with storescu."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pydicom

import dicomgen
import tools
from helpers import find_bytes, stored_files, vault_records, wait_indexed, wait_until
from ith_proxy.vault import stream as vault_stream
from worker_rooms import Rooms


def _no_uid(src: Path) -> bytes:
    ds = pydicom.dcmread(src)
    del ds.StudyInstanceUID
    out = src.with_suffix(".nouid")
    ds.save_as(out)
    return out.read_bytes()


def test_quarantine_is_encrypted_and_its_json_is_plain_and_phi_free(rooms, tmp_path) -> None:
    series = dicomgen.make_instance(tmp_path / "in")
    garbage = b"\x00" * 132 + b"not DICOM " + series.patient_name.encode() + os.urandom(3000)
    inconsistent = _no_uid(series.files[0])
    rooms.drop("garbage-1", garbage)
    rooms.drop("nouid-2", inconsistent)
    assert rooms.indexer.run_once() == 2
    q = rooms.spool.quarantine_dir
    assert sorted(p.relative_to(q).as_posix() for p in q.rglob("*") if p.is_file()) == [
        "inconsistent/nouid-2",
        "inconsistent/nouid-2.json",
        "unparseable/garbage-1",
        "unparseable/garbage-1.json",
    ]
    assert not list(rooms.spool.incoming.iterdir()) and not list(rooms.spool.tmp.iterdir())
    for rel, original in (
        ("unparseable/garbage-1", garbage),
        ("inconsistent/nouid-2", inconsistent),
    ):
        data = q / rel
        assert vault_stream.is_encrypted(data)
        assert stat.S_IMODE(data.stat().st_mode) == 0o600
        with vault_stream.open_source(data, rooms.vault.keyring) as fh:
            assert fh.read() == original
        info = json.loads(data.with_name(data.name + ".json").read_text())
        assert info["size"] == len(original)
        assert info["sha256"] == hashlib.sha256(original).hexdigest()
        assert info["encrypted"] is True and info["quarantined_at"].endswith("Z")
    info = json.loads((q / "inconsistent" / "nouid-2.json").read_text())
    assert info["error"] == "missing or invalid StudyInstanceUID"
    leaks = series.leak_strings() | {series.patient_name, series.patient_id}
    assert find_bytes(rooms.spool.root, leaks, skip=[rooms.spool.root / "vault.phi"]) == []


def test_an_encrypted_file_that_does_not_decrypt_is_kept_as_it_is(rooms, tmp_path) -> None:
    series = dicomgen.make_instance(tmp_path / "in")
    other = vault_stream.Keyring([vault_stream.Keyring.generate_key()])
    raw = b"".join(vault_stream.encrypt_stream(other, [series.files[0].read_bytes()]))
    rooms.drop("foreign-1", raw)
    assert rooms.indexer.run_once() == 1
    data = rooms.spool.quarantine_dir / "undecryptable" / "foreign-1"
    assert data.read_bytes() == raw
    info = json.loads(data.with_name("foreign-1.json").read_text())
    assert "not in the key file" in info["error"] and info["size"] is None


def test_quarantine_commands(rooms, tmp_path: Path) -> None:
    series = dicomgen.make_instance(tmp_path / "in")
    garbage = b"\x00" * 132 + b"garbage " + os.urandom(2 * vault_stream.CHUNK)
    inconsistent = _no_uid(series.files[0])
    rooms.drop("garbage-1", garbage)
    rooms.drop("nouid-2", inconsistent)
    rooms.indexer.run_once()

    listed = rooms.cli("quarantine", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("inconsistent  nouid-2  20") and lines[0].endswith(
        f"  {len(inconsistent)} bytes  missing or invalid StudyInstanceUID"
    )
    assert (
        lines[1].startswith("unparseable  garbage-1  ")
        and f"  {len(garbage)} bytes  unreadable DICOM" in lines[1]
    )
    assert series.patient_name not in listed.stdout

    out = tmp_path / "export" / "nouid.dcm"
    out.parent.mkdir()
    exported = rooms.cli("quarantine", "export", "nouid-2", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert out.read_bytes() == inconsistent and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "plaintext PHI" in exported.stdout
    again = rooms.cli("quarantine", "export", "inconsistent/nouid-2", "--out", str(out))
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "already exists" in again.stderr and out.read_bytes() == inconsistent
    default = rooms.cli("quarantine", "export", "unparseable/garbage-1")
    assert default.returncode == 0 and (rooms.root / "garbage-1.dcm").read_bytes() == garbage

    for bad in (
        "nope",
        "../../secrets/vault.key",
        "unparseable/../inconsistent/nouid-2",
        "garbage-1.json",
        "",
    ):
        for action in ("export", "release"):
            result = rooms.cli("quarantine", action, bad)
            assert result.returncode == 1, (action, bad)
            assert (
                result.stderr == f"ith-proxy: no quarantined item named {bad!r} "
                "(see: ith-proxy quarantine list)\n"
            )

    # release, encrypt_incoming off: back to incoming/ in plaintext
    released = rooms.cli(
        "quarantine", "release", "garbage-1", ini="[spool]\nencrypt_incoming = false\n"
    )
    assert released.returncode == 0, released.stderr
    assert (rooms.spool.incoming / "garbage-1").read_bytes() == garbage
    assert not list(rooms.spool.quarantine_dir.glob("*/garbage-1*"))
    assert rooms.indexer.run_once() == 1  # still garbage: quarantined again
    assert (rooms.spool.quarantine_dir / "unparseable" / "garbage-1.json").exists()

    # release, encrypt_incoming on (the default): back to incoming/ encrypted
    released = rooms.cli("quarantine", "release", "nouid-2", ini="")
    assert released.returncode == 0, released.stderr
    back = rooms.spool.incoming / "nouid-2"
    assert vault_stream.is_encrypted(back)
    with vault_stream.open_source(back, rooms.vault.keyring) as fh:
        assert fh.read() == inconsistent
    assert "quarantine is empty" not in rooms.cli("quarantine", "list").stdout


def test_burned_in_annotation_and_secondary_capture_are_phi_risks(tmp_path: Path) -> None:
    ct = dicomgen.make_instance(tmp_path / "ct")
    ds = pydicom.dcmread(ct.files[0])
    ds.BurnedInAnnotation = "YES"
    burned = tmp_path / "burned.dcm"
    ds.save_as(burned)
    sc = dicomgen.make_instance_of_class(tmp_path / "sc")

    default = Rooms(tmp_path / "default")
    try:
        default.drop("burned-1", burned.read_bytes())
        default.drop("sc-2", sc.files[0].read_bytes())
        assert default.indexer.run_once() == 2
        q = default.spool.quarantine_dir / "phi-risk"
        assert sorted(p.name for p in q.iterdir()) == [
            "burned-1",
            "burned-1.json",
            "sc-2",
            "sc-2.json",
        ]
        assert (
            json.loads((q / "burned-1.json").read_text())["error"]
            == "BurnedInAnnotation is YES (identifying text in the pixels)"
        )
        assert "Secondary Capture" in json.loads((q / "sc-2.json").read_text())["error"]
        assert stored_files(default.spool.root) == [] and not vault_records(default.root)
    finally:
        default.close()

    allowed = Rooms(tmp_path / "allowed", "[deid]\nquarantine_burned_in = false\n")
    try:
        allowed.drop("burned-1", burned.read_bytes())
        assert allowed.indexer.run_once() == 1
        assert len(stored_files(allowed.spool.root)) == 1
        assert not list(allowed.spool.quarantine_dir.iterdir())
    finally:
        allowed.close()

    # not de-identifying: everything is stored as received, burned-in text or not
    plain = Rooms(tmp_path / "plain", env={"DICOM_ANONYMIZE_PATIENTS": "false"})
    try:
        plain.drop("burned-1", burned.read_bytes())
        assert plain.indexer.run_once() == 1
        assert len(stored_files(plain.spool.root)) == 1
    finally:
        plain.close()


def test_burned_in_annotation_end_to_end(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 3, rows=64, cols=64)
    ds = pydicom.dcmread(series.files[1])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(series.files[1])
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        result = tools.storescu(proxy.dicom_port, series.files)
        assert result.returncode == 0 and len(tools.acked_files(result)) == 3, result.stderr
        wait_indexed(proxy.spool, 2)
        q = proxy.spool / "quarantine" / "phi-risk"
        meta = wait_until(lambda: list(q.glob("*.json")), 30, "phi-risk quarantine")
        assert len(meta) == 1
        data = meta[0].with_suffix("")
        assert vault_stream.is_encrypted(data)
        assert "BurnedInAnnotation" in json.loads(meta[0].read_text())["error"]
        assert len(stored_files(proxy.spool)) == 2
        originals = {
            rec["phi"]["instance"]["SOPInstanceUID"] for rec in vault_records(proxy.workdir)
        }
        assert originals == {series.sop_uids[0], series.sop_uids[2]}
        assert find_bytes(proxy.spool, series.markers(), skip=[proxy.spool / "vault.phi"]) == []
        assert "quarantined" in (proxy.spool / "logs" / "main.log").read_text()
        listed = subprocess.run(
            [sys.executable, "-m", "ith_proxy.cli", "quarantine", "list"],
            cwd=proxy.workdir,
            env=proxy.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.stdout.startswith(f"phi-risk  {data.name}  ")


def test_a_bug_in_the_fast_lane_leaves_the_file_to_the_pydicom_path(
    rooms, tmp_path, caplog
) -> None:
    """The fast lane (workers/index_flat.py) is only a shortcut: a bug hit in it
    is logged without its message (which may quote a value) and the file is
    read again the pydicom way, which stores it."""
    series = dicomgen.make_ct_series(tmp_path / "in", 3, rows=32, cols=32)
    for i, f in enumerate(series.files):
        rooms.drop(f"f{i}", f.read_bytes())
    indexer = rooms.indexer
    assert indexer._flat is not None
    real_flat = indexer._flat.apply

    def buggy_flat(header):
        if header.elements[0x00200013].value.strip() == b"2":  # InstanceNumber
            raise ValueError(f"cannot handle {header.elements[0x00100010].value!r}")
        return real_flat(header)

    indexer._flat.apply = buggy_flat
    with caplog.at_level("INFO"):
        assert indexer.run_once() == 3
    assert len(stored_files(rooms.spool.root)) == 3
    assert not (rooms.spool.quarantine_dir / "failed").exists()
    assert "fast lane failed (internal error: ValueError at test_quarantine.py:" in caplog.text
    assert series.patient_name.split("^")[0] not in caplog.text


def test_an_unexpected_error_quarantines_that_file_only(rooms, tmp_path, caplog) -> None:
    """A bug hit by one file must not stop the batch (nor every later batch),
    and its message, which may quote a value, is kept out of .json and logs."""
    series = dicomgen.make_ct_series(tmp_path / "in", 3, rows=32, cols=32)
    for i, f in enumerate(series.files):
        rooms.drop(f"f{i}", f.read_bytes())
    indexer = rooms.indexer
    indexer._flat = None  # the pydicom path (the fast lane's bugs: the test above)
    real = indexer.deid.apply

    def buggy(ds, *args, **kwargs):
        if ds.InstanceNumber == 2:
            raise ValueError(f"cannot handle {ds.PatientName}")
        return real(ds, *args, **kwargs)

    indexer.deid.apply = buggy
    with caplog.at_level("INFO"):
        assert rooms.indexer.run_once() == 3
    assert len(stored_files(rooms.spool.root)) == 2
    info = json.loads((rooms.spool.quarantine_dir / "failed" / "f1.json").read_text())
    assert info["error"].startswith("internal error: ValueError at test_quarantine.py:")
    assert series.patient_name not in caplog.text and "test_quarantine.py" in caplog.text
    assert (
        find_bytes(
            rooms.spool.root,
            series.markers() | {series.patient_name},
            skip=[rooms.spool.root / "vault.phi"],
        )
        == []
    )
