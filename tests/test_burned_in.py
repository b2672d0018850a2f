"""Burned-in risk beyond Burned In Annotation (issue 6): Recognizable Visual
Features YES, and text in the codestream of encapsulated pixel data (JPEG
COM / APPn, JPEG 2000 COM), which de-identifying the header would copy.

Real JPEG codestreams come from DCMTK (dcmcjpeg, dcmcjpls) compressing
generated images; segments are then injected into them.  JPEG 2000
codestreams (no encoder here) are built marker by marker.  The room
(codestream.scan) is tested directly, the indexer through worker_rooms,
and one instance of each kind end to end through the proxy with storescu.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import generate_frames

import dicomgen
import tools
from helpers import find_bytes, stored_files, vault_records, wait_until
from ith_proxy.dicom import files as dicomfile
from ith_proxy.vault import stream as vault_stream
from worker_rooms import Rooms

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
TOKEN = "PHIMARK-CODESTREAM-7f3a"  # stands for a patient name in a comment


# --------------------------------------------------------------------------
# making codestreams
# --------------------------------------------------------------------------


def _segment(code: int, payload: bytes) -> bytes:
    return bytes([0xFF, code]) + struct.pack(">H", len(payload) + 2) + payload


COM = _segment(0xFE, b"Patient: " + TOKEN.encode())
EXIF = _segment(0xE1, b"Exif\x00\x00MM\x00\x2a" + TOKEN.encode())
JFIF_THUMB = _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x01\x01\xff\x00\x00")
ADOBE = _segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01")
ADOBE_LONG = _segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01" + TOKEN.encode())


def _compress(src: Path, out: Path, tool: str = "dcmcjpeg", *args: str) -> Path:
    result = tools.run_tool([tool, *args, str(src), str(out)])
    assert result.returncode == 0, result.stderr
    return out


def _edit(path: Path, out: Path, change) -> Path:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(out, enforce_file_format=True)
    return out


def _rgb(ds) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes((i * 7) % 251 for i in range(ds.Rows * ds.Columns * 3))


def _multiframe(n: int):
    def change(ds) -> None:
        ds.NumberOfFrames = n
        ds.PixelData = ds.PixelData * n

    return change


def _frames(path: Path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))


def _encapsulate(fragments: list[bytes]) -> bytes:
    out = struct.pack("<HHL", 0xFFFE, 0xE000, 0)  # empty Basic Offset Table
    for frag in fragments:
        frag += b"\x00" * (len(frag) % 2)
        out += struct.pack("<HHL", 0xFFFE, 0xE000, len(frag)) + frag
    return out


def _split(frame: bytes, at: list[int]) -> list[bytes]:
    bounds = [0, *at, len(frame)]
    return [frame[a:b] for a, b in itertools.pairwise(bounds)]


def _with_pixels(path: Path, out: Path, fragments: list[bytes]) -> Path:
    """path's dataset with its encapsulated pixel data replaced by fragments."""

    def change(ds) -> None:
        ds.PixelData = _encapsulate(fragments)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True

    return _edit(path, out, change)


def _insert(frame: bytes, at: int, segment: bytes) -> bytes:
    return frame[:at] + segment + frame[at:]


def _scan(path: Path) -> list[str]:
    from ith_proxy.dicom import codestream

    split = dicomfile.read_split(path)
    with open(path, "rb") as fh:
        return codestream.scan(fh, split)


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory) -> dict[str, Path]:
    """Clean DCMTK output: lossless JPEG (with DCMTK's JFIF APP0), a 3-frame
    one, JPEG-LS, and uninterleaved colour JPEG-LS (one scan per component)."""
    d = tmp_path_factory.mktemp("jpeg")
    ct = dicomgen.make_ct_series(d / "ct", 1, rows=64, cols=64).files[0]
    multi = _edit(ct, d / "multi.dcm", _multiframe(3))
    rgb = _edit(ct, d / "rgb.dcm", _rgb)
    return {
        "lossless": _compress(ct, d / "lossless.dcm"),
        "multi": _compress(multi, d / "multi-jpeg.dcm"),
        "ls": _compress(ct, d / "ls.dcm", "dcmcjpls"),
        "ls-rgb": _compress(rgb, d / "ls-rgb.dcm", "dcmcjpls", "+in"),
    }


