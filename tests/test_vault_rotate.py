"""Vault key rotation: the step functions on real files (including simulated
crashes between and inside the steps), and ``ith-proxy vault rotate-key``
end to end against a real proxy's spool."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import dicomgen
import tools
from helpers import encrypt_v1, vault_records, wait_indexed, wait_until
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.keyfiles import init_secrets
from ith_proxy.vault.keys import Keyring, add_new_key, drop_old_keys, load_keys
from ith_proxy.vault.records import Vault, VaultRecordError
from ith_proxy.vault.rotate import rotate, step_reencrypt


@pytest.fixture
def site(tmp_path: Path):
    """A spool with 40 vault records of varied sizes, one encrypted quarantine
    file (3.5 chunks), one encrypted incoming file and one incoming file in
    the legacy v1 format (2.5 chunks)."""
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    key_file = tmp_path / "secrets" / "vault.key"
    init_secrets(key_file)
    vault_path = spool.root / "vault.phi"
    vault = Vault(vault_path, key_file)
    records = {}
    for i in range(40):
        rec = {"sop": f"2.25.{i}", "phi": {"PatientName": f"DOE^{'X' * (i * 37)}", "i": i}}
        records[vault.put(rec)] = rec
    vault.sync()
    vault.close()
    keyring = vault.keyring
    blobs = {
        "quarantine/unparseable/q1": os.urandom(3 * vault_stream.CHUNK + 1234),
        "incoming/in1": os.urandom(5000),
    }
    for rel, data in blobs.items():
        path = spool.root / rel
        path.parent.mkdir(mode=0o700, exist_ok=True)
        with open(path, "wb") as fh:
            fh.writelines(vault_stream.encrypt_stream(keyring, [data]))
    blobs["incoming/legacy-v1"] = os.urandom(2 * vault_stream.CHUNK + 777)
    (spool.root / "incoming/legacy-v1").write_bytes(
        encrypt_v1(keyring, blobs["incoming/legacy-v1"])
    )
    return spool, vault_path, key_file, records, blobs


def _plain(path: Path, keyring: Keyring) -> bytes:
    with vault_stream.open_source(path, keyring) as fh:
        return fh.read()


def _assert_all_readable(
    spool: Spool, vault_path: Path, key_file: Path, records: dict, blobs: dict
) -> None:
    vault = Vault(vault_path, key_file)
    for offset, rec in records.items():
        assert vault.get(offset) == rec
    assert [o for o, r in vault.scan() if isinstance(r, dict)] == sorted(records)
    for rel, data in blobs.items():
        assert _plain(spool.root / rel, vault.keyring) == data


def test_fernet_token_length_depends_only_on_plaintext_length() -> None:
    """The property that keeps every record's byte offset through a rotation."""
    keyrings = [Keyring([Keyring.generate_key()]) for _ in range(3)]
    for n in (0, 1, 15, 16, 17, 100, 1000, 4096, 65537):
        lengths = {len(k.encrypt(os.urandom(n))) for k in keyrings for _ in range(3)}
        assert len(lengths) == 1, (n, lengths)
    full = len(keyrings[0].encrypt(bytes(9 + vault_stream.CHUNK))) + 1
    assert vault_stream.token_line_length(vault_stream.CHUNK) == full


def test_rotation_keeps_every_record_and_offset(site) -> None:
    spool, vault_path, key_file, records, blobs = site
    old_keys = load_keys(key_file)
    before = vault_path.read_bytes()
    rotation = rotate(spool, vault_path, key_file)
    assert (rotation.records, rotation.corrupt_records) == (40, [])
    assert (rotation.files, rotation.corrupt_files, rotation.keys_removed) == (3, [], 1)
    new_keys = load_keys(key_file)
    assert len(new_keys) == 1 and new_keys[0] not in old_keys
    after = vault_path.read_bytes()
    assert len(after) == len(before)
    old_lines, new_lines = before.splitlines(True), after.splitlines(True)
    assert [len(x) for x in old_lines] == [len(x) for x in new_lines]
    assert all(a != b for a, b in zip(old_lines, new_lines, strict=True))
    _assert_all_readable(spool, vault_path, key_file, records, blobs)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(vault_path.stat().st_mode) == 0o600
    assert not list(spool.tmp.iterdir())
    assert not [
        p
        for p in key_file.parent.iterdir()
        if p.name != key_file.name and p.name not in ("site.secret", "audit.key")
    ]
    new_id = Keyring(new_keys).stream_key_id
    assert all(_key_id(spool.root / rel) == new_id for rel in blobs)  # all v2, new key


