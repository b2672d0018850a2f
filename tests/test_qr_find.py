"""C-FIND end to end: DCMTK findscu (-P and -S) against a real proxy holding
studies sent by storescu and indexed; every level of each model, every
matching type, computed attributes, C-CANCEL, the result limit, malformed
identifiers (a pynetdicom SCU), purged studies, reindex refilling the Q/R
columns.  Two profiles: the default (Basic Profile: dates, accession and
descriptions are gone, such queries honestly match nothing) and
retain_long_modified_dates + clean_descriptors (shifted dates and kept
descriptions: ranges and wildcard text match for real)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from ith_proxy.store.catalog import Catalog
from tests.dicomgen import Series, make_small_series
from tests.helpers import bulk_rows, wait_indexed
from tests.tools import ProxyProcess, require_tool, storescu

PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
A900 = "Error: DataSetDoesNotMatchSOPClass"  # findscu's words for 0xA900
LIMIT = 4  # [qr] max_find_results of the "retained" proxy

PROFILES = {
    "default": "",
    "retained": (
        "[deid]\nretain_long_modified_dates = true\nclean_descriptors = true\n"
        f"[qr]\nmax_find_results = {LIMIT}\n"
    ),
}


@dataclass
class Site:
    profile: str
    proxy: ProxyProcess
    a_ct: Series  # patient 1, study A: CT (3) + MR (1)
    a_mr: Series
    b: Series  # patient 2, study B: CT (5)
    c: Series  # patient 3, study C: MR (1)
    out: Path

    def catalog(self) -> Catalog:
        return Catalog(self.proxy.spool / "catalog.sqlite3", readonly=True)

    def stored(self, sql: str, params: tuple = ()) -> list:
        cat = self.catalog()
        try:
            return list(cat.conn.execute(sql, params))
        finally:
            cat.close()

    def study_uid(self, series: Series) -> str:
        """The anonymized StudyInstanceUID of a sent series (by its first instance's size order)."""
        return self._uids[series.study_uid][0]

    def patient_id(self, series: Series) -> str:
        return self._uids[series.study_uid][1]

    _uids: dict


@pytest.fixture(scope="module", params=sorted(PROFILES))
def site(request, tmp_path_factory) -> Site:
    require_tool("findscu")
    tmp = tmp_path_factory.mktemp(f"qr-{request.param}")
    a_ct = make_small_series(tmp / "in" / "a", 3, rows=16, cols=16)
    a_mr = make_small_series(
        tmp / "in" / "a", 1, rows=16, cols=16, like=a_ct, modality="MR", series_number=2
    )
    b = make_small_series(tmp / "in" / "b", 5, rows=16, cols=16)
    c = make_small_series(tmp / "in" / "c", 1, rows=16, cols=16, modality="MR")
    proxy = ProxyProcess(tmp / "proxy", config_text=PROFILES[request.param])
    proxy.start()
    try:
        sent = storescu(proxy.dicom_port, tmp / "in")
        assert sent.returncode == 0, sent.stderr
        wait_indexed(proxy.spool, 10)
        site = Site(request.param, proxy, a_ct, a_mr, b, c, tmp / "out", {})
        # which anonymized study is which: by instance count and modalities
        rows = site.stored(
            "SELECT s.study_uid, s.patient_id, count(i.sop_uid),"
            " (SELECT group_concat(DISTINCT modality) FROM series WHERE study_uid = s.study_uid)"
            " FROM studies s JOIN instances i ON i.study_uid = s.study_uid GROUP BY s.study_uid"
        )
        by_shape = {(n, mods): (uid, pid) for uid, pid, n, mods in rows}
        site._uids = {
            a_ct.study_uid: next(v for k, v in by_shape.items() if k[0] == 4),
            b.study_uid: next(v for k, v in by_shape.items() if k[0] == 5),
            c.study_uid: next(v for k, v in by_shape.items() if k[0] == 1),
        }
        yield site
    finally:
        proxy.stop()


# --- findscu ---------------------------------------------------------------


@dataclass
class Found:
    status: str  # the final response's status text, e.g. "Success", "Cancel"
    answers: list[Dataset]
    output: str


def findscu(site: Site, model: str, keys: list[str], extra: tuple[str, ...] = ()) -> Found:
    out = site.out / f"q{len(list(site.out.glob('q*'))) if site.out.exists() else 0}"
    out.mkdir(parents=True)
    args = [require_tool("findscu"), "-v", model, "-aec", "DICOMRCV", "-X", "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    args += [*extra, "127.0.0.1", str(site.proxy.dicom_port)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    text = done.stdout + done.stderr
    finals = re.findall(r"Received Final Find Response \(([^)]*)\)", text)
    status = finals[-1] if finals else ""
    if not finals and "Cancel" in text:
        status = "Cancel"
    answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return Found(status, answers, text)


def values(found: Found, keyword: str) -> set[str]:
    return {str(ds.get(keyword, "")) for ds in found.answers}


# --- levels of each model --------------------------------------------------


def test_patient_root_levels(site: Site) -> None:
    pid_a = site.patient_id(site.a_ct)
    patients = findscu(
        site,
        "-P",
        ["QueryRetrieveLevel=PATIENT", "PatientID", "PatientName", "NumberOfPatientRelatedStudies"],
    )
    assert patients.status == "Success", patients.output
    assert len(patients.answers) == 3
    assert {str(ds.NumberOfPatientRelatedStudies) for ds in patients.answers} == {"1"}
    assert all(str(ds.PatientName).startswith("ANON^") for ds in patients.answers)

    studies = findscu(
        site, "-P", ["QueryRetrieveLevel=STUDY", f"PatientID={pid_a}", "StudyInstanceUID"]
    )
    assert values(studies, "StudyInstanceUID") == {site.study_uid(site.a_ct)}

    series = findscu(
        site,
        "-P",
        [
            "QueryRetrieveLevel=SERIES",
            f"PatientID={pid_a}",
            f"StudyInstanceUID={site.study_uid(site.a_ct)}",
            "SeriesInstanceUID",
            "Modality",
            "NumberOfSeriesRelatedInstances",
        ],
    )
    counts = sorted(
        (str(d.Modality), str(d.NumberOfSeriesRelatedInstances)) for d in series.answers
    )
    assert counts == [("CT", "3"), ("MR", "1")]
    ct = next(str(d.SeriesInstanceUID) for d in series.answers if d.Modality == "CT")
    images = findscu(
        site,
        "-P",
        [
            "QueryRetrieveLevel=IMAGE",
            f"PatientID={pid_a}",
            f"StudyInstanceUID={site.study_uid(site.a_ct)}",
            f"SeriesInstanceUID={ct}",
            "SOPInstanceUID",
            "InstanceNumber",
            "SOPClassUID",
        ],
    )
    assert values(images, "InstanceNumber") == {"1", "2", "3"}
    assert values(images, "SOPClassUID") == {site.a_ct.sop_class_uid}

    # hierarchical: below PATIENT the patient's unique key is required, single valued
    missing = findscu(site, "-P", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"])
    assert missing.status == A900 and missing.answers == []


def test_study_root_levels(site: Site) -> None:
    study_a = site.study_uid(site.a_ct)
    studies = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID"])
    assert studies.status == "Success", studies.output
    assert len(studies.answers) == 3
    series = findscu(
        site,
        "-S",
        ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_a}", "SeriesInstanceUID"],
    )
    assert len(series.answers) == 2
    uid = str(series.answers[0].SeriesInstanceUID)
    images = findscu(
        site,
        "-S",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study_a}",
            f"SeriesInstanceUID={uid}",
            "SOPInstanceUID",
        ],
    )
    assert len(images.answers) in (1, 3)
    # Study Root has no PATIENT level
    patient = findscu(site, "-S", ["QueryRetrieveLevel=PATIENT", "PatientID"])
    assert patient.answers == [] and patient.status == A900
    # a missing StudyInstanceUID at SERIES level
    bad = findscu(site, "-S", ["QueryRetrieveLevel=SERIES", "SeriesInstanceUID"])
    assert bad.answers == [] and bad.status == A900