# --------------------------------------------------------------------------
# the room: codestream.scan
# --------------------------------------------------------------------------


def test_clean_dcmtk_output_has_no_finding(jpeg) -> None:
    for name, path in jpeg.items():
        assert _frames(path)[0][:2] == b"\xff\xd8", name
        assert _scan(path) == [], name
    assert b"JFIF" in _frames(jpeg["lossless"])[0][:20]  # structural APP0, allowed


@pytest.mark.parametrize(
    "segment,finding",
    [
        (COM, "JPEG COM segment"),
        (EXIF, "JPEG APP1 segment"),
        (JFIF_THUMB, "JPEG APP0 segment"),
        (ADOBE_LONG, "JPEG APP14 segment"),
        (ADOBE, None),
    ],
    ids=["com", "app1-exif", "app0-thumbnail", "app14-long", "app14-adobe"],
)
def test_com_and_app_segments_are_found(jpeg, tmp_path, segment, finding) -> None:
    frame = _insert(_frames(jpeg["lossless"])[0], 2, segment)
    found = _scan(_with_pixels(jpeg["lossless"], tmp_path / "x.dcm", [frame]))
    if finding is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith(f"frame 1: {finding}")
        assert TOKEN not in found[0]


@pytest.mark.parametrize(
    "at",
    [[4], [2, 20], [2, 4, 6, 8], [22]],
    ids=["in-marker", "after-app0", "two-byte-fragments", "in-length"],
)
def test_a_segment_split_across_fragments_is_found(jpeg, tmp_path, at) -> None:
    """A frame's header may span fragments; the marker itself may be split."""
    frame = _frames(jpeg["lossless"])[0]
    assert frame[2:4] == b"\xff\xe0" and len(frame) > 64
    # after DCMTK's 18-byte APP0: a fill byte, then COM (FF | FF FE at 20..22)
    frame = _insert(frame, 20, b"\xff" + COM + b"\xff")  # two fills keep every split even
    found = _scan(_with_pixels(jpeg["lossless"], tmp_path / "x.dcm", _split(frame, at)))
    assert [f[:25] for f in found] == ["frame 1: JPEG COM segment"]


def test_each_frame_is_checked(jpeg, tmp_path) -> None:
    frames = _frames(jpeg["multi"])
    assert len(frames) == 3
    frames[2] = _insert(frames[2], 2, COM)
    found = _scan(_with_pixels(jpeg["multi"], tmp_path / "x.dcm", frames))
    assert [f[:25] for f in found] == ["frame 3: JPEG COM segment"]
    # a frame in two fragments: the second fragment is not a new frame
    frames = _frames(jpeg["multi"])
    fragments = [frames[0], *_split(frames[1], [100]), _insert(frames[2], 2, EXIF)]
    found = _scan(_with_pixels(jpeg["multi"], tmp_path / "y.dcm", fragments))
    assert [f[:26] for f in found] == ["frame 3: JPEG APP1 segment"]


