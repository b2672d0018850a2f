"""Retain Safe Private with PS3.15 Table E.3.10-1 as data: the table file, and
what the engine does with a listed element (keeps it, walks a listed sequence,
remaps a listed UID, drops an untyped one it cannot check). The end-to-end
option test is in test_deid_options.py."""

from __future__ import annotations

import json

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from ith_proxy.deid import remap_uid
from ith_proxy.deid.engine import Deidentifier
from ith_proxy.deid.private import TABLE_FILE, load_table

SECRET = b"s" * 32
ORIGINAL_SERIES = "1.2.826.0.1.3680043.2.1125.77.5"


def test_the_table_is_all_of_e_3_10_1_2026d() -> None:
    data = json.loads(TABLE_FILE.read_text())
    assert "2026d" in json.dumps(data["source"])
    rows = data["rows"]
    assert len(rows) == 479
    table = load_table()
    assert len(table) == len({(r["group"], r["creator"], r["element"].upper()) for r in rows})
    # spot checks across vendors, as printed in the standard
    assert table[(0x7053, "PHILIPS PET PRIVATE GROUP", 0x00)] == "DS"  # SUV factor
    assert table[(0x0019, "GEMS_ACQU_01", 0x23)] == "DS"  # table speed
    assert table[(0x0019, "SIEMENS MR HEADER", 0x0C)] == "IS"  # B value
    assert table[(0x2001, "PHILIPS IMAGING DD 001", 0x5F)] == "SQ"  # stack sequence
    assert table[(0x0099, "NQHEADER", 0x02)] == "UI"  # analyzed series UID
    assert all(int(r["group"], 16) % 2 == 1 and r["element"].lower().startswith("xx") for r in rows)


def _dataset() -> Dataset:
    ds = Dataset()
    ds.PatientName = "CANARY^SAFEPRIV"
    ds.PatientID = "PID-SAFEPRIV"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.77.1"
    ds.SeriesInstanceUID = ORIGINAL_SERIES
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.77.9"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ge = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    ge.add_new(0x23, "DS", "39.375")  # listed: table speed
    ge.add_new(0x99, "LO", "GE-UNLISTED-CANARY")  # same creator, not listed
    philips = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
    item = Dataset()
    item.PatientName = "NESTED^CANARY"  # a standard attribute inside
    item.SliceThickness = "2.5"  # kept by the basic profile
    inner = item.private_block(0x0029, "ITH NOT LISTED", create=True)
    inner.add_new(0x01, "LO", "NESTED-PRIVATE-CANARY")
    philips.add_new(0x5F, "SQ", Sequence([item]))  # listed: stack sequence
    nq = ds.private_block(0x0099, "NQHeader", create=True)
    nq.add_new(0x02, "UI", ORIGINAL_SERIES)  # listed UID: the original series
    return ds


def _phi_leaves(result) -> set[str]:
    out: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        else:
            out.add(str(value))

    walk(result.phi)
    return out


def test_listed_elements_stay_and_what_they_carry_is_checked() -> None:
    ds = _dataset()
    result = Deidentifier(SECRET, frozenset({"retain_safe_private"})).apply(ds)
    ge = ds.private_block(0x0019, "GEMS_ACQU_01")
    assert str(ge[0x23].value) == "39.375"
    assert 0x00191099 not in ds and ge.block_start + 0x99 not in ds
    # the listed sequence stays, walked: nested name replaced, nested unlisted private gone
    stack = ds.private_block(0x2001, "Philips Imaging DD 001")[0x5F].value
    assert len(stack) == 1
    nested = stack[0]
    assert "NESTED^CANARY" not in str(nested.get("PatientName", ""))
    assert str(nested.SliceThickness) == "2.5"
    assert not [e for e in nested if e.tag.is_private and e.tag.element > 0xFF]
    # the listed UID is remapped with the same keyed map as the series it names
    analyzed = str(ds.private_block(0x0099, "NQHeader")[0x02].value)
    assert analyzed == remap_uid(SECRET, ORIGINAL_SERIES) == str(ds.SeriesInstanceUID)
    # every original removed or replaced is in the vault record
    leaves = _phi_leaves(result)
    for original in (
        "GE-UNLISTED-CANARY",
        "NESTED^CANARY",
        "NESTED-PRIVATE-CANARY",
        ORIGINAL_SERIES,
    ):
        assert original in leaves, original


def test_under_retain_uids_a_listed_uid_stays_with_the_uids_it_names() -> None:
    ds = _dataset()
    Deidentifier(SECRET, frozenset({"retain_safe_private", "retain_uids"})).apply(ds)
    analyzed = str(ds.private_block(0x0099, "NQHeader")[0x02].value)
    assert analyzed == ORIGINAL_SERIES == str(ds.SeriesInstanceUID)


def test_without_the_option_every_private_element_goes() -> None:
    ds = _dataset()
    Deidentifier(SECRET).apply(ds)
    assert not [e for e in ds if e.tag.is_private]


def test_a_listed_sequence_the_parser_could_not_type_is_dropped() -> None:
    ds = _dataset()
    philips = ds.private_block(0x2001, "Philips Imaging DD 001")
    tag = Tag(philips.get_tag(0xC5))  # listed as SQ; pydicom's dictionary lacks it
    # as read from an implicit VR file: UN bytes that may hold anything
    blob = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\x10\x00\x10\x00\x0c\x00\x00\x00HIDDEN^NAME "
    ds[tag] = RawDataElement(tag, "UN", len(blob), blob, 0, False, True)
    philips.add_new(0x5D, "ST", "mm")  # a listed text element beside it stays
    result = Deidentifier(SECRET, frozenset({"retain_safe_private"})).apply(ds)
    assert tag not in ds
    assert str(ds.private_block(0x2001, "Philips Imaging DD 001")[0x5D].value) == "mm"
    assert any("HIDDEN^NAME" in leaf for leaf in _phi_leaves(result))  # bytes, kept raw


def test_site_entries_extend_the_table() -> None:
    ds = _dataset()
    site = ds.private_block(0x0029, "ITH SITE", create=True)
    site.add_new(0x10, "LO", "SITE SAFE")
    Deidentifier(
        SECRET, frozenset({"retain_safe_private"}), safe_private=((0x0029, "ITH SITE", 0x10),)
    ).apply(ds)
    assert str(ds.private_block(0x0029, "ITH SITE")[0x10].value) == "SITE SAFE"
