"""The de-identification walk (issue 11's pass) does what the previous one did.

``tests/deid_reference.py`` keeps ``deid/engine.py`` (with what it used of
``raw.py``, ``meta.py`` and ``Profile.rule``) as it was before the pass.
Both run on two reads of the same file, under several option sets, and must
leave the same thing: the same output file through ``write_joined`` (meta,
header, pixels, trailer), the same elements left raw or decoded in the
header, and the same ``DeidResult`` including every recorded original, its
type and the order of the records (the vault stores them as JSON).

The corpus: generated series in Explicit VR LE, Implicit VR LE, Explicit VR
BE and RLE; the canary study (every Table E.1-1 row, nested sequences,
private blocks, curves, overlays, the file meta, elements after the pixel
data); UN-encoded and untyped sequences three deep (tests/test_deid_un.py's
files); odd cases (tests/test_encode_equal.py's); and hand-made files in
ISO_IR 100, ISO 2022 IR 87 (Japanese, escape sequences) and ISO_IR 192
(UTF-8), each in the three encodings, with text to remove, replace and
clean at the top level and in nested items (one with its own character
set), private elements safe-listed (text, UID, sequence) and not.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

import canary
import dicomgen
from deid_reference import Deidentifier as Reference
from ith_proxy.deid.engine import Deidentifier
from ith_proxy.dicom import files as dicomfile
from test_deid_un import CASES, _deep_item, write_case
from test_encode_equal import _odd

SECRET = b"0123456789abcdef0123456789abcdef-equal"
SITE_PRIVATE = ((0x0009, "ACME 1.0", 0x02), (0x0009, "CREATOR X", 0x11))
OPTION_SETS = {
    "basic": frozenset(),
    "safe-private": frozenset({"retain_safe_private"}),
    "clean": frozenset(
        {"clean_descriptors", "retain_long_modified_dates", "retain_patient_characteristics"}
    ),
    "retain": frozenset(
        {
            "retain_uids",
            "retain_device_identity",
            "retain_institution_identity",
            "retain_long_full_dates",
            "retain_safe_private",
        }
    ),
}
# (SpecificCharacterSet, patient name, a description, a nested name): not ASCII
CHARSETS = {
    "latin1": ("ISO_IR 100", "Müller^Jörg", "Tête et cou Müller", "Gödel^Kurt"),
    "japanese": (
        ["", "ISO 2022 IR 87"],
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "頭部 山田 検査",
        "Suzuki^Hanako=鈴木^花子=すずき^はなこ",
    ),
    "utf8": ("ISO_IR 192", "Иванов^Дмитрий", "Голова Иванов 😀", "Петров^Иван"),
}
ENCODINGS = {
    "evr": (ExplicitVRLittleEndian, False, True),
    "ivr": (ImplicitVRLittleEndian, True, True),
    "be": (ExplicitVRBigEndian, False, False),
}


def _referenced(name: str) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.99.11.9"
    deeper = Dataset()
    deeper.SpecificCharacterSet = "ISO_IR 192"
    deeper.PersonName = "Ünïcode^Ñame"
    deeper.ContentCreatorName = name
    deeper.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.99.11.10"
    ref.ReferencedImageSequence = Sequence([deeper, Dataset()])
    ref.PersonName = name
    return ref


def _charset_file(path: Path, name: str, ts: str, implicit: bool, little: bool) -> Path:
    charset, patient, description, nested = CHARSETS[name]
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.99.11.{len(name)}.{int(implicit)}{int(little)}"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.11.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.11.2"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.99.11.3"
    ds.StudyDate, ds.StudyTime, ds.ContentDate = "20240131", "101530.25", "20240131"
    ds.AcquisitionDateTime = "20240131101530"
    ds.PatientName = patient
    ds.PatientID = "MRN-123456"
    ds.PatientBirthDate = "19450317"
    ds.PatientSex, ds.PatientAge, ds.PatientWeight = "F", "078Y", "61.5"
    ds.OtherPatientIDs = ["OPID-1", "OPID-2"]
    ds.ReferringPhysicianName = nested
    ds.OperatorsName = [patient, nested]
    ds.InstitutionName = description
    ds.StudyDescription = description
    ds.SeriesDescription = f"{description} MRN-123456 5551234567"
    ds.ImageComments = f"{patient} {description}"
    ds.AccessionNumber = ""
    ds.StationName = "CT01"
    ds.DeviceSerialNumber = "SN 0042"
    ds.Modality, ds.Manufacturer = "CT", "ACME"
    # nested: a sequence the profile removes, one it keeps (its items walked),
    # and an item with its own character set
    request = Dataset()
    request.RequestedProcedureDescription = description
    request.ScheduledProcedureStepID = "SPS 1"
    request.RequestedProcedureID = nested
    ds.RequestAttributesSequence = Sequence([request])
    ds.ReferencedSeriesSequence = Sequence([_referenced(nested)])  # kept, walked
    ds.ReferencedStudySequence = Sequence([_referenced(nested)])  # emptied
    # private: safe-listed text (GEMS), UID (NQHeader), sequence (Philips),
    # site-listed (ACME), and unlisted
    ds.private_block(0x0019, "GEMS_ACQU_01", create=True).add_new(0x9E, "LO", description)
    nq = ds.private_block(0x0099, "NQHeader", create=True)
    nq.add_new(0x01, "UI", "1.2.826.0.1.3680043.99.11.11")
    inner = Dataset()
    inner.PatientName = nested
    inner.StudyInstanceUID = "1.2.826.0.1.3680043.99.11.1"
    inner.private_block(0x0009, "ACME 1.0", create=True).add_new(0x02, "PN", patient)
    philips = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
    philips.add_new(0x5F, "SQ", Sequence([inner]))
    acme = ds.private_block(0x0009, "ACME 1.0", create=True)
    acme.add_new(0x01, "LO", description)
    acme.add_new(0x02, "PN", patient)
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x00" * 4
    ds.add_new(0xFFFAFFFA, "SQ", Sequence([Dataset()]))  # Digital Signatures Sequence
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY"
    ds.save_as(path, implicit_vr=implicit, little_endian=little, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("deid-equal")
    files: list[Path] = []
    for i, ts in enumerate(
        (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless)
    ):
        s = dicomgen.make_series(root / f"ct{i}", 1, rows=8, cols=8, transfer_syntax=ts)
        files += [Path(p) for p in s.files]
    return files + hard_cases(root)


def hard_cases(root: Path) -> list[Path]:
    """The corpus's files beyond plain series (also tests/test_flat_equal.py's):
    the canary study, the UN cases, the odd files and the character sets."""
    study = canary.build_canary(root / "canary", series=(1,), rows=8, cols=8)
    files = [i.path for i in study.instances]
    deep = _deep_item(study)
    for i, case in enumerate(CASES):
        files.append(root / f"un-{i}.dcm")
        write_case(files[-1], case, i, deep)
    for name, (ts, implicit, little) in ENCODINGS.items():
        files.append(_odd(root / f"odd-{name}.dcm", ts, implicit, little))
        for charset in CHARSETS:
            path = root / f"{charset}-{name}.dcm"
            files.append(_charset_file(path, charset, ts, implicit, little))
    return files


def _state(ds: Dataset | None) -> list[tuple[int, str]]:
    """Which elements the dataset holds, in order, and whether each is raw."""
    if ds is None:
        return []
    return [(int(tag), type(elem).__name__) for tag, elem in ds._dict.items()]


def _run(deid: Deidentifier | Reference, path: Path) -> tuple[bytes, list, str]:
    split = dicomfile.read_split(path)
    result = deid.apply(split.header)
    if split.trailer is not None:
        deid.apply_fragment(split.trailer, result)
    out = io.BytesIO()
    dicomfile.write_joined(out, split)
    state = [_state(split.header), _state(split.header.file_meta), _state(split.trailer)]
    # repr: values, their types and the order of the records, as the vault sees them
    return out.getvalue(), state, repr(dataclasses.asdict(result))


@pytest.mark.parametrize("options", list(OPTION_SETS.values()), ids=list(OPTION_SETS))
def test_the_walk_does_what_the_previous_one_did(
    corpus: list[Path], options: frozenset[str]
) -> None:
    new = Deidentifier(SECRET, options, SITE_PRIVATE)
    old = Reference(SECRET, options, SITE_PRIVATE)
    assert len(corpus) > 25
    for path in corpus:
        got, want = _run(new, path), _run(old, path)
        assert got[0] == want[0], f"{path.name}: output bytes differ"
        assert got[1] == want[1], f"{path.name}: raw/decoded elements differ"
        assert got[2] == want[2], f"{path.name}: the results differ"


def test_the_corpus_has_what_the_walk_branches_on(corpus: list[Path]) -> None:
    """Non-ASCII text read raw in each character set, recorded from nested
    items and from private elements kept and removed (else the comparison
    above would prove little)."""
    deid = Deidentifier(SECRET, OPTION_SETS["safe-private"], SITE_PRIVATE)
    phi: dict[str, dict[str, object]] = {}
    names = set()
    for path in corpus:
        if path.name.startswith(("latin1", "japanese", "utf8")):
            split = dicomfile.read_split(path)
            assert isinstance(split.header.get_item(0x00100010), RawDataElement)
            result = deid.apply(split.header)
            names.add(result.phi["patient"]["PatientName"])
            for level, values in result.phi.items():
                phi.setdefault(level, {}).update(values)
    assert names == {c[1] for c in CHARSETS.values()}  # read raw in each character set
    assert "RequestAttributesSequence" in phi["study"]
    assert "ReferencedSeriesSequence[0].ReferencedImageSequence[0].PersonName" in phi["instance"]
    assert "ReferencedSeriesSequence[0].PersonName" in phi["instance"]
    assert "ReferencedStudySequence" in phi["instance"]
    assert "(0009,1001)" in phi["instance"]  # unlisted private text, removed
    assert "(2001,105F)[0].PatientName" in phi["instance"]  # inside a safe private sequence
    assert "(0099,1001)" in phi["instance"]  # a safe private UID, remapped


def test_a_dataset_without_file_meta() -> None:
    """Decoded elements and no transfer syntax: the markers are added decoded."""

    def build() -> Dataset:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID = "Müller^Jörg", "P1"
        ds.StudyInstanceUID = "1.2.3.4"
        ds.StudyDescription = "Tête"
        return ds

    encoded = []
    for deid in (Deidentifier(SECRET), Reference(SECRET)):
        ds = build()
        result = deid.apply(ds)
        fp = DicomFileLike(io.BytesIO())
        fp.is_implicit_VR, fp.is_little_endian = False, True
        write_dataset(fp, ds)
        encoded.append((fp.parent.getvalue(), _state(ds), repr(dataclasses.asdict(result))))
    assert encoded[0] == encoded[1]