# --- matching types --------------------------------------------------------


def test_single_universal_and_return_keys_only_when_asked(site: Site) -> None:
    pid_b = site.patient_id(site.b)
    one = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", f"PatientID={pid_b}"])
    assert len(one.answers) == 1
    asked = {e.keyword for e in one.answers[0]}
    # only what was asked, plus the level and its unique key
    assert asked <= {"QueryRetrieveLevel", "PatientID", "StudyInstanceUID"}
    assert "StudyDate" not in one.answers[0]
    universal = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", "PatientID=", "StudyDate"])
    assert len(universal.answers) == 3
    none = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", "PatientID=NOSUCH"])
    assert none.answers == [] and none.status == "Success"


def test_wildcards_and_case_insensitive_names(site: Site) -> None:
    all_names = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", "PatientName=anon^*"])
    assert len(all_names.answers) == 3, all_names.output
    name_b = site.stored(
        "SELECT pseudo_name FROM patients WHERE pseudo_id = ?", (site.patient_id(site.b),)
    )[0][0]
    pattern = name_b[:-3].lower() + "?" + name_b[-2:].lower()
    one = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", f"PatientName={pattern}"])
    assert values(one, "StudyInstanceUID") == {site.study_uid(site.b)}
    # GLOB and LIKE syntax in a value is literal: no injection
    for hostile in ("%", "_*", "[A-Z]*", "*]", "'; DROP TABLE studies; --"):
        got = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", f"PatientName={hostile}"])
        assert got.answers == [] and got.status == "Success", hostile
    assert site.stored("SELECT count(*) FROM studies")[0][0] == 3
    mods = findscu(
        site, "-S", ["QueryRetrieveLevel=STUDY", "ModalitiesInStudy=M?", "StudyInstanceUID"]
    )
    assert values(mods, "StudyInstanceUID") == {site.study_uid(site.a_ct), site.study_uid(site.c)}