def test_segments_between_scans_are_found(jpeg, tmp_path) -> None:
    """Uninterleaved colour JPEG-LS has one scan per component; a COM between
    them is found by searching the coded data for the next marker."""
    frame = _frames(jpeg["ls-rgb"])[0]
    sos = [i for i in range(len(frame) - 1) if frame[i : i + 2] == b"\xff\xda"]
    assert len(sos) == 3
    for where in sos[1:]:
        bad = _insert(frame, where, COM)
        found = _scan(_with_pixels(jpeg["ls-rgb"], tmp_path / "x.dcm", [bad]))
        assert [f[:25] for f in found] == ["frame 1: JPEG COM segment"]
        # also when the coded data before it spans fragments
        half = (where // 2) & ~1
        found = _scan(_with_pixels(jpeg["ls-rgb"], tmp_path / "y.dcm", _split(bad, [half])))
        assert [f[:25] for f in found] == ["frame 1: JPEG COM segment"]


def test_a_frame_that_is_not_a_plain_codestream_cannot_be_checked(jpeg, tmp_path) -> None:
    frame = _frames(jpeg["lossless"])[0]
    jp2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + frame
    for fragments, why in (
        ([jp2], "does not start with SOI"),
        ([frame[:40]], "truncated"),
        ([frame[:2] + b"\x00" + frame[3:]], "marker is missing"),
    ):
        found = _scan(_with_pixels(jpeg["lossless"], tmp_path / "x.dcm", fragments))
        assert len(found) == 1 and why in found[0] and "cannot be checked" in found[0]


def test_the_scan_reads_only_marker_segments(jpeg, tmp_path) -> None:
    """Bounded work: a 4 MB frame costs a few KB of reads."""
    from ith_proxy.dicom import codestream

    frame = _frames(jpeg["lossless"])[0]
    sos = frame.index(b"\xff\xda")
    end = sos + 2 + struct.unpack(">H", frame[sos + 2 : sos + 4])[0]
    big = frame[:end] + b"\x5a" * (4 << 20) + b"\xff\xd9"
    path = _with_pixels(jpeg["lossless"], tmp_path / "big.dcm", [big] + [big] * 3)
    split = dicomfile.read_split(path)

    class Counting(io.FileIO):
        total = 0

        def read(self, n=-1):
            data = super().read(n)
            Counting.total += len(data)
            return data

    with Counting(path, "rb") as fh:
        assert codestream.scan(fh, split) == []
    assert Counting.total < 64 * 1024, Counting.total


# JPEG 2000: SOC, SIZ, COD, QCD, [main], then tile-parts SOT [tile] SOD data, EOC
def _j2k(main: bytes = b"", tile: tuple[bytes, ...] = (b"", b"")) -> bytes:
    siz = _segment(
        0x51, struct.pack(">HLLLLLLLLH", 0, 64, 64, 0, 0, 32, 64, 0, 0, 1) + b"\x0f\x01\x01"
    )
    cod = _segment(0x52, bytes([0, 0, 0, 1, 0, 5, 4, 4, 0, 1]))
    qcd = _segment(0x5C, b"\x40" + b"\x48" * 16)
    parts = b""
    for i, extra in enumerate(tile):
        data = bytes((j * 13) % 0x8F for j in range(300))  # no FF in it
        body = extra + b"\xff\x93" + data
        psot = 12 + len(body)
        parts += _segment(0x90, struct.pack(">HLBB", i, psot, 0, 1)) + body
    return b"\xff\x4f" + siz + cod + qcd + main + parts + b"\xff\xd9"


@pytest.mark.parametrize(
    "ts", ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201"]
)
def test_jpeg2000_comments_are_found_in_main_and_tile_part_headers(jpeg, tmp_path, ts) -> None:
    j2k_com = _segment(0x64, b"\x00\x01" + TOKEN.encode())

    def as_j2k(frame: bytes, name: str) -> Path:
        out = _with_pixels(jpeg["lossless"], tmp_path / name, [frame])
        return _edit(out, out, lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", ts))

    assert _scan(as_j2k(_j2k(), "clean.dcm")) == []
    assert _scan(as_j2k(_j2k(main=j2k_com), "main.dcm"))[0].startswith(
        "frame 1: JPEG 2000 COM segment"
    )
    assert _scan(as_j2k(_j2k(tile=(b"", j2k_com)), "tile.dcm"))[0].startswith(
        "frame 1: JPEG 2000 COM segment"
    )
    assert (
        "does not start with SOC"
        in _scan(as_j2k(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + _j2k(), "jp2.dcm"))[0]
    )


def test_risk_room_reasons() -> None:
    from ith_proxy.deid import risk

    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    assert risk.phi_risk(ds, []) is None
    ds.RecognizableVisualFeatures = "YES"
    assert (
        risk.phi_risk(ds, [])
        == "RecognizableVisualFeatures is YES (identifying features in the pixels)"
    )
    assert risk.phi_risk(ds, [], burned_in=False) is None
    assert risk.phi_risk(
        ds, ["frame 1: JPEG COM segment (comment text)"], burned_in=False
    ).startswith("pixel data codestream may carry")
    ds.RecognizableVisualFeatures = "NO"
    ds.BurnedInAnnotation = "NO"
    assert risk.phi_risk(ds, []) is None


# --------------------------------------------------------------------------
# the indexer, and end to end
# --------------------------------------------------------------------------


def _inputs(tmp_path: Path) -> tuple[dicomgen.Series, dict[str, Path]]:
    """Three CT instances of one series: JPEG with a COM naming the patient,
    clean JPEG, and uncompressed with Recognizable Visual Features YES."""
    series = dicomgen.make_ct_series(tmp_path / "in", 3, rows=64, cols=64)
    com_src = _compress(series.files[0], tmp_path / "com-src.dcm")
    frame = _insert(_frames(com_src)[0], 2, COM)
    files = {
        "com": _with_pixels(com_src, tmp_path / "com.dcm", [frame]),
        "clean": _compress(series.files[1], tmp_path / "clean.dcm"),
        "rvf": _edit(
            series.files[2],
            tmp_path / "rvf.dcm",
            lambda ds: setattr(ds, "RecognizableVisualFeatures", "YES"),
        ),
    }
    return series, files


def test_indexer_quarantines_codestream_text_and_recognizable_features(tmp_path) -> None:
    series, files = _inputs(tmp_path)
    rooms = Rooms(tmp_path / "site")
    try:
        for name, path in files.items():
            rooms.drop(name, path.read_bytes())
        assert rooms.indexer.run_once() == 3
        q = rooms.spool.quarantine_dir
        assert sorted(p.relative_to(q).as_posix() for p in q.rglob("*.json")) == [
            "phi-risk/com.json",
            "phi-risk/rvf.json",
        ]
        assert (
            json.loads((q / "phi-risk" / "rvf.json").read_text())["error"]
            == "RecognizableVisualFeatures is YES (identifying features in the pixels)"
        )
        assert (
            json.loads((q / "phi-risk" / "com.json").read_text())["error"]
            == "pixel data codestream may carry identifying text: "
            "frame 1: JPEG COM segment (comment text)"
        )
        stored = stored_files(rooms.spool.root)
        assert len(stored) == 1  # the clean JPEG, its pixel data copied as it was
        assert _frames(stored[0]) == _frames(files["clean"])
        assert (
            find_bytes(
                rooms.spool.root, {TOKEN, *series.markers()}, skip=[rooms.spool.root / "vault.phi"]
            )
            == []
        )
    finally:
        rooms.close()

    # quarantine_burned_in = false accepts burned-in risk, never codestream text
    rooms = Rooms(tmp_path / "allowed", "[deid]\nquarantine_burned_in = false\n")
    try:
        for name, path in files.items():
            rooms.drop(name, path.read_bytes())
        assert rooms.indexer.run_once() == 3
        assert [p.name for p in rooms.spool.quarantine_dir.rglob("*.json")] == ["com.json"]
        assert len(stored_files(rooms.spool.root)) == 2
    finally:
        rooms.close()


def test_codestream_text_is_quarantined_end_to_end(tmp_path) -> None:
    """JPEG accepted by [scp] transfer_syntaxes, incoming encrypted (default),
    anonymize and quarantine_burned_in on (defaults)."""
    series, files = _inputs(tmp_path)
    ini = "[scp]\ntransfer_syntaxes = jpeg-lossless\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        # -xs: propose JPEG lossless SV1 first (uncompressed too, for the third file)
        result = tools.storescu(proxy.dicom_port, list(files.values()), extra=["-xs"])
        assert result.returncode == 0 and len(tools.acked_files(result)) == 3, result.stderr
        q = proxy.spool / "quarantine" / "phi-risk"

        def settled():
            incoming = list((proxy.spool / "incoming").iterdir())
            done = len(stored_files(proxy.spool)) + len(list(q.glob("*.json")))
            return not incoming and done == 3

        wait_until(settled, 60, "three instances indexed or quarantined")
        errors = sorted(json.loads(p.read_text())["error"] for p in q.glob("*.json"))
        assert errors == [
            "RecognizableVisualFeatures is YES (identifying features in the pixels)",
            "pixel data codestream may carry identifying text: "
            "frame 1: JPEG COM segment (comment text)",
        ]
        assert all(vault_stream.is_encrypted(p.with_suffix("")) for p in q.glob("*.json"))
        stored = stored_files(proxy.spool)
        assert len(stored) == 1
        assert str(pydicom.dcmread(stored[0]).file_meta.TransferSyntaxUID) == JPEG_LOSSLESS
        originals = {
            rec["phi"]["instance"]["SOPInstanceUID"] for rec in vault_records(proxy.workdir)
        }
        assert originals == {series.sop_uids[1]}
        assert (
            find_bytes(proxy.spool, {TOKEN, *series.markers()}, skip=[proxy.spool / "vault.phi"])
            == []
        )
        assert os.path.getsize(stored[0]) > 0
