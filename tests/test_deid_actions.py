"""One decision for both engine paths (issue 7).

The engine applies an action to an element along one of two paths: raw text
elements are read and replaced without pydicom decoding them (``_act_raw``),
everything else goes through a decoded DataElement (``_act``).  Both must
give the same output and record the same original, or a value would leak
(or vanish from the vault) depending on how the element happened to be held.
Every case here runs through both: once with the element raw, as read from
a file, and once decoded.
"""

from __future__ import annotations

import io

import pytest
from pydicom.charset import decode_bytes, python_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from ith_proxy.deid.actions import KEEP, REMOVE, Context, replacement
from ith_proxy.deid.engine import Deidentifier, DeidResult
from ith_proxy.deid.pseudo import remap_uid
from ith_proxy.deid.raw import TEXT_VRS, encode_raw, read_text

SECRET = b"0123456789abcdef0123456789abcdef-actions"
DAYS = -400
IDENTIFIERS = ["DOE", "JOHN", "DOE^JOHN", "MRN12345"]
PRIVATE_UI = 0x00091010


def _item() -> Dataset:
    item = Dataset()
    item.PatientName = "DOE^JOHN"
    item.CodeValue = "113100"
    return item


# (name, tag, VR, action, value as stored): value is the raw bytes of the element,
# or a Dataset list for a sequence
CASES = [
    # empty values, every action
    *[
        (f"empty {vr} {a}", tag, vr, a, b"")
        for tag, vr in (
            (0x00080050, "SH"),
            (0x00080020, "DA"),
            (0x0020000D, "UI"),
            (0x0040A123, "PN"),
            (0x00080080, "LO"),
        )
        for a in ("X", "Z", "D", "D?", "U", "C")
    ],
    ("padding only SH Z", 0x00080050, "SH", "Z", b"  "),
    ("padding only UI U", 0x0020000D, "UI", "U", b"\x00\x00"),
    # pseudonyms: replaced even when empty, whatever the action but X
    *[
        (f"{kw} {a} {v!r}", tag, "LO" if kw == "PatientID" else "PN", a, v)
        for kw, tag in (("PatientID", 0x00100020), ("PatientName", 0x00100010))
        for a in ("X", "Z", "D", "U", "C")
        for v in (b"", b"DOE^JOHN")
    ],
    # text
    ("SH Z", 0x00080050, "SH", "Z", b"ACC123"),
    ("SH D", 0x00080050, "SH", "D", b"ACC123"),
    ("SH X", 0x00080050, "SH", "X", b"ACC123"),
    ("SH U", 0x00080050, "SH", "U", b"ACC123"),
    ("LO multi Z", 0x00101000, "LO", "Z", b"A1\\B2 "),
    ("CS multi D", 0x00080008, "CS", "D", b"ORIGINAL\\PRIMARY"),
    ("PN D", 0x0040A123, "PN", "D", b"DOE^JOHN"),
    ("PN X non-ASCII", 0x0040A123, "PN", "X", "Müller^Jürgen=ミュラー".encode()),
    ("PN Z non-ASCII", 0x0040A123, "PN", "Z", "Müller^Jürgen".encode()),
    ("LO X leading space", 0x00080080, "LO", "X", b"  GENERAL HOSPITAL "),
    ("PN C", 0x0040A123, "PN", "C", b"DOE^JOHN"),
    ("LO C", 0x00081030, "LO", "C", b"CT for John Doe MRN12345 tel 5551234567"),
    ("LT C", 0x00204000, "LT", "C", b"seen by DOE\\JOHN"),
    ("ST D", 0x0070006, "ST", "D", b"free text"),
    ("UT D", 0x00720070, "UT", "D", b"free text"),
    ("UC D", 0x00189371, "UC", "D", b"DET 1 "),
    ("UR D", 0x00720071, "UR", "D", b"http://h/x"),
    ("AE D", 0x21000140, "AE", "D", b"MODALITY1 "),
    ("AE Z", 0x00020016, "AE", "Z", b"MODALITY1 "),
    ("AS D", 0x0072005F, "AS", "D", b"042Y"),
    ("AS Z", 0x00101010, "AS", "Z", b"042Y"),
    ("DS D", 0x00101020, "DS", "D", b"1.75"),
    ("DS multi Z", 0x00101020, "DS", "Z", b"1.75\\2 "),
    ("IS D", 0x00200011, "IS", "D", b"12"),
    ("DS C", 0x00101020, "DS", "C", b"1.75"),
    # dates and times, under both date modes
    ("DA D", 0x0040A121, "DA", "D", b"20240131"),
    ("DA Z", 0x00080020, "DA", "Z", b"20240131"),
    ("DA C", 0x00080020, "DA", "C", b"20240131"),
    ("DA C range", 0x00080020, "DA", "C", b"20240131-20240202"),
    ("DA C multi", 0x00080020, "DA", "C", b"20240131\\20240201"),
    ("DA C bad", 0x00080020, "DA", "C", b"2024XX31"),
    ("DA D?", 0x00080021, "DA", "D?", b"20240131"),
    ("DT D", 0x0040A120, "DT", "D", b"20240131123000.5+0100"),
    ("DT C", 0x0008002A, "DT", "C", b"20240131123000.5+0100"),
    ("TM D", 0x0040A122, "TM", "D", b"123000.5 "),
    ("TM C", 0x00080030, "TM", "C", b"123000.5 "),
    ("TM D?", 0x00080031, "TM", "D?", b"123000"),
    # UIDs
    ("UI U", 0x0020000D, "UI", "U", b"1.2.3.4.5\x00"),
    ("UI U multi", 0x00081155, "UI", "U", b"1.2.3.4.5\\1.2.3.4.6\x00"),
    ("UI U standard", 0x00081150, "UI", "U", b"1.2.840.10008.5.1.4.1.1.2\x00"),
    ("UI U empty part", 0x00081155, "UI", "U", b"1.2.3\\"),
    ("UI D", 0x006A0003, "UI", "D", b"1.2.3.4.5\x00"),
    ("UI D multi", 0x006A0003, "UI", "D", b"1.2.3.4.5\\1.2.3.4.6\x00"),
    ("UI Z", 0x0020000D, "UI", "Z", b"1.2.3.4.5\x00"),
    ("UI X", 0x0020000D, "UI", "X", b"1.2.3.4.5\x00"),
    ("UI C", 0x0020000D, "UI", "C", b"1.2.3.4.5\x00"),
    ("private UI U", PRIVATE_UI, "UI", "U", b"1.2.3.4.5\x00"),
    # binary and numeric VRs, AT
    ("OB D", 0x00420011, "OB", "D", b"%PDF-1.4 DOE"),
    ("OB Z", 0x00420011, "OB", "Z", b"%PDF-1.4 DOE"),
    ("OB X", 0x00420011, "OB", "X", b"%PDF-1.4 DOE"),
    ("OB C", 0x00420011, "OB", "C", b"%PDF-1.4 DOE"),
    ("OB empty D", 0x00420011, "OB", "D", b""),
    ("OW D", 0x00340002, "OW", "D", b"\x01\x02\x03\x04"),
    ("US D", 0x00280010, "US", "D", b"\x00\x02"),
    ("US Z", 0x00280010, "US", "Z", b"\x00\x02"),
    ("FD D", 0x00181318, "FD", "D", b"\x00\x00\x00\x00\x00\x00\xf0\x3f"),
    ("AT D", 0x00209165, "AT", "D", b"\x20\x00\x32\x00"),
    # UN: a value of unknown type, and a re-encoded standard text attribute
    ("UN D", 0x0072006D, "UN", "D", b"DOE^JOHN"),
    ("UN Z", 0x0072006D, "UN", "Z", b"DOE^JOHN"),
    ("UN X", 0x0072006D, "UN", "X", b"DOE^JOHN"),
    ("UN as LO Z", 0x00080080, "UN", "Z", b"GENERAL HOSPITAL"),
    ("UN as PN D", 0x0040A123, "UN", "D", b"DOE^JOHN"),
    # sequences
    ("SQ D", 0x0040A730, "SQ", "D", [_item()]),
    ("SQ Z", 0x0040A730, "SQ", "Z", [_item()]),
    ("SQ X", 0x0040A730, "SQ", "X", [_item()]),
    ("SQ D empty", 0x0040A730, "SQ", "D", []),
    ("SQ Z empty", 0x0040A730, "SQ", "Z", []),
]


