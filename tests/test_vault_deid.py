"""Vault file and keys, keyed pseudonyms and UID remapping, on real files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ith_proxy.deid import patient_key, patient_pseudonym, remap_uid
from ith_proxy.vault.keyfiles import VaultKeyError, init_secrets, load_site_secret
from ith_proxy.vault.keys import load_keys
from ith_proxy.vault.records import Vault, VaultRecordError

REPO = Path(__file__).resolve().parent.parent


def test_key_is_generated_0600_outside_spool_with_a_log_line(tmp_path: Path, caplog) -> None:
    key = tmp_path / "secrets" / "vault.key"
    with caplog.at_level("WARNING", logger="ith_proxy.vault"):
        keys = load_keys(key, create=True)
    assert len(keys) == 1
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert any("generated a new vault key" in r.message for r in caplog.records)
    assert load_keys(key) == keys  # stable on the next start


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "vault.key"
    load_keys(key, create=True)
    os.chmod(key, mode)
    with pytest.raises(VaultKeyError, match="chmod 600"):
        load_keys(key)


def test_run_refuses_an_open_key_file_with_one_line(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "vault.key"
    init_secrets(key)
    os.chmod(key, 0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DICOM_", "API_", "VAULT_"))}
    env.update(PYTHONPATH=str(REPO), VAULT_KEY_FILE=str(key))
    result = subprocess.run(
        [sys.executable, "-m", "ith_proxy.cli", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "accessible by group or others" in result.stderr
    assert "Traceback" not in result.stderr


def test_vault_roundtrip_encrypted_at_rest(tmp_path: Path) -> None:
    init_secrets(tmp_path / "k" / "vault.key")
    v = Vault(tmp_path / "vault.phi", tmp_path / "k" / "vault.key")
    a = v.put({"sop": "1", "phi": {"PatientName": "DOE^JANE-MARKER"}})
    b = v.put({"sop": "2", "phi": {"PatientName": "ROE^RICHARD"}})
    v.sync()
    assert v.get(a)["phi"]["PatientName"] == "DOE^JANE-MARKER"
    assert v.get(b)["sop"] == "2"
    raw = (tmp_path / "vault.phi").read_bytes()
    # whole values: a 3- or 4-letter piece turns up in base64 ciphertext by chance
    # (one run in a few hundred: "DOE" did once)
    for plain in (b"DOE^JANE-MARKER", b"JANE-MARKER", b"ROE^RICHARD", b"PatientName"):
        assert plain not in raw
    assert stat.S_IMODE((tmp_path / "vault.phi").stat().st_mode) == 0o600
    assert [off for off, _ in v.scan()] == [a, b]


def test_torn_record_is_isolated(tmp_path: Path) -> None:
    path = tmp_path / "vault.phi"
    key = tmp_path / "k" / "vault.key"
    init_secrets(key)
    v = Vault(path, key)
    good = v.put({"sop": "1"})
    v.close()
    with open(path, "ab") as fh:  # a crash in the middle of an append
        fh.write(b"gAAAAABtorn-record-without-newline")
    v2 = Vault(path, key)
    after = v2.put({"sop": "2"})
    records = list(v2.scan())
    assert len(records) == 3
    assert records[0] == (good, {"sop": "1"})
    assert isinstance(records[1][1], VaultRecordError)
    assert records[2] == (after, {"sop": "2"})
    with pytest.raises(VaultRecordError, match="corrupt"):
        v2.get(records[1][0])


def test_pseudonyms_are_keyed_and_stable(tmp_path: Path) -> None:
    secret = load_site_secret(tmp_path / "site.secret", create=True)
    assert load_site_secret(tmp_path / "site.secret") == secret
    p1 = patient_pseudonym(secret, patient_key("PID-1", "DOE^J", "19700101"))
    p2 = patient_pseudonym(secret, patient_key("PID-1", "OTHER^NAME", ""))
    assert p1 == p2 and p1.startswith("ITH-")
    assert patient_pseudonym(b"x" * 32, patient_key("PID-1", "", "")) != p1
    assert patient_pseudonym(secret, patient_key("PID-2", "DOE^J", "")) != p1


def test_uid_remap_is_valid_consistent_and_keeps_standard_uids() -> None:
    secret = b"s" * 32
    uid = "1.2.392.200036.9116.2.5.1.48.1221418236.1234567890.123456"
    new = remap_uid(secret, uid)
    assert new == remap_uid(secret, uid)
    assert new.startswith("2.25.") and len(new) <= 64
    assert all(
        part.isdigit() and (part == "0" or not part.startswith("0")) for part in new.split(".")
    )
    assert remap_uid(secret, uid + "1") != new
    assert remap_uid(secret, "1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
