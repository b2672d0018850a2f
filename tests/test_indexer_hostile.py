"""Hostile input at the indexer (issue 6): file meta injected in the dataset
(a deflate bomb), the indexer's memory ceiling, and a SOP Instance UID
reused in another study.  Workers driven through run_once() on real spool
folders, plus the real service for the memory figures."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import dicomgen
import tools
from helpers import (
    catalog_counts,
    same_sop_other_study,
    stored_files,
    vault_records,
    wait_indexed,
    wait_until,
)
from ith_proxy.dicom import files as dicomfile
from ith_proxy.dicom import scp
from ith_proxy.workers.reindex import reindex

REPO = Path(__file__).resolve().parent.parent
DEFLATE_TS = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
INFLATED_MB = 400


def _explicit(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _body(path: Path) -> bytes:
    """The dataset of a Part 10 file, after its file meta group."""
    raw = path.read_bytes()
    return raw[144 + struct.unpack("<L", raw[140:144])[0] :]


def _as_received(dataset: bytes, sop_class: str, sop: str, ts: str = EXPLICIT_LE) -> bytes:
    """What the SCP writes to incoming/: our file meta, then the dataset as sent."""
    return scp.file_header(sop_class, sop, ts, "HOSTILE") + dataset


def deflate_bomb() -> bytes:
    """A dataset whose first element says deflate, followed by a deflated
    stream of INFLATED_MB MB of zeros (about 0.4 MB on the wire)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = bytes(1 << 20)
    stream = b"".join(comp.compress(block) for _ in range(INFLATED_MB)) + comp.flush()
    return _explicit(0x0002, 0x0010, b"UI", DEFLATE_TS.encode()) + stream


_CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_DATA, (300 << 20, resource.RLIM_INFINITY))  # fail fast
from ith_proxy.dicom import files as dicomfile
try:
    dicomfile.read_split(sys.argv[1])
    outcome = "parsed"