def test_uid_list(site: Site) -> None:
    wanted = [site.study_uid(site.a_ct), site.study_uid(site.c)]
    got = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=" + "\\".join(wanted)])
    assert values(got, "StudyInstanceUID") == set(wanted)


def test_computed_attributes(site: Site) -> None:
    got = findscu(
        site,
        "-S",
        [
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={site.study_uid(site.a_ct)}",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
            "ModalitiesInStudy",
        ],
    )
    (ds,) = got.answers
    assert str(ds.NumberOfStudyRelatedSeries) == "2"
    assert str(ds.NumberOfStudyRelatedInstances) == "4"
    assert list(ds.ModalitiesInStudy) == ["CT", "MR"]


def test_dates_and_text_per_profile(site: Site) -> None:
    dates = sorted(r[0] for r in site.stored("SELECT study_date FROM studies"))
    descriptions = findscu(
        site, "-S", ["QueryRetrieveLevel=STUDY", "StudyDescription=*SDESC*"]
    ).answers
    if site.profile == "default":  # Basic Profile: emptied, honestly nothing matches
        assert dates == ["", "", ""]
        ranged = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", "StudyDate=19000101-"])
        assert ranged.answers == [] and ranged.status == "Success"
        assert descriptions == []
        return
    assert all(re.fullmatch(r"\d{8}", d) for d in dates), dates
    assert len(descriptions) == 3
    low, high = dates[0], dates[-1]
    for query, expected in (
        (f"{low}-{high}", 3),
        (f"{high}-", sum(d >= high for d in dates)),
        (f"-{low}", sum(d <= low for d in dates)),
        (low, sum(d == low for d in dates)),
        ("20990101-", 0),
    ):
        got = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", f"StudyDate={query}"])
        assert len(got.answers) == expected, (query, got.output)
        assert all(low <= str(d.StudyDate) <= high for d in got.answers)
    times = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", "StudyTime=10-1016"]).answers
    assert len(times) == 3  # the generator's 101530: 10:15:30 is within 10:00-10:16


