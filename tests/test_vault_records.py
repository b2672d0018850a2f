"""Vault records are bounded (issue 6): a removed binary value is stored raw
in a v2 record (AES-GCM, base64 once), so a record is at most 1.5x the value
and writing or reading it costs a small multiple of the value in memory; v1
(Fernet) records still read; rotation keeps both kinds and every offset; a
torn, corrupt or moved v2 record is that record's error only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

import dicomgen
import tools
from helpers import wait_indexed
from ith_proxy.deid import Deidentifier
from ith_proxy.store.spool import Spool
from ith_proxy.vault.keyfiles import init_secrets
from ith_proxy.vault.keys import Keyring, add_new_key
from ith_proxy.vault.records import Vault, VaultRecordError, reencrypt_records
from ith_proxy.vault.rotate import rotate, step_reencrypt

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20
SECRET = b"0123456789abcdef0123456789abcdef"
V2 = b"V2 "  # V2 (spelled out so this file also runs against main)
PIECE = 3 << 18  # PIECE: values around it cross piece boundaries


def _vault(tmp_path: Path) -> Vault:
    (tmp_path / "spool").mkdir(mode=0o700, exist_ok=True)
    init_secrets(tmp_path / "secrets" / "vault.key")
    return Vault(tmp_path / "spool" / "vault.phi", tmp_path / "secrets" / "vault.key")


def _line_at(path: Path, offset: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.readline()


def _with_private_ob(value: bytes) -> Dataset:
    """A header with a private OB that the default profile removes (to the vault)."""
    ds = Dataset()
    ds.PatientName, ds.PatientID = "VAULT^BIG", "BIG123"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        "1.2.826.0.1.3680043.8.498.1",
        "1.2.826.0.1.3680043.8.498.2",
    )
    ds.SOPInstanceUID, ds.SOPClassUID = "1.2.826.0.1.3680043.8.498.3", "1.2.840.10008.5.1.4.1.1.7"
    ds.Modality = "OT"
    ds.add_new(0x00090010, "LO", "ACME BIG")
    ds.add_new(0x00091010, "OB", value)
    return ds


def _binary_leaves(obj: object) -> list[bytes]:
    if isinstance(obj, dict):
        return [b for v in obj.values() for b in _binary_leaves(v)]
    if isinstance(obj, list):
        return [b for v in obj for b in _binary_leaves(v)]
    return [obj] if isinstance(obj, (bytes, bytearray)) else []


def _indexer_record(value: bytes) -> dict:
    """The record the indexer appends for an instance with a removed private OB."""
    result = Deidentifier(SECRET).apply(_with_private_ob(value))
    return {
        "v": 1,
        "study": result.study_uid,
        "series": result.series_uid,
        "sop": result.sop_uid,
        "patient": result.patient_id,
        "phi": result.phi,
    }


# --------------------------------------------------------------------------
# size and memory
# --------------------------------------------------------------------------


def test_a_20mb_removed_value_makes_a_record_at_most_1_5x(tmp_path: Path) -> None:
    value = os.urandom(20 * MB)
    vault = _vault(tmp_path)
    record = _indexer_record(value)
    offset = vault.put(record)
    vault.close()
    line = _line_at(vault.path, offset)
    assert len(line) <= 1.5 * len(value), f"{len(line) / len(value):.2f}x the value"
    back = vault.get(offset)
    assert _binary_leaves(back["phi"]) == [value]  # raw bytes, exactly
    assert back == record  # the indexer's idempotence check holds


_MEMORY_SCRIPT = r"""
import json, os, sys, gc
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from test_vault_records import _indexer_record, _binary_leaves, _line_at
from ith_proxy.vault.keyfiles import init_secrets
from ith_proxy.vault.records import Vault
from pathlib import Path

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

size, work = int(sys.argv[2]), Path(sys.argv[3])
init_secrets(work / "vault.key")
vault = Vault(work / "vault.phi", work / "vault.key")
vault.put({"warm": "up"}); vault.get(0)
value = os.urandom(size)
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # VmHWM := VmRSS
record = _indexer_record(value)
offset = vault.put(record)
vault.close()
del record
back = vault.get(offset)
ok = _binary_leaves(back["phi"]) == [value]
del back
gc.collect()
print(json.dumps({"growth": status("VmHWM") - base, "line": len(_line_at(vault.path, offset)),
                  "ok": ok}))