def _raw(tag: int, vr: str, value: object) -> RawDataElement:
    if vr == "SQ":
        return encode_raw([DataElement(tag, "SQ", Sequence(value))], False, True)[0]
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def _dataset(tag: int, vr: str, value: object, decoded: bool) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.set_original_encoding(False, True)
    if tag == PRIVATE_UI:
        ds[0x00090010] = DataElement(0x00090010, "LO", "ACME 1.0")
    ds._dict[BaseTag(tag)] = _raw(tag, vr, value)  # as read from a file (setitem decodes private)
    if decoded:
        ds[tag]
        assert not getattr(ds.get_item(tag), "is_raw", False)
    return ds


def _encoded(ds: Dataset) -> bytes:
    fp = DicomFileLike(io.BytesIO())
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.parent.getvalue()


def _run(
    deid: Deidentifier,
    tag: int,
    vr: str,
    action: str,
    value: object,
    decoded: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[bytes, dict, bool]:
    """(the dataset encoded after the action, what was recorded, whether the raw path took it)"""
    ds = _dataset(tag, vr, value, decoded)
    result = DeidResult(
        patient_id="ITH-TESTPSEUDO1",
        patient_name="ANON^ITH-TESTPSEUDO1",
        study_uid="",
        series_uid="",
        sop_uid="",
        dates=deid.date_mode,
        shift=DAYS,
        identifiers=IDENTIFIERS,
    )
    state = deid._pass(result)
    taken: list[bool] = []
    act_raw = Deidentifier._act_raw

    def spy(self: Deidentifier, *args: object) -> bool:
        taken.append(act_raw(self, *args))
        return taken[-1]

    with monkeypatch.context() as patch:
        patch.setattr(Deidentifier, "_act_raw", spy)
        deid._act(ds, BaseTag(tag), action, "", state, top=True)
    return _encoded(ds), result.phi, any(taken)


@pytest.mark.parametrize(
    "options",
    [frozenset(), frozenset({"retain_long_modified_dates"})],
    ids=["dates-removed", "dates-modified"],
)
@pytest.mark.parametrize("name,tag,vr,action,value", CASES, ids=[c[0] for c in CASES])
def test_both_paths_decide_alike(
    name: str,
    tag: int,
    vr: str,
    action: str,
    value: object,
    options: frozenset[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deid = Deidentifier(SECRET, options)
    raw_bytes, raw_phi, raw_path = _run(deid, tag, vr, action, value, False, monkeypatch)
    dec_bytes, dec_phi, dec_path = _run(deid, tag, vr, action, value, True, monkeypatch)
    # the raw path takes every raw text element but for cleaning (C), and no decoded one
    assert raw_path == (vr in TEXT_VRS and action != "C")
    assert not dec_path
    assert raw_bytes == dec_bytes
    assert raw_phi == dec_phi


CTX = Context(
    SECRET, "ITH-TESTPSEUDO1", "ANON^ITH-TESTPSEUDO1", "MODIFIED", DAYS, tuple(IDENTIFIERS)
)


@pytest.mark.parametrize(
    "action,vr,keyword,value,expected",
    [
        ("X", "LO", "InstitutionName", "GENERAL", REMOVE),
        ("X", "PN", "PatientName", "DOE^JOHN", REMOVE),  # X removes even the pseudonyms
        ("Z", "PN", "PatientName", "", "ANON^ITH-TESTPSEUDO1"),  # which no other action leaves out
        ("C", "LO", "PatientID", "MRN12345", "ITH-TESTPSEUDO1"),
        ("K", "LO", "InstitutionName", "GENERAL", KEEP),
        ("Z", "LO", "InstitutionName", "GENERAL", None),
        ("Z", "SQ", "ContentSequence", [{"CodeValue": "1"}], []),
        ("Z", "LO", "InstitutionName", "", KEEP),  # an empty value hides nothing...
        ("D?", "DA", "SeriesDate", "", KEEP),
        ("U", "UI", "StudyInstanceUID", None, KEEP),
        ("D", "DA", "Date", "", "19000101"),  # ...but D asks for a value
        ("D", "LO", "ContainerIdentifier", "", "ANONYMIZED"),
        ("D", "UI", "AnnotationGroupUID", "", ""),  # the remap of no UID is none
        ("D", "US", "Rows", 512, 0),
        ("D", "OB", "EncapsulatedDocument", b"%PDF", b"\x00\x00"),
        ("D", "UN", "SelectorUNValue", b"DOE", b"\x00\x00"),
        ("D", "AT", "FrameIncrementPointer", 0x00181063, 0),
        ("D", "SQ", "ContentSequence", [], []),
        ("U", "SH", "AccessionNumber", "ACC", None),
        (
            "U",
            "UI",
            "StudyInstanceUID",
            "1.2.840.10008.1.2\\1.2.3.4\\",
            "1.2.840.10008.1.2\\" + remap_uid(SECRET, "1.2.3.4") + "\\",
        ),
        ("D", "UI", "AnnotationGroupUID", "1.2.3.4", remap_uid(SECRET, "1.2.3.4")),
        ("C", "DA", "StudyDate", "20240131", "20221227"),
        ("C", "DT", "AcquisitionDateTime", "20240131120000", "20221227120000"),
        ("C", "TM", "StudyTime", "120000", KEEP),  # whole-day shifts keep times of day
        ("C", "LO", "StudyDescription", "CT John Doe 5551234567", "CT * * *"),
        ("C", "DS", "PatientWeight", "75", None),  # cannot be cleaned: emptied
    ],
)
def test_the_rule(action: str, vr: str, keyword: str, value: object, expected: object) -> None:
    assert replacement(action, vr, keyword, value, CTX) == expected


def test_cleaning_without_modified_dates_empties_dates_and_times() -> None:
    removed = Context(SECRET, "P", "N", "REMOVED", DAYS, ())
    assert replacement("C", "DA", "StudyDate", "20240131", removed) is None
    assert replacement("C", "TM", "StudyTime", "120000", removed) is None


def test_an_unknown_action_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown"):
        replacement("Q", "LO", "InstitutionName", "GENERAL", CTX)


@pytest.mark.parametrize("term", sorted(python_encoding))
def test_ascii_text_reads_the_same_in_every_character_set(term: str) -> None:
    """``read_text`` reads plain ASCII (no escape) without looking up the
    character sets; pydicom's full decoding gives the same text in each."""
    value = bytes(range(0x20, 0x7F)) + b" "  # every printable byte, \\ = ^ included
    for charsets in ([term], ["", term]):
        ds = Dataset()
        ds.SpecificCharacterSet = charsets if len(charsets) > 1 else charsets[0]
        tag = BaseTag(0x00100010)  # PatientName, PN
        ds[tag] = RawDataElement(tag, "PN", len(value), value, 0, False, True)
        read = read_text(ds, tag)
        assert read is not None
        full = decode_bytes(value, ds._character_set, {0x5C, 0x3D, 0x5E}).rstrip(" \x00")
        assert read[2] == full == value.decode("ascii").rstrip(" ")
