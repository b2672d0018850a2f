"""Hostile C-STOREs against a real proxy process (issue 6, SCP part).

A pynetdicom SCU in this process sends hand-made data sets and P-DATA:

- a data set whose first element is in a group below 0x0008 (here injected
  file meta naming deflate) is refused with 0xC000 and leaves nothing in
  tmp/ or incoming/;
- a C-STORE is streamed to spool/tmp/ while it arrives (encrypted there, no
  plaintext in the system temp dir), and the partial file of an aborted
  association is removed;
- an instance past ``[scp] max_instance_mb`` aborts its association, and
  other associations, before and after, go on.
"""

from __future__ import annotations

import struct
import time
from io import BytesIO
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

import tools
from helpers import stored_files, wait_indexed, wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CANARY = b"Hostile^Canary^QX7"


def _el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    if vr in (b"OB", b"OW", b"UN", b"SQ"):
        return struct.pack("<HH2s2xL", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _dataset(sop: str, pixel_bytes: int = 512, meta: bool = False) -> bytes:
    """Explicit VR LE CT data set (16-bit pixels); with ``meta``,
    injected (0002,xxxx) first."""
    cols = 16 if pixel_bytes < 1024 else 512
    head = b""
    if meta:  # what a hostile sender puts in front: deflate, never negotiated
        head = _el(2, 0x0001, b"OB", b"\x00\x01") + _el(2, 0x0010, b"UI", b"1.2.840.10008.1.2.1.99")
    body = b"".join(
        (
            _el(0x0008, 0x0016, b"UI", CT.encode()),
            _el(0x0008, 0x0018, b"UI", sop.encode()),
            _el(0x0008, 0x0060, b"CS", b"CT"),
            _el(0x0010, 0x0010, b"PN", CANARY),
            _el(0x0010, 0x0020, b"LO", b"HOSTILE-1"),
            _el(0x0020, 0x000D, b"UI", b"1.2.826.0.1.3680043.8.498.1"),
            _el(0x0020, 0x000E, b"UI", b"1.2.826.0.1.3680043.8.498.2"),
            _el(0x0028, 0x0002, b"US", struct.pack("<H", 1)),
            _el(0x0028, 0x0004, b"CS", b"MONOCHROME2"),
            _el(0x0028, 0x0010, b"US", struct.pack("<H", pixel_bytes // (2 * cols))),
            _el(0x0028, 0x0011, b"US", struct.pack("<H", cols)),
            _el(0x0028, 0x0100, b"US", struct.pack("<H", 16)),
            _el(0x0028, 0x0101, b"US", struct.pack("<H", 16)),
            _el(0x0028, 0x0102, b"US", struct.pack("<H", 15)),
            _el(0x0028, 0x0103, b"US", struct.pack("<H", 0)),
        )
    )
    return head + body + _el(0x7FE0, 0x0010, b"OW", bytes(pixel_bytes))


def _associate(port: int, calling: str = "HOSTILE"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(CT, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMRCV", max_pdu=16384)
    assert assoc.is_established
    return assoc


def _request(sop: str, data: bytes, msg_id: int = 1) -> C_STORE:
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = sop
    req.Priority = 2
    req.DataSet = BytesIO(data)
    return req


def _store(assoc, sop: str, data: bytes) -> int:
    """One whole C-STORE; the status the proxy answered."""
    assoc._reactor_checkpoint.clear()  # as send_c_store: the reactor must not take the reply
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        assoc.dimse.send_msg(_request(sop, data), assoc.accepted_contexts[0].context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert rsp is not None, "no C-STORE response"
    return int(rsp.Status)


def _send_all_but_last(assoc, sop: str, data: bytes, keep: int = 2) -> None:
    """Every P-DATA of a C-STORE but the last ``keep``: the message stays unfinished."""
    msg = C_STORE_RQ()
    msg.primitive_to_message(_request(sop, data))
    pdus = list(msg.encode_msg(assoc.accepted_contexts[0].context_id, 16384))
    for pdu in pdus[: len(pdus) - keep]:
        assoc.dul.send_pdu(pdu)


def _files(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_file()] if path.exists() else []


@pytest.fixture
def proxy(tmp_path: Path):
    systmp = tmp_path / "system-tmp"
    systmp.mkdir()
    with tools.ProxyProcess(tmp_path / "p", env={"TMPDIR": str(systmp)}) as p:
        p.system_tmp = systmp  # type: ignore[attr-defined]  # the fixture adds the proxy's TMPDIR
        yield p


def test_dataset_starting_below_group_0008_is_refused(proxy) -> None:
    assoc = _associate(proxy.dicom_port)
    try:
        status = _store(
            assoc,
            "1.2.826.0.1.3680043.8.498.10",
            _dataset("1.2.826.0.1.3680043.8.498.10", meta=True),
        )
        assert status == 0xC000  # Cannot understand (PS3.4 B.2.3)
        # the same association goes on: a well-formed instance is stored
        assert (
            _store(assoc, "1.2.826.0.1.3680043.8.498.11", _dataset("1.2.826.0.1.3680043.8.498.11"))
            == 0x0000
        )
    finally:
        assoc.release()
    spool = proxy.spool
    # only the good one ever reached incoming/, and it is de-identified
    wait_indexed(spool, 1, timeout=60)
    # nothing of the refused one stays in tmp/ (the indexer writes its own
    # outputs through tmp/ too, so a file may pass through: a leak stays)
    wait_until(lambda: _files(spool / "tmp") == [], 15, "an empty spool/tmp/")
    assert len(stored_files(spool)) == 1
    assert not list((spool / "quarantine").rglob("*")), "something was quarantined"
    assert proxy.running and proxy.health()[0] == 200


def test_partial_instance_streams_encrypted_to_spool_tmp_and_abort_removes_it(proxy) -> None:
    spool = proxy.spool
    sop = "1.2.826.0.1.3680043.8.498.20"
    assoc = _associate(proxy.dicom_port)
    try:
        _send_all_but_last(assoc, sop, _dataset(sop, pixel_bytes=6 << 20))
        # the bytes are on disk in spool/tmp/ before the message is complete
        partial = wait_until(
            lambda: [p for p in _files(spool / "tmp") if p.stat().st_size > 1 << 20],
            30,
            "a partial instance in spool/tmp/",
        )
        raw = partial[0].read_bytes()
        assert raw.startswith(b"ITH-PROXY-ENCRYPTED v2\n")  # encrypt_incoming is on by default
        assert CANARY not in raw
        assert _files(spool / "incoming") == []
    finally:
        assoc.abort()
    wait_until(lambda: not _files(spool / "tmp"), 30, "the partial file removed")
    assert list(proxy.system_tmp.rglob("*")) == []  # nothing in the system temp dir
    assert _files(spool / "incoming") == []
    # the proxy is healthy and the next association stores normally
    assoc = _associate(proxy.dicom_port)
    try:
        assert _store(assoc, sop, _dataset(sop, pixel_bytes=3 << 20)) == 0x0000
    finally:
        assoc.release()
    assert proxy.running and proxy.health()[0] == 200


def test_instance_past_max_instance_mb_aborts_only_its_association(tmp_path: Path) -> None:
    ini = "[scp]\nmax_instance_mb = 4\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        spool = proxy.spool
        big = _associate(proxy.dicom_port, "BIGSENDER")
        other = _associate(proxy.dicom_port, "OTHER")
        try:
            sop = "1.2.826.0.1.3680043.8.498.30"
            _send_all_but_last(big, sop, _dataset(sop, pixel_bytes=3 << 20))  # under the limit
            assert (
                _store(
                    other, "1.2.826.0.1.3680043.8.498.31", _dataset("1.2.826.0.1.3680043.8.498.31")
                )
                == 0x0000
            )
            _send_all_but_last(
                big,
                "1.2.826.0.1.3680043.8.498.32",
                _dataset("1.2.826.0.1.3680043.8.498.32", pixel_bytes=6 << 20),
                0,
            )
            wait_until(lambda: big.is_aborted, 30, "the over-size association aborted")
            # the other association goes on, and new ones are served
            assert (
                _store(
                    other, "1.2.826.0.1.3680043.8.498.33", _dataset("1.2.826.0.1.3680043.8.498.33")
                )
                == 0x0000
            )
        finally:
            other.release()
            big.abort()
        wait_until(lambda: not _files(spool / "tmp"), 30, "no partial file left in tmp/")
        result = tools.echoscu(proxy.dicom_port)
        assert result.returncode == 0, result.stderr
        assert proxy.running and proxy.health()[0] == 200
        assert "max_instance_mb" in (spool / "logs" / "dicom.log").read_text()


def test_pdu_longer_than_announced_closes_the_connection(proxy) -> None:
    """pynetdicom would read a PDU of any announced length into memory whole;
    one longer than our maximum PDU length (here 64 MiB) is refused at its header."""
    import socket

    assoc = _associate(proxy.dicom_port)
    try:
        raw = assoc.dul.socket.socket
        raw.sendall(b"\x04\x00" + struct.pack(">L", 64 << 20) + bytes(1 << 16))

        def closed() -> bool:
            try:
                raw.sendall(bytes(1 << 16))
            except OSError:
                return True
            try:
                raw.settimeout(0.05)
                return raw.recv(1 << 16, socket.MSG_PEEK) == b""
            except TimeoutError:
                return False
            except OSError:
                return True

        wait_until(closed, 30, "the proxy closing the connection", interval=0.05)
    finally:
        assoc.abort()
    assert _files(proxy.spool / "tmp") == []
    result = tools.echoscu(proxy.dicom_port)
    assert result.returncode == 0, result.stderr
    assert proxy.running and proxy.health()[0] == 200
