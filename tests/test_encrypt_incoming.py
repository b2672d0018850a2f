"""``[spool] encrypt_incoming``: the chunked encrypted file format, the SCP
encrypting before the disk, the indexer reading through a decrypting reader
(streamed, never a whole file in memory), toggling the setting with files in
incoming/, and end to end with DCMTK storescu: no plaintext PHI in any byte
under spool/ outside the vault at any time."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import tracemalloc
from pathlib import Path

import pydicom
import pytest

import dicomgen
import tools
from helpers import (find_bytes, original_to_anonymized_sop, read_header, stored_files,
                     vault_records, wait_indexed, wait_until)
from ith_proxy import dicomfile, vault_stream
from ith_proxy.scp import StorageSCP
from ith_proxy.vault import Keyring
from worker_rooms import Rooms

CHUNK = vault_stream.CHUNK


@pytest.fixture
def rooms(tmp_path: Path):
    r = Rooms(tmp_path / "site")
    yield r
    r.close()


def _encrypted(keyring: Keyring, data: bytes, pieces: int = 1) -> bytes:
    step = max(1, len(data) // pieces)
    parts = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
    return b"".join(vault_stream.encrypt_stream(keyring, parts))


# --------------------------------------------------------------------------
# the file format
# --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 4000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_format_roundtrip_and_random_access(tmp_path: Path, size: int) -> None:
    keyring = Keyring([Keyring.generate_key()])
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(_encrypted(keyring, data, pieces=3))
    raw = path.read_bytes()
    assert raw.startswith(b"ITH-PROXY-ENCRYPTED v1 chunk=1048576\n")
    lines = raw.split(b"\n")[1:-1]
    assert len(lines) == max(1, -(-size // CHUNK))
    assert {len(x) + 1 for x in lines[:-1]} <= {vault_stream.token_line_length(CHUNK)}
    with vault_stream.open_source(path, keyring) as fh:
        assert fh.seek(0, io.SEEK_END) == size
        for start in {0, size // 3, max(0, size - 7), max(0, CHUNK - 3)}:
            fh.seek(start)
            assert fh.read(CHUNK + 10) == data[start:start + CHUNK + 10]
        fh.seek(0)
        assert fh.read() == data
    assert vault_stream.digest(path, keyring) == {
        "size": size, "sha256": hashlib.sha256(data).hexdigest()}


def test_format_detects_damage_truncation_and_reordering(tmp_path: Path) -> None:
    keyring = Keyring([Keyring.generate_key()])
    raw = _encrypted(keyring, os.urandom(3 * CHUNK + 100))
    head, *lines = raw.split(b"\n")[:-1]
    path = tmp_path / "f"

    def variant(chosen: list[bytes], end: bytes = b"\n") -> str:
        path.write_bytes(b"\n".join([head, *chosen]) + end)
        with pytest.raises(vault_stream.EncryptedFileError) as exc:
            with vault_stream.open_source(path, keyring) as fh:
                fh.read()
        return str(exc.value)
    assert "missing or out of order" in variant(lines[:-1])           # last chunk dropped
    assert "missing or out of order" in variant([lines[1], lines[0], *lines[2:]])
    flipped = bytearray(lines[2])
    flipped[100] = ord("A") if flipped[100] != ord("A") else ord("B")
    assert "chunk 2" in variant([*lines[:2], bytes(flipped), lines[3]])
    assert "damaged" in variant(lines, end=b"")                        # torn: no newline
    assert "chunk 3" in variant([*lines[:-1], lines[-1][:-10]])        # torn inside
    other = Keyring([Keyring.generate_key()])
    path.write_bytes(raw)
    with pytest.raises(vault_stream.EncryptedFileError, match="not in the key file"):
        vault_stream.open_source(path, other)
    # a plaintext file is never taken for an encrypted one
    plain = tmp_path / "plain.dcm"
    dicomgen.make_instance(tmp_path / "in").files[0].rename(plain)
    assert not vault_stream.is_encrypted(plain)
    assert vault_stream.open_source(plain, keyring).read(132)[128:] == b"DICM"


# --------------------------------------------------------------------------
# the SCP encrypts before the disk; the indexer reads both kinds
# --------------------------------------------------------------------------

def test_scp_writes_only_encrypted_bytes(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 3, rows=700, cols=800)  # > 1 chunk each
    env = {"DICOM_STORAGE_DIR": str(tmp_path / "spool"), "DICOM_PORT": str(tools.free_port()),
           "DICOM_BIND_ADDRESS": "127.0.0.1",
           "VAULT_KEY_FILE": str(tmp_path / "secrets" / "vault.key")}
    rooms = Rooms(tmp_path, "[spool]\nencrypt_incoming = true\n", env)
    try:
        keyring = rooms.vault.keyring
        scp = StorageSCP(rooms.cfg, rooms.spool, keyring)
        scp.start()
        try:
            result = tools.storescu(rooms.cfg.scp.port, series.files)
        finally:
            scp.stop()
        assert result.returncode == 0, result.stderr
        names = rooms.spool.incoming_names()
        assert len(names) == 3 and not list(rooms.spool.tmp.iterdir())
        assert find_bytes(rooms.spool.root, series.leak_strings()) == []
        for name in names:
            path = rooms.spool.incoming_path(name)
            assert vault_stream.is_encrypted(path)
            with vault_stream.open_source(path, keyring) as fh:
                ds = pydicom.dcmread(fh)
                assert ds.PatientName == series.patient_name
                assert fh.seek(0, io.SEEK_END) > CHUNK
        assert rooms.indexer.run_once() == 3
        _assert_output_matches(rooms, series)
    finally:
        rooms.close()


def _assert_output_matches(rooms: Rooms, series: dicomgen.Series) -> None:
    files = stored_files(rooms.spool.root)
    assert len(files) == len(series.files)
    anon = original_to_anonymized_sop(rooms.root)
    by_sop = {f.stem: f for f in files}
    for src in series.files:
        original = pydicom.dcmread(src)
        out = pydicom.dcmread(by_sop[anon[original.SOPInstanceUID]])
        assert out.PixelData == original.PixelData
        assert out.PatientIdentityRemoved == "YES" and out.PatientID.startswith("ITH-")
        assert out.Rows == original.Rows and out.PixelSpacing == original.PixelSpacing
    assert not list(rooms.spool.incoming.iterdir())


def test_both_kinds_in_incoming_are_indexed_whatever_the_setting(tmp_path: Path) -> None:
    """Toggling encrypt_incoming with files still in incoming/ works both ways."""
    series = dicomgen.make_ct_series(tmp_path / "in", 4, rows=64, cols=64)
    for setting in ("true", "false"):
        rooms = Rooms(tmp_path / setting, f"[spool]\nencrypt_incoming = {setting}\n")
        try:
            for i, src in enumerate(series.files):
                data = src.read_bytes()
                if i % 2:
                    data = _encrypted(rooms.vault.keyring, data)
                rooms.drop(f"f{i}", data)
            assert rooms.indexer.run_once() == 4
            assert not list(rooms.spool.quarantine_dir.iterdir())
            _assert_output_matches(rooms, series)
        finally:
            rooms.close()


def test_anonymize_off_stores_the_decrypted_original(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 1, rows=64, cols=64)
    rooms = Rooms(tmp_path / "site", env={"DICOM_ANONYMIZE_PATIENTS": "false"})
    try:
        rooms.drop("f0", _encrypted(rooms.vault.keyring, series.files[0].read_bytes()))
        assert rooms.indexer.run_once() == 1
        assert stored_files(rooms.spool.root)[0].read_bytes() == series.files[0].read_bytes()
    finally:
        rooms.close()


def _big_instance(src: Path, rows: int, cols: int) -> tuple[bytes, list[bytes], str]:
    """(header bytes, pixel blocks, sha256 of the pixels) for a rows x cols 16-bit CT."""
    ds = pydicom.dcmread(src)
    del ds.PixelData
    ds.Rows, ds.Columns = rows, cols
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    length = rows * cols * 2
    head = buf.getvalue() + struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", length)
    block = hashlib.sha256(b"seed").digest() * (CHUNK // 32)
    blocks = [bytes([i % 251]) + block[1:] for i in range(length // CHUNK)]
    assert len(blocks) * CHUNK == length
    h = hashlib.sha256()
    for b in blocks:
        h.update(b)
    return head, blocks, h.hexdigest()


def test_large_encrypted_instance_is_streamed_not_loaded(rooms, tmp_path: Path) -> None:
    series = dicomgen.make_instance(tmp_path / "in")
    head, blocks, pixel_sha = _big_instance(series.files[0], 4096, 8192)  # 64 MiB of pixels
    rooms.spool.deliver_incoming(vault_stream.encrypt_stream(rooms.vault.keyring,
                                                             [head, *blocks]))
    del blocks
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        assert rooms.indexer.run_once() == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # measured: 9.8 MiB whether the instance has 8, 64 or 128 MiB of pixels
    assert peak < 12 * 2**20, f"indexer peak {peak / 2**20:.1f} MiB for a 64 MiB instance"
    out = stored_files(rooms.spool.root)[0]
    split = dicomfile.read_split(out)
    h = hashlib.sha256()
    with open(out, "rb") as fh:
        fh.seek(split.pixel_start + 12)
        remaining = split.pixel_end - split.pixel_start - 12
        while remaining:
            piece = fh.read(min(CHUNK, remaining))
            h.update(piece)
            remaining -= len(piece)
    assert h.hexdigest() == pixel_sha
    assert read_header(out).PatientIdentityRemoved == "YES"


# --------------------------------------------------------------------------
# end to end with storescu
# --------------------------------------------------------------------------

class Watcher(threading.Thread):
    """Reads every file under spool/ (but vault.phi) over and over, looking for
    PHI; notes every incoming/ file it saw and whether it was encrypted."""

    def __init__(self, spool: Path, needles: set[str]) -> None:
        super().__init__(daemon=True)
        self.spool, self.needles = spool, [n.encode() for n in needles]
        self.stop = threading.Event()
        self.hits: set[str] = set()
        self.incoming_seen: dict[str, bool] = {}
        self.passes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for path in list(self.spool.rglob("*")):
                if path.name == "vault.phi":
                    continue
                try:
                    data = path.read_bytes()
                except (IsADirectoryError, FileNotFoundError, PermissionError):
                    continue
                if path.parent.name == "incoming" and data:
                    self.incoming_seen[path.name] = data.startswith(vault_stream.MAGIC)
                self.hits.update(f"{path.relative_to(self.spool)}: {n.decode()}"
                                 for n in self.needles if n in data)
            self.passes += 1


def test_encrypt_incoming_end_to_end_no_plaintext_phi_on_disk(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 60)
    needles = series.leak_strings() | {series.patient_name, series.patient_id}
    with tools.ProxyProcess(tmp_path / "p", config_text="[spool]\nencrypt_incoming = true\n",
                            env={"DICOM_STUDY_TIMEOUT": "2"}) as proxy:
        watcher = Watcher(proxy.spool, needles)
        watcher.start()
        try:
            result = tools.storescu(proxy.dicom_port, series.files)
            assert result.returncode == 0 and len(tools.acked_files(result)) == 60, \
                result.stderr[-1500:]
            wait_indexed(proxy.spool, 60)
            wait_until(lambda: list(proxy.spool.glob("studies/*/study.json")), 30, "study.json")
            passes = watcher.passes
            wait_until(lambda: watcher.passes > passes + 1, 60, "a last full pass")
        finally:
            watcher.stop.set()
            watcher.join()
        assert watcher.hits == set()
        assert watcher.incoming_seen and all(watcher.incoming_seen.values()), \
            watcher.incoming_seen
        vault = proxy.spool / "vault.phi"
        assert find_bytes(proxy.workdir, needles, skip=[vault]) == []
        assert len(vault_records(proxy.workdir)) == 60
        files = stored_files(proxy.spool)
        assert len(files) == 60
        anon = original_to_anonymized_sop(proxy.workdir)
        by_sop = {f.stem: f for f in files}
        for src in series.files[::7]:
            original = pydicom.dcmread(src)
            out = pydicom.dcmread(by_sop[anon[original.SOPInstanceUID]])
            assert out.PixelData == original.PixelData
            assert out.ImagePositionPatient == original.ImagePositionPatient
            assert out.PatientIdentityRemoved == "YES"
        assert "encrypted under the vault key" in (proxy.spool / "logs" / "main.log").read_text()


def test_garbage_with_encrypt_incoming_is_quarantined_encrypted(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 2, rows=64, cols=64)
    ds = pydicom.dcmread(series.files[1])
    del ds.StudyInstanceUID
    ds.save_as(series.files[1])
    needles = series.leak_strings() | {series.patient_name}
    with tools.ProxyProcess(tmp_path / "p",
                            config_text="[spool]\nencrypt_incoming = true\n") as proxy:
        garbage = b"\x00" * 132 + series.patient_name.encode() + os.urandom(5000)
        (proxy.spool / "incoming" / "garbage-1").write_bytes(garbage)  # dropped in plaintext
        result = tools.storescu(proxy.dicom_port, series.files)
        assert result.returncode == 0, result.stderr[-1500:]
        wait_indexed(proxy.spool, 1)
        q = proxy.spool / "quarantine"
        wait_until(lambda: len(list(q.glob("*/*.json"))) == 2, 30, "2 quarantined")
        data = sorted(p for p in q.glob("*/*") if p.suffix != ".json")
        assert [p.parent.name for p in data] == ["inconsistent", "unparseable"]
        assert all(vault_stream.is_encrypted(p) for p in data)
        assert find_bytes(proxy.spool, needles, skip=[proxy.spool / "vault.phi"]) == []
        # what the SCP received comes back whole from the export
        keyring = Keyring.load(Path(proxy.env["VAULT_KEY_FILE"]))
        with vault_stream.open_source(data[0], keyring) as fh:
            back = pydicom.dcmread(fh)
        assert back.PatientName == series.patient_name and "StudyInstanceUID" not in back
        garbage_copy = tmp_path / "garbage.out"
        vault_stream.export_plain(data[1], garbage_copy, keyring)
        assert garbage_copy.read_bytes() == garbage
        assert len(stored_files(proxy.spool)) == 1
