"""Each PS3.15 Annex E option in ``[deid]`` shows its effect, end to end.

Every test starts a real proxy with the option switched on in its INI
(``[deid]\\n<option> = true``), sends instances with DCMTK ``storescu`` and
reads the stored files and the vault back. The Retain options are checked
against the canary corpus row by row from Table E.1-1
(``ith_proxy/deid/table_e1_1.json``): every row whose option column says K
keeps its original value, and every marker of a row the option does not
touch is still gone. Dates, descriptors, private attributes, burned-in
annotation and the declared method codes use small purpose-built instances.

``CANARY_EXCLUDE="(gggg,eeee);..."`` leaves table rows out of the canary
corpus (see tests/test_deid_canary.py).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

import canary
import dicomgen
from canary import BASIC_CODE, OPTION_CODES, deid_config, method_codes
from helpers import catalog_counts, stored_files, vault_records

LTIM = {"retain_long_full_dates": "UNMODIFIED", "retain_long_modified_dates": "MODIFIED"}

#: attributes named in the brief for each Retain option (all must be among the K rows)
NAMED_KEPT = {
    "retain_long_full_dates": (
        "StudyDate",
        "SeriesDate",
        "AcquisitionDate",
        "ContentDate",
        "StudyTime",
        "SeriesTime",
        "AcquisitionTime",
        "ContentTime",
        "AcquisitionDateTime",
    ),
    "retain_patient_characteristics": ("PatientSex", "PatientAge", "PatientWeight", "PatientSize"),
    "retain_device_identity": ("StationName", "DeviceSerialNumber"),
    "retain_institution_identity": (
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
    ),
    "retain_uids": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
    ),
}

FIXED_SECRET = b"f1e2d3c4b5a697887766554433221100f1e2d3c4b5a697887766554433221100\n"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def canary_run(tmp_path: Path, *options: str, **values: str) -> canary.Run:
    corpus = canary.build_canary(
        tmp_path / "in", series=(1, 1), drop=False, exclude=canary.excluded_rows()
    )
    if not corpus.table.has_options:
        pytest.fail(f"Table E.1-1 option columns needed ({canary.TABLE_PATH} missing)")
    run = canary.ingest(tmp_path / "proxy", corpus, deid_config(*options, **values), drop=False)
    run.require_all_stored()
    assert run.quarantined == []
    assert sorted(run.outputs) == [i.index for i in corpus.instances if i.network]
    return run


def headers(run: canary.Run) -> tuple[dict[int, Dataset], dict[int, Dataset]]:
    return ({i: run.input_header(i) for i in run.outputs}, {i: run.header(i) for i in run.outputs})


def rows_by_tag(run: canary.Run) -> dict[str, canary.TableRow]:
    return {r.tag: r for r in run.corpus.table.rows}


def kept_rows(run: canary.Run, option: str) -> tuple[set[str], list[str]]:
    """Every top-level marker of a row whose ``option`` column says K must come
    out unchanged. Returns (attributes checked, problems)."""
    rows = rows_by_tag(run)
    before, after = headers(run)
    checked, problems = set(), []
    for m in run.corpus.markers:
        if not m.row or not m.top_level or rows[m.row].option(option) != "K":
            continue
        checked.add(m.path)
        for i in run.corpus.delivered(m):
            old = canary.plain(canary.get_path(before[i], m.path))
            new = canary.plain(canary.get_path(after[i], m.path))
            if new != old:
                problems.append(f"instance {i}: {m.path} {old!r} -> {new!r}")
    return checked, problems


def untouched_markers_absent(run: canary.Run, option: str | None) -> list[str]:
    """Markers of rows the option does not keep or clean (and of everything
    outside the table) must still be absent from the stored files."""
    rows = rows_by_tag(run)
    needles = set()
    for m in run.corpus.markers:
        if not m.greppable or not m.needle or not run.corpus.delivered(m):
            continue
        if option and m.row and rows[m.row].option(option) in ("K", "C"):
            continue
        if option == "retain_long_modified_dates" and m.vr == "DA":
            continue  # a shifted date can equal another marker's date
        needles.add(m.needle)
    return canary.find_needles(run.proxy.spool / "studies", needles)


def check_declared(ds: Dataset, options: tuple[str, ...], where: str = "") -> None:
    assert ds.get("PatientIdentityRemoved") == "YES", where
    assert str(ds.get("DeidentificationMethod", "")).strip(), where
    want = {BASIC_CODE} | {OPTION_CODES[o] for o in options}
    assert method_codes(ds) == want, where
    dates = [LTIM[o] for o in options if o in LTIM] or ["REMOVED"]
    assert ds.get("LongitudinalTemporalInformationModified") == dates[0], where


def check_retained(run: canary.Run) -> None:
    before, after = headers(run)
    for i in run.outputs:
        for kw in canary.RETAINED:
            old = canary.plain(before[i][kw] if kw in before[i] else None)
            assert canary.plain(after[i][kw] if kw in after[i] else None) == old, (i, kw)


def edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def write_site_secret(proxy) -> None:
    """A fixed site secret, so the keyed date shifts of the test patients are fixed."""
    d = proxy.workdir / "secrets"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = d / "site.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(FIXED_SECRET)


def dt(date: str, time: str = "") -> datetime:
    """DA + TM (or a DT) as a naive datetime; fractions kept, offsets ignored."""
    value = (str(date) + str(time)).split("+")[0].split("-")[0]
    main, _, frac = value.partition(".")
    main = (main + "000000")[:14]
    return datetime.strptime(main, "%Y%m%d%H%M%S") + timedelta(
        microseconds=int((frac + "000000")[:6])
    )


def tm_seconds(tm: str) -> float:
    main, _, frac = str(tm).partition(".")
    main = (main + "0000")[:6]
    return int(main[:2]) * 3600 + int(main[2:4]) * 60 + int(main[4:6]) + float("0." + (frac or "0"))


def private_element(ds: Dataset, group: int, creator: str, low: int):
    """The private element ``(group, xx<low>)`` of ``creator``'s block, or None."""
    for elem in ds:
        if (
            elem.tag.group == group
            and 0x10 <= elem.tag.element <= 0xFF
            and str(elem.value).strip().upper() == creator.upper()
        ):
            return ds.get((group << 16) | (elem.tag.element << 8) | low)
    return None