def _key_id(path: Path) -> bytes:
    """The key id in a v2 file's header."""
    raw = path.read_bytes()
    assert raw.startswith(vault_stream.MAGIC_V2)
    return raw[27:35]


def test_v1_files_are_rotated_to_v2(site) -> None:
    spool, vault_path, key_file, _records, blobs = site
    legacy = spool.root / "incoming" / "legacy-v1"
    assert legacy.read_bytes().startswith(vault_stream.MAGIC_V1)
    os.utime(legacy, (1_600_000_000, 1_600_000_000))  # the quiet timer of a waiting instance
    rotate(spool, vault_path, key_file)
    raw = legacy.read_bytes()
    assert raw.startswith(vault_stream.MAGIC_V2)
    assert len(raw) == vault_stream.HEADER_V2 + len(blobs["incoming/legacy-v1"]) + 3 * 28
    assert legacy.stat().st_mtime == 1_600_000_000
    assert _plain(legacy, Keyring.load(key_file)) == blobs["incoming/legacy-v1"]


def test_the_key_id_selects_the_key_after_rotation(site, tmp_path: Path) -> None:
    """First key writes, every key reads: each v2 file names its key by id."""
    spool, vault_path, key_file, _records, blobs = site
    old_key = load_keys(key_file)[0]
    old = Keyring([old_key])
    v2_files = [spool.root / rel for rel in blobs if rel != "incoming/legacy-v1"]
    assert {_key_id(p) for p in v2_files} == {old.stream_key_id}
    add_new_key(key_file)
    ring = Keyring.load(key_file)
    new_key = load_keys(key_file)[0]
    new = Keyring([new_key])
    assert ring.count == 2 and ring.stream_key_id == new.stream_key_id != old.stream_key_id
    fresh = tmp_path / "fresh"
    data = os.urandom(vault_stream.CHUNK + 3)
    fresh.write_bytes(b"".join(vault_stream.encrypt_stream(ring, [data])))
    assert _key_id(fresh) == new.stream_key_id  # written under the first key
    for keyring in (ring, Keyring([old_key, new_key])):  # found by id, whatever the order
        assert _plain(fresh, keyring) == data
        assert all(_plain(p, keyring) == blobs[str(p.relative_to(spool.root))] for p in v2_files)
    with pytest.raises(
        vault_stream.EncryptedFileError,
        match=f"not in the key file \\(key id {new.stream_key_id.hex()}\\)",
    ):
        _plain(fresh, old)
    with pytest.raises(vault_stream.EncryptedFileError, match="not in the key file"):
        _plain(v2_files[0], new)
    step_reencrypt(spool, vault_path, key_file)
    assert all(_key_id(spool.root / rel) == new.stream_key_id for rel in blobs)
    assert all(_plain(spool.root / rel, new) == data for rel, data in blobs.items())


def test_old_key_alone_no_longer_decrypts(site, tmp_path: Path) -> None:
    spool, vault_path, key_file, records, blobs = site
    old_key_file = tmp_path / "old" / "vault.key"
    old_key_file.parent.mkdir(mode=0o700)
    old_key_file.write_bytes(key_file.read_bytes())
    os.chmod(old_key_file, 0o600)
    rotate(spool, vault_path, key_file)
    old = Vault(vault_path, old_key_file)
    for offset in records:
        with pytest.raises(VaultRecordError, match=f"offset {offset} is corrupt"):
            old.get(offset)
    for rel in blobs:
        with pytest.raises(vault_stream.EncryptedFileError, match="not in the key file"):
            _plain(spool.root / rel, old.keyring)


