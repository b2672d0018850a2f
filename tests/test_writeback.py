"""The SCP starts the writeback of a large instance while it still arrives
(``Spool.write_tmp(kick=True)`` every ``scp_stream.WRITEBACK`` bytes, issue
11): a hint to the kernel, so the fsync before the answer finds less to
write.  A small instance never asks; what is kept is byte for byte what was
sent, and the answer still comes after the fsync (tests/test_durability*)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

import dicomgen
import tools
from ith_proxy.dicom import scp_stream
from ith_proxy.dicom.scp import StorageSCP
from worker_rooms import Rooms


def test_a_large_instance_is_written_back_as_it_arrives(tmp_path: Path) -> None:
    large = dicomgen.make_ct_series(tmp_path / "large", 1, rows=768, cols=768)  # ~1.2 MB
    small = dicomgen.make_small_series(tmp_path / "small", 1)
    env = {"DICOM_PORT": str(tools.free_port()), "DICOM_BIND_ADDRESS": "127.0.0.1"}
    rooms = Rooms(tmp_path, "[spool]\nencrypt_incoming = false\n", env)
    kicks: list[int] = []
    real = rooms.spool._sync_file_range
    assert real is not None  # Linux: libc has it

    def counted(fd: int, offset: int, nbytes: int, flags: int) -> int:
        kicks.append(flags)
        return real(fd, offset, nbytes, flags)

    rooms.spool._sync_file_range = counted
    server = StorageSCP(rooms.cfg, rooms.spool)
    server.start()
    try:
        with rooms.scu() as assoc:
            assert assoc.send_c_store(dcmread(small.files[0])).Status == 0x0000
            assert kicks == []  # 10 KB: never
            assert assoc.send_c_store(dcmread(large.files[0])).Status == 0x0000
    finally:
        server.stop()
    size = large.files[0].stat().st_size
    # at most once per WRITEBACK bytes; how often depends on how much the writer
    # holds before it writes (here plaintext, held up to ~1 MiB)
    assert 1 <= len(kicks) <= size // scp_stream.WRITEBACK + 1
    assert set(kicks) == {2}  # SYNC_FILE_RANGE_WRITE: start, never wait
    try:
        kept = sorted(
            rooms.spool.incoming_path(n).read_bytes() for n in rooms.spool.incoming_names()
        )
        sent = large.files[0].read_bytes()
        pixels = sent[-(768 * 768 * 2) :]
        assert len(kept) == 2 and any(k.endswith(pixels) for k in kept)
    finally:
        rooms.close()