def one_output(proxy) -> Dataset:
    files = stored_files(proxy.spool)
    assert len(files) == 1, files
    return pydicom.dcmread(files[0])


# --------------------------------------------------------------------------
# the Retain options, row by row
# --------------------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(NAMED_KEPT))
def test_retain_option_keeps_its_rows_and_nothing_else(tmp_path: Path, option: str) -> None:
    run = canary_run(tmp_path, option)
    checked, problems = kept_rows(run, option)
    assert problems == [], "\n".join(problems)
    missing = [kw for kw in NAMED_KEPT[option] if kw not in checked]
    assert missing == [], f"not K rows under {option} in the table: {missing}"
    leaks = untouched_markers_absent(run, option)
    assert leaks == [], f"{len(leaks)} markers of rows {option} does not keep:\n" + "\n".join(
        leaks[:100]
    )
    for i in run.outputs:
        check_declared(run.header(i), (option,), f"instance {i}")
    check_retained(run)
    if option == "retain_uids":
        for inst in run.corpus.instances:
            path = run.outputs[inst.index]
            assert (path.parent.parent.name, path.parent.name, path.stem) == (
                inst.study_uid,
                inst.series_uid,
                inst.sop_uid,
            )
            out = run.header(inst.index)
            assert out.file_meta.MediaStorageSOPInstanceUID == inst.sop_uid
            for ref, target in inst.references.items():
                elem = canary.get_path(out, ref)
                want = (
                    run.corpus.instances[int(target.split(":")[1])].sop_uid
                    if target.startswith("instance:")
                    else getattr(
                        inst,
                        {
                            "StudyInstanceUID": "study_uid",
                            "SeriesInstanceUID": "series_uid",
                            "SOPInstanceUID": "sop_uid",
                            "FrameOfReferenceUID": "frame_uid",
                        }[target],
                    )
                )
                assert elem is not None and str(elem.value) == want, ref