def test_crash_after_step_a_leaves_everything_readable(site) -> None:
    spool, vault_path, key_file, records, blobs = site
    before = vault_path.read_bytes()
    add_new_key(key_file)  # ... and the power fails
    assert len(load_keys(key_file)) == 2
    assert vault_path.read_bytes() == before
    _assert_all_readable(spool, vault_path, key_file, records, blobs)
    # the service may run now: new records go under the new key, old ones still read
    vault = Vault(vault_path, key_file)
    extra = {"sop": "2.25.999", "phi": {"PatientName": "NEW^RECORD"}}
    records[vault.put(extra)] = extra
    vault.close()
    _assert_all_readable(spool, vault_path, key_file, records, blobs)
    # running the command again finishes the job
    rotation = rotate(spool, vault_path, key_file)
    assert rotation.records == 41 and rotation.keys_removed == 2
    _assert_all_readable(spool, vault_path, key_file, records, blobs)


def test_crash_after_step_b_leaves_everything_readable(site) -> None:
    spool, vault_path, key_file, records, blobs = site
    add_new_key(key_file)
    step_reencrypt(spool, vault_path, key_file)  # ... and the power fails before (c)
    assert len(load_keys(key_file)) == 2
    _assert_all_readable(spool, vault_path, key_file, records, blobs)
    only_new = Keyring(load_keys(key_file)[:1])  # everything is under the new key already
    assert all(_plain(spool.root / rel, only_new) == data for rel, data in blobs.items())
    assert drop_old_keys(key_file) == 1
    _assert_all_readable(spool, vault_path, key_file, records, blobs)


def test_crash_inside_step_b_leaves_everything_readable(site, monkeypatch) -> None:
    """The vault is replaced, then the rewrite of the first spool file dies."""
    spool, vault_path, key_file, records, blobs = site
    real = Spool.rewrite
    calls = []

    def dying(self, path, write):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(self, path, write)

    monkeypatch.setattr(Spool, "rewrite", dying)
    add_new_key(key_file)
    with pytest.raises(OSError):
        step_reencrypt(spool, vault_path, key_file)
    monkeypatch.undo()
    assert calls[0] == vault_path
    _assert_all_readable(spool, vault_path, key_file, records, blobs)
    assert not list(spool.tmp.iterdir())
    rotate(spool, vault_path, key_file)
    assert len(load_keys(key_file)) == 1
    _assert_all_readable(spool, vault_path, key_file, records, blobs)


def test_a_token_length_change_aborts_before_anything_is_replaced(site, monkeypatch) -> None:
    spool, vault_path, key_file, records, blobs = site
    before = vault_path.read_bytes()
    real = Keyring.seal_record  # the records are v2 (test_vault_records.py has v1 too)
    monkeypatch.setattr(
        Keyring, "seal_record", lambda self, parts, aad: [*real(self, parts, aad), b"A"]
    )
    add_new_key(key_file)
    with pytest.raises(VaultRecordError, match="would move it"):
        step_reencrypt(spool, vault_path, key_file)
    monkeypatch.undo()
    assert vault_path.read_bytes() == before
    assert not list(spool.tmp.iterdir())
    _assert_all_readable(spool, vault_path, key_file, records, blobs)


def test_corrupt_record_stays_corrupt_and_the_others_rotate(site) -> None:
    spool, vault_path, key_file, records, blobs = site
    offsets = sorted(records)
    bad = offsets[7]
    data = bytearray(vault_path.read_bytes())
    data[bad + 60] = ord("A") if data[bad + 60] != ord("A") else ord("B")  # same length
    vault_path.write_bytes(bytes(data))
    bad_record = records.pop(bad)
    bad_line = bytes(data[bad : offsets[8]])
    # a damaged quarantine file is kept as it is too
    qfile = spool.root / "quarantine" / "unparseable" / "q1"
    damaged = bytearray(qfile.read_bytes())
    damaged[vault_stream.HEADER_V2 + 500] ^= 1
    qfile.write_bytes(bytes(damaged))
    blobs.pop("quarantine/unparseable/q1")

    rotation = rotate(spool, vault_path, key_file)
    assert rotation.records == 39 and rotation.corrupt_records == [bad]
    assert rotation.corrupt_files == ["quarantine/unparseable/q1"] and rotation.files == 2
    assert "1 corrupt record kept unchanged (offsets " + str(bad) + ")" in rotation.summary()
    after = vault_path.read_bytes()
    assert after[bad : offsets[8]] == bad_line
    assert qfile.read_bytes() == bytes(damaged)
    vault = Vault(vault_path, key_file)
    with pytest.raises(VaultRecordError, match=f"record at offset {bad} is corrupt"):
        vault.get(bad)
    assert bad_record not in [r for _, r in vault.scan()]
    _assert_all_readable(spool, vault_path, key_file, records, blobs)


