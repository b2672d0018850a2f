"""Synthetic DICOM generator for the tests (pydicom only, no numpy).

Every generated series carries recognisable PHI "markers" (``PHIMARK-...``) in
the attributes that de-identification must replace or remove, so a test can
grep any output (files, logs, HTTP bodies, the catalog) for leaks with
:meth:`Series.leak_strings`.

Pixel data is built once per (size, seed) from a seeded RNG and reused; each
instance only gets its own 16-byte prefix, so 200 x 512x512 CT files take a
few seconds, dominated by disk writes.

Typical use::

    s = make_ct_series(tmp_path / "in", 20)
    s2 = make_ct_series(tmp_path / "in2", 5, like=s)   # 2nd series, same study
    storescu(proxy.dicom_port, s.files)
"""

from __future__ import annotations

import functools
import random
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    RLELossless,
    RTPlanStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

__all__ = [
    "MARKER_PREFIX",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "Series",
    "iter_files",
    "make_ct_series",
    "make_instance",
    "make_instance_of_class",
    "make_mr_instance",
    "make_pet_instance",
    "make_series",
    "make_small_series",
]

#: Every marker string starts with this; grep for it to find any leak at all.
MARKER_PREFIX = "PHIMARK"

#: Transfer syntaxes the generator can write. RLE Lossless is encoded by a
#: trivial (literal-only, but valid) PackBits encoder below.
SUPPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
)

_MODALITY_CLASS: dict[str, UID] = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "PT": PositronEmissionTomographyImageStorage,
}

# Fixed, recognisable dates (DA/TM cannot hold a marker string).
_BIRTH_DATE = "19450317"
_STUDY_DATE = "20240115"
_STUDY_TIME = "101530"
_SERIES_TIME = "101700"

_PRIVATE_GROUP = 0x0009
_PRIVATE_CREATOR = "ITH TEST"


@dataclass
class Series:
    """What a generator call wrote, and the identifying values it used.

    ``phi``        patient- and study-level attributes, keyword -> original value
                   (what ``POST /api/phi-metadata/`` should give back), including
                   the original ``StudyInstanceUID``.
    ``series_phi`` series/equipment-level identifying values, including the
                   original ``SeriesInstanceUID`` and ``FrameOfReferenceUID``.
    ``other_phi``  identifying values that are not plain top-level keywords:
                   a private tag and a value nested in a sequence.
    """

    files: list[Path]
    phi: dict[str, str]
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    token: str
    series_phi: dict[str, str] = field(default_factory=dict)
    other_phi: dict[str, str] = field(default_factory=dict)

    @property
    def patient_id(self) -> str:
        return self.phi["PatientID"]

    @property
    def patient_name(self) -> str:
        return self.phi["PatientName"]

    def markers(self) -> set[str]:
        """All PHIMARK strings in the files (empty when ``markers=False``)."""
        values = [*self.phi.values(), *self.series_phi.values(), *self.other_phi.values()]
        # PN values are "PHIMARK-NAME-<token>^TEST": the family name is the marker
        return {v.split("^")[0] for v in values if v.startswith(MARKER_PREFIX)}

    def leak_strings(self) -> set[str]:
        """Strings that must not appear in anonymized output: the markers and
        every original UID (study, series, frame of reference, instances)."""
        uids = {self.study_uid, self.series_uid, *self.sop_uids}
        if "FrameOfReferenceUID" in self.series_phi:
            uids.add(self.series_phi["FrameOfReferenceUID"])
        return self.markers() | uids


# --------------------------------------------------------------------------
# pixel data
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _pixel_template(rows: int, cols: int, seed: int) -> bytes:
    """Little-endian 16-bit pixels with 12 significant bits (values 0..4095)."""
    rng = random.Random(seed)
    n = rows * cols
    low = rng.randbytes(n)
    high = rng.randbytes(n).translate(bytes(b & 0x0F for b in range(256)))
    buf = bytearray(2 * n)
    buf[0::2] = low
    buf[1::2] = high
    return bytes(buf)