def test_retain_long_modified_dates_shifts_every_date_by_one_offset(tmp_path: Path) -> None:
    option = "retain_long_modified_dates"
    run = canary_run(tmp_path, option)
    rows = rows_by_tag(run)
    before, after = headers(run)
    da, dts, tms, problems = set(), set(), set(), []
    checked = set()
    for m in run.corpus.markers:
        if (
            not m.row
            or not m.top_level
            or m.vr not in ("DA", "DT", "TM")
            or rows[m.row].option(option) != "C"
        ):
            continue
        checked.add(m.path)
        for i in run.corpus.delivered(m):
            old = str(canary.get_path(before[i], m.path).value)
            elem = canary.get_path(after[i], m.path)
            if elem is None or not str(elem.value or ""):
                problems.append(f"instance {i}: {m.path} removed instead of shifted")
                continue
            new = str(elem.value)
            try:
                if m.vr == "DA":
                    da.add((dt(new) - dt(old)).days)
                elif m.vr == "DT":
                    dts.add(dt(new) - dt(old))
                else:
                    tms.add(round((tm_seconds(new) - tm_seconds(old)) % 86400, 3))
            except ValueError:
                problems.append(f"instance {i}: {m.path} {old!r} -> unparseable {new!r}")
    assert problems == [], "\n".join(problems[:100])
    assert {
        "StudyDate",
        "SeriesDate",
        "AcquisitionDate",
        "ContentDate",
        "StudyTime",
        "AcquisitionDateTime",
    } <= checked
    assert len(da) == 1 and da != {0}, f"DA shifts {sorted(da)}"
    assert len(dts) == 1, f"DT shifts {sorted(dts)}"
    shift = dts.pop()
    assert abs(shift - timedelta(days=da.pop())) < timedelta(days=1)
    assert tms == {round(shift.seconds % 86400, 3)}, f"TM shifts {sorted(tms)} vs DT shift {shift}"
    leaks = untouched_markers_absent(run, option)
    assert leaks == [], "\n".join(leaks[:100])
    for i in run.outputs:
        check_declared(after[i], (option,), f"instance {i}")
        assert (
            after[i].get("PatientBirthDate", "") in ("", None)
            or after[i].PatientBirthDate != before[i].PatientBirthDate
        )
    check_retained(run)


def _study(out: Path, series_number: int, pid: str, name: str, day: str) -> Path:
    """One CT instance of a new study of patient ``pid`` on ``day``, with
    times that cross midnight (content on the next day)."""
    s = dicomgen.make_ct_series(
        out, 1, rows=32, cols=32, patient_id=pid, patient_name=name, series_number=series_number
    )
    d = datetime.strptime(day, "%Y%m%d")
    nxt = (d + timedelta(days=1)).strftime("%Y%m%d")

    def change(ds: Dataset) -> None:
        ds.StudyDate, ds.StudyTime = day, "233015"
        ds.SeriesDate, ds.SeriesTime = day, "233500"
        ds.AcquisitionDate, ds.AcquisitionTime = day, "234510.25"
        ds.AcquisitionDateTime = day + "234510.25"
        ds.ContentDate, ds.ContentTime = nxt, "000730"
        ds.InstanceCreationDate, ds.InstanceCreationTime = nxt, "001000"

    edit(s.files[0], change)
    return s.files[0]


def _points(ds: Dataset) -> dict[str, datetime]:
    return {
        "study": dt(ds.StudyDate, ds.StudyTime),
        "series": dt(ds.SeriesDate, ds.SeriesTime),
        "acquisition": dt(ds.AcquisitionDateTime),
        "content": dt(ds.ContentDate, ds.ContentTime),
    }


