"""The C-FIND SQL room (store/qr_catalog.py) and the identifier parser
(dicom/qr_match.py) over a real catalog file: the plans use indexes (no
per-request full scans), GLOB syntax in a value is literal, purged studies are
never answered, Q/R reads through a read-only connection, and migration 7
carries an older catalog's rows over."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest
from pydicom.dataset import Dataset

from ith_proxy.dicom import qr_match as m
from ith_proxy.store import catalog as catalog_mod
from ith_proxy.store import qr_catalog as q
from ith_proxy.store.catalog import Catalog, InstanceRow


def _row(study: int, instance: int, name: str | None = None, **main: dict) -> InstanceRow:
    return InstanceRow(
        patient_id=f"P{study % 50}",
        patient_name=name or f"ANON^P{study % 50}",
        study_uid=f"1.{study}",
        series_uid=f"1.{study}.1",
        sop_uid=f"1.{study}.1.{instance}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=1,
        vault_offset=None,
        received_at=1.0,
        main=main or {"study": {"study_date": f"2020{study % 12 + 1:02d}01"}},
    )


@pytest.fixture
def cat(tmp_path: Path):
    writer = Catalog(tmp_path / "c.sqlite3")
    writer.record_instances(_row(s, i) for s in range(200) for i in range(3))
    reader = Catalog(tmp_path / "c.sqlite3", readonly=True)
    yield writer, reader
    reader.close()
    writer.close()


def _ident(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _query(ds: Dataset, model: str = m.STUDY_ROOT_FIND) -> q.QuerySpec:
    return m.parse(ds, model).spec


PLANNED = {
    "exact PatientID": _ident(
        "STUDY",
        PatientID="P1",
        StudyInstanceUID="",
        NumberOfStudyRelatedInstances="",
        NumberOfStudyRelatedSeries="",
        ModalitiesInStudy="",
    ),
    "StudyInstanceUID": _ident("STUDY", StudyInstanceUID="1.5"),
    "UID list": _ident("STUDY", StudyInstanceUID=["1.5", "1.6"]),
    "StudyDate range": _ident("STUDY", StudyDate="20200301-20200401"),
    "PatientName prefix": _ident("STUDY", PatientName="anon^p1*"),
    "AccessionNumber": _ident("STUDY", AccessionNumber="A1"),
    "series of a study": _ident(
        "SERIES", StudyInstanceUID="1.5", NumberOfSeriesRelatedInstances=""
    ),
    "images of a series": _ident("IMAGE", StudyInstanceUID="1.5", SeriesInstanceUID="1.5.1"),
}


@pytest.mark.parametrize("name", sorted(PLANNED))
def test_no_full_scans(cat, name: str) -> None:
    _, reader = cat
    plan = q.plan(reader, _query(PLANNED[name]))
    scans = [
        line
        for line in plan
        if line.startswith("SCAN") and not line.startswith(("SCAN json_each", "SCAN (subquery"))
    ]
    assert not scans, plan
    assert any("INDEX" in line for line in plan), plan


def test_patient_level_plans_use_indexes(cat) -> None:
    _, reader = cat
    spec = _query(
        _ident("PATIENT", PatientID="P1", NumberOfPatientRelatedStudies=""), m.PATIENT_ROOT_FIND
    )
    assert not [line for line in q.plan(reader, spec) if line.startswith("SCAN")]


def test_matching_on_rows(cat) -> None:
    _, reader = cat

    def uids(ds: Dataset) -> set[str]:
        return {row[0] for row in q.rows(reader, _query(ds))}

    assert uids(_ident("STUDY", PatientID="P1")) == {"1.1", "1.51", "1.101", "1.151"}
    assert len(uids(_ident("STUDY", PatientName="anon^p1*"))) == 44  # P1, P10-P19
    assert uids(_ident("STUDY", PatientName="ANON^P?", StudyDate="20200201")) == {
        f"1.{s}" for s in range(200) if s % 50 < 10 and s % 12 == 1
    }
    march = uids(_ident("STUDY", StudyDate="20200301-20200401"))
    assert march == {f"1.{s}" for s in range(200) if s % 12 in (2, 3)}
    assert uids(_ident("STUDY", StudyDate="-20200101")) == {f"1.{s}" for s in range(0, 200, 12)}
    assert uids(_ident("STUDY", StudyInstanceUID=["1.5", "1.6", "9.9"])) == {"1.5", "1.6"}


def test_wildcard_syntax_is_escaped(tmp_path: Path) -> None:
    writer = Catalog(tmp_path / "c.sqlite3")
    names = ["A[B]C", "ABC", "A%C", "A_C", "A]C"]
    writer.record_instances(_row(n, 0, name=name) for n, name in enumerate(names))

    def names_for(value: str) -> set[str]:
        spec = _query(_ident("STUDY", PatientName=value, StudyInstanceUID=""))
        return {names[int(row[0].split(".")[1])] for row in q.rows(writer, spec)}

    assert names_for("A[B]*") == {"A[B]C"}
    assert names_for("A[B]C") == {"A[B]C"}
    assert names_for("A%C") == {"A%C"}  # not LIKE's "any"
    assert names_for("A_C") == {"A_C"}
    assert names_for("A?C") == {"ABC", "A%C", "A_C", "A]C"}
    assert names_for("A]*") == {"A]C"}
    assert names_for("[A-Z]*") == set()
    assert q.glob_pattern("a[*]?") == "a[[]*[]]?"
    writer.close()


def test_purged_studies_are_never_answered(cat) -> None:
    writer, reader = cat
    with writer.conn:
        writer.conn.execute("UPDATE studies SET purged_at = 1 WHERE patient_id = 'P1'")
        writer.conn.execute("UPDATE instances SET purged_at = 1 WHERE study_uid = '1.2'")
    assert not list(q.rows(reader, _query(_ident("STUDY", PatientID="P1"))))
    spec = _query(_ident("PATIENT", PatientID="P1"), m.PATIENT_ROOT_FIND)
    assert not list(q.rows(reader, spec))
    series = _ident("SERIES", StudyInstanceUID="1.1")
    assert not list(q.rows(reader, _query(series)))
    image = _ident("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.1")
    assert not list(q.rows(reader, _query(image)))
    counted = _ident("STUDY", StudyInstanceUID="1.2", NumberOfStudyRelatedInstances="")
    ((*_, count),) = list(q.rows(reader, _query(counted)))
    assert count == 0


def test_the_query_connection_cannot_write(cat) -> None:
    _, reader = cat
    with pytest.raises(apsw.ReadOnlyError):
        reader.conn.execute("DELETE FROM studies")


def test_migration_7_keeps_older_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = apsw.Connection(str(path))
    for step in catalog_mod._MIGRATIONS[:-1]:  # the schema before the Q/R step
        conn.execute(step)
    conn.execute(f"PRAGMA user_version = {len(catalog_mod._MIGRATIONS) - 1}")
    conn.execute("INSERT INTO patients VALUES ('P1', 'anon^x', 1)")
    conn.execute(
        "INSERT INTO studies(study_uid, patient_id, first_received, last_received)"
        " VALUES ('1.1', 'P1', 1, 1)"
    )
    conn.close()
    cat = Catalog(path)
    assert cat.schema_version() == len(catalog_mod._MIGRATIONS)
    spec = _query(_ident("STUDY", PatientName="ANON^X", StudyDate=""))
    # unique key, then StudyDate, PatientName, StudyInstanceUID (tag order): the name
    # matched through the folded column the step filled; the date not refilled yet
    assert list(q.rows(cat, spec)) == [("1.1", "", "anon^x", "1.1")]
    cat.close()


@pytest.mark.parametrize("value", ["20200101-20200201-", "2020", "abcdefgh", "20200101--", "-"])
def test_bad_ranges(value: str) -> None:
    with pytest.raises(m.IdentifierError) as err:
        m.parse(_ident("STUDY", StudyDate=value), m.STUDY_ROOT_FIND)
    assert err.value.status == m.NOT_MATCHING
    assert value not in err.value.comment or not value.strip("-")


def test_main_attributes_from_a_header(tmp_path: Path) -> None:
    """Plain ASCII values are taken as stored, others decoded by pydicom with
    the header's character set; a value that is not text is stored empty."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    from ith_proxy.dicom import files as dicomfile

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3"
    ds.StudyDate, ds.StudyTime, ds.Modality = "20200102", "101530 ", "CT"
    ds.StudyDescription = "Thorax Ü"
    ds.SeriesNumber = "7"
    ds.add(DataElement(0x00180015, "SQ", Sequence([Dataset()])))  # BodyPartExamined as SQ
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    main = dicomfile.main_attributes(dicomfile.read_split(path).header)
    assert main["study"]["study_date"] == "20200102"
    assert main["study"]["study_time"] == "101530"
    assert main["study"]["description"] == "Thorax Ü"
    assert main["series"]["series_number"] == "7"
    assert main["series"]["body_part"] == ""
    assert main["patient"] == {"birth_date": "", "sex": ""}