def test_image_level_keys_from_the_header(site: Site) -> None:
    study_b = site.study_uid(site.b)
    series = findscu(
        site, "-S", ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_b}", "Rows"]
    )
    assert series.answers and all(ds.get("Rows") in (None, "") for ds in series.answers)
    uid = str(
        findscu(
            site,
            "-S",
            ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_b}", "SeriesInstanceUID"],
        )
        .answers[0]
        .SeriesInstanceUID
    )
    images = findscu(
        site,
        "-S",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study_b}",
            f"SeriesInstanceUID={uid}",
            "InstanceNumber=2",
            "Rows",
            "SliceThickness",
        ],
    )
    (ds,) = images.answers
    assert ds.Rows == 16 and str(ds.InstanceNumber) == "2"


def test_limit(site: Site) -> None:
    study_b = site.study_uid(site.b)
    keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_b}"]
    uid = site.stored("SELECT series_uid FROM series WHERE study_uid = ?", (study_b,))[0][0]
    keys += [f"SeriesInstanceUID={uid}", "SOPInstanceUID"]
    full = findscu(site, "-S", keys)
    if site.profile == "default":  # no limit
        assert full.status == "Success" and len(full.answers) == 5
    else:  # [qr] max_find_results = 4: 4 answers, then Out of Resources
        assert len(full.answers) == LIMIT, full.output
        assert full.status == "Refused: OutOfResources", full.output


BULK = 10000  # catalog rows of a synthetic series (no files): more than the socket buffers hold


def test_cancel_stops_the_answers(site: Site) -> None:
    """findscu --cancel 1 on a series of BULK instances: the answers stop,
    the final status is Cancel."""
    study, series = "1.2.826.0.1.3680043.10.9999.1", "1.2.826.0.1.3680043.10.9999.2"
    rows = bulk_rows("ITH-BULK", study, series, "1.2.826.0.1.3680043.10.9999.3", BULK)
    cat = Catalog(site.proxy.spool / "catalog.sqlite3")
    try:
        cat.record_instances(rows)
        keys = [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study}",
            f"SeriesInstanceUID={series}",
            "SOPInstanceUID",
        ]
        cancelled = findscu(site, "-S", keys, ("--cancel", "1"))
        if site.profile == "default":
            assert cancelled.status.startswith("Cancel"), cancelled.output
            assert 1 <= len(cancelled.answers) < BULK
        else:  # the limit (4) may cut before the cancel arrives
            assert cancelled.status.startswith(("Cancel", "Refused: OutOfResources"))
            assert 1 <= len(cancelled.answers) <= LIMIT
    finally:
        with cat.conn:
            cat.conn.execute("DELETE FROM studies WHERE study_uid = ?", (study,))
            cat.conn.execute("DELETE FROM patients WHERE pseudo_id = 'ITH-BULK'")
        cat.close()


# --- malformed identifiers (a pynetdicom SCU) ------------------------------


def _scu_find(
    site: Site, model: str, identifier: Dataset, syntax: str = ImplicitVRLittleEndian
) -> list[int]:
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(model, [syntax])
    assoc = ae.associate("127.0.0.1", site.proxy.dicom_port, ae_title="DICOMRCV")
    assert assoc.is_established
    try:
        return [int(status.Status) for status, _ in assoc.send_c_find(identifier, model) if status]
    finally:
        assoc.release()