"""


@pytest.mark.parametrize("size_mb", [20, 200])
def test_put_and_get_of_a_large_value_stay_within_a_small_multiple(
    tmp_path: Path, size_mb: int
) -> None:
    """Peak RSS growth (VmHWM reset after the value exists) over building the
    record, appending it and reading it back: at most 4x the value + 32 MB
    (main: about 17x, 346 MB for 20 MB)."""
    size = size_mb * MB
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(REPO), str(size), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["growth"] <= 4 * size + 32 * MB, (
        f"peak grew by {got['growth'] / size:.1f}x the value ({got['growth'] // MB} MB)"
    )
    assert got["line"] <= 1.5 * size
    assert got["ok"]  # the value came back as the same bytes


# --------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------


def test_binary_values_come_back_as_the_same_bytes(tmp_path: Path) -> None:
    vault = _vault(tmp_path)
    cases = [
        b"",
        b"\x00",
        b"\n\n\r\n",
        os.urandom(1000),
        os.urandom(PIECE - 1),
        os.urandom(MB + 1),
        os.urandom(3 * PIECE + 2),
    ]
    offsets = {}
    for value in cases:
        record = {
            "sop": "1.2.3",
            "phi": {
                "instance": {
                    "(0009,1010)": value,
                    "Seq": [{"(0011,1001)": bytearray(value), "Name": "A"}],
                    "Text": "x",
                    "Number": 7,
                    "Empty": None,
                }
            },
        }
        offsets[vault.put(record)] = (record, value)
    plain = {"sop": "1.2.4", "phi": {"patient": {"PatientName": "DOE^JANE", "bin": "x"}}}
    offsets[vault.put(plain)] = (plain, None)
    vault.close()
    for offset, (record, value) in offsets.items():
        back = vault.get(offset)
        assert back == record
        if value is not None:
            leaves = _binary_leaves(back)
            assert leaves == [value, value] and all(type(b) is bytes for b in leaves)
        assert _line_at(vault.path, offset).startswith(V2)
    assert [o for o, r in vault.scan() if isinstance(r, dict)] == sorted(offsets)
    with pytest.raises(ValueError, match='only key is "bin"'):
        vault.put({"phi": {"x": {"bin": 0}}})  # would read back as a binary value


def _put_v1(vault: Vault, record: dict) -> int:
    """Append a record in the format main wrote (Fernet, binary values as hex)."""

    def hexed(obj: object) -> object:
        if isinstance(obj, bytes):
            return {"hex": obj.hex()}
        raise TypeError

    line = vault.keyring.encrypt(json.dumps(record, sort_keys=True, default=hexed).encode())
    with open(vault.path, "ab") as fh:
        offset = fh.tell()
        fh.write(line + b"\n")
    return offset


def test_v1_records_still_read_with_binary_values_as_bytes(tmp_path: Path) -> None:
    vault = _vault(tmp_path)
    value = os.urandom(5000)
    first = {"sop": "1.2.1", "phi": {"instance": {"(0009,1010)": value, "Name": "OLD"}}}
    second = {"sop": "1.2.2", "phi": {"instance": {"(0009,1010)": value, "Name": "NEW"}}}
    a = _put_v1(vault, first)
    b = vault.put(second)
    c = _put_v1(vault, {"sop": "1.2.3", "phi": {}})
    vault.close()
    assert not _line_at(vault.path, a).startswith(V2)
    assert vault.get(a) == first and vault.get(b) == second
    assert [r for _, r in vault.scan()] == [first, second, {"sop": "1.2.3", "phi": {}}]
    assert c > b


# --------------------------------------------------------------------------
# damage: one record only
# --------------------------------------------------------------------------


def _three(tmp_path: Path, value: bytes) -> tuple[Vault, list[int], list[dict]]:
    vault = _vault(tmp_path)
    records = [{"sop": f"1.2.{i}", "phi": {"instance": {"(0009,1010)": value}}} for i in range(3)]
    offsets = [vault.put(r) for r in records]
    vault.close()
    return vault, offsets, records


def test_a_torn_v2_tail_is_sealed_and_isolated(tmp_path: Path) -> None:
    vault, offsets, records = _three(tmp_path, os.urandom(2 * MB))
    line = _line_at(vault.path, offsets[1])
    torn_at = vault.path.stat().st_size
    with open(vault.path, "ab") as fh:
        fh.write(line[: len(line) // 2])  # the service died mid-append
    after = {"sop": "1.2.9", "phi": {"instance": {"(0009,1010)": b"after"}}}
    vault = _vault(tmp_path)
    new = vault.put(after)
    vault.close()
    assert new == torn_at + len(line) // 2 + 1  # the torn tail got its newline
    for offset, record in zip(offsets, records, strict=True):
        assert vault.get(offset) == record
    assert vault.get(new) == after
    with pytest.raises(VaultRecordError, match=f"offset {torn_at} is corrupt"):
        vault.get(torn_at)
    scanned = dict(vault.scan())
    assert isinstance(scanned.pop(torn_at), VaultRecordError)
    assert scanned == {**dict(zip(offsets, records, strict=True)), new: after}


@pytest.mark.parametrize("size", [3000, MB + 3])  # opened in one call / in pieces
@pytest.mark.parametrize("where", ["prefix", "key id", "middle", "tag", "newline-free"])
def test_a_flipped_byte_spoils_that_v2_record_only(tmp_path: Path, where: str, size: int) -> None:
    vault, offsets, records = _three(tmp_path, os.urandom(size))
    length = len(_line_at(vault.path, offsets[1]))
    at = (
        offsets[1]
        + {
            "prefix": 0,
            "key id": 5,
            "middle": length // 2,
            "tag": length - 8,
            "newline-free": length - 1,
        }[where]
    )
    data = bytearray(vault.path.read_bytes())
    # same length; "tag" is in a full base64 quantum (a padded last quantum has
    # unused bits, a flip there may decode to the same bytes)
    data[at] = ord("A") if data[at] != ord("A") else ord("B")
    vault.path.write_bytes(bytes(data))
    vault = _vault(tmp_path)
    assert vault.get(offsets[0]) == records[0]
    assert vault.get(offsets[2]) == records[2] or where == "newline-free"
    with pytest.raises(VaultRecordError, match=f"offset {offsets[1]} is corrupt"):
        vault.get(offsets[1])


def test_a_v2_record_moved_to_another_offset_does_not_read(tmp_path: Path) -> None:
    """The offset is in the associated data: swapping two same-length records
    (another patient's originals under this instance's offset) is detected."""
    vault, offsets, records = _three(tmp_path, os.urandom(4000))
    data = vault.path.read_bytes()
    one, two = data[offsets[0] : offsets[1]], data[offsets[1] : offsets[2]]
    assert len(one) == len(two)
    vault.path.write_bytes(two + one + data[offsets[2] :])
    vault = _vault(tmp_path)
    for offset in offsets[:2]:
        with pytest.raises(VaultRecordError):
            vault.get(offset)
    assert vault.get(offsets[2]) == records[2]


# --------------------------------------------------------------------------
# key rotation: both kinds, every offset kept
# --------------------------------------------------------------------------


def _mixed(tmp_path: Path) -> tuple[Spool, Vault, dict]:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    vault = _vault(tmp_path)
    records = {}
    for i in range(6):
        value = os.urandom([0, 10, 3000, MB + 7, 3 * PIECE + 1, 200][i])
        record = {"sop": f"1.2.{i}", "phi": {"instance": {"(0009,1010)": value, "i": i}}}
        records[_put_v1(vault, record) if i % 2 else vault.put(record)] = record
    vault.close()
    return spool, vault, records


def test_rotation_rotates_v1_and_v2_records_and_keeps_every_offset(tmp_path: Path) -> None:
    spool, vault, records = _mixed(tmp_path)
    before = vault.path.read_bytes().splitlines(True)
    old_keyring = vault.keyring
    rotation = rotate(spool, vault.path, vault.key_file)
    assert (rotation.records, rotation.corrupt_records) == (6, [])
    after = vault.path.read_bytes().splitlines(True)
    assert [len(x) for x in after] == [len(x) for x in before]
    assert all(a != b for a, b in zip(before, after, strict=True))
    assert (
        [x.startswith(V2) for x in after] == [x.startswith(V2) for x in before] == [True, False] * 3
    )
    vault = _vault(tmp_path)
    assert vault.keyring.count == 1
    for offset, record in records.items():
        assert vault.get(offset) == record
    # nothing is left under the old key
    assert all(isinstance(r, VaultRecordError) for _, r in _with_keyring(vault, old_keyring).scan())


def _with_keyring(vault: Vault, keyring: Keyring) -> Vault:
    other = Vault.__new__(Vault)
    other.path, other.key_file, other.keyring = vault.path, vault.key_file, keyring
    return other


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_a_length_change_aborts_the_rotation_for_either_kind(
    tmp_path: Path, monkeypatch, kind: str
) -> None:
    spool, vault, _records = _mixed(tmp_path)
    before = vault.path.read_bytes()
    if kind == "v1":
        real = Keyring.encrypt
        monkeypatch.setattr(Keyring, "encrypt", lambda self, data: real(self, data) + b"A")
    else:
        seal = Keyring.seal_record
        monkeypatch.setattr(
            Keyring, "seal_record", lambda self, parts, aad: [*seal(self, parts, aad), b"AB"]
        )
    add_new_key(vault.key_file)
    with pytest.raises(VaultRecordError, match="would move it"):
        step_reencrypt(spool, vault.path, vault.key_file)
    monkeypatch.undo()
    assert vault.path.read_bytes() == before
    assert not list(spool.tmp.iterdir())


def test_reencrypting_a_large_record_keeps_it_and_a_corrupt_one_stays(tmp_path: Path) -> None:
    vault, offsets, records = _three(tmp_path, os.urandom(2 * MB))
    data = bytearray(vault.path.read_bytes())
    data[offsets[1] + 100] ^= 0x01  # still base64: fails authentication
    vault.path.write_bytes(bytes(data))
    new_key = Keyring.generate_key()
    new = Keyring([new_key, *_key_lines(vault)])
    out = tmp_path / "out.phi"
    with open(vault.path, "rb") as src, open(out, "wb") as dst:
        done, kept = reencrypt_records(src, dst, new)
    assert (done, kept) == (2, [offsets[1]])
    rotated = out.read_bytes()
    assert len(rotated) == len(data) and rotated[offsets[1] : offsets[2]] == bytes(
        data[offsets[1] : offsets[2]]
    )
    reader = _with_keyring(vault, Keyring([new_key]))  # the new key alone reads them
    reader.path = out
    assert reader.get(offsets[0]) == records[0] and reader.get(offsets[2]) == records[2]


def _key_lines(vault: Vault) -> list[bytes]:
    return [k.strip() for k in vault.key_file.read_bytes().splitlines() if k.strip()]


# --------------------------------------------------------------------------
# end to end: storescu -> proxy -> indexer -> vault
# --------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found += [int(entry), *_descendants(int(entry))]
    return found


def _peak_rss(pids: list[int]) -> int:
    """The largest VmHWM among ``pids`` (bytes)."""
    peaks = [0]
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) * 1024)
        except OSError:
            continue
    return max(peaks)


def test_a_20mb_private_ob_through_the_proxy_comes_back_from_a_bounded_record(
    tmp_path: Path,
) -> None:
    """storescu -> proxy -> indexer: the vault line is at most 1.5x the value,
    the value comes back exactly, and the worker processes' peak RSS grows by
    at most 4x the value + 32 MB over a small instance (main: 357 MB)."""
    small = dicomgen.make_instance(tmp_path / "small").files[0]
    path = dicomgen.make_instance(tmp_path / "in").files[0]
    ds = pydicom.dcmread(path)
    value = os.urandom(20 * MB)
    ds.add_new(0x00090010, "LO", "ACME BIG")
    ds.add_new(0x00091010, "OB", value)
    ds.save_as(path, enforce_file_format=True)
    with tools.ProxyProcess(tmp_path / "proxy") as proxy:
        assert tools.storescu(proxy.dicom_port, [small]).returncode == 0
        wait_indexed(proxy.spool, 1)
        workers = _descendants(proxy.pid)  # the indexer process among them
        before = _peak_rss(workers)
        result = tools.storescu(proxy.dicom_port, [path])
        assert result.returncode == 0, result.stderr[-2000:]
        wait_indexed(proxy.spool, 2)
        growth = _peak_rss(workers) - before
    assert growth <= 4 * len(value) + 32 * MB, f"worker peak RSS grew by {growth // MB} MB"
    vault = Vault(proxy.spool / "vault.phi", proxy.workdir / "secrets" / "vault.key")
    records = [(o, r) for o, r in vault.scan() if _binary_leaves(r)]
    assert len(records) == 1
    offset, record = records[0]
    assert _binary_leaves(record["phi"]) == [value]
    line = _line_at(vault.path, offset)
    assert len(line) <= 1.5 * len(value), f"{len(line) / len(value):.2f}x the value"
    stored = list((proxy.spool / "studies").glob("*/*/*.dcm"))
    assert len(stored) == 2 and not any(value[:64] in f.read_bytes() for f in stored)


def test_a_record_is_refused_to_an_instance_it_does_not_belong_to(tmp_path: Path) -> None:
    """The vault checks that a record is the asking instance's (a reused SOP
    Instance UID must never repoint another study's originals)."""
    vault = _vault(tmp_path)
    offset = vault.put(
        {
            "v": 1,
            "study": "1.2.3",
            "series": "1.2.3.4",
            "sop": "1.2.3.4.5",
            "patient": "P",
            "phi": {},
        }
    )
    assert vault.get(offset, "1.2.3", "1.2.3.4.5")["sop"] == "1.2.3.4.5"
    for study, sop in (("1.2.3", "1.2.3.4.6"), ("1.2.9", "1.2.3.4.5")):
        with pytest.raises(VaultRecordError, match="belongs to another instance"):
            vault.get(offset, study, sop)
