"""File meta rebuilt from an allow-list; dates after the pixel data shifted (issue 6).

* Injected (0002,xxxx) elements (standard ones the allow-list leaves out,
  PrivateInformation with its creator, elements no standard defines, and the
  version / implementation elements holding markers) never reach the output
  meta, and every value comes back from the vault. Group 0000/0002 elements
  hidden in the dataset body (top level and nested) go too.
* Elements after the pixel data (the "trailer", e.g. written there by a
  careless or hostile writer) get the same per-patient date shift and
  descriptor cleaning as the header, so LongitudinalTemporalInformationModified
  = MODIFIED is true of every date in the file.

Checked through the engine as the indexer runs it and end to end (files
dropped into a proxy's incoming/).
"""

from __future__ import annotations

import io
import struct
from datetime import date, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

import canary
from helpers import deidentify_file, stored_files, vault_records
from ith_proxy.deid.engine import Deidentifier
from ith_proxy.dicom import files as dicomfile

SECRET = b"0123456789abcdef0123456789abcdef-meta-tests"
ALLOWED_META = {0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013}

#: injected file meta: (tag, VR, value) -- each value a marker
INJECTED_META = [
    (0x00020016, "AE", "CANARYMETA0016"),  # Source AE Title
    (0x00020017, "AE", "CANARYMETA0017"),  # Sending AE Title
    (0x00020018, "AE", "CANARYMETA0018"),  # Receiving AE Title
    (0x00020026, "UR", "http://canary.invalid/CANARYMETA0026"),
    (0x00020100, "UI", "1.2.826.0.1.3680043.99.555.100"),  # PrivateInformationCreatorUID
    (0x00020102, "OB", b"CANARYMETA0102~~"),  # PrivateInformation
    (0x00020005, "LO", "CANARYMETA0005"),  # defined by no standard
    (0x00020011, "LO", "CANARYMETA0011"),  # defined by no standard, < 0x0016
    (0x00020014, "SH", "CANARYMETA0014"),
]
#: allow-listed elements whose values we replace: the markers must go to the vault too
REPLACED_META = [
    (0x00020001, "OB", b"CANARYMETA0001~~"),  # FileMetaInformationVersion
    (0x00020012, "UI", "1.2.826.0.1.3680043.99.555.12"),  # ImplementationClassUID
    (0x00020013, "SH", "CANARYMETA0013"),  # ImplementationVersionName
]
#: group 0000 / 0002 elements inside the dataset body
BODY_MARKERS = [
    (0x00000902, "LO", "CANARYBODY0902"),  # Error Comment (command group)
    (0x00020102, "OB", b"CANARYBODY0102~~"),  # PrivateInformation in the body
]
NESTED_MARKER = (0x00020100, "UI", "1.2.826.0.1.3680043.99.555.200")


def _needle(value) -> str:
    return value.decode().rstrip("~") if isinstance(value, bytes) else value


def _encode_elements(elements: list[DataElement]) -> bytes:
    fp = DicomFileLike(io.BytesIO())
    fp.is_implicit_VR, fp.is_little_endian = False, True
    for elem in elements:
        write_data_element(fp, elem)
    return fp.parent.getvalue()


