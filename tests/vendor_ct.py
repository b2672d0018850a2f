"""Realistic, vendor-like CT instances for the de-identification equality tests.

Where :mod:`dicomgen` writes minimal images carrying PHI markers, this module
writes one CT instance as a Siemens, GE or Philips scanner would (their
private blocks, binary CSA headers, a private sequence, undefined-length
sequences, multi-valued attributes), or a "plain" one without any private
data, so a fast path can be compared with the reference de-identifier on the
shapes real files have. pydicom only; no external tool (no dciodvfy).

Output is deterministic: the same arguments give a byte-identical file. UIDs
lie under :data:`UID_ROOT`; study, series and frame of reference depend only
on the vendor, the SOP instance also on ``index``, so one call per index
makes one study::

    files = [write_vendor_ct(tmp_path / f"{i}.dcm", "ge", ExplicitVRLittleEndian, i)
             for i in range(20)]
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

__all__ = ["TRANSFER_SYNTAXES", "UID_ROOT", "VENDORS", "write_vendor_ct"]

VENDORS = ("siemens", "ge", "philips", "plain")
#: the native (uncompressed) transfer syntaxes write_vendor_ct can write
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
UID_ROOT = "1.2.826.0.1.3680043.99.77."

# vendor -> (Manufacturer, ManufacturerModelName, FilterType, ConvolutionKernel)
_EQUIPMENT = {
    "siemens": ("SIEMENS", "SOMATOM Definition AS+", "FLAT", "B30f"),
    "ge": ("GE MEDICAL SYSTEMS", "LightSpeed VCT", "BODY FILTER", "STANDARD"),
    "philips": ("Philips", "Brilliance 64", "B", "B"),
    "plain": ("ITH Medical", "CT-1000", "BODY", "SOFT"),
}
_SOFTWARE = {
    "siemens": ["syngo CT VA48A", "VA48A"],
    "ge": ["LightSpeedverrel", "gmp_vct.42"],
    "philips": ["3.2.1", "3.2.1.20210"],
    "plain": ["1.0", "1.0.3"],
}


def _uid(vendor: str, *parts: int) -> str:
    return UID_ROOT + ".".join(str(p) for p in (VENDORS.index(vendor) + 1, *parts))


def _pixels(rows: int, cols: int, index: int, little_endian: bool) -> bytes:
    """A 12-bit gradient shifted by index, as 16-bit words in the file's byte order."""
    values = [(r * 61 + c * 17 + index * 97) % 4096 for r in range(rows) for c in range(cols)]
    return struct.pack(f"{'<' if little_endian else '>'}{len(values)}H", *values)


def _csa(names: list[tuple[str, str, list[str]]]) -> bytes:
    """A Siemens CSA2 header (b"SV10" ...): (name, VR, values) entries."""
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<II", len(names), 77)
    for name, vr, values in names:
        out += struct.pack(
            "<64si4siii", name.encode(), len(values), vr.encode(), 0, len(values), 77
        )
        for value in values:
            raw = value.encode() + b"\x00"
            raw += b"\x00" * (-len(raw) % 4)
            out += struct.pack("<4i", len(value) + 1, len(value) + 1, 77, len(value) + 1) + raw
    return out


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _private_blocks(vendor: str, index: int) -> list[tuple[int, str, list[tuple[int, str, Any]]]]:
    """The vendor's private blocks: (group, creator, [(offset, VR, value)]).

    Made-up values; where pydicom's private dictionary knows an offset the VR
    is the one it gives (so implicit VR files read back the same), the others
    are offsets it does not know (read back as UN from implicit VR files)."""
    if vendor == "siemens":
        image = _csa(
            [("SliceResolution", "FD", ["1"]), ("ImaRelTablePosition", "IS", [f"{index}"])]
        )
        series = _csa([("DataFileName", "LO", [f"/data/ct/{index:05d}.ima"])])
        coad = [
            (0x10, "IS", "1040"),
            (0x22, "DS", "1.09"),
            (0x52, "DS", "34.5"),
            (0x54, "DS", "0.5"),
            (0x30, "LO", "SPI"),
            (0x31, "US", 3),
            (0x32, "SL", -12 - index),
            (0x33, "FD", 0.6),
            (0x34, "OB", b"\x01\x00\x02\x00\x10\x00\x20\x00"),
        ]
        return [
            (0x0019, "SIEMENS CT VA0  COAD", coad),
            (0x0029, "SIEMENS CSA HEADER", [(0x10, "OB", image), (0x20, "OB", series)]),
            (0x0029, "SIEMENS MEDCOM HEADER2", [(0x60, "LO", "com")]),
        ]
    if vendor == "ge":
        parm = [
            (0x12, "SS", [5, 7, 9]),
            (0x18, "DS", ["0", "0", f"{-1.25 * index:g}"]),
            (0x27, "SH", "1.375:1"),
            (0x28, "OB", b"GEMS\x00\x01"),
            (0x99, "LO", "NONE"),
        ]
        return [
            (0x0009, "GEMS_IDEN_01", [(0x01, "LO", "CT_LIGHTSPEED"), (0x02, "SH", "CT01")]),
            (
                0x0019,
                "GEMS_ACQU_01",
                [(0x02, "SL", 912), (0x03, "DS", "441.64"), (0x11, "SS", 2), (0x18, "LO", "S")],
            ),
            (0x0043, "GEMS_PARM_01", parm),
            (
                0x0045,
                "GEMS_HELIOS_01",
                [(0x01, "SS", 64), (0x02, "FL", 0.625), (0x61, "DS", "0.984375")],
            ),
        ]
    if vendor == "philips":
        item = _item(StudyDescription="Thorax/Abdomen, free text")
        stack = item.private_block(0x2001, "Philips Imaging DD 001", create=True)
        stack.add_new(0x50, "LO", "stack 1")
        elscint = [
            (0x0A, "US", 1),
            (0x27, "DS", "0.5"),
            (0x31, "UL", 1000 + index),
            (0x41, "LO", "0"),
            (0x4B, "SH", "64x0.625"),
        ]
        return [
            (0x01F1, "ELSCINT1", elscint),
            (0x00E1, "ELSCINT1", [(0x61, "LO", "CHEST_ABDOMEN.PRO"), (0x12, "DA", "20240115")]),
            (0x2001, "Philips Imaging DD 001", [(0x5F, "SQ", Sequence([item]))]),
        ]
    return []


