"""The output's file meta group (ith_proxy/dicom/file_meta.py, issue 11):
packed by hand, byte for byte what pydicom's ``write_file_meta_info``
writes, for the metas the de-identifier leaves; any other meta goes through
pydicom, as before; only the allowed elements are ever written."""

from __future__ import annotations

import io

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info

from ith_proxy.config import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from ith_proxy.deid import meta as deid_meta
from ith_proxy.dicom import file_meta


def _pydicom(meta: FileMetaDataset) -> bytes:
    """What write_joined wrote before issue 11."""
    buf = io.BytesIO()
    fp = DicomFileLike(buf)
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, file_meta.allowed(meta), enforce_standard=True)
    return buf.getvalue()


def _meta(sop_class: str, sop: str, ts: str, extra: tuple = ()) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.3.4"
    meta.SourceApplicationEntityTitle = "MODALITY"
    for tag, vr, value in extra:
        meta.add_new(tag, vr, value)
    return meta


CASES = [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1"),  # odd, odd, odd
    ("1.2.840.10008.5.1.4.1.1.12.1", "1.2.34", "1.2.840.10008.1.2"),  # even lengths
    ("1.2.840.10008.5.1.4.1.1.4", "2.25." + "7" * 59, "1.2.840.10008.1.2.2"),  # big endian
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.4.50"),  # JPEG
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.3.4.5.6.7.8.9.10"),  # private TS
]


@pytest.mark.parametrize(("sop_class", "sop", "ts"), CASES)
def test_a_rebuilt_meta_is_packed_as_pydicom_writes_it(sop_class: str, sop: str, ts: str) -> None:
    private = ((0x00020100, "UI", "1.2.9"), (0x00020102, "OB", b"secret"))
    for extra in ((), private):
        meta = _meta(sop_class, sop, ts, extra)
        deid_meta.rebuild(meta, "2.25.1234567")
        assert file_meta._packed(meta) is not None  # the fast path is taken
        rebuilt = _meta(sop_class, sop, ts, extra)
        deid_meta.rebuild(rebuilt, "2.25.1234567")
        packed = file_meta.encode(rebuilt)
        assert packed == _pydicom(meta)
        assert b"MODALITY" not in packed and b"secret" not in packed


def test_a_meta_kept_as_received_is_written_by_pydicom_allowed_elements_only() -> None:
    meta = _meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    meta.add_new(0x00020102, "OB", b"secret")
    assert file_meta._packed(file_meta.allowed(meta)) is None  # no version, our class UID
    out = file_meta.encode(meta)
    assert out == _pydicom(meta)
    assert b"MODALITY" not in out and b"secret" not in out


def test_odd_metas_are_left_to_pydicom() -> None:
    def rebuilt(**changes) -> FileMetaDataset:
        meta = _meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
        deid_meta.rebuild(meta, "2.25.99")
        for keyword, value in changes.items():
            setattr(meta, keyword, value)
        return meta

    assert file_meta._packed(rebuilt()) is not None
    odd = [
        rebuilt(MediaStorageSOPClassUID=["1.2.3", "1.2.4"]),  # multi-valued
        rebuilt(TransferSyntaxUID="1.2.\u00e9"),  # not ASCII (pydicom warns, writes it)
        rebuilt(MediaStorageSOPClassUID=""),  # empty: pydicom refuses
        rebuilt(FileMetaInformationVersion=b"\x00\x02"),
    ]
    no_ts = rebuilt()
    del no_ts.TransferSyntaxUID
    odd.append(no_ts)
    wrong_vr = rebuilt()
    wrong_vr[0x00020013] = DataElement(0x00020013, "LO", IMPLEMENTATION_VERSION)
    odd.append(wrong_vr)
    for meta in odd:
        assert file_meta._packed(meta) is None
    # a meta pydicom can write is written the same either way
    for meta in (odd[1], odd[3], wrong_vr):
        assert file_meta.encode(meta) == _pydicom(meta)
    with pytest.raises(AttributeError):  # as before: pydicom refuses an empty required one
        file_meta.encode(odd[2])


def test_our_implementation_values_are_what_the_packed_meta_carries() -> None:
    meta = _meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")
    deid_meta.rebuild(meta, "2.25.5")
    out = file_meta.encode(meta)
    assert IMPLEMENTATION_CLASS_UID.encode() in out and IMPLEMENTATION_VERSION.encode() in out
    assert out[:132] == b"\x00" * 128 + b"DICM"