except BaseException as exc:
    outcome = f"{type(exc).__name__}: {exc}"
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"outcome": outcome, "vmhwm_mb": hwm / 1024}))
"""


def _read_split_in_child(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout)


def _indexer_pid(proxy: tools.ProxyProcess) -> int:
    for task in Path(f"/proc/{proxy.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if Path(f"/proc/{child}/comm").read_text().strip() == "ith-indexer":
                return int(child)
    raise AssertionError("no indexer process")


def _proc_field(pid: int, name: str) -> str:
    return next(
        line.split(":", 1)[1].strip()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith(name + ":")
    )


def _data_limit(pid: int) -> str:
    line = next(
        x
        for x in Path(f"/proc/{pid}/limits").read_text().splitlines()
        if x.startswith("Max data size")
    )
    return line.split()[3]


def _drop_incoming(spool: Path, name: str, data: bytes) -> None:
    """Put a file in incoming/ as the SCP does (written in tmp/, renamed)."""
    tmp = spool / "tmp" / name
    tmp.write_bytes(data)
    os.rename(tmp, spool / "incoming" / name)


# --- file meta: read up to its group length, never taken from the dataset ---


def test_deflate_bomb_in_the_dataset_is_refused_before_inflating(tmp_path) -> None:
    """(0002,0010)=deflate at the head of the dataset must not override the
    negotiated transfer syntax in our meta, and nothing is ever inflated."""
    series = dicomgen.make_instance(tmp_path / "in")
    bomb = tmp_path / "bomb"
    bomb.write_bytes(_as_received(deflate_bomb(), series.sop_class_uid, series.sop_uids[0]))
    assert bomb.stat().st_size < 1 << 20
    result = _read_split_in_child(bomb)
    assert result["outcome"].startswith("DicomFileError: dataset holds file meta"), result
    assert result["vmhwm_mb"] < 120, result  # inflating would need > INFLATED_MB


def test_file_meta_is_ours_up_to_its_group_length(tmp_path) -> None:
    """Group-0002 elements after our meta (here: a transfer syntax that is
    not the negotiated one) are refused, not merged into the meta; the
    negotiated transfer syntax decodes the dataset."""
    series = dicomgen.make_instance(tmp_path / "in")
    body = _body(series.files[0])
    injected = _explicit(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2\x00") + body
    path = tmp_path / "injected"
    path.write_bytes(_as_received(injected, series.sop_class_uid, series.sop_uids[0]))
    with pytest.raises(dicomfile.DicomFileError, match="file meta or command elements"):
        dicomfile.read_split(path)
    # later in the body, too (out of order, so past the first-element check)
    ds_bytes = _explicit(0x0008, 0x0016, b"UI", series.sop_class_uid.encode() + b"\x00")
    later = tmp_path / "later"
    later.write_bytes(
        _as_received(
            ds_bytes + _explicit(0x0002, 0x0010, b"UI", DEFLATE_TS.encode()),
            series.sop_class_uid,
            series.sop_uids[0],
        )
    )
    with pytest.raises(dicomfile.DicomFileError, match="file meta or command elements"):
        dicomfile.read_split(later)
    clean = tmp_path / "clean"
    clean.write_bytes(_as_received(body, series.sop_class_uid, series.sop_uids[0]))
    split = dicomfile.read_split(clean)
    assert split.transfer_syntax == EXPLICIT_LE
    assert split.header.file_meta.SourceApplicationEntityTitle == "HOSTILE"
    assert str(split.header.SOPInstanceUID) == series.sop_uids[0]


def test_deflate_bomb_in_incoming_is_quarantined_with_bounded_memory(tmp_path) -> None:
    """End to end: the bomb waits in incoming/ (as from before the SCP
    refused it); the indexer quarantines it and its peak RSS stays small,
    and the instances around it are indexed."""
    series = dicomgen.make_small_series(tmp_path / "in", 2)
    bomb = _as_received(deflate_bomb(), series.sop_class_uid, series.sop_uids[0])
    with tools.ProxyProcess(tmp_path / "proxy") as proxy:  # the 1 GB ceiling does not bound it
        _drop_incoming(proxy.spool, "1000-bomb", bomb)
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_indexed(proxy.spool, 2)
        info = json.loads(
            (proxy.spool / "quarantine" / "unparseable" / "1000-bomb.json").read_text()
        )
        assert info["error"].startswith("dataset holds file meta")
        hwm_kb = int(_proc_field(_indexer_pid(proxy), "VmHWM").split()[0])
        assert hwm_kb < 200 * 1024, f"indexer peaked at {hwm_kb // 1024} MB"


# --- the indexer's memory ceiling ---


def _huge_length_file(series) -> bytes:
    """A small file whose first element declares a 2 GB value: reading it
    asks for that much memory at once."""
    huge = struct.pack("<HH2s2xL", 0x0008, 0x0001, b"UN", 0x7FFFFFF0)
    return _as_received(huge + _body(series.files[0]), series.sop_class_uid, series.sop_uids[0])


def test_memory_ceiling_fails_one_file_not_the_indexer(tmp_path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 3)
    with tools.ProxyProcess(tmp_path / "proxy") as proxy:  # default memory_limit_mb
        pid = _indexer_pid(proxy)
        wait_until(lambda: _data_limit(pid) != "unlimited", 60, "the indexer's limit")
        assert _data_limit(pid) == str(1024 << 20)
        _drop_incoming(proxy.spool, "1000-huge", _huge_length_file(series))
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_indexed(proxy.spool, 3)
        info = json.loads((proxy.spool / "quarantine" / "failed" / "1000-huge.json").read_text())
        assert info["error"].startswith("internal error: MemoryError"), info
        assert info["attempts"] == 1
        assert _indexer_pid(proxy) == pid  # the same process: nothing was killed


def test_memory_limit_zero_means_no_ceiling(tmp_path) -> None:
    series = dicomgen.make_instance(tmp_path / "in")
    with tools.ProxyProcess(
        tmp_path / "proxy", config_text="[indexer]\nmemory_limit_mb = 0\n"
    ) as proxy:
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_indexed(proxy.spool, 1)  # the indexer is past its start-up
        assert _data_limit(_indexer_pid(proxy)) == "unlimited"


# --- a SOP Instance UID reused in another study ---


def test_reused_sop_uid_in_another_study_is_quarantined(rooms, tmp_path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 2)
    rooms.drop("1-a", series.files[0].read_bytes())
    rooms.drop("2-b", series.files[1].read_bytes())
    assert rooms.indexer.run_once() == 2
    before = {p: p.read_bytes() for p in stored_files(rooms.spool.root)}
    sop = rooms.catalog.conn.execute(
        "SELECT sop_uid, study_uid, vault_offset FROM instances ORDER BY received_at"
    ).fetchall()
    # the same instance again (idempotent), and its UID reused in another study,
    # both in one batch and in a later one
    rooms.drop("3-resend", series.files[0].read_bytes())
    rooms.drop("4-reuse", same_sop_other_study(series.files[0], tmp_path / "x.dcm"))
    assert rooms.indexer.run_once() == 2
    rooms.drop("5-reuse", same_sop_other_study(series.files[1], tmp_path / "y.dcm"))
    assert rooms.indexer.run_once() == 1
    q = rooms.spool.quarantine_dir / "inconsistent"
    assert sorted(p.name for p in q.iterdir()) == [
        "4-reuse",
        "4-reuse.json",
        "5-reuse",
        "5-reuse.json",
    ]
    assert (
        json.loads((q / "4-reuse.json").read_text())["error"]
        == "SOP Instance UID already recorded in another study or series"
    )
    assert {p: p.read_bytes() for p in stored_files(rooms.spool.root)} == before
    assert (
        rooms.catalog.conn.execute(
            "SELECT sop_uid, study_uid, vault_offset FROM instances ORDER BY received_at"
        ).fetchall()
        == sop
    )
    assert len(vault_records(rooms.root)) == 2  # the re-send reused its own record
    assert catalog_counts(rooms.spool.root)["studies"] == 1


def test_a_vault_record_serves_only_its_own_instance(rooms, tmp_path) -> None:
    """A record for the same SOP UID under another study (as today's main
    wrote when a UID was reused) never becomes another instance's record."""
    series = dicomgen.make_small_series(tmp_path / "in", 1)
    rooms.drop("1-a", series.files[0].read_bytes())
    assert rooms.indexer.run_once() == 1
    sop, study, offset = rooms.catalog.conn.execute(
        "SELECT sop_uid, study_uid, vault_offset FROM instances"
    ).fetchone()
    own = rooms.vault.get(offset)
    foreign = {**own, "study": "1.2.3.4", "series": "1.2.3.4.5"}
    rooms.vault.put(foreign)  # later in the vault than the instance's own record
    rooms.vault.sync()
    reindex(rooms.spool, rooms.catalog, rooms.vault)
    assert rooms.catalog.instance_vault_offset(sop) == offset
    # and the indexer does not reuse a record that names another instance
    rooms.catalog.conn.execute("UPDATE instances SET vault_offset = ?", (rooms.vault.put(foreign),))
    rooms.drop("2-again", series.files[0].read_bytes())
    assert rooms.indexer.run_once() == 1
    fresh = rooms.catalog.instance_vault_offset(sop)
    assert rooms.vault.get(fresh) == own
    assert study == own["study"]