def _instance_pixels(template: bytes, index: int) -> bytes:
    """The template with a per-instance 16-byte prefix, so no two instances
    share pixel data (values stay within 12 bits)."""
    prefix = bytearray(index.to_bytes(8, "little") * 2)
    prefix[1::2] = bytes(b & 0x0F for b in prefix[1::2])
    return bytes(prefix) + template[len(prefix) :]


def _swap16(data: bytes) -> bytes:
    out = bytearray(len(data))
    out[0::2] = data[1::2]
    out[1::2] = data[0::2]
    return bytes(out)


def _packbits_literal(segment: bytes) -> bytes:
    """PackBits with literal runs only (header n-1, then n bytes): valid RLE,
    no compression, but fast in pure Python."""
    out = bytearray()
    for i in range(0, len(segment), 128):
        chunk = segment[i : i + 128]
        out.append(len(chunk) - 1)
        out += chunk
    if len(out) % 2:  # segments are padded to even length
        out.append(0x80)  # PackBits no-op byte
    return bytes(out)


def _rle_frame(le16: bytes) -> bytes:
    """One RLE Lossless frame for 16-bit little-endian pixels (PS3.5 Annex G):
    segment 1 = most significant bytes, segment 2 = least significant bytes."""
    segments = [_packbits_literal(le16[1::2]), _packbits_literal(le16[0::2])]
    header = [len(segments)] + [0] * 15
    offset = 64
    for i, seg in enumerate(segments):
        header[i + 1] = offset
        offset += len(seg)
    return b"".join(v.to_bytes(4, "little") for v in header) + b"".join(segments)


# --------------------------------------------------------------------------
# identifying values
# --------------------------------------------------------------------------


