"""A UID is digits and dots, nothing else, everywhere (issue 6).

``re.match(r"^...$")`` accepts a trailing newline (``$`` matches before it),
and pydicom strips trailing whitespace when it decodes a UI value, so
``1.2.3\\n`` passed as ``1.2.3`` (two instances could share one output UID)
or, under Retain UIDs, reached the spool as a path with a newline in it.

The only legal padding of a UI value is one trailing NUL (PS3.5 6.2); the
indexer checks the value as stored, less that pad. Checked: the spool's path
check, the de-identifier's remapping (its output is always a valid UID, also
for inputs under the standard root), the indexer end to end (files dropped
into incoming/, with and without Retain UIDs), and a config URL.
"""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

import canary
from helpers import stored_files
from ith_proxy import config
from ith_proxy.deid import remap_uid
from ith_proxy.store.spool import Spool

SECRET = b"0123456789abcdef0123456789abcdef-uid-tests"
BAD = [
    "1.2.3\n",
    "1.2.3 ",
    "1.2.3\x00",
    "1.2.a",
    "1..2",
    ".1.2",
    "1.2.",
    "1.2.3\n4",
    "\u0661.\u0662",
    "1" * 65,
    "",
]
VALID = re.compile(r"[0-9]+(\.[0-9]+)*")


@pytest.mark.parametrize("uid", BAD, ids=repr)
def test_the_spool_refuses_a_path_from_a_bad_uid(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path / "spool")
    good = "1.2.3"
    for args in ((uid, good, good), (good, uid, good), (good, good, uid)):
        with pytest.raises(ValueError):
            spool.instance_path(*args)
    with pytest.raises(ValueError):
        spool.study_dir(uid)


def test_the_spool_takes_a_good_uid(tmp_path: Path) -> None:
    path = Spool(tmp_path / "spool").instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path.name == "1.2.3.4.5.dcm"


@pytest.mark.parametrize(
    "uid",
    [
        "1.2.840.10008.5.1.4.1.1.2\nCANARY",
        "1.2.840.10008.CANARY^NAME",
        "1.2.840.10008.1 2",
        "1.2.840.10008.\u0661",
        "1.2.840.10008." + "1" * 60,
        "1.2.840.10008.1.2.a",
    ],
    ids=repr,
)
def test_remapping_never_keeps_an_invalid_uid_under_the_standard_root(uid: str) -> None:
    out = remap_uid(SECRET, uid)
    assert VALID.fullmatch(out) and len(out) <= 64 and out != uid
    assert out.startswith("2.25.")


def test_remapping_keeps_a_valid_standard_uid() -> None:
    assert remap_uid(SECRET, "1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    assert remap_uid(SECRET, "1.2.840.10008.5.1.4.1.1.2\x00") == "1.2.840.10008.5.1.4.1.1.2"


# --------------------------------------------------------------------------
# the indexer: the instance's own UIDs, as stored
# --------------------------------------------------------------------------

ROOT = "1.2.826.0.1.3680043.99.558"


def _file(path: Path, n: int, sop: bytes | None = None, study: bytes | None = None) -> Path:
    """A small CT instance; ``sop``/``study`` are the raw bytes of that UI value."""
    sop_uid = f"{ROOT}.3.{n}"
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = f"{ROOT}.1"
    ds.SeriesInstanceUID = f"{ROOT}.2"
    ds.PatientID = "PID-UID-TEST"
    ds.Modality = "CT"
    ds.SeriesNumber, ds.InstanceNumber = 1, n
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    raw = {0x00080018: sop, 0x0020000D: study}
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fp = DicomFileLike(io.BytesIO())
    fp.is_implicit_VR, fp.is_little_endian = False, True
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta)
    for tag in sorted(ds.keys()):
        value = raw.get(int(tag))
        if value is not None:
            assert len(value) % 2 == 0
            fp.write(struct.pack("<HH2sH", tag.group, tag.element, b"UI", len(value)) + value)
        else:
            write_data_element(fp, ds[tag])
    pixels = b"\x01\x00" * 4
    fp.write(struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", len(pixels)) + pixels)
    path.write_bytes(fp.parent.getvalue())
    return path


def _corpus(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """(files with a bad UID, files with good ones); raw values of even length."""
    tmp_path.mkdir(parents=True, exist_ok=True)

    def sop(n: int) -> bytes:
        return f"{ROOT}.3.{n}".encode()

    bad = [
        _file(tmp_path / "nl.dcm", 11, sop=sop(11) + b"\n"),  # newline
        _file(tmp_path / "sp.dcm", 13, sop=sop(13) + b" "),  # space
        _file(tmp_path / "nul2.dcm", 150, sop=sop(150) + b"\x00\x00"),  # two NULs
        _file(tmp_path / "alpha.dcm", 17, sop=f"{ROOT}.a.17".encode() + b"\x00"),
        _file(tmp_path / "study-nl.dcm", 19, study=f"{ROOT}.100".encode() + b"\n\x00"),
    ]
    good = [
        _file(tmp_path / "pad.dcm", 21, sop=sop(21) + b"\x00"),  # the legal pad
        _file(tmp_path / "even.dcm", 230, sop=sop(230)),  # even: no pad
    ]
    return bad, good


@pytest.mark.parametrize("options", ["", "retain_uids"])
def test_the_indexer_quarantines_an_instance_with_a_bad_uid(tmp_path: Path, options: str) -> None:
    bad, good = _corpus(tmp_path / "in")
    proxy, quarantined = canary.run_proxy(
        tmp_path / "proxy", [], bad + good, canary.deid_config(*([options] if options else []))
    )
    assert sorted(q["reason_dir"] for q in quarantined) == ["inconsistent"] * len(bad)
    stored = stored_files(proxy.spool)
    assert len(stored) == len(good)
    for path in proxy.spool.joinpath("studies").rglob("*"):
        name = path.name.removesuffix(".dcm")
        if name not in ("study.json",) and not name.endswith(".json"):
            assert VALID.fullmatch(name), repr(path)
    if options == "retain_uids":
        assert sorted(p.stem for p in stored) == sorted(f"{ROOT}.3.{n}" for n in (21, 230))


def test_a_config_url_with_a_newline_is_refused() -> None:
    with pytest.raises(config.ConfigError, match="ith_url"):
        config.load(
            env={"ITH_URL": "https://ith.example\nhttps://evil.example"},
            cwd=Path("/nonexistent-ith-proxy-test"),
        )
    assert (
        config.load(
            env={"ITH_URL": "https://ith.example/api/"}, cwd=Path("/nonexistent-ith-proxy-test")
        ).link.ith_url
        == "https://ith.example/api"
    )
