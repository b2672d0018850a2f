"""Self-check of tests/vendor_ct.py: the vendor-like CT files it writes are
read back by pydicom with what the module promises (transfer syntax, UIDs,
the vendor's private creators, pixel data), byte for byte the same on each
call, and no external tool (dciodvfy) is needed to make them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from vendor_ct import TRANSFER_SYNTAXES, VENDORS, write_vendor_ct

_CREATORS: dict[str, set[tuple[int, str]]] = {
    "siemens": {
        (0x0019, "SIEMENS CT VA0  COAD"),
        (0x0029, "SIEMENS CSA HEADER"),
        (0x0029, "SIEMENS MEDCOM HEADER2"),
    },
    "ge": {
        (0x0009, "GEMS_IDEN_01"),
        (0x0019, "GEMS_ACQU_01"),
        (0x0043, "GEMS_PARM_01"),
        (0x0045, "GEMS_HELIOS_01"),
    },
    "philips": {(0x01F1, "ELSCINT1"), (0x00E1, "ELSCINT1"), (0x2001, "Philips Imaging DD 001")},
    "plain": set(),
}


def _creators(ds: Dataset) -> set[tuple[int, str]]:
    return {(e.tag.group, e.value) for e in ds if e.tag.is_private_creator}


@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES, ids=lambda ts: ts.name)
@pytest.mark.parametrize("vendor", VENDORS)
def test_written_file_reads_back(tmp_path: Path, vendor: str, ts: str) -> None:
    a = write_vendor_ct(tmp_path / "a.dcm", vendor, ts, 3, rows=8, cols=12)
    b = write_vendor_ct(tmp_path / "b.dcm", vendor, ts, 3, rows=8, cols=12)
    c = write_vendor_ct(tmp_path / "c.dcm", vendor, ts, 4, rows=8, cols=12)
    assert a.read_bytes() == b.read_bytes()
    ds, other = dcmread(a), dcmread(c)
    assert ds.file_meta.TransferSyntaxUID == ts
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPInstanceUID != other.SOPInstanceUID
    assert ds.SOPInstanceUID.startswith("1.2.826.0.1.3680043.99.77.")
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
        other.StudyInstanceUID,
        other.SeriesInstanceUID,
    )
    assert _creators(ds) == _CREATORS[vendor]
    assert len(ds.PixelData) == 8 * 12 * 2 and ds.PixelData != other.PixelData
    assert (ds.Rows, ds.Columns, ds.BitsStored) == (8, 12, 12)
    assert str(ds.PatientName) == "Doe^John"
    assert ("SourceImageSequence" in ds) == (vendor == "siemens")
    assert len(ds.ReferencedImageSequence[0]) == 2


def test_vendor_details(tmp_path: Path) -> None:
    ts = TRANSFER_SYNTAXES[0]
    siemens = dcmread(write_vendor_ct(tmp_path / "s.dcm", "siemens", ts))
    assert siemens[0x0029, 0x1010].value.startswith(b"SV10")
    assert len(siemens.WindowCenter) == 2 and len(siemens.SoftwareVersions) == 2
    philips = dcmread(write_vendor_ct(tmp_path / "p.dcm", "philips", ts))
    (item,) = philips[0x2001, 0x105F].value
    assert len(item) == 3 and "StudyDescription" in item
    raw = (tmp_path / "s.dcm").read_bytes()
    assert b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" in raw  # a sequence delimiter
    assert b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" in raw  # an item delimiter
    ge = write_vendor_ct(tmp_path / "g.dcm", "ge", ts).read_bytes()
    assert b"\x08\x00\x32\x10SQ\x00\x00\xff\xff\xff\xff" in ge  # ProcedureCodeSequence


def test_utf8_patient_name(tmp_path: Path) -> None:
    path = write_vendor_ct(tmp_path / "u.dcm", "ge", TRANSFER_SYNTAXES[1], charset="ISO_IR 192")
    ds = dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jürgen"
    assert "Müller".encode() in path.read_bytes()


def test_no_external_tool_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written with pydicom alone: works with no program (dciodvfy) on PATH."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    path = write_vendor_ct(tmp_path / "x.dcm", "philips", TRANSFER_SYNTAXES[2])
    assert dcmread(path).Modality == "CT"