def _header(uid_suffix: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.99.556.{uid_suffix}"
    ds.StudyDate = "20200115"
    ds.StudyTime = "101500"
    ds.PatientName = "DOEMETA^JOHNATHAN"
    ds.PatientID = "PID-META-TEST"
    ds.PatientBirthDate = "19700101"
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.556.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.556.2"
    ds.SeriesNumber, ds.InstanceNumber = 1, uid_suffix
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def write_file(path: Path, ds: Dataset, meta_extra=(), body_extra=(), trailer=()) -> None:
    """Preamble, a meta with ``meta_extra`` (and REPLACED values), the header
    with ``body_extra`` elements appended after it, pixels, ``trailer``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for tag, vr, value in meta_extra:
        meta[tag] = DataElement(tag, vr, value)
    fp = DicomFileLike(io.BytesIO())
    fp.is_implicit_VR, fp.is_little_endian = False, True
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    write_dataset(fp, ds)
    fp.write(_encode_elements([DataElement(t, vr, v) for t, vr, v in body_extra]))
    pixels = b"\x01\x00" * 4
    fp.write(struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", len(pixels)) + pixels)
    fp.write(_encode_elements(list(trailer)))
    path.write_bytes(fp.parent.getvalue())


def deidentify(path: Path, options: frozenset[str] = frozenset()) -> tuple[bytes, dict]:
    return deidentify_file(path, SECRET, options)


def _in_vault(record: dict, value) -> bool:
    leaves = list(canary.vault_leaves(record.get("phi", record)))
    if isinstance(value, bytes):
        return any(isinstance(v, bytes) and v == value for v in leaves)
    return any(isinstance(v, str) and v == value for v in leaves) or any(
        isinstance(v, bytes) and v.rstrip(b" \x00") == value.encode() for v in leaves
    )


# --------------------------------------------------------------------------
# file meta
# --------------------------------------------------------------------------


def meta_file(path: Path, index: int = 1, body: bool = False) -> Path:
    ds = _header(index)
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.99.556.9"
    item[NESTED_MARKER[0]] = DataElement(*NESTED_MARKER)
    ds.ReferencedImageSequence = Sequence([item])
    write_file(
        path, ds, meta_extra=INJECTED_META + REPLACED_META, body_extra=BODY_MARKERS if body else ()
    )
    return path


def test_the_input_holds_the_injected_elements(tmp_path: Path) -> None:
    path = meta_file(tmp_path / "meta.dcm", body=True)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for tag, _, value in INJECTED_META + REPLACED_META:
        assert ds.file_meta[tag].value == value
    for tag, _, value in BODY_MARKERS:
        assert ds[tag].value == value
    assert ds.ReferencedImageSequence[0][NESTED_MARKER[0]].value == NESTED_MARKER[2]


def test_output_meta_is_the_allow_list_and_nothing_injected_survives(tmp_path: Path) -> None:
    data, record = deidentify(meta_file(tmp_path / "meta.dcm"))
    out = pydicom.dcmread(io.BytesIO(data))
    assert {int(t) for t in out.file_meta.keys()} <= ALLOWED_META
    assert out.file_meta.FileMetaInformationVersion == b"\x00\x01"
    assert out.file_meta.ImplementationVersionName == "ITH_PROXY_01"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert not [e for e in out if e.tag.group in (0x0000, 0x0002)]
    assert not [p for p, e in canary.walk(out) if e.tag.group in (0x0000, 0x0002)]
    everything = INJECTED_META + REPLACED_META + [NESTED_MARKER]
    leaks = [_needle(v) for _, _, v in everything if canary._hits(data, _needle(v).encode())]
    assert leaks == []
    missing = [hex(t) for t, _, v in everything if not _in_vault(record, v)]
    assert missing == []


def test_group_0000_0002_in_the_body_is_refused_by_the_reader(tmp_path: Path) -> None:
    """Top-level command or file meta elements in the body: the file is not
    read at all (the indexer quarantines it as unparseable)."""
    with pytest.raises(dicomfile.DicomFileError, match="file meta or command"):
        dicomfile.read_split(meta_file(tmp_path / "meta.dcm", body=True))


def test_the_engine_removes_group_0000_0002_from_a_dataset(tmp_path: Path) -> None:
    """Defence in depth behind the reader: the engine drops them and vaults them."""
    ds = _header(3)
    for tag, vr, value in BODY_MARKERS:
        ds[tag] = DataElement(tag, vr, value)
    result = Deidentifier(SECRET).apply(ds)
    assert not [e for e in ds if e.tag.group in (0x0000, 0x0002)]
    missing = [hex(t) for t, _, v in BODY_MARKERS if not _in_vault({"phi": result.phi}, v)]
    assert missing == []


# --------------------------------------------------------------------------
# elements after the pixel data
# --------------------------------------------------------------------------

TRAILER_DATES = {  # tag -> (VR, value): every one a date the option shifts
    0x00080021: ("DA", "20200116"),  # Series Date
    0x00080023: ("DA", "20200117"),  # Content Date
    0x0008002A: ("DT", "20200118101010"),  # Acquisition DateTime
}
TRAILER_NESTED = ("DT", "20200115083000")  # Radiopharmaceutical Start DateTime, nested
DESCRIPTION = "CT DOEMETA JOHNATHAN CHEST"


def trailer_file(path: Path, index: int = 2) -> Path:
    ds = _header(index)
    item = Dataset()
    item.RadiopharmaceuticalStartDateTime = TRAILER_NESTED[1]
    trailer = [DataElement(t, vr, v) for t, (vr, v) in TRAILER_DATES.items()]
    trailer += [
        DataElement(0x00081030, "LO", DESCRIPTION),  # Study Description
        DataElement(0x00540016, "SQ", Sequence([item])),
    ]
    write_file(path, ds, trailer=trailer)
    return path


def _shift(value: str, days: int) -> str:
    d = date(int(value[:4]), int(value[4:6]), int(value[6:8])) + timedelta(days=days)
    return d.strftime("%Y%m%d") + value[8:]


def test_the_trailer_is_parsed_as_a_trailer(tmp_path: Path) -> None:
    split = dicomfile.read_split(trailer_file(tmp_path / "t.dcm"))
    assert split.trailer is not None and 0x00080023 in split.trailer
    assert 0x00080023 not in split.header


def test_trailer_dates_get_the_same_shift_as_the_header(tmp_path: Path) -> None:
    data, record = deidentify(
        trailer_file(tmp_path / "t.dcm"),
        frozenset({"retain_long_modified_dates", "clean_descriptors"}),
    )
    out = pydicom.dcmread(io.BytesIO(data))
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    days = (
        datetime.strptime(out.StudyDate, "%Y%m%d") - datetime.strptime("20200115", "%Y%m%d")
    ).days
    assert days != 0
    for tag, (_, value) in TRAILER_DATES.items():
        assert str(out[tag].value) == _shift(value, days), hex(tag)
        assert not canary._hits(data, value.encode()), value
        assert _in_vault(record, value)
    nested = str(out.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime)
    assert nested == _shift(TRAILER_NESTED[1], days)
    assert _in_vault(record, TRAILER_NESTED[1])
    # descriptor cleaning knows the patient's name in the trailer too
    assert "DOEMETA" not in str(out.StudyDescription) and "CHEST" in str(out.StudyDescription)
    assert b"DOEMETA" not in data and b"JOHNATHAN" not in data
    assert _in_vault(record, DESCRIPTION)


# --------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------


def test_end_to_end_through_the_proxy(tmp_path: Path) -> None:
    files = [meta_file(tmp_path / "meta.dcm", 1), trailer_file(tmp_path / "trailer.dcm", 2)]
    proxy, quarantined = canary.run_proxy(
        tmp_path / "proxy",
        [],
        files,
        canary.deid_config("retain_long_modified_dates", "clean_descriptors"),
    )
    assert quarantined == []
    outputs = stored_files(proxy.spool)
    assert len(outputs) == 2
    everything = INJECTED_META + REPLACED_META + [NESTED_MARKER]
    needles = (
        [_needle(v) for _, _, v in everything]
        + [v for _, v in TRAILER_DATES.values()]
        + [TRAILER_NESTED[1], "DOEMETA", "JOHNATHAN"]
    )
    assert canary.find_needles(proxy.workdir, needles, skip=[proxy.spool / "vault.phi"]) == []
    records = vault_records(proxy.workdir)
    for _, _, value in everything:
        assert any(_in_vault(r, value) for r in records), value
    for path in outputs:
        out = pydicom.dcmread(path)
        assert {int(t) for t in out.file_meta.keys()} <= ALLOWED_META
