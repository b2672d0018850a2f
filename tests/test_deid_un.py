"""UN-encoded sequences are walked, untyped UN values removed (issue 6).

A router that does not know a sequence re-encodes it with VR UN (explicit
VR), and in implicit VR a tag the dictionary does not know has no type at
all. Whatever such a value nests must get the profile like any sequence.

The deep item of every file here holds a canary (tests/canary.py) for each
Table E.1-1 attribute, at depth 3 inside UN-encoded sequences:

* explicit VR LE, the outer sequence written with VR UN, defined length and
  undefined length, under a dictionary SQ tag (Radiopharmaceutical
  Information Sequence), an unknown standard tag and a private tag;
* implicit VR LE, under an unknown standard tag, a private tag and a
  dictionary SQ tag.

The levels below the outer one are in implicit VR LE (PS3.5 6.2.2), mixing
dictionary SQ tags, unknown tags and a private tag. Each file also carries
an untyped, defined-length UN value that no table row lists (top level and
nested). Checked through the engine as the indexer runs it (read_split ->
apply -> apply_fragment -> write_joined) and end to end through a proxy (the
files dropped into incoming/): no canary byte in any output, every canary
back from the vault.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

import canary
from helpers import deidentify_file, vault_records
from ith_proxy.deid.dates import shift_days
from ith_proxy.deid.engine import _text
from ith_proxy.deid.pseudo import patient_key

SECRET = b"0123456789abcdef0123456789abcdef-un-tests"
RADIOPHARM = 0x00540016  # Radiopharmaceutical Information Sequence: SQ, no table row
UNKNOWN_SQ = (0x0018FFF0, 0x0018FFF2)  # even groups, unknown to the dictionary
UNTYPED = 0x0018FFF4  # an untyped value no row lists
PRIVATE = 0x00091010  # with creator (0009,0010) in the same item
CREATOR = b"UN TEST CREATOR "
STUDY, SERIES = "1.2.826.0.1.3680043.99.7.1", "1.2.826.0.1.3680043.99.7.2"
ITEM, ITEM_END, SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)


# --------------------------------------------------------------------------
# encoding by hand (pydicom would not write UN sequences the way routers do)
# --------------------------------------------------------------------------


def _head(tag: tuple[int, int], length: int) -> bytes:
    return struct.pack("<HHL", *tag, length)


def _items(content: bytes, undefined: bool) -> bytes:
    """One item holding ``content``: the value of a sequence (implicit VR LE)."""
    if undefined:
        return _head(ITEM, 0xFFFFFFFF) + content + _head(ITEM_END, 0) + _head(SEQ_END, 0)
    return _head(ITEM, len(content)) + content


def _implicit(tag: int, value: bytes, undefined: bool = False) -> bytes:
    return _head((tag >> 16, tag & 0xFFFF), 0xFFFFFFFF if undefined else len(value)) + value


def _explicit_un(tag: int, value: bytes, undefined: bool = False) -> bytes:
    return (
        struct.pack(
            "<HH2s2xL", tag >> 16, tag & 0xFFFF, b"UN", 0xFFFFFFFF if undefined else len(value)
        )
        + value
    )


def _creator(tag: int) -> bytes:
    return _implicit((tag & 0xFFFF0000) | 0x0010, CREATOR) if tag == PRIVATE else b""


def _chain(tags: tuple[int, ...], deep: bytes, undefined: bool) -> bytes:
    """The value of ``tags[0]``: its item holds ``tags[1]``, ... down to ``deep``
    at depth len(tags). Inner levels are implicit VR LE, as in a UN value."""
    content = deep
    for tag in reversed(tags[1:]):
        content = _creator(tag) + _implicit(tag, _items(content, undefined), undefined)
    return _items(content, undefined)


def _encode(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomFileLike(io.BytesIO())
    fp.is_implicit_VR, fp.is_little_endian = implicit, True
    write_dataset(fp, ds)
    return fp.parent.getvalue()


def _deep_item(corpus: canary.Canary) -> bytes:
    """Every element of the canary instance (a marker for each Table E.1-1
    row, nested sequences, private blocks, curves, overlays), no pixels,
    encoded as implicit VR LE, plus an untyped UN value that no row lists."""
    src = pydicom.dcmread(corpus.instances[0].path)
    deep = Dataset()
    for elem in src:
        if elem.tag != 0x7FE00010:
            deep.add(elem)
    return _encode(deep, implicit=True) + _implicit(UNTYPED, b"UNTYPED-DEEP-VALUE")


@dataclass
class Case:
    name: str
    implicit: bool
    tags: tuple[int, ...]  # outermost first; depth 3
    undefined: bool


CASES = [
    Case("explicit-dictionary-sq-defined", False, (RADIOPHARM, UNKNOWN_SQ[0], RADIOPHARM), False),
    Case("explicit-dictionary-sq-undefined", False, (RADIOPHARM, PRIVATE, UNKNOWN_SQ[1]), True),
    Case("explicit-unknown-tag-defined", False, (UNKNOWN_SQ[0], RADIOPHARM, UNKNOWN_SQ[1]), False),
    Case("explicit-private-defined", False, (PRIVATE, UNKNOWN_SQ[0], RADIOPHARM), False),
    Case("implicit-unknown-tag", True, (UNKNOWN_SQ[0], RADIOPHARM, UNKNOWN_SQ[1]), False),
    Case("implicit-private", True, (PRIVATE, UNKNOWN_SQ[1], RADIOPHARM), False),
    Case("implicit-dictionary-sq", True, (RADIOPHARM, UNKNOWN_SQ[0], UNKNOWN_SQ[1]), False),
    Case("implicit-unknown-tag-undefined", True, (UNKNOWN_SQ[1], UNKNOWN_SQ[0], RADIOPHARM), True),
]


def _top(index: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.99.7.3.{index + 1}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.Modality = "CT"
    ds.PatientID = "UN-TEST-PATIENT"
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def write_case(path: Path, case: Case, index: int, deep: bytes) -> None:
    """A Part 10 file: the top level with the UN chain (and the untyped UN
    value) in tag order, then the pixel data."""
    top = _top(index)
    extra = {case.tags[0]: _chain(case.tags, deep, case.undefined), UNTYPED: b"UNTYPED-TOP-VALUE "}
    if case.tags[0] == PRIVATE:
        extra[(PRIVATE & 0xFFFF0000) | 0x0010] = CREATOR
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = top.SOPClassUID
    meta.MediaStorageSOPInstanceUID = top.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if case.implicit else ExplicitVRLittleEndian
    fp = DicomFileLike(io.BytesIO())
    fp.is_implicit_VR, fp.is_little_endian = case.implicit, True
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta)
    tags = sorted(set(top.keys()) | set(extra))
    for tag in tags:
        if tag in extra and tag == (PRIVATE & 0xFFFF0000) | 0x0010:
            value = extra[tag]
            fp.write(
                _implicit(tag, value)
                if case.implicit
                else struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"LO", len(value)) + value
            )
        elif tag in extra:
            undefined = case.undefined and tag == case.tags[0]
            fp.write(
                _implicit(tag, extra[tag], undefined)
                if case.implicit
                else _explicit_un(tag, extra[tag], undefined)
            )
        else:
            write_data_element(fp, top[tag])
    pixels = b"\x01\x00" * 4
    fp.write(
        _implicit(0x7FE00010, pixels)
        if case.implicit
        else struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", len(pixels)) + pixels
    )
    path.write_bytes(fp.parent.getvalue())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[canary.Canary, list[Path]]:
    work = tmp_path_factory.mktemp("un")
    corpus = canary.build_canary(
        work / "canary", series=(1,), drop=False, exclude=canary.excluded_rows()
    )
    deep = _deep_item(corpus)
    files = []
    for i, case in enumerate(CASES):
        path = work / f"UN_{i:02d}_{case.name}.dcm"
        write_case(path, case, i, deep)
        files.append(path)
    return corpus, files


def _markers(corpus: canary.Canary) -> list[canary.Marker]:
    return [m for m in corpus.markers if 0 in m.instances and m.kind not in ("meta", "preamble")]


def in_vault(record: dict, marker: canary.Marker) -> bool:
    """The marker's value is in the record; an untyped value (a private element
    in implicit VR has no known VR) is given back as its exact bytes."""
    if canary.record_has(record, marker):
        return True
    if not isinstance(marker.value, str):
        return False
    want = marker.value.encode("latin-1")
    return any(
        isinstance(leaf, bytes) and leaf.rstrip(b" \x00") == want
        for leaf in canary.vault_leaves(record.get("phi", record))
    )


def _extra_needles() -> list[str]:
    return ["UNTYPED-TOP-VALUE", "UNTYPED-DEEP-VALUE"]


def _leaks(data: bytes, corpus: canary.Canary) -> list[str]:
    needles = [m.needle for m in _markers(corpus) if m.greppable and m.needle] + _extra_needles()
    return [n for n in needles if canary._hits(data, n.encode())]


def deidentify(path: Path, options: frozenset[str] = frozenset()) -> tuple[bytes, dict]:
    return deidentify_file(path, SECRET, options)


# --------------------------------------------------------------------------
# self-checks: the corpus holds what the tests look for
# --------------------------------------------------------------------------


def test_the_markers_are_in_the_input_at_depth_3(corpus) -> None:
    c, files = corpus
    assert len(_markers(c)) > 500
    for path in files:
        data = path.read_bytes()
        assert (
            _leaks(data, c)
            == [m.needle for m in _markers(c) if m.greppable and m.needle] + _extra_needles()
        ), path.name
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.get_item(CASES[files.index(path)].tags[0]).VR in ("UN", None, "SQ")


# --------------------------------------------------------------------------
# the engine, as the indexer runs it
# --------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_no_canary_in_the_output_and_every_one_in_the_vault(corpus, index: int) -> None:
    c, files = corpus
    data, record = deidentify(files[index])
    assert _leaks(data, c) == []
    missing = [f"{m.kind} {m.path} {m.value!r}" for m in _markers(c) if not in_vault(record, m)]
    assert missing == [], f"{len(missing)} markers not in the vault:\n" + "\n".join(missing[:50])
    leaves = list(canary.vault_leaves(record))
    for text in _extra_needles():  # untyped values: removed, their bytes in the vault
        assert any(isinstance(v, bytes) and text.encode() in v for v in leaves), text
    out = pydicom.dcmread(io.BytesIO(data))
    assert UNTYPED not in out
    case = CASES[index]
    if case.tags[0] != PRIVATE:  # a kept sequence is a real SQ in the output, walked
        outer = out[case.tags[0]]
        if case.implicit and outer.VR == "UN":  # no VR in implicit VR: its items then
            assert bytes(outer.value[:4]) == b"\xfe\xff\x00\xe0"
        else:
            assert outer.VR == "SQ" and len(outer.value) == 1
    assert canary.valid_output_uid(str(out.SOPInstanceUID))


def test_a_nested_patient_name_gets_the_pseudonym_and_dates_the_shift(corpus) -> None:
    """Options apply inside too: with Retain Longitudinal (modified dates) a
    nested date is shifted like a top-level one, not kept."""
    c, files = corpus
    data, _record = deidentify(files[0], frozenset({"retain_long_modified_dates"}))
    out = pydicom.dcmread(io.BytesIO(data))
    names = [str(e.value) for path, e in canary.walk(out) if e.keyword == "PatientName"]
    assert names and all(n.startswith("ANON^ITH-") for n in names)
    nested = [(p, e) for p, e in canary.walk(out) if p.count("[") == 3 and e.VR == "DA"]
    assert nested
    # the per-patient shift, as the engine computes it for this input
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    days = shift_days(
        SECRET, patient_key(*(_text(src, t) for t in (0x00100020, 0x00100010, 0x00100030)))
    )
    assert days != 0
    dates = [m for m in _markers(c) if m.vr == "DA" and m.greppable]
    # corpus dates are consecutive days, so a shifted one may equal another's original
    shifted = {
        (datetime.strptime(m.needle, "%Y%m%d") + timedelta(days=days)).strftime("%Y%m%d")
        for m in dates
    }
    for marker in dates:
        if marker.needle not in shifted:
            assert not canary._hits(data, marker.needle.encode()), marker.path


# --------------------------------------------------------------------------
# end to end: a real proxy, files dropped into incoming/
# --------------------------------------------------------------------------


def test_end_to_end_through_the_proxy(corpus, tmp_path: Path) -> None:
    c, files = corpus
    proxy, quarantined = canary.run_proxy(tmp_path / "proxy", [], files)
    assert quarantined == []
    vault = proxy.spool / "vault.phi"
    needles = [m.needle for m in _markers(c) if m.greppable and m.needle] + _extra_needles()
    assert canary.find_needles(proxy.workdir, needles, skip=[vault]) == []
    records = vault_records(proxy.workdir)
    assert len(records) == len(files)
    for record in records:
        missing = [m.path for m in _markers(c) if not in_vault(record, m)]
        assert missing == [], f"{record.get('sop')}: {len(missing)} missing, e.g. {missing[:10]}"