def test_modified_dates_shift_per_patient_and_keep_intervals(tmp_path: Path) -> None:
    files = [
        _study(tmp_path / "a1", 1, "PAT-ALPHA", "ALPHA^ANNA", "20240115"),
        _study(tmp_path / "a2", 2, "PAT-ALPHA", "ALPHA^ANNA", "20230601"),
        _study(tmp_path / "b", 3, "PAT-BRAVO", "BRAVO^BEN", "20240115"),
        _study(tmp_path / "c", 4, "PAT-CHARLIE", "CHARLIE^CARL", "20240115"),
    ]
    proxy, quarantined = canary.run_proxy(
        tmp_path / "proxy",
        files,
        config_text=deid_config("retain_long_modified_dates"),
        before_start=write_site_secret,
    )
    assert quarantined == []
    outs = canary.outputs_by_key(proxy.spool)
    shifts = {}
    for n, src in enumerate(files, start=1):
        before = pydicom.dcmread(src, stop_before_pixels=True)
        after = pydicom.dcmread(outs[(n, 1)], stop_before_pixels=True)
        p0, p1 = _points(before), _points(after)
        shifts[n] = p1["study"] - p0["study"]
        for what in p0:  # intervals within the study, across midnight too
            assert p1[what] - p1["study"] == p0[what] - p0["study"], (n, what)
        check_declared(after, ("retain_long_modified_dates",), f"study {n}")
    assert shifts[1] != timedelta(0)
    assert shifts[1] == shifts[2], "same patient, different shift"
    assert shifts[3] != shifts[1] and shifts[4] != shifts[1], "different patients, same shift"
    assert len({str(pydicom.dcmread(outs[(n, 1)]).PatientID) for n in (1, 2)}) == 1


def test_modified_dates_keep_pet_decay_timing_and_suv(tmp_path: Path) -> None:
    s = dicomgen.make_pet_instance(tmp_path / "in", patient_id="PAT-PET", patient_name="PET^PAULA")

    def change(ds: Dataset) -> None:
        ds.StudyDate, ds.StudyTime = "20240115", "090000"
        ds.SeriesDate, ds.SeriesTime = "20240115", "101700"
        ds.AcquisitionDate, ds.AcquisitionTime = "20240115", "101800"
        ds.PatientWeight = "72.5"
        radio = ds.RadiopharmaceuticalInformationSequence[0]
        radio.RadiopharmaceuticalStartTime = "093000"
        radio.RadiopharmaceuticalStartDateTime = "20240115093000"
        radio.RadionuclideTotalDose = "370000000"
        radio.RadionuclideHalfLife = "6586.2"

    edit(s.files[0], change)
    options = ("retain_long_modified_dates", "retain_patient_characteristics")
    proxy, quarantined = canary.run_proxy(
        tmp_path / "proxy", s.files, config_text=deid_config(*options)
    )
    assert quarantined == []

    def timing(ds: Dataset) -> dict[str, float]:
        radio = ds.RadiopharmaceuticalInformationSequence[0]
        start_dt = dt(radio.RadiopharmaceuticalStartDateTime)
        decay = (dt(ds.SeriesDate, ds.SeriesTime) - start_dt).total_seconds()
        weight_g = float(ds.PatientWeight) * 1000
        dose = float(radio.RadionuclideTotalDose)
        half = float(radio.RadionuclideHalfLife)
        return {
            "decay_dt": decay,
            "decay_tm": (tm_seconds(ds.SeriesTime) - tm_seconds(radio.RadiopharmaceuticalStartTime))
            % 86400,
            "acq_tm": (
                tm_seconds(ds.AcquisitionTime) - tm_seconds(radio.RadiopharmaceuticalStartTime)
            )
            % 86400,
            "suv_factor": weight_g / (dose * 2 ** (-decay / half)),
        }

    before = pydicom.dcmread(s.files[0], stop_before_pixels=True)
    after = one_output(proxy)
    assert timing(after) == pytest.approx(timing(before))
    assert timing(before)["decay_dt"] == 47 * 60
    assert after.SeriesDate != before.SeriesDate  # and yet the timing holds
    for kw in ("Units", "DecayCorrection", "CorrectedImage", "RescaleSlope"):
        assert after.get(kw) == before.get(kw), kw
    check_declared(after, options)


# --------------------------------------------------------------------------
# Clean Descriptors
# --------------------------------------------------------------------------


