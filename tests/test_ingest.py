"""End to end: DCMTK storescu -> proxy process -> spool, vault, catalog, study.json.

A real proxy (``python -m ith_proxy.cli run``) on loopback ports, driven by
DCMTK's ``storescu``/``echoscu``; results read back from the real files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydicom
import pytest

import dicomgen
import tools
from helpers import (
    catalog_counts,
    catalog_study,
    find_bytes,
    original_to_anonymized_sop,
    read_header,
    stored_files,
    study_summary,
    vault_records,
    wait_indexed,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# one 200-instance CT study, shared by the checks below
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory):
    work = tmp_path_factory.mktemp("ct200")
    series = dicomgen.make_ct_series(work / "in", 200)
    proxy = tools.ProxyProcess(work / "proxy", env={"DICOM_STUDY_TIMEOUT": "3"})
    proxy.start()
    result = tools.storescu(proxy.dicom_port, series.files)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(tools.acked_files(result)) == 200
    wait_indexed(proxy.spool, 200)
    yield proxy, series
    proxy.stop()


def _study_dir(proxy: tools.ProxyProcess) -> Path:
    dirs = [p for p in (proxy.spool / "studies").iterdir() if p.is_dir()]
    assert len(dirs) == 1
    return dirs[0]


def test_echo(ct_study) -> None:
    proxy, _ = ct_study
    result = tools.echoscu(proxy.dicom_port)
    assert result.returncode == 0, result.stderr


def test_ct_study_is_stored_finalized_and_counted(ct_study) -> None:
    proxy, _series = ct_study
    study_dir = _study_dir(proxy)
    files = stored_files(proxy.spool)
    assert len(files) == 200
    assert {f.parent.parent for f in files} == {study_dir}
    assert len({f.parent for f in files}) == 1
    summary = wait_until(
        lambda: (
            (s := study_summary(proxy.spool, study_dir.name)) and s["state"] == "complete" and s
        ),
        30,
        "study complete",
    )
    assert summary["instance_count"] == 200 and summary["series_count"] == 1
    assert summary["modalities"] == ["CT"]
    assert summary["study_instance_uid"] == study_dir.name
    assert summary["completed_at"] - summary["last_received"] >= 3
    assert [e["event"] for e in summary["events"]] == ["first-received", "complete"]
    counts = catalog_counts(proxy.spool)
    assert (counts["patients"], counts["studies"], counts["series"], counts["instances"]) == (
        1,
        1,
        1,
        200,
    )
    assert counts["studies_by_state"]["complete"] == 1
    assert not list((proxy.spool / "incoming").iterdir())
    assert not list((proxy.spool / "tmp").iterdir())
    status = proxy.cli("status")
    assert status.returncode == 0, status.stderr
    assert "1 patients, 1 studies, 1 series, 200 instances" in status.stdout
    assert "complete 1" in status.stdout and "service:     ok" in status.stdout


def test_files_are_anonymized_consistently(ct_study) -> None:
    proxy, series = ct_study
    files = stored_files(proxy.spool)
    headers = [read_header(f) for f in files]
    pids = {str(h.PatientID) for h in headers}
    assert len(pids) == 1 and pids.pop().startswith("ITH-")
    assert {str(h.PatientName) for h in headers} == {f"ANON^{headers[0].PatientID}"}
    assert {str(h.StudyInstanceUID) for h in headers} == {files[0].parent.parent.name}
    assert {str(h.SeriesInstanceUID) for h in headers} == {files[0].parent.name}
    assert len({str(h.FrameOfReferenceUID) for h in headers}) == 1
    for path, h in zip(files, headers, strict=True):
        assert path.stem == str(h.SOPInstanceUID) == str(h.file_meta.MediaStorageSOPInstanceUID)
        for uid in (
            h.StudyInstanceUID,
            h.SeriesInstanceUID,
            h.SOPInstanceUID,
            h.FrameOfReferenceUID,
        ):
            assert uid.startswith("2.25.") and len(uid) <= 64
        assert h.PatientIdentityRemoved == "YES"
        assert h.get("PatientBirthDate", "") == "" and h.get("AccessionNumber", "") == ""
        assert h.get("ReferringPhysicianName", "") == ""
        for gone in (
            "OtherPatientIDs",
            "PatientAddress",
            "StudyDescription",
            "RequestAttributesSequence",
        ):
            assert gone not in h
        assert h.get("InstitutionName", "") == ""  # X/Z/D: emptied
        assert not any(e.tag.is_private for e in h)
        assert h.file_meta.ImplementationClassUID != series.sop_class_uid
        assert h.Modality == "CT" and h.SOPClassUID == series.sop_class_uid
    assert sorted(int(h.InstanceNumber) for h in headers) == list(range(1, 201))


def test_pixel_data_is_byte_identical(ct_study) -> None:
    proxy, series = ct_study
    orig_to_anon = original_to_anonymized_sop(proxy.workdir)
    for src in series.files[::37]:
        original = pydicom.dcmread(src)
        study = _study_dir(proxy)
        out = next(study.glob(f"*/{orig_to_anon[original.SOPInstanceUID]}.dcm"))
        anonymized = pydicom.dcmread(out)
        assert anonymized.PixelData == original.PixelData
        assert anonymized.PixelSpacing == original.PixelSpacing
        assert anonymized.ImagePositionPatient == original.ImagePositionPatient
        assert anonymized.ImageOrientationPatient == original.ImageOrientationPatient
        assert anonymized.SliceThickness == original.SliceThickness


def test_vault_holds_every_original(ct_study) -> None:
    proxy, series = ct_study
    records = vault_records(proxy.workdir)
    assert len(records) == 200
    rec = records[0]
    assert rec["phi"]["patient"]["PatientName"] == series.phi["PatientName"]
    assert rec["phi"]["patient"]["PatientID"] == series.phi["PatientID"]
    assert rec["phi"]["patient"]["PatientBirthDate"] == series.phi["PatientBirthDate"]
    assert rec["phi"]["patient"]["OtherPatientIDs"] == series.phi["OtherPatientIDs"]
    assert rec["phi"]["patient"]["PatientAddress"] == series.phi["PatientAddress"]
    assert rec["phi"]["study"]["AccessionNumber"] == series.phi["AccessionNumber"]
    assert rec["phi"]["study"]["StudyInstanceUID"] == series.study_uid
    assert rec["phi"]["study"]["ReferringPhysicianName"] == series.phi["ReferringPhysicianName"]
    assert rec["phi"]["study"]["InstitutionName"] == series.series_phi["InstitutionName"]
    assert rec["phi"]["series"]["SeriesInstanceUID"] == series.series_uid
    assert rec["phi"]["series"]["FrameOfReferenceUID"] == series.series_phi["FrameOfReferenceUID"]
    assert sorted(original_to_anonymized_sop(proxy.workdir)) == sorted(series.sop_uids)
    assert {r["study"] for r in records} == {_study_dir(proxy).name}


def test_no_phi_outside_the_vault_nor_in_logs(ct_study) -> None:
    proxy, series = ct_study
    needles = series.leak_strings()
    assert len(needles) > 200  # markers + every original UID
    vault = proxy.spool / "vault.phi"
    assert find_bytes(proxy.spool, needles, skip=[vault]) == []
    assert find_bytes(proxy.workdir, needles, skip=[vault]) == []  # stdout/stderr logs too
    for name in ("main.log", "dicom.log", "error.log", "api.log"):
        assert (proxy.spool / "logs" / name).exists()
    assert "association accepted" in (proxy.spool / "logs" / "dicom.log").read_text()
    assert "listening on" in (proxy.spool / "logs" / "main.log").read_text()


def test_files_and_folders_are_private(ct_study) -> None:
    proxy, _ = ct_study
    for path in [proxy.spool, *proxy.spool.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{path} is {mode:o}"


def test_reindex_rebuilds_the_same_catalog(ct_study) -> None:
    proxy, _ = ct_study
    wait_until(
        lambda: catalog_counts(proxy.spool)["studies_by_state"].get("complete"), 30, "complete"
    )
    before = catalog_counts(proxy.spool)
    study_uid = _study_dir(proxy).name
    timeline = catalog_study(proxy.spool, study_uid)
    refused = proxy.cli("reindex")
    assert refused.returncode == 1 and "stop it" in refused.stderr
    proxy.stop()
    for suffix in ("", "-wal", "-shm"):
        path = proxy.spool / f"catalog.sqlite3{suffix}"
        if path.exists():
            path.unlink()
    result = proxy.cli("reindex")
    assert result.returncode == 0, result.stderr
    assert "1 patients, 1 studies, 1 series, 200 instances" in result.stdout
    assert catalog_counts(proxy.spool) == before
    again = catalog_study(proxy.spool, study_uid)
    for key in ("state", "first_received", "last_received", "completed_at", "instance_count"):
        assert again[key] == timeline[key], key
    assert all(o is not None for o in _vault_offsets(proxy.spool, study_uid))
    proxy.start()


def _vault_offsets(spool: Path, study_uid: str) -> list:
    from ith_proxy.store.catalog import Catalog

    cat = Catalog(spool / "catalog.sqlite3", readonly=True)
    try:
        return cat.instance_vault_offsets(study_uid)
    finally:
        cat.close()


# --------------------------------------------------------------------------
# pseudonyms across studies and restarts; anonymization off
# --------------------------------------------------------------------------


def test_pseudonyms_are_stable_across_studies_and_restarts(tmp_path: Path) -> None:
    first = dicomgen.make_ct_series(tmp_path / "a", 3, rows=64, cols=64)
    second = dicomgen.make_ct_series(
        tmp_path / "b",
        2,
        rows=64,
        cols=64,
        patient_id=first.patient_id,
        patient_name="OTHER^SPELLING",
    )
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        assert tools.storescu(proxy.dicom_port, first.files).returncode == 0
        wait_indexed(proxy.spool, 3)
        proxy.stop()
        proxy.start()
        assert tools.storescu(proxy.dicom_port, second.files).returncode == 0
        wait_indexed(proxy.spool, 5)
        headers = [read_header(f) for f in stored_files(proxy.spool)]
        assert len({str(h.StudyInstanceUID) for h in headers}) == 2
        assert len({str(h.PatientID) for h in headers}) == 1
        assert catalog_counts(proxy.spool)["patients"] == 1


def test_anonymize_off_stores_unchanged(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 4, rows=64, cols=64)
    env = {"DICOM_ANONYMIZE_PATIENTS": "false"}
    with tools.ProxyProcess(tmp_path / "p", env=env) as proxy:
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_indexed(proxy.spool, 4)
        files = stored_files(proxy.spool)
        assert {f.stem for f in files} == set(series.sop_uids)
        assert {f.parent.parent.name for f in files} == {series.study_uid}
        for src in series.files:
            original = pydicom.dcmread(src)
            out = (
                proxy.spool
                / "studies"
                / series.study_uid
                / series.series_uid
                / f"{original.SOPInstanceUID}.dcm"
            )
            stored = pydicom.dcmread(out)
            assert stored == original  # every data element unchanged
            assert stored.PixelData == original.PixelData
        assert not vault_records(proxy.workdir)


# --------------------------------------------------------------------------
# refusals and bad input
# --------------------------------------------------------------------------


def test_unsupported_sop_class_is_refused(tmp_path: Path) -> None:
    sc = dicomgen.make_instance_of_class(tmp_path / "sc")
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        result = tools.storescu(proxy.dicom_port, sc.files)
        assert result.returncode != 0
        assert "No presentation context" in result.stderr
        assert tools.acked_files(result) == []
        assert not list((proxy.spool / "incoming").iterdir())
        assert stored_files(proxy.spool) == []


def test_wrong_called_ae_and_calling_ae_allow_list(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 1, rows=64, cols=64)
    ini = "[scp]\nallowed_calling_aes = MODALITY1, MODALITY2\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        wrong_called = tools.storescu(
            proxy.dicom_port, series.files, aet="MODALITY1", aec="SOMEONEELSE"
        )
        assert wrong_called.returncode != 0 and "Association Rejected" in wrong_called.stderr
        not_allowed = tools.storescu(proxy.dicom_port, series.files, aet="INTRUDER")
        assert not_allowed.returncode != 0 and "Association Rejected" in not_allowed.stderr
        ok = tools.storescu(proxy.dicom_port, series.files, aet="MODALITY2")
        assert ok.returncode == 0, ok.stderr
        wait_indexed(proxy.spool, 1)
        assert "association rejected" in (proxy.spool / "logs" / "dicom.log").read_text()


def test_garbage_goes_to_quarantine_and_ingest_continues(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 5, rows=64, cols=64)
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        incoming = proxy.spool / "incoming"
        (incoming / "garbage-1").write_bytes(b"\x00" * 200 + b"this is not DICOM at all")
        (incoming / "garbage-2").write_bytes(os.urandom(5000))
        truncated = series.files[0].read_bytes()[:-1000]
        (incoming / "truncated-3").write_bytes(truncated)
        no_uid = pydicom.dcmread(series.files[1])
        del no_uid.StudyInstanceUID
        no_uid.save_as(incoming / "nouid-4")
        assert tools.storescu(proxy.dicom_port, series.files).returncode == 0
        wait_indexed(proxy.spool, 5)
        quarantine = proxy.spool / "quarantine"
        wait_until(lambda: len(list(quarantine.glob("*/*.json"))) == 4, 30, "4 quarantined")
        found = {p.name: p.parent.name for p in quarantine.glob("*/*") if p.suffix != ".json"}
        assert found == {
            "garbage-1": "unparseable",
            "garbage-2": "unparseable",
            "truncated-3": "unparseable",
            "nouid-4": "inconsistent",
        }
        info = json.loads((quarantine / "inconsistent" / "nouid-4.json").read_text())
        assert info["reason"] == "inconsistent" and "StudyInstanceUID" in info["error"]
        assert info["quarantined_at"].endswith("Z")
        assert len(stored_files(proxy.spool)) == 5
        assert proxy.health()[0] == 200
        assert "quarantined 4" in proxy.cli("status").stdout


def test_full_disk_watermark_answers_out_of_resources(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 2, rows=64, cols=64)
    ini = "[spool]\nmin_free_mb = 999999999\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        result = tools.storescu(proxy.dicom_port, series.files)
        assert "Refused: OutOfResources" in result.stderr
        assert tools.acked_files(result) == []
        assert not list((proxy.spool / "incoming").iterdir())
        assert not list((proxy.spool / "tmp").iterdir())
        status, body = proxy.health()
        assert status == 503 and body["status"] == "degraded"
        assert any("disk" in p for p in body["problems"])


def test_io_error_answers_out_of_resources_and_leaves_nothing(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 2, rows=64, cols=64)
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        incoming = proxy.spool / "incoming"
        aside = proxy.spool / "incoming.aside"
        incoming.rename(aside)
        incoming.write_bytes(b"")  # rename into incoming/ now fails with ENOTDIR
        try:
            result = tools.storescu(proxy.dicom_port, series.files)
            assert "Refused: OutOfResources" in result.stderr
            assert tools.acked_files(result) == []
            assert not list((proxy.spool / "tmp").iterdir())
        finally:
            incoming.unlink()
            aside.rename(incoming)
        ok = tools.storescu(proxy.dicom_port, series.files)
        assert ok.returncode == 0
        wait_indexed(proxy.spool, 2)
        assert "I/O error" in (proxy.spool / "logs" / "error.log").read_text()
