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
from helpers import (
    encrypt_v1,
    find_bytes,
    original_to_anonymized_sop,
    read_header,
    stored_files,
    vault_records,
    wait_indexed,
    wait_until,
)
from ith_proxy.dicom import files as dicomfile
from ith_proxy.dicom.scp import StorageSCP
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.keys import SEAL_JOINED, Keyring
from worker_rooms import Rooms

CHUNK = vault_stream.CHUNK


def _encrypted(keyring: Keyring, data: bytes, pieces: int = 1) -> bytes:
    step = max(1, len(data) // pieces)
    parts = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
    return b"".join(vault_stream.encrypt_stream(keyring, parts))


# --------------------------------------------------------------------------
# the file format
# --------------------------------------------------------------------------

# (a chunk up to SEAL_JOINED bytes is sealed in one AESGCM call, a larger one part by part)
SIZES = [0, 1, 4000, SEAL_JOINED, SEAL_JOINED + 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]
SIZES += [6 * CHUNK + 12345]
RECORD = CHUNK + 28  # nonce, AES-GCM ciphertext of a full chunk, tag
H = vault_stream.HEADER_V2


def _keyring() -> Keyring:
    return Keyring([Keyring.generate_key()])


def _read_at(path: Path, keyring: Keyring, data: bytes) -> None:
    """Random access through the buffered reader, bulk copy_to, digest."""
    size = len(data)
    with vault_stream.open_source(path, keyring) as fh:
        assert fh.seek(0, io.SEEK_END) == size
        starts = {
            0,
            1,
            size // 3,
            max(0, size - 7),
            max(0, CHUNK - 3),
            CHUNK,
            2 * CHUNK + 1,
            max(0, size - CHUNK - 1),
            size,
        }
        for start in sorted(starts, reverse=True):  # backwards: every read is a seek
            fh.seek(start)
            assert fh.read(CHUNK + 10) == data[start : start + CHUNK + 10]
        for start in sorted(s for s in starts if s <= size):
            fh.seek(start)
            n = min(size - start, CHUNK + 77)
            out = io.BytesIO()
            fh.copy_to(out, n)
            assert out.getvalue() == data[start : start + n] and fh.tell() == start + n
            assert fh.read(5) == data[start + n : start + n + 5]
        fh.seek(0)
        assert fh.read() == data
    assert vault_stream.digest(path, keyring) == {
        "size": size,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@pytest.mark.parametrize("size", SIZES)
def test_v2_roundtrip_and_random_access(tmp_path: Path, size: int) -> None:
    keyring = _keyring()
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(_encrypted(keyring, data, pieces=3))
    raw = path.read_bytes()
    assert raw.startswith(b"ITH-PROXY-ENCRYPTED v2\n") and vault_stream.is_encrypted(path)
    assert struct.unpack_from(">I8s", raw, 23) == (CHUNK, keyring.stream_key_id)
    chunks = max(1, -(-size // CHUNK))
    assert len(raw) == H + size + 28 * chunks  # fixed-size chunks, no padding, no index
    _read_at(path, keyring, data)
    # the same from a stream of small pieces a producer reuses (copied when held)
    buf = bytearray(7001)

    def reused():
        for i in range(0, size, len(buf)):
            piece = data[i : i + len(buf)]
            buf[: len(piece)] = piece
            yield memoryview(buf)[: len(piece)]

    path.write_bytes(b"".join(vault_stream.encrypt_stream(keyring, reused())))
    _read_at(path, keyring, data)


def test_v2_is_the_documented_format(tmp_path: Path) -> None:
    """Decoded independently with cryptography: HKDF-SHA256 of the Fernet key
    (info "ith-proxy stream v2"), key id = SHA-256(derived)[:8], per chunk
    nonce || AES-256-GCM || tag with AAD = header || >QB(index, last)."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = Keyring.generate_key()
    keyring = Keyring([key])
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"ith-proxy stream v2"
    ).derive(base64.urlsafe_b64decode(key))
    assert derived not in base64.urlsafe_b64decode(key)
    data = os.urandom(2 * CHUNK + 999)
    raw = _encrypted(keyring, data)
    header = raw[:H]
    chunk, key_id, file_id = struct.unpack(">I8s16s", header[23:])
    assert chunk == CHUNK and key_id == hashlib.sha256(derived).digest()[:8]
    plain, nonces = b"", set()
    for i in range(3):
        record = raw[H + i * RECORD : H + (i + 1) * RECORD]
        nonces.add(record[:12])
        plain += AESGCM(derived).decrypt(
            record[:12], record[12:], header + struct.pack(">QB", i, i == 2)
        )
    assert plain == data and len(nonces) == 3
    other = _encrypted(keyring, data)
    assert other[: H - 16] == header[: H - 16] and other[H - 16 : H] != file_id  # a new file id


def _fails(path: Path, keyring: Keyring, raw: bytes) -> str:
    path.write_bytes(raw)
    with (
        pytest.raises(vault_stream.EncryptedFileError) as exc,
        vault_stream.open_source(path, keyring) as fh,
    ):
        fh.read()
    return str(exc.value)


def test_v2_detects_tampering(tmp_path: Path) -> None:
    key = Keyring.generate_key()
    keyring = Keyring([key])
    raw = _encrypted(keyring, os.urandom(3 * CHUNK + 100))
    header, recs = raw[:H], [raw[H + i * RECORD : H + (i + 1) * RECORD] for i in range(4)]
    assert b"".join([header, *recs]) == raw
    path = tmp_path / "f"

    def flipped(data: bytes, at: int) -> bytes:
        b = bytearray(data)
        b[at] ^= 0x01
        return bytes(b)

    bad = "authentication failed"
    for at in (
        H + 3,
        H + 500,
        H + RECORD - 1,
        H + RECORD + 12,
        H + 2 * RECORD + 77777,
        len(raw) - 1,
    ):  # nonce, ciphertext, tag, ... of several chunks
        assert bad in _fails(path, keyring, flipped(raw, at))
    for at in (23 + 2, 23 + 4 + 16):  # chunk size field, file id: bound by the AAD
        assert _fails(path, keyring, flipped(raw, at))
    assert "key" in _fails(path, keyring, flipped(raw, 23 + 4))  # key id: no such key
    swapped = b"".join([header, recs[1], recs[0], *recs[2:]])
    assert "chunk 0" in _fails(path, keyring, swapped)
    swapped = b"".join([header, recs[0], recs[2], recs[1], recs[3]])
    assert "chunk 1" in _fails(path, keyring, swapped)
    # truncated: at a chunk boundary, inside a chunk, inside the header, extended
    assert "chunk 2" in _fails(path, keyring, b"".join([header, *recs[:3]]))
    assert "chunk 0" in _fails(path, keyring, b"".join([header, recs[0]]))
    assert "chunk 3" in _fails(path, keyring, raw[:-10])
    assert "damaged at chunk 3" in _fails(path, keyring, raw[: -(len(recs[3]) - 20)])
    assert "no content" in _fails(path, keyring, header)
    assert "bad header" in _fails(path, keyring, raw[: H - 3])
    assert "chunk 4" in _fails(path, keyring, raw + recs[1])  # read as 5 chunks
    # a chunk from another file under the same key, at the same position
    other = _encrypted(keyring, os.urandom(3 * CHUNK + 100))
    spliced = b"".join([header, recs[0], other[H + RECORD : H + 2 * RECORD], *recs[2:]])
    assert "chunk 1" in _fails(path, keyring, spliced)
    # ... or with its header: the file id binds every chunk to its own header
    assert "chunk" in _fails(path, keyring, other[:H] + raw[H:])
    # a key that is not in the key file; another key's id in the header
    stranger = _keyring()
    assert "not in the key file" in _fails(path, stranger, raw)
    both = Keyring([Keyring.generate_key(), key])
    forged = raw[:27] + both.stream_key_id + raw[35:]
    assert bad in _fails(path, both, forged)
    path.write_bytes(raw)
    with vault_stream.open_source(path, both) as fh:  # the right key, found by its id
        assert fh.seek(0, io.SEEK_END) == 3 * CHUNK + 100
    # a reader never decrypts past a damaged chunk: the bytes before it still read
    path.write_bytes(flipped(raw, H + 2 * RECORD + 5))
    with vault_stream.open_source(path, keyring) as fh:
        assert len(fh.read(2 * CHUNK)) == 2 * CHUNK
        with pytest.raises(vault_stream.EncryptedFileError, match="chunk 2"):
            fh.read(1)
    # a plaintext file is never taken for an encrypted one
    plain = tmp_path / "plain.dcm"
    dicomgen.make_instance(tmp_path / "in").files[0].rename(plain)
    assert not vault_stream.is_encrypted(plain)
    assert vault_stream.open_source(plain, keyring).read(132)[128:] == b"DICM"


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK + 5])
def test_v1_files_are_still_read(tmp_path: Path, size: int) -> None:
    keyring = _keyring()
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(encrypt_v1(keyring, data))
    assert path.read_bytes().startswith(b"ITH-PROXY-ENCRYPTED v1 chunk=1048576\n")
    lines = path.read_bytes().split(b"\n")[1:-1]
    assert {len(x) + 1 for x in lines[:-1]} <= {vault_stream.token_line_length(CHUNK)}
    assert vault_stream.is_encrypted(path)
    _read_at(path, keyring, data)
    # quarantine seals and release re-seals as v2
    out = io.BytesIO()
    assert vault_stream.seal(path, out, keyring)["size"] == size
    path.write_bytes(out.getvalue())
    assert out.getvalue().startswith(vault_stream.MAGIC_V2)
    _read_at(path, keyring, data)


def test_v1_damage_truncation_and_reordering_are_detected(tmp_path: Path) -> None:
    keyring = _keyring()
    raw = encrypt_v1(keyring, os.urandom(3 * CHUNK + 100))
    head, *lines = raw.split(b"\n")[:-1]
    path = tmp_path / "f"

    def variant(chosen: list[bytes], end: bytes = b"\n") -> str:
        return _fails(path, keyring, b"\n".join([head, *chosen]) + end)

    assert "missing or out of order" in variant(lines[:-1])  # last chunk dropped
    assert "missing or out of order" in variant([lines[1], lines[0], *lines[2:]])
    flipped = bytearray(lines[2])
    flipped[100] = ord("A") if flipped[100] != ord("A") else ord("B")
    assert "chunk 2" in variant([*lines[:2], bytes(flipped), lines[3]])
    assert "damaged" in variant(lines, end=b"")  # torn: no newline
    assert "chunk 3" in variant([*lines[:-1], lines[-1][:-10]])  # torn inside
    assert "not in the key file" in _fails(path, _keyring(), raw)


# --------------------------------------------------------------------------
# the SCP encrypts before the disk; the indexer reads both kinds
# --------------------------------------------------------------------------


def test_scp_writes_only_encrypted_bytes(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 3, rows=700, cols=800)  # > 1 chunk each
    # Rooms sets the spool and the vault key under tmp_path; the SCP's address:
    env = {"DICOM_PORT": str(tools.free_port()), "DICOM_BIND_ADDRESS": "127.0.0.1"}
    rooms = Rooms(tmp_path, "[spool]\nencrypt_incoming = true\n", env)
    try:
        keyring = rooms.vault.keyring
        scp = StorageSCP(rooms.cfg, rooms.spool, vault_stream.encryptor(keyring))
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
    rooms.spool.deliver_incoming(vault_stream.encrypt_stream(rooms.vault.keyring, [head, *blocks]))
    del blocks
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        assert rooms.indexer.run_once() == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # measured: 2.2 MiB whether the instance has 8, 64 or 128 MiB of pixels (the
    # reader's reused buffers: sealed chunk, plain chunk, last chunk; v1 took 9.8 MiB)
    assert peak < 4 * 2**20, f"indexer peak {peak / 2**20:.1f} MiB for a 64 MiB instance"
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


def test_encrypted_pixel_bytes_are_copied_in_bulk(rooms, tmp_path: Path, monkeypatch) -> None:
    """The indexer reads the header through the buffered reader and copies the
    pixel bytes with copy_to: whole decrypted chunks straight into the output."""
    series = dicomgen.make_instance(tmp_path / "in")
    head, blocks, pixel_sha = _big_instance(series.files[0], 1024, 2048)  # 4 MiB of pixels
    rooms.spool.deliver_incoming(vault_stream.encrypt_stream(rooms.vault.keyring, [head, *blocks]))
    read, copied = [], []
    real_readinto = vault_stream.DecryptingReader.readinto
    real_copy = vault_stream.DecryptingReader.copy_range
    monkeypatch.setattr(
        vault_stream.DecryptingReader,
        "readinto",
        lambda self, b: read.append(real_readinto(self, b)) or read[-1],
    )
    monkeypatch.setattr(
        vault_stream.DecryptingReader,
        "copy_range",
        lambda self, out, start, n: copied.append(n) or real_copy(self, out, start, n),
    )
    assert rooms.indexer.run_once() == 1
    assert copied == [4 * CHUNK + 12]  # the pixel element, in one call
    assert sum(read) < 2 * len(head) + (1 << 16)  # the header (+ one read-ahead buffer)
    out = stored_files(rooms.spool.root)[0]
    assert hashlib.sha256(pydicom.dcmread(out).PixelData).hexdigest() == pixel_sha


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
                self.hits.update(
                    f"{path.relative_to(self.spool)}: {n.decode()}"
                    for n in self.needles
                    if n in data
                )
            self.passes += 1


def test_encrypt_incoming_end_to_end_no_plaintext_phi_on_disk(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 60)
    needles = series.leak_strings() | {series.patient_name, series.patient_id}
    with tools.ProxyProcess(
        tmp_path / "p",
        config_text="[spool]\nencrypt_incoming = true\n",
        env={"DICOM_STUDY_TIMEOUT": "2"},
    ) as proxy:
        watcher = Watcher(proxy.spool, needles)
        watcher.start()
        try:
            result = tools.storescu(proxy.dicom_port, series.files)
            assert result.returncode == 0 and len(tools.acked_files(result)) == 60, result.stderr[
                -1500:
            ]
            wait_indexed(proxy.spool, 60)
            wait_until(lambda: list(proxy.spool.glob("studies/*/study.json")), 30, "study.json")
            passes = watcher.passes
            wait_until(lambda: watcher.passes > passes + 1, 60, "a last full pass")
        finally:
            watcher.stop.set()
            watcher.join()
        assert watcher.hits == set()
        assert watcher.incoming_seen and all(watcher.incoming_seen.values()), watcher.incoming_seen
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
    with tools.ProxyProcess(
        tmp_path / "p", config_text="[spool]\nencrypt_incoming = true\n"
    ) as proxy:
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