def _identifier(level: str | None, **elements: object) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _deep(depth: int) -> Dataset:
    ds = Dataset()
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ProcedureCodeSequence = Sequence([inner])
        inner = outer
    ds.QueryRetrieveLevel = "STUDY"
    ds.ProcedureCodeSequence = inner.ProcedureCodeSequence
    return ds


def test_malformed_identifiers_get_a_failure_status(site: Site) -> None:
    bad_vr = _identifier("STUDY")
    bad_vr.add(DataElement(0x00080020, "US", 5))  # StudyDate as a number
    seq = _identifier("STUDY")
    seq.PatientName = ""
    seq.add(DataElement(0x00100010, "SQ", Sequence([Dataset()])))
    cases = {
        "no level": (STUDY_ROOT, _identifier(None, PatientID="")),
        "bad level": (STUDY_ROOT, _identifier("FOO", PatientID="")),
        "patient in study root": (STUDY_ROOT, _identifier("PATIENT", PatientID="")),
        "bad date": (STUDY_ROOT, _identifier("STUDY", StudyDate="2020AB01")),
        "bad range": (STUDY_ROOT, _identifier("STUDY", StudyDate="20200101-20210101-2022")),
        "wildcard uid": (STUDY_ROOT, _identifier("STUDY", StudyInstanceUID="1.2.*")),
        "bad uid": (STUDY_ROOT, _identifier("STUDY", StudyInstanceUID="1.2.abc")),
        "sequence for a value": (STUDY_ROOT, seq),
        "wrong vr": (STUDY_ROOT, bad_vr),
        "too long": (STUDY_ROOT, _identifier("STUDY", PatientID="A" * 300)),
        "too many wildcards": (STUDY_ROOT, _identifier("STUDY", PatientID="*?" * 20)),
        "uid list above": (STUDY_ROOT, _identifier("SERIES", StudyInstanceUID=["1.2.3", "1.2.4"])),
        "no patient id": (PATIENT_ROOT, _identifier("SERIES", StudyInstanceUID="1.2.3")),
        "deep sequence": (STUDY_ROOT, _deep(12)),
    }
    for name, (model, identifier) in cases.items():
        for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
            statuses = _scu_find(site, model, identifier, syntax)
            assert statuses and statuses[-1] in (0xA900, 0xC000), (name, syntax, statuses)
            assert 0xFF00 not in statuses, name
    assert (
        _scu_find(site, STUDY_ROOT, _identifier("STUDY", StudyInstanceUID="")).count(0xFF00) == 3
    )  # the SCP still answers
    logs = "".join(p.read_text(errors="replace") for p in (site.proxy.spool / "logs").glob("*.log"))
    assert "Traceback" not in logs
    assert "2020AB01" not in logs and "1.2.abc" not in logs  # no identifier values logged


def test_purged_studies_are_not_answered(site: Site) -> None:
    study_c = site.study_uid(site.c)
    cat = Catalog(site.proxy.spool / "catalog.sqlite3")
    try:
        with cat.conn:
            cat.conn.execute("UPDATE studies SET purged_at = 1 WHERE study_uid = ?", (study_c,))
        got = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"])
        assert study_c not in values(got, "StudyInstanceUID") and len(got.answers) == 2
        patients = findscu(site, "-P", ["QueryRetrieveLevel=PATIENT", "PatientID"])
        assert site.patient_id(site.c) not in values(patients, "PatientID")
    finally:
        with cat.conn:
            cat.conn.execute("UPDATE studies SET purged_at = NULL WHERE study_uid = ?", (study_c,))
        cat.close()