def _dataset(vendor: str, index: int, rows: int, cols: int, charset: str | None) -> Dataset:
    manufacturer, model, filter_type, kernel = _EQUIPMENT[vendor]
    date, z = "20240115", -12.5 - 1.25 * index
    ds = Dataset()
    ds.SpecificCharacterSet = charset or "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] + (
        ["CT_SOM5 SPI"] if vendor == "siemens" else []
    )
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = f"1018{index % 60:02d}"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = _uid(vendor, 4, index + 1)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime, ds.SeriesTime = "101530", "101700.123"
    ds.AcquisitionTime = ds.ContentTime = f"1017{index % 60:02d}.456"
    ds.AccessionNumber = "A20240115001"
    ds.Modality = "CT"
    ds.Manufacturer = manufacturer
    ds.InstitutionName = "General Hospital"
    ds.InstitutionAddress = "2 Hospital Road, Springfield"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StationName = "CTAWP00001"
    ds.StudyDescription = "CT Thorax Abdomen"
    codes = _item(CodeValue="CTCHAB", CodingSchemeDesignator="L", CodeMeaning="CT Chest Abdomen")
    ds.ProcedureCodeSequence = Sequence([codes])
    ds.SeriesDescription = "Thorax 1.0 B30f"
    ds.PerformingPhysicianName = "Who^John"
    ds.OperatorsName = "Tech^Tom"
    ds.ManufacturerModelName = model
    refs = [
        _item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=_uid(vendor, 5, n))
        for n in (1, 2)
    ]
    ds.ReferencedImageSequence = Sequence(refs if vendor != "plain" else refs[:1])
    if vendor == "siemens":
        src = _item(
            ReferencedSOPClassUID=CTImageStorage,
            ReferencedSOPInstanceUID=_uid(vendor, 6, index + 1),
        )
        ds.SourceImageSequence = Sequence([src])
    ds.PatientName = "Müller^Jürgen" if charset == "ISO_IR 192" else "Doe^John"
    ds.PatientID = "PID0012345"
    ds.IssuerOfPatientID = "GH-MRN"
    ds.PatientBirthDate = "19450317"
    ds.PatientSex = "M"
    ds.PatientAge = "078Y"
    ds.PatientWeight = "82"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "80412"
    ds.SoftwareVersions = _SOFTWARE[vendor]
    ds.ProtocolName = "ThoraxAbdomen_Routine"
    ds.ReconstructionDiameter = "350"
    ds.DistanceSourceToDetector = "1085.6"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "158"
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 210 + index % 7
    ds.Exposure = 105
    ds.FilterType = filter_type
    ds.ConvolutionKernel = kernel
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = _uid(vendor, 1)
    ds.SeriesInstanceUID = _uid(vendor, 2)
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = ["-175", "-175", f"{z:g}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = _uid(vendor, 3)
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [f"{350 / rows:.6g}", f"{350 / cols:.6g}"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = (
        (["40", "-600"], ["400", "1200"]) if vendor == "siemens" else ("40", "400")
    )
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    req = _item(
        RequestedProcedureID="RP4711",
        ScheduledProcedureStepID="SPS4711",
        RequestedProcedureDescription="CT Thorax Abdomen with contrast",
    )
    ds.RequestAttributesSequence = Sequence([req])
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = date, "101530"
    ds.PerformedProcedureStepID = "PPS4711"
    ds.PerformedProcedureStepDescription = "CT Thorax Abdomen"
    ds.CTDIvol = 8.52
    if vendor == "siemens":
        ds["ReferencedImageSequence"].is_undefined_length = True
        for item in ds.ReferencedImageSequence:
            item.is_undefined_length_sequence_item = True
    elif vendor == "ge":
        ds["ProcedureCodeSequence"].is_undefined_length = True
    for group, creator, elements in _private_blocks(vendor, index):
        block = ds.private_block(group, creator, create=True)
        for offset, vr, value in elements:
            block.add_new(offset, vr, value)
    return ds


def write_vendor_ct(
    path: Path,
    vendor: str,
    transfer_syntax: str,
    index: int = 0,
    *,
    rows: int = 16,
    cols: int = 16,
    charset: str | None = None,
) -> Path:
    """Write instance ``index`` of the vendor's CT series to ``path`` (returned)."""
    if vendor not in VENDORS:
        raise ValueError(f"unknown vendor {vendor!r}, not one of {VENDORS}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax {transfer_syntax} is not a native one")
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    ds = _dataset(vendor, index, rows, cols, charset)
    ds.PixelData = _pixels(rows, cols, index, little)
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(_uid(vendor, 0))
    meta.ImplementationVersionName = f"{vendor.upper()}_CT_1"
    meta.SourceApplicationEntityTitle = "CT_SCANNER"
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, implicit_vr=implicit, little_endian=little, enforce_file_format=True)
    return path
