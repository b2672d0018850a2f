"""The indexer's header encoder (issue 11) writes what the previous one wrote.

``files._encode_dataset`` walks the dataset's dict and frames raw elements
with struct into one join; the reference below is the previous version
(``keys()`` + ``get_item`` per tag, one DicomFileLike).  Both run on the same
de-identified headers of a varied corpus (Implicit VR LE, Explicit VR LE and
BE, RLE, multi-frame, the canary study with every table row, private tags
kept and removed, undefined-length sequences, elements after the pixel
data, odd lengths, zero-length elements) and must give the same bytes, and
the whole output file through ``write_joined`` must too.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import cast

import pydicom
import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

import corpus as corpus_files
from ith_proxy.deid.engine import Deidentifier
from ith_proxy.dicom import file_meta
from ith_proxy.dicom import files as dicomfile

_LONG = {"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}


def _reference(ds: Dataset, implicit: bool, little: bool) -> bytes:
    """files._encode_dataset before issue 11's parse pass, verbatim in effect."""
    order = "<" if little else ">"
    short, long_ = struct.Struct(order + "HH2sH"), struct.Struct(order + "HH2s2xL")
    implicit_head = struct.Struct(order + "HHL")
    encodings = ds.get("SpecificCharacterSet", "iso8859")
    buf = io.BytesIO()
    fp = DicomFileLike(buf)
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    for tag in sorted(ds.keys()):
        if not tag & 0xFFFF or tag >> 16 in (0x0000, 0x0002):
            continue
        elem = cast("DataElement | RawDataElement", ds.get_item(tag))
        if (
            isinstance(elem, RawDataElement)
            and elem.value is not None
            and elem.length != 0xFFFFFFFF
            and elem.is_implicit_VR == implicit
            and elem.is_little_endian == little
        ):
            value, vr = elem.value, elem.VR
            if implicit:
                fp.write(implicit_head.pack(tag.group, tag.element, len(value)) + value)
                continue
            if vr in _LONG:
                fp.write(long_.pack(tag.group, tag.element, vr.encode(), len(value)) + value)
                continue
            if vr and len(value) <= 0xFFFF:
                fp.write(short.pack(tag.group, tag.element, vr.encode(), len(value)) + value)
                continue
        write_data_element(fp, ds[tag], encodings)
    return buf.getvalue()


def _odd(path: Path, ts: str, implicit: bool, little: bool) -> Path:
    """Private tags (safe-listed and not), an undefined-length sequence,
    zero-length and odd values, a multi-frame pixel run and trailing padding."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.SeriesInstanceUID = "1.2.3.4.5.6"
    ds.PatientName = "Müller^Jörg"
    ds.PatientID = "ODD1"
    ds.StudyDescription = ""
    ds.AccessionNumber = "A1"
    ds.ImageComments = "odd length"
    ds.Modality = "OT"
    ds.add_new(0x00091010, "LO", "CREATOR X")
    ds.add_new(0x00091011, "LO", "private text")
    ds.add_new(0x00291010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(0x00291008, "CS", "IMAGE NUM 4")
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.9"
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4, 4, 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.NumberOfFrames = 1, 0, 3
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(48))
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 6)  # Data Set Trailing Padding
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, implicit_vr=implicit, little_endian=little, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("corpus")
    files = corpus_files.encodings_and_canary(root)
    for name, ts, implicit, little in (
        ("ivr", ImplicitVRLittleEndian, True, True),
        ("evr", ExplicitVRLittleEndian, False, True),
        ("be", ExplicitVRBigEndian, False, False),
    ):
        files.append(_odd(root / f"odd-{name}.dcm", ts, implicit, little))
    return files


@pytest.mark.parametrize(
    "safe_private", [(), ((0x0009, "CREATOR X", 0x11), (0x0029, "SIEMENS CSA HEADER", 0x08))]
)
def test_the_encoder_writes_what_the_previous_one_wrote(
    corpus: list[Path], safe_private: tuple
) -> None:
    deid = Deidentifier(b"s" * 32, safe_private=safe_private)
    assert len(corpus) > 30
    for path in corpus:
        split = dicomfile.read_split(path)
        ts = split.header.file_meta.TransferSyntaxUID
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
        # before de-identification: everything raw
        assert dicomfile._encode_dataset(split.header, implicit, little) == _reference(
            split.header, implicit, little
        ), path.name
        result = deid.apply(split.header)
        if split.trailer is not None:
            deid.apply_fragment(split.trailer, result)
        for ds in (split.header, split.trailer):
            if ds is not None:
                new = dicomfile._encode_dataset(ds, implicit, little)
                assert new == _reference(ds, implicit, little), path.name
        out = io.BytesIO()
        dicomfile.write_joined(out, split)
        expected = (
            file_meta.encode(split.header.file_meta)
            + _reference(split.header, implicit, little)
            + path.read_bytes()[split.pixel_start : split.pixel_end]
            + (_reference(split.trailer, implicit, little) if split.trailer is not None else b"")
        )
        assert out.getvalue() == expected, path.name


def test_decoded_and_foreign_elements_go_through_pydicom() -> None:
    ds = Dataset()
    ds.PatientName = "Decoded^Value"  # a DataElement
    ds[0x00100020] = RawDataElement(  # raw, but in another encoding than the output
        Tag(0x00100020), "LO", 4, b"ID01", 0, True, True
    )
    ds[0x00081030] = RawDataElement(Tag(0x00081030), "LO", 4, b"DESC", 0, False, True)
    for implicit, little in ((True, True), (False, True), (False, False)):
        assert dicomfile._encode_dataset(ds, implicit, little) == _reference(ds, implicit, little)


def test_the_meta_rebuild_skips_only_what_it_would_keep(corpus: list[Path], tmp_path: Path) -> None:
    """deid.meta.rebuild leaves an undecoded element alone when it holds our value
    byte for byte; records and output bytes are those of a decoded meta."""
    from ith_proxy.config import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
    from ith_proxy.deid import meta as deid_meta

    ours = tmp_path / "ours.dcm"
    ds = pydicom.dcmread(corpus[0])
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY"
    ds.save_as(ours)
    odd = tmp_path / "odd-version.dcm"
    ds.file_meta.FileMetaInformationVersion = b"\x00\x02"
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION + " "  # padded oddly
    ds.save_as(odd)
    skipped = 0
    for path in [ours, odd, *corpus[:6]]:
        raw, decoded = dicomfile.read_split(path), dicomfile.read_split(path)
        list(decoded.header.file_meta.values())  # every element decoded
        skipped += sum(type(e) is RawDataElement for e in raw.header.file_meta._dict.values())
        sop = "2.25.1234"
        got = [(p, e.value) for p, e in deid_meta.rebuild(raw.header.file_meta, sop)]
        want = [(p, e.value) for p, e in deid_meta.rebuild(decoded.header.file_meta, sop)]
        assert got == want, path.name
        assert file_meta.encode(raw.header.file_meta) == file_meta.encode(
            decoded.header.file_meta
        ), path.name
    assert skipped  # the raw path was taken