def test_reindex_refills_the_columns(site: Site) -> None:
    before = site.stored("SELECT study_uid, study_date, description FROM studies ORDER BY 1")
    cat = Catalog(site.proxy.spool / "catalog.sqlite3")
    try:  # as an older catalog would hold them
        with cat.conn:
            cat.conn.execute("UPDATE studies SET study_date = '', description = ''")
    finally:
        cat.close()
    site.proxy.stop()
    done = site.proxy.cli("reindex")
    assert done.returncode == 0, done.stderr
    site.proxy.start()
    after = site.stored("SELECT study_uid, study_date, description FROM studies ORDER BY 1")
    assert after == before
    got = findscu(site, "-S", ["QueryRetrieveLevel=STUDY", "StudyDate", "StudyInstanceUID"])
    assert len(got.answers) == 3


def _pdus_per_answer(site: Site, max_pdu: int) -> tuple[list[int], int]:
    """(statuses, P-DATA-TF PDUs received) for a 3-match STUDY query."""
    from pynetdicom import evt
    from pynetdicom.pdu import P_DATA_TF

    pdus = []
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(STUDY_ROOT, [ExplicitVRLittleEndian])
    handlers = [(evt.EVT_PDU_RECV, lambda event: pdus.append(type(event.pdu)))]
    assoc = ae.associate(
        "127.0.0.1",
        site.proxy.dicom_port,
        ae_title="DICOMRCV",
        max_pdu=max_pdu,
        evt_handlers=handlers,
    )
    assert assoc.is_established
    try:
        identifier = _identifier("STUDY", StudyInstanceUID="", PatientName="")
        statuses = [int(s.Status) for s, _ in assoc.send_c_find(identifier, STUDY_ROOT) if s]
    finally:
        assoc.release()
    return statuses, sum(p is P_DATA_TF for p in pdus)


def test_each_answer_is_one_pdu(site: Site) -> None:
    """dicom/find_wire.one_pdu_answers: command and identifier of a pending answer in
    one P-DATA-TF (stock pynetdicom sends two); split as stock when the peer's
    maximum PDU is too small for both."""
    statuses, pdus = _pdus_per_answer(site, 16384)
    assert statuses == [0xFF00] * 3 + [0x0000]
    assert pdus == 3 + 1  # three answers, then the final (command only)
    statuses, pdus = _pdus_per_answer(site, 100)  # below one answer's size
    assert statuses == [0xFF00] * 3 + [0x0000]
    assert pdus > 3 * 2


def _answers_as(site: Site, syntax: str, max_pdu: int) -> list[dict]:
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(STUDY_ROOT, [syntax])
    assoc = ae.associate("127.0.0.1", site.proxy.dicom_port, ae_title="DICOMRCV", max_pdu=max_pdu)
    assert assoc.is_established
    keys = ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "ModalitiesInStudy")
    identifier = _identifier("STUDY", **dict.fromkeys(keys, ""), NumberOfStudyRelatedInstances="")
    try:
        answers = [
            {elem.keyword: str(elem.value) for elem in ds}
            for status, ds in assoc.send_c_find(identifier, STUDY_ROOT)
            if status and status.Status == 0xFF00
        ]
    finally:
        assoc.release()
    return sorted(answers, key=lambda a: a["StudyInstanceUID"])


def test_answers_are_the_same_in_every_transfer_syntax_and_pdu_size(site: Site) -> None:
    """The hand-encoded answers (dicom/find_wire) read the same by pynetdicom
    in Implicit and Explicit VR Little Endian, whole or in fragments of a
    100-byte maximum PDU, and hold the catalog's values."""
    implicit = _answers_as(site, ImplicitVRLittleEndian, 16384)
    assert len(implicit) == 3
    assert implicit == _answers_as(site, ExplicitVRLittleEndian, 16384)
    assert implicit == _answers_as(site, ExplicitVRLittleEndian, 100)
    by_uid = {a["StudyInstanceUID"]: a for a in implicit}
    uid, pid = site._uids[site.a_ct.study_uid]
    assert by_uid[uid]["ModalitiesInStudy"] == "['CT', 'MR']"
    assert by_uid[uid]["NumberOfStudyRelatedInstances"] == "4"
    assert by_uid[uid]["PatientID"] == pid
