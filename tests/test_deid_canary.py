"""De-identification end to end with the canary corpus (issue 3, PS3.15 Annex E).

A real proxy receives the canary study (tests/canary.py) over DICOM with
DCMTK ``storescu``; one more instance, carrying file meta and preamble
markers, is dropped straight into ``spool/incoming/``. After ingest the
proxy is stopped and everything it wrote is inspected:

* no marker in any byte under spool/ (outside vault.phi), in the catalog,
  the logs or the proxy's stdout/stderr;
* every marker comes back exactly from the vault;
* retained attributes and pixel bytes are unchanged;
* UID references (5 sequences deep, and to another instance) are remapped
  consistently with their targets; every output UID is valid;
* PatientIdentityRemoved, DeidentificationMethod(CodeSequence) and
  LongitudinalTemporalInformationModified are present; the preamble is zeroed.

``CANARY_EXCLUDE="(gggg,eeee);..."`` leaves table rows out of the corpus (to
see the other results while one row breaks ingest).

Two self-checks make sure a failure is the engine's and not the corpus's:
every marker is in the input files, and every marker that should travel over
DICOM arrives in a proxy that stores unchanged (anonymize off).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

import canary
from helpers import vault_records

CALLING_AE = "CANARYSCU"  # not a marker: the SCP may log it, but it must not reach studies/


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> canary.Run:
    work = tmp_path_factory.mktemp("canary")
    corpus = canary.build_canary(work / "in", exclude=canary.excluded_rows())
    return canary.ingest(work / "proxy", corpus, calling_ae=CALLING_AE)


# --------------------------------------------------------------------------
# self-checks of the corpus (failures here are test bugs, not engine gaps)
# --------------------------------------------------------------------------


def test_corpus_covers_the_table(tmp_path: Path) -> None:
    corpus = canary.build_canary(tmp_path, series=(1,), drop=False)
    wanted = {r.tag for r in corpus.table.rows if r.basic not in ("K", "")}
    covered = corpus.rows_with_markers() | {row.split()[0] for row, _ in corpus.skipped}
    covered |= {"(0002,0003)"}  # Media Storage SOP Instance UID: the SOP Instance UID marker
    covered |= {r.tag for r in corpus.table.rows if r.tag.lower().startswith("(gggg")}  # private
    assert sorted(wanted - covered) == []
    assert len(corpus.markers) > 500
    needles = [m.needle for m in corpus.markers if m.needle]
    assert len(needles) == len(set(needles))  # one marker, one needle


def test_corpus_markers_are_in_the_input_files(run: canary.Run) -> None:
    missing = []
    for m in run.corpus.markers:
        for i in m.instances:
            path = run.corpus.instances[i].path
            if m.kind == "preamble":
                ok = path.read_bytes()[:128] == m.value
            elif m.greppable:
                ok = canary.file_has(path, m.needle)
            else:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                ok = canary.marker_holds(canary.get_path(ds, m.path), m)
            if not ok:
                missing.append(f"{path.name}: {m.path} {m.value!r}")
    assert missing == []
    for path in run.corpus.network_files + run.corpus.drop_files:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"


def test_corpus_markers_survive_the_wire(tmp_path: Path) -> None:
    """With anonymization off the proxy stores what it received: every marker
    meant to travel over DICOM must be there, so the leak and vault checks
    below test the engine and not DCMTK."""
    corpus = canary.build_canary(tmp_path / "in", drop=False)
    r = canary.ingest(
        tmp_path / "proxy", corpus, drop=False, env={"DICOM_ANONYMIZE_PATIENTS": "false"}
    )
    assert r.quarantined == []
    data = b"".join(p.read_bytes() for p in r.outputs.values())
    lost = [
        f"{m.path} {m.needle}"
        for m in corpus.markers
        if corpus.travels(m) and m.greppable and not canary._hits(data, m.needle.encode())
    ]
    assert lost == []


# --------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------


def test_every_instance_is_stored_and_none_quarantined(run: canary.Run) -> None:
    run.require_all_stored()
    assert run.quarantined == []
    assert sorted(run.outputs) == [i.index for i in run.corpus.instances]
    assert not list((run.proxy.spool / "incoming").iterdir())


def test_no_marker_outside_the_vault(run: canary.Run) -> None:
    """Files, study.json, catalog (+WAL), logs, quarantine, stdout/stderr."""
    run.require_all_stored()
    vault = run.proxy.spool / "vault.phi"
    needles = run.corpus.needles()
    hits = canary.find_needles(run.proxy.workdir, needles, skip=[vault])
    by_marker = {m.needle: m for m in run.corpus.markers}
    report = [
        f"{h}  <- {by_marker[h.split(': ', 1)[1]].kind} {by_marker[h.split(': ', 1)[1]].path}"
        for h in hits
    ]
    assert report == [], f"{len(report)} leaks:\n" + "\n".join(report[:200])


def test_no_unsearchable_marker_in_outputs(run: canary.Run) -> None:
    """Markers that cannot be searched as bytes (US, AS, ...): parse the outputs."""
    run.require_all_stored()
    leaks = []
    for m in run.corpus.markers:
        if m.greppable or m.kind in ("meta", "preamble"):
            continue
        for i in m.instances:
            ds = run.header(i)
            if canary.marker_holds(canary.get_path(ds, m.path), m):
                leaks.append(f"instance {i}: {m.path} = {m.value!r}")
    assert leaks == []


def test_every_marker_comes_back_from_the_vault(run: canary.Run) -> None:
    run.require_all_stored()
    records = vault_records(run.proxy.workdir)
    assert records, "vault is empty"
    missing = [
        f"{m.kind:15} {m.path} {m.value!r}"
        for m in run.corpus.markers
        if m.kind != "preamble"
        and run.corpus.delivered(m)
        and not any(canary.record_has(r, m) for r in records)
    ]
    assert missing == [], (
        f"{len(missing)} of {len(run.corpus.markers)} markers not in the vault:\n"
        + "\n".join(missing[:300])
    )


def test_each_instance_record_holds_its_own_values(run: canary.Run) -> None:
    """Instance-level markers are in that instance's record; top-level ones under
    their attribute path (``Keyword`` or ``(gggg,eeee)``)."""
    run.require_all_stored()
    records = vault_records(run.proxy.workdir)
    by_sop: dict[str, list[dict]] = {}
    for r in records:
        by_sop.setdefault(r.get("sop", ""), []).append(r)
    problems = []
    for inst in run.corpus.instances:
        sop = str(run.header(inst.index).SOPInstanceUID)
        recs = by_sop.get(sop, [])
        if not recs:
            problems.append(f"instance {inst.index}: no vault record for {sop}")
            continue
        assert all(r.get("study") == str(run.header(inst.index).StudyInstanceUID) for r in recs)
        for m in run.corpus.markers_in(inst.index):
            if (
                m.scope != "instance"
                or m.kind == "preamble"
                or inst.index not in run.corpus.delivered(m)
            ):
                continue
            if not any(canary.record_has(r, m) for r in recs):
                problems.append(f"instance {inst.index}: {m.path} {m.value!r} not in its record")
            elif m.top_level and not any(
                canary.same_value(leaf, m)
                for r in recs
                for level in r.get("phi", {}).values()
                if isinstance(level, dict)
                for leaf in canary.vault_leaves(level.get(m.path))
            ):
                problems.append(f"instance {inst.index}: {m.path} not recorded under that path")
    assert problems == [], "\n".join(problems[:300])


def test_retained_attributes_and_pixels_are_unchanged(run: canary.Run) -> None:
    run.require_all_stored()
    changed = []
    for inst in run.corpus.instances:
        before = pydicom.dcmread(inst.path)
        after = pydicom.dcmread(run.outputs[inst.index])
        for kw in canary.RETAINED:
            old = canary.plain(before[kw] if kw in before else None)
            if old != canary.plain(after[kw] if kw in after else None):
                changed.append(
                    f"instance {inst.index}: {kw} {before.get(kw)!r} -> {after.get(kw)!r}"
                )
        if bytes(before.PixelData) != bytes(after.PixelData):
            changed.append(f"instance {inst.index}: pixel data differs")
        assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert changed == []


def test_uid_references_are_remapped_consistently(run: canary.Run) -> None:
    run.require_all_stored()
    corpus = run.corpus
    heads = {i.index: run.header(i.index) for i in corpus.instances}
    studies = {str(h.StudyInstanceUID) for h in heads.values()}
    frames = {str(h.get("FrameOfReferenceUID", "")) for h in heads.values()}
    assert len(studies) == 1 and studies != {corpus.study_uid}
    assert len(frames) == 1 and frames != {corpus.frame_uid} and frames != {""}
    for s in {i.series_number for i in corpus.instances}:
        members = [i for i in corpus.instances if i.series_number == s]
        assert len({str(heads[i.index].SeriesInstanceUID) for i in members}) == 1
    assert len({str(h.SeriesInstanceUID) for h in heads.values()}) == 2
    assert len({str(h.SOPInstanceUID) for h in heads.values()}) == len(heads)
    problems = []
    for inst in corpus.instances:
        h = heads[inst.index]
        path = run.outputs[inst.index]
        assert path.stem == str(h.SOPInstanceUID) == str(h.file_meta.MediaStorageSOPInstanceUID)
        assert path.parent.name == str(h.SeriesInstanceUID)
        assert path.parent.parent.name == str(h.StudyInstanceUID)
        for ref_path, target in inst.references.items():
            elem = canary.get_path(h, ref_path)
            if target.startswith("instance:"):
                want = str(heads[int(target.split(":")[1])].SOPInstanceUID)
            else:
                want = str(h.get(target, ""))
            got = None if elem is None else str(elem.value)
            if got != want:
                problems.append(
                    f"instance {inst.index}: {ref_path} = {got}, expected {want} ({target})"
                )
    # a value shared by several instances maps to one value everywhere
    for m in corpus.markers:
        if m.vr != "UI" or len(m.instances) < 2 or not m.top_level:
            continue
        outs = {
            str(e.value)
            for i in m.instances
            if (e := canary.get_path(heads[i], m.path)) is not None
        }
        if len(outs) > 1:
            problems.append(f"{m.path}: one input UID became {sorted(outs)}")
    assert problems == [], "\n".join(problems)


def test_every_output_uid_is_valid(run: canary.Run) -> None:
    run.require_all_stored()
    bad = []
    for index, path in run.outputs.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for where, uid in canary.output_uids(ds):
            if where == "FileMeta.ImplementationClassUID":
                continue  # names the proxy's implementation, not an instance
            if not canary.valid_output_uid(uid):
                bad.append(f"instance {index}: {where} = {uid}")
    assert bad == []


def test_deidentification_is_declared(run: canary.Run) -> None:
    run.require_all_stored()
    for index in run.outputs:
        ds = run.header(index)
        assert ds.get("PatientIdentityRemoved") == "YES"
        assert str(ds.get("DeidentificationMethod", "")).strip()
        codes = [
            (str(i.get("CodeValue")), str(i.get("CodingSchemeDesignator")))
            for i in ds.get("DeidentificationMethodCodeSequence", [])
        ]
        assert (canary.BASIC_CODE, "DCM") in codes
        assert {c for c, _ in codes} == {canary.BASIC_CODE}  # no option is on
        assert ds.get("LongitudinalTemporalInformationModified") == "REMOVED"


def test_preamble_is_zeroed_and_file_meta_rewritten(run: canary.Run) -> None:
    run.require_all_stored()
    for index, path in run.outputs.items():
        head = path.read_bytes()[:132]
        assert head[:128] == b"\0" * 128, f"instance {index}: preamble not zeroed"
        assert head[128:] == b"DICM"
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        for kw in (
            "SourceApplicationEntityTitle",
            "SendingApplicationEntityTitle",
            "ReceivingApplicationEntityTitle",
            "SourcePresentationAddress",
            "PrivateInformationCreatorUID",
            "PrivateInformation",
        ):
            assert kw not in meta, f"instance {index}: file meta keeps {kw}"
        assert meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
    assert canary.find_needles(run.proxy.spool / "studies", [CALLING_AE]) == []