def test_torn_last_record_is_kept(site) -> None:
    spool, vault_path, key_file, records, _blobs = site
    torn_at = vault_path.stat().st_size
    with open(vault_path, "ab") as fh:
        fh.write(b"gAAAAABtorn-by-a-crash")  # no newline: the service died mid-append
    size = vault_path.stat().st_size
    rotation = rotate(spool, vault_path, key_file)
    assert rotation.corrupt_records == [torn_at] and rotation.records == 40
    assert vault_path.stat().st_size == size
    assert vault_path.read_bytes()[torn_at:] == b"gAAAAABtorn-by-a-crash"
    vault = Vault(vault_path, key_file)
    for offset, rec in records.items():
        assert vault.get(offset) == rec
    with pytest.raises(VaultRecordError, match=f"offset {torn_at} is corrupt"):
        vault.get(torn_at)


# --------------------------------------------------------------------------
# the command, against a real proxy's spool
# --------------------------------------------------------------------------


def _offsets(spool: Path) -> list:
    cat = Catalog(spool / "catalog.sqlite3", readonly=True)
    try:
        return [cat.instance_vault_offsets(s) for s in cat.study_uids()]
    finally:
        cat.close()


def test_rotate_key_command(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 4, rows=64, cols=64)
    garbage = b"\x00" * 132 + b"PHIMARK-garbage-" + os.urandom(3000)
    proxy = tools.ProxyProcess(tmp_path / "p")
    missing = proxy.cli("vault", "rotate-key")
    assert missing.returncode == 1 and "nothing to rotate" in missing.stderr
    with proxy:
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_indexed(proxy.spool, 4)
        staged = proxy.spool / "tmp" / "garbage-1"  # whole, then renamed in (as the SCP does)
        staged.write_bytes(garbage)
        staged.rename(proxy.spool / "incoming" / "garbage-1")
        wait_until(
            lambda: list((proxy.spool / "quarantine").glob("*/garbage-1.json")),
            30,
            "garbage quarantined",
        )
        refused = proxy.cli("vault", "rotate-key")
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            "ith-proxy: the proxy is running on this spool; stop it before vault rotate-key"
        )
    before = vault_records(proxy.workdir)
    offsets = _offsets(proxy.spool)
    old_key = (proxy.workdir / "secrets" / "vault.key").read_bytes()
    result = proxy.cli("vault", "rotate-key")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "vault key rotated: 4 records re-encrypted, 0 corrupt "
        "records kept unchanged; 1 spool file re-encrypted; "
        "1 old key removed"
    )
    new_key = (proxy.workdir / "secrets" / "vault.key").read_bytes()
    assert new_key != old_key and len(new_key.split()) == 1
    assert vault_records(proxy.workdir) == before
    assert _offsets(proxy.spool) == offsets
    out = tmp_path / "garbage.out"
    exported = proxy.cli("quarantine", "export", "garbage-1", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert out.read_bytes() == garbage
    with proxy:  # the service runs on the new key
        more = dicomgen.make_ct_series(tmp_path / "in2", 2, rows=64, cols=64, like=series)
        assert tools.storescu(proxy.dicom_port, more.files).returncode == 0
        wait_indexed(proxy.spool, 6)
        assert len(vault_records(proxy.workdir)) == 6
