"""The SCP's streamed reception (ith_proxy/dicom/scp_stream.py, issue 6):

- a 1 GB instance sent by DCMTK storescu to a real proxy grows the proxy
  process's peak RSS by less than 64 MB, and lands de-identified in studies/;
- the push-style ``vault.stream.EncryptingWriter`` writes the same v2 file
  that ``encrypt_stream`` writes (the indexer reads it unchanged);
- the first-element check works whatever the fragmentation;
- on any pynetdicom but 3.0.4 the proxy refuses to start, with one line.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

import dicomgen
import tools
from helpers import stored_files, wait_indexed
from ith_proxy.store.spool import Spool
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.keys import Keyring

try:  # imported here so that the other tests still run (and fail) without the module
    from ith_proxy.dicom import scp_stream
except ImportError:  # main before issue 6
    scp_stream = None  # type: ignore[assignment]  # tests needing it fail

REPO = Path(__file__).resolve().parent.parent
CHUNK = vault_stream.CHUNK
RSS_GROWTH_LIMIT_MB = 64


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]  # a file's spec has a loader
    return module


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


# --------------------------------------------------------------------------
# memory: 1 GB through a real proxy
# --------------------------------------------------------------------------


def test_1gb_instance_is_received_with_bounded_memory(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    if free < 5 << 30:
        pytest.skip(f"needs 5 GB free in {tmp_path} (source, incoming, studies)")
    big = tmp_path / "src" / "enhanced-ct-1gb.dcm"
    big.parent.mkdir()
    workdir = tmp_path / "p"
    try:
        # ~1.05 GB, written frame by frame (never whole in memory)
        size = _load_bench("deid_memory").write_instance(big, 2000)
        assert size > 1_000_000_000
        with tools.ProxyProcess(workdir) as proxy:
            # warm-up: one small instance first, so imports and first-use allocations are done
            series = dicomgen.make_small_series(tmp_path / "warm", 1)
            assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
            wait_indexed(proxy.spool, 1)
            before = _status_kb(proxy.pid, "VmRSS")
            result = tools.storescu(proxy.dicom_port, [big], timeout=900)
            peak = _status_kb(proxy.pid, "VmHWM")
            assert result.returncode == 0, result.stderr[-2000:]
            assert len(tools.acked_files(result)) == 1
            growth_mb = (peak - before) / 1024
            print(
                f"proxy RSS before {before / 1024:.0f} MB, peak after {peak / 1024:.0f} MB, "
                f"growth {growth_mb:.1f} MB for a {size / 1e6:.0f} MB instance"
            )
            assert growth_mb < RSS_GROWTH_LIMIT_MB
            assert not list((proxy.spool / "tmp").iterdir())
            wait_indexed(proxy.spool, 2, timeout=600)
            assert max(f.stat().st_size for f in stored_files(proxy.spool)) > 1_000_000_000
            assert not list((proxy.spool / "quarantine").rglob("*"))
    finally:
        shutil.rmtree(big.parent, ignore_errors=True)
        shutil.rmtree(workdir / "spool", ignore_errors=True)


# --------------------------------------------------------------------------
# the push-style encrypting writer: the v2 format of encrypt_stream
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_encrypting_writer_writes_the_v2_file_of_encrypt_stream(tmp_path: Path, size: int) -> None:
    keyring = Keyring([Keyring.generate_key()])
    rng = random.Random(size)
    data = rng.randbytes(size)
    out: list[bytes] = []
    writer = vault_stream.encryptor(keyring)(lambda parts: out.extend(bytes(p) for p in parts))
    at = 0
    while at < size:  # fragments of PDV-like, irregular sizes
        step = rng.choice((1, 7, 16378, 65536, CHUNK + 3))
        writer.write(data[at : at + step])
        at += step
    writer.close()
    pushed = tmp_path / "pushed"
    pushed.write_bytes(b"".join(out))
    pulled = b"".join(vault_stream.encrypt_stream(keyring, [data]))
    assert pushed.stat().st_size == len(pulled)
    assert out[0].startswith(pulled[: vault_stream.HEADER_V2 - 16])  # same magic, chunk, key id
    with vault_stream.open_source(pushed, keyring) as fh:
        assert fh.read() == data
    assert vault_stream.digest(pushed, keyring)["size"] == size


# --------------------------------------------------------------------------
# the first-element check, whatever the fragmentation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first, big_endian, refused",
    [
        (b"\x02\x00\x10\x00", False, True),  # (0002,0010) file meta
        (b"\x00\x00\x00\x09", False, True),  # (0000,0900) a command element
        (b"\x07\x00\x10\x00", False, True),  # group 0007: illegal
        (b"\x04\x00\x11\x15", False, True),  # (0004,1511): Directory Structuring, DICOMDIR only
        (b"\x08\x00\x05\x00", False, False),  # (0008,0005): a data set
        (b"\x00\x02\x00\x10", True, True),  # big endian (0002,0010)
        (b"\x00\x08\x00\x05", True, False),  # big endian (0008,0005)
    ],
)
@pytest.mark.parametrize("split", [1, 2, 4])
def test_first_element_check(
    tmp_path: Path, first: bytes, big_endian: bool, refused: bool, split: int
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    incoming = scp_stream.Incoming(spool, b"HEAD", None, big_endian, 1 << 20, 0)
    data = first + b"UI\x02\x001\x00"
    for i in range(0, len(data), split):
        assert incoming.write(memoryview(data[i : i + split]))
    status, name = incoming.finish()
    if refused:
        assert (status, name) == (scp_stream.CANNOT_UNDERSTAND, None)
        assert spool.incoming_names() == []
    else:
        assert status == 0 and (spool.incoming / name).read_bytes() == b"HEAD" + data
    assert not list(spool.tmp.iterdir())


def test_size_limit_and_empty_data_set(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    incoming = scp_stream.Incoming(spool, b"HEAD", None, False, 3 * CHUNK, 0)
    piece = bytes(16384)
    while incoming.write(memoryview(b"\x08\x00" + piece)):
        assert incoming.size <= 3 * CHUNK
    assert incoming.size > 3 * CHUNK and not list(spool.tmp.iterdir())
    assert incoming.finish() == (scp_stream.CANNOT_UNDERSTAND, None)
    empty = scp_stream.Incoming(spool, b"HEAD", None, False, CHUNK, 0)
    assert empty.finish() == (scp_stream.CANNOT_UNDERSTAND, None)
    assert spool.incoming_names() == [] and not list(spool.tmp.iterdir())


# --------------------------------------------------------------------------
# the pynetdicom version check
# --------------------------------------------------------------------------


def test_version_check() -> None:
    scp_stream.check_library()  # the installed one is what it was written for
    with pytest.raises(scp_stream.LibraryMismatch, match=r"pynetdicom 3\.0\.5"):
        scp_stream.check_library("3.0.5")


def test_proxy_refuses_to_start_on_another_pynetdicom(tmp_path: Path) -> None:
    """A real `run` in a process whose pynetdicom says it is 3.0.5."""
    code = (
        "import sys, pynetdicom; pynetdicom.__version__ = '3.0.5'; "
        "from ith_proxy.cli import main; sys.exit(main(['run']))"
    )
    proxy = tools.ProxyProcess(tmp_path / "p", command=[sys.executable, "-c", code])
    with pytest.raises(tools.ProxyStartError, match="exited with code 1"):
        proxy.start(timeout=60)
    proxy.stop()
    err = proxy.stderr_text().strip().splitlines()
    assert len(err) == 1, err
    assert "pynetdicom 3.0.5" in err[0] and "3.0.4" in err[0]
    assert not (tmp_path / "p" / "spool" / "incoming").exists()  # nothing was set up
    assert os.path.exists(tmp_path / "p" / "proxy.ini")