def _phi_values(token: str, markers: bool) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(patient/study phi, series phi, other phi) without the UIDs.

    SH values are limited to 16 characters: those markers are
    ``PHIMARK`` + one letter + the 8-hex token.
    """
    m = MARKER_PREFIX
    if markers:
        phi = {
            "PatientName": f"{m}-NAME-{token}^TEST",
            "PatientID": f"{m}-PID-{token}",
            "OtherPatientIDs": f"{m}-OPID-{token}",
            "PatientAddress": f"{m}-ADDR-{token}",
            "PatientBirthDate": _BIRTH_DATE,
            "PatientSex": "F",
            "PatientAge": "078Y",
            "AccessionNumber": f"{m}A{token}",
            "StudyID": f"{m}S{token}",
            "StudyDate": _STUDY_DATE,
            "StudyTime": _STUDY_TIME,
            "ReferringPhysicianName": f"{m}-REF-{token}^TEST",
            "StudyDescription": f"{m}-SDESC-{token}",
        }
        series = {
            "SeriesDescription": f"{m}-SERDESC-{token}",
            "OperatorsName": f"{m}-OPER-{token}^TEST",
            "PerformingPhysicianName": f"{m}-PERF-{token}^TEST",
            "InstitutionName": f"{m}-INST-{token}",
            "InstitutionAddress": f"{m}-IADDR-{token}",
            "StationName": f"{m}T{token}",
            "DeviceSerialNumber": f"{m}-DSN-{token}",
        }
        other = {
            f"({_PRIVATE_GROUP:04X},1010)": f"{m}-PRIV-{token}",
            "RequestAttributesSequence[0].RequestedProcedureID": f"{m}R{token}",
            "RequestAttributesSequence[0].ScheduledProcedureStepID": f"{m}P{token}",
        }
    else:
        phi = {
            "PatientName": "DOE^JANE",
            "PatientID": f"MRN{int(token, 16) % 10**7:07d}",
            "OtherPatientIDs": "OLD-4711",
            "PatientAddress": "1 Main Street, Springfield",
            "PatientBirthDate": _BIRTH_DATE,
            "PatientSex": "F",
            "PatientAge": "078Y",
            "AccessionNumber": f"ACC{int(token, 16) % 10**8:08d}",
            "StudyID": "1",
            "StudyDate": _STUDY_DATE,
            "StudyTime": _STUDY_TIME,
            "ReferringPhysicianName": "HOUSE^GREGORY",
            "StudyDescription": "CHEST ABDOMEN",
        }
        series = {
            "SeriesDescription": "AXIAL 1.0",
            "OperatorsName": "TECH^TOM",
            "PerformingPhysicianName": "WHO^JOHN",
            "InstitutionName": "General Hospital",
            "InstitutionAddress": "2 Hospital Road",
            "StationName": "CT01",
            "DeviceSerialNumber": "SN12345",
        }
        other = {
            f"({_PRIVATE_GROUP:04X},1010)": "private note",
            "RequestAttributesSequence[0].RequestedProcedureID": "RP1",
            "RequestAttributesSequence[0].ScheduledProcedureStepID": "SPS1",
        }
    return phi, series, other


# --------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------


def _base_dataset(
    *,
    sop_class: str,
    sop_uid: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str | None,
    phi: dict[str, str],
    series_phi: dict[str, str],
    other_phi: dict[str, str],
    series_number: int,
    instance_number: int,
) -> Dataset:
    """Patient, study, series, equipment and SOP common modules."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for keyword, value in phi.items():
        setattr(ds, keyword, value)
    for keyword, value in series_phi.items():
        if keyword not in ("SeriesInstanceUID", "FrameOfReferenceUID"):
            setattr(ds, keyword, value)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    if frame_uid is not None:
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDate = phi["StudyDate"]
    ds.SeriesTime = _SERIES_TIME
    ds.ContentDate = phi["StudyDate"]
    ds.ContentTime = _SERIES_TIME
    ds.AcquisitionDate = phi["StudyDate"]
    ds.AcquisitionTime = _SERIES_TIME
    ds.InstanceCreationDate = phi["StudyDate"]
    ds.InstanceCreationTime = _SERIES_TIME
    ds.Manufacturer = "ITH TEST GENERATOR"
    ds.ManufacturerModelName = "dicomgen"
    ds.SoftwareVersions = "1"
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "CHEST"

    item = Dataset()
    item.RequestedProcedureID = other_phi["RequestAttributesSequence[0].RequestedProcedureID"]
    item.ScheduledProcedureStepID = other_phi[
        "RequestAttributesSequence[0].ScheduledProcedureStepID"
    ]
    ds.RequestAttributesSequence = Sequence([item])

    block = ds.private_block(_PRIVATE_GROUP, _PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", other_phi[f"({_PRIVATE_GROUP:04X},1010)"])
    return ds


def _add_image_pixel(ds: Dataset, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0


def _add_plane(ds: Dataset, index: int, rows: int, thickness: float) -> None:
    spacing = 350.0 / rows
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.SliceThickness = f"{thickness:g}"
    z = -index * thickness
    ds.ImagePositionPatient = ["-175", "-175", f"{z:g}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:g}"


def _add_modality(ds: Dataset, modality: str, index: int, n: int) -> None:
    """The modality-specific type 1/2 attributes of the CT, MR and PET image modules."""
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
    elif modality == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = "1.5"
        ds.ImagedNucleus = "1H"
        ds.AcquisitionNumber = 1
    elif modality == "PT":
        # PET requires 16 significant bits
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PatientOrientationCodeSequence = Sequence()
        del ds.PatientPosition  # not allowed together with the code sequence
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.CorrectedImage = ["DECY", "ATTN"]
        ds.DecayCorrection = "START"
        ds.RandomsCorrectionMethod = "NONE"
        ds.AttenuationCorrectionMethod = "CT"
        ds.ReconstructionMethod = "OSEM"
        ds.CollimatorType = "NONE"
        ds.NumberOfSlices = n
        ds.ImageIndex = index + 1
        ds.FrameReferenceTime = "0"
        ds.ActualFrameDuration = 120000
        ds.PrimaryPromptsCountsAccumulated = 0
        ds.DecayFactor = "1"
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.AcquisitionNumber = 1
        ds.PatientGantryRelationshipCodeSequence = Sequence()
        radio = Dataset()
        radio.Radiopharmaceutical = "Fluorodeoxyglucose"
        radio.RadionuclideTotalDose = "370000000"
        radio.RadionuclideHalfLife = "6586.2"
        radio.RadiopharmaceuticalStartTime = "093000"
        nuclide = Dataset()
        nuclide.CodeValue = "77004003"
        nuclide.CodingSchemeDesignator = "SCT"
        nuclide.CodeMeaning = "^18^Fluorine"
        radio.RadionuclideCodeSequence = Sequence([nuclide])
        ds.RadiopharmaceuticalInformationSequence = Sequence([radio])


def _write(path: Path, ds: Dataset, transfer_syntax: UID, pixels: bytes | None) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    if pixels is not None:
        if transfer_syntax == RLELossless:
            ds.PixelData = encapsulate([_rle_frame(pixels)])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = _swap16(pixels) if transfer_syntax == ExplicitVRBigEndian else pixels
            ds["PixelData"].VR = "OW"
    dcmwrite(path, ds, enforce_file_format=True)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def make_series(
    out_dir: str | Path,
    n: int,
    *,
    modality: str = "CT",
    rows: int = 512,
    cols: int = 512,
    patient_name: str | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    markers: bool = True,
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_class: str | None = None,
    seed: int = 0,
    token: str | None = None,
    like: Series | None = None,
    series_number: int = 1,
    slice_thickness: float = 1.0,
    filename_prefix: str = "IMG",
) -> Series:
    """Write ``n`` instances of one image series into ``out_dir``.

    ``seed`` fixes the pixel data. ``token`` (8 hex digits, random by default)
    makes the marker strings; ``like=<Series>`` reuses another series'
    token, patient and study (a second series of the same study).
    ``sop_class`` overrides the class chosen from ``modality`` (the dataset
    keeps the modality's attributes).
    """
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    if modality not in _MODALITY_CLASS:
        raise ValueError(f"unsupported modality {modality!r}; use make_instance_of_class")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if like is not None:
        token = token or like.token
        study_uid = study_uid or like.study_uid
    token = token or secrets.token_hex(4)
    phi, series_phi, other_phi = _phi_values(token, markers)
    if like is not None:
        # same patient and study, whatever markers/token say
        phi = dict(like.phi)
    if patient_name is not None:
        phi["PatientName"] = patient_name
    if patient_id is not None:
        phi["PatientID"] = patient_id
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    phi["StudyInstanceUID"] = study_uid
    series_phi["SeriesInstanceUID"] = series_uid
    series_phi["FrameOfReferenceUID"] = frame_uid
    sop_class = UID(sop_class or _MODALITY_CLASS[modality])

    template = _pixel_template(rows, cols, seed)
    files: list[Path] = []
    sop_uids: list[str] = []
    for i in range(n):
        sop_uid = generate_uid()
        ds = _base_dataset(
            sop_class=sop_class,
            sop_uid=sop_uid,
            modality=modality,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            phi={k: v for k, v in phi.items() if k != "StudyInstanceUID"},
            series_phi=series_phi,
            other_phi=other_phi,
            series_number=series_number,
            instance_number=i + 1,
        )
        _add_image_pixel(ds, rows, cols)
        _add_plane(ds, i, rows, slice_thickness)
        _add_modality(ds, modality, i, n)
        path = out / f"{filename_prefix}{series_number:03d}_{i + 1:05d}.dcm"
        _write(path, ds, transfer_syntax, _instance_pixels(template, i))
        files.append(path)
        sop_uids.append(sop_uid)

    return Series(
        files=files,
        phi=phi,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uids=sop_uids,
        sop_class_uid=str(sop_class),
        transfer_syntax=str(transfer_syntax),
        modality=modality,
        token=token,
        series_phi=series_phi,
        other_phi=other_phi,
    )


def make_ct_series(
    out_dir: str | Path,
    n: int,
    rows: int = 512,
    cols: int = 512,
    patient_name: str | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    markers: bool = True,
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_class: str = CTImageStorage,
    seed: int = 0,
    **kwargs: object,
) -> Series:
    """``n`` CT Image Storage instances (512x512 by default). See :func:`make_series`."""
    return make_series(
        out_dir,
        n,
        modality="CT",
        rows=rows,
        cols=cols,
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        markers=markers,
        transfer_syntax=transfer_syntax,
        sop_class=sop_class,
        seed=seed,
        **kwargs,  # type: ignore[arg-type]  # make_series' keywords
    )


def make_small_series(
    out_dir: str | Path, n: int, rows: int = 64, cols: int = 64, **kwargs: object
) -> Series:
    """Like :func:`make_ct_series` (or any ``modality=``) but 64x64 by default."""
    kwargs.setdefault("modality", "CT")
    return make_series(out_dir, n, rows=rows, cols=cols, **kwargs)  # type: ignore[arg-type]  # make_series' keywords


def make_instance(
    out_dir: str | Path, modality: str = "CT", rows: int = 64, cols: int = 64, **kwargs: object
) -> Series:
    """One minimal valid instance of ``modality`` ("CT", "MR" or "PT")."""
    return make_series(out_dir, 1, modality=modality, rows=rows, cols=cols, **kwargs)  # type: ignore[arg-type]  # make_series' keywords


def make_mr_instance(out_dir: str | Path, **kwargs: object) -> Series:
    """One minimal valid MR Image Storage instance."""
    return make_instance(out_dir, "MR", **kwargs)  # type: ignore[arg-type]  # make_series' keywords


def make_pet_instance(out_dir: str | Path, **kwargs: object) -> Series:
    """One minimal valid PET Image Storage instance."""
    return make_instance(out_dir, "PT", **kwargs)  # type: ignore[arg-type]  # make_series' keywords


def make_instance_of_class(
    out_dir: str | Path,
    sop_class_uid: str = SecondaryCaptureImageStorage,
    *,
    markers: bool = True,
    token: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    rows: int = 64,
    cols: int = 64,
) -> Series:
    """One instance of an arbitrary (typically unsupported) SOP class, e.g.
    Secondary Capture (default, with pixels) or RT Plan (no pixels), to test
    rejection. Carries the same PHI markers as the image series."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sop_class = UID(sop_class_uid)
    transfer_syntax = UID(transfer_syntax)
    token = token or secrets.token_hex(4)
    phi, series_phi, other_phi = _phi_values(token, markers)
    study_uid, series_uid, sop_uid = generate_uid(), generate_uid(), generate_uid()
    phi["StudyInstanceUID"] = study_uid
    series_phi["SeriesInstanceUID"] = series_uid

    modality = {SecondaryCaptureImageStorage: "OT", RTPlanStorage: "RTPLAN"}.get(sop_class, "OT")
    ds = _base_dataset(
        sop_class=sop_class,
        sop_uid=sop_uid,
        modality=modality,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=None,
        phi={k: v for k, v in phi.items() if k != "StudyInstanceUID"},
        series_phi=series_phi,
        other_phi=other_phi,
        series_number=1,
        instance_number=1,
    )
    pixels: bytes | None = None
    if sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"
        ds.PatientOrientation = ""
        _add_image_pixel(ds, rows, cols)
        pixels = _instance_pixels(_pixel_template(rows, cols, 0), 0)
    elif sop_class == RTPlanStorage:
        ds.RTPlanLabel = "PLAN1"
        ds.RTPlanDate = phi["StudyDate"]
        ds.RTPlanTime = _STUDY_TIME
        ds.RTPlanGeometry = "TREATMENT_DEVICE"
    path = out / "INSTANCE.dcm"
    _write(path, ds, transfer_syntax, pixels)
    return Series(
        files=[path],
        phi=phi,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uids=[sop_uid],
        sop_class_uid=str(sop_class),
        transfer_syntax=str(transfer_syntax),
        modality=modality,
        token=token,
        series_phi=series_phi,
        other_phi=other_phi,
    )


def iter_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories (recursively) into the ``.dcm`` files below them."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(p.rglob("*.dcm")) if p.is_dir() else [p])
    return out