def test_clean_descriptors_removes_identifiers_and_keeps_the_words(tmp_path: Path) -> None:
    s = dicomgen.make_ct_series(
        tmp_path / "in", 1, rows=32, cols=32, patient_id="MRN4711X", patient_name="SMITHSON^JOHANNA"
    )
    originals = {
        "StudyDescription": "CT CHEST SMITHSON FOLLOW UP",
        "SeriesDescription": "AXIAL MRN4711X SOFT TISSUE",
        "ImageComments": "Scout for Johanna, ACC99887, born 19450317",
        "ProtocolName": "CHEST ROUTINE",
    }

    def change(ds: Dataset) -> None:
        ds.AccessionNumber = "ACC99887"
        ds.PatientBirthDate = "19450317"
        for kw, value in originals.items():
            setattr(ds, kw, value)

    edit(s.files[0], change)
    proxy, quarantined = canary.run_proxy(
        tmp_path / "proxy", s.files, config_text=deid_config("clean_descriptors")
    )
    assert quarantined == []
    out = one_output(proxy)
    expect = {  # kept words, identifying fragments
        "StudyDescription": (("CT", "CHEST", "FOLLOW", "UP"), ("SMITHSON",)),
        "SeriesDescription": (("AXIAL", "SOFT", "TISSUE"), ("MRN4711X",)),
        "ImageComments": (("Scout", "born"), ("JOHANNA", "ACC99887", "19450317")),
    }
    for kw, (words, gone) in expect.items():
        assert kw in out and str(out[kw].value).strip(), f"{kw} removed instead of cleaned"
        text = str(out[kw].value)
        for g in gone:
            assert g.upper() not in text.upper(), f"{kw} still holds {g!r}: {text!r}"
        for w in words:
            assert w in text, f"{kw} lost {w!r}: {text!r}"
    assert str(out.ProtocolName) == originals["ProtocolName"]  # nothing identifying: unchanged
    assert str(out.PatientName) != "SMITHSON^JOHANNA" and "SMITHSON" not in str(out.PatientName)
    leaves = [leaf for r in vault_records(proxy.workdir) for leaf in canary.vault_leaves(r["phi"])]
    for kw in ("StudyDescription", "SeriesDescription", "ImageComments"):
        assert originals[kw] in leaves, f"original {kw} not in the vault"
    check_declared(out, ("clean_descriptors",))


def test_clean_descriptors_keeps_every_descriptor_row_cleaned(tmp_path: Path) -> None:
    """Canary: every long text row whose Clean Descriptors column says C is kept
    with its ordinary words, not removed; everything else stays removed."""
    option = "clean_descriptors"
    run = canary_run(tmp_path, option)
    words = ("ROUTINE", "CHEST")  # build_canary's descriptor_words
    _, after = headers(run)
    problems, checked = [], 0
    for m in run.corpus.markers:
        if m.kind != "descriptor" or not m.top_level or m.value == m.needle:
            continue  # short (SH/CS) descriptors hold only the marker: nothing to keep
        checked += 1
        for i in run.corpus.delivered(m):
            elem = canary.get_path(after[i], m.path)
            text = "" if elem is None or elem.value is None else str(elem.value)
            if not all(w in text for w in words):
                problems.append(f"instance {i}: {m.path} {m.value!r} -> {text!r}")
    assert checked > 50
    assert problems == [], f"{len(problems)} descriptors removed or mangled:\n" + "\n".join(
        problems[:100]
    )
    leaks = untouched_markers_absent(run, option)
    assert leaks == [], "\n".join(leaks[:100])
    for i in run.outputs:
        check_declared(after[i], (option,), f"instance {i}")
    check_retained(run)


# --------------------------------------------------------------------------
# Retain Safe Private
# --------------------------------------------------------------------------


def test_retain_safe_private_keeps_known_safe_and_drops_the_rest(tmp_path: Path) -> None:
    s = dicomgen.make_ct_series(tmp_path / "in", 1, rows=32, cols=32)
    secret = f"UNSAFE-{s.token}"

    def change(ds: Dataset) -> None:
        safe = ds.private_block(0x0019, "ITH SAFE", create=True)
        safe.add_new(0x10, "LO", "SAFE VALUE 1.25")  # configured safe
        safe.add_new(0x11, "LO", secret + "-A")  # same creator, not listed
        siemens = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        siemens.add_new(0x0C, "IS", "1000")  # B value (PS3.15 E.3.10)
        unsafe = ds.private_block(0x0029, "ITH UNSAFE", create=True)
        unsafe.add_new(0x10, "LO", secret + "-B")

    edit(s.files[0], change)
    proxy, quarantined = canary.run_proxy(
        tmp_path / "proxy",
        s.files,
        config_text=deid_config("retain_safe_private", safe_private="0019,xx10 ITH SAFE"),
    )
    assert quarantined == []
    out = one_output(proxy)
    kept = private_element(out, 0x0019, "ITH SAFE", 0x10)
    assert kept is not None and str(kept.value) == "SAFE VALUE 1.25"
    b_value = private_element(out, 0x0019, "SIEMENS MR HEADER", 0x0C)
    assert b_value is not None and str(b_value.value).strip() == "1000"
    assert private_element(out, 0x0019, "ITH SAFE", 0x11) is None
    assert private_element(out, 0x0029, "ITH UNSAFE", 0x10) is None
    assert private_element(out, 0x0009, "ITH TEST", 0x10) is None
    creators = {str(e.value) for e in out if e.tag.is_private and 0x10 <= e.tag.element <= 0xFF}
    assert creators == {"ITH SAFE", "SIEMENS MR HEADER"}
    assert len([e for e in out if e.tag.is_private and e.tag.element > 0xFF]) == 2
    assert canary.find_needles(proxy.spool / "studies", [secret, s.other_phi["(0009,1010)"]]) == []
    leaves = [leaf for r in vault_records(proxy.workdir) for leaf in canary.vault_leaves(r["phi"])]
    assert secret + "-A" in leaves and secret + "-B" in leaves
    check_declared(out, ("retain_safe_private",))


# --------------------------------------------------------------------------
# Burned In Annotation
# --------------------------------------------------------------------------


def _burned_in(tmp_path: Path) -> dicomgen.Series:
    s = dicomgen.make_ct_series(tmp_path / "in", 1, rows=32, cols=32)
    edit(s.files[0], lambda ds: setattr(ds, "BurnedInAnnotation", "YES"))
    return s


def test_burned_in_annotation_goes_to_phi_risk_quarantine_by_default(tmp_path: Path) -> None:
    s = _burned_in(tmp_path)
    proxy, quarantined = canary.run_proxy(tmp_path / "proxy", s.files)
    assert [q["reason_dir"] for q in quarantined] == ["phi-risk"]
    assert [
        p.name
        for p in (proxy.spool / "quarantine" / "phi-risk").iterdir()
        if not p.name.endswith(".json")
    ] != []
    assert catalog_counts(proxy.spool)["instances"] == 0
    assert stored_files(proxy.spool) == []


def test_quarantined_burned_in_instance_is_not_stored_in_plaintext(tmp_path: Path) -> None:
    """Quarantined input may hold PHI: issue 3 wants it encrypted under the vault key."""
    s = _burned_in(tmp_path)
    proxy, quarantined = canary.run_proxy(tmp_path / "proxy", s.files)
    assert [q["reason_dir"] for q in quarantined] == ["phi-risk"]
    assert canary.find_needles(proxy.spool / "quarantine", s.leak_strings()) == []


def test_burned_in_annotation_is_processed_when_quarantine_is_off(tmp_path: Path) -> None:
    s = _burned_in(tmp_path)
    proxy, quarantined = canary.run_proxy(
        tmp_path / "proxy", s.files, config_text=deid_config(quarantine_burned_in="false")
    )
    assert quarantined == []
    out = one_output(proxy)
    assert out.get("BurnedInAnnotation") == "YES"
    check_declared(out, ())
    assert canary.find_needles(proxy.spool / "studies", s.markers()) == []


# --------------------------------------------------------------------------
# what the output declares
# --------------------------------------------------------------------------

CODE_CASES = (
    [()]
    + [(o,) for o in canary.OPTIONS]
    + [tuple(o for o in canary.OPTIONS if o != "retain_long_full_dates")]
)


@pytest.mark.parametrize("options", CODE_CASES, ids=lambda o: "+".join(o) or "basic")
def test_method_codes_and_temporal_flag_follow_the_options(tmp_path: Path, options) -> None:
    s = dicomgen.make_instance(tmp_path / "in", "CT", rows=16, cols=16)
    proxy, quarantined = canary.run_proxy(
        tmp_path / "proxy", s.files, config_text=deid_config(*options)
    )
    assert quarantined == []
    out = one_output(proxy)
    check_declared(out, options)
    codes = list(out.DeidentificationMethodCodeSequence)
    assert all(str(c.CodingSchemeDesignator) == "DCM" and str(c.CodeMeaning).strip() for c in codes)
    assert len(codes) == len({str(c.CodeValue) for c in codes})  # no duplicates
