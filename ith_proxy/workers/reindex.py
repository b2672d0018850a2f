"""``ith-proxy reindex``: rebuild the catalog from ``studies/`` and the vault.

Offline (the service is stopped and the CLI holds the spool lock).  The
de-identified files and their ``study.json`` are the truth; the catalog is
an index of them, so it can always be rebuilt.  Each instance gets back its
own vault record: the one whose study and SOP Instance UID match (a later
record for the same instance supersedes an earlier one).

A study purged by retention has no instance files left: its ``study.json``
(the tombstone) lists the purged instances, so their rows come back marked
purged, with their vault records.  The outbox and its ledger are not in the
files: they survive in the catalog, or come back from study.json's
destinations when the catalog file is new (store/retention.py).
"""

from __future__ import annotations

import logging
import os
import time

from ith_proxy.dicom import files as dicomfile
from ith_proxy.store.catalog import Catalog, InstanceRow
from ith_proxy.store.outbox import Outbox
from ith_proxy.store.retention import Retention
from ith_proxy.store.spool import Spool
from ith_proxy.vault.records import Vault

log = logging.getLogger("ith_proxy.indexer")


def reindex(spool: Spool, catalog: Catalog, vault: Vault | None, now: float | None = None) -> dict:
    """Rebuild the catalog from studies/ plus the vault; return the new counts."""
    now = time.time() if now is None else now
    # (study, sop) -> the instance's own record (a record without a study never matches)
    offsets: dict[tuple[str | None, str], int] = {}
    patients: dict[str | None, str] = {}  # study -> its patient's pseudonym
    if vault is not None:
        for offset, record in vault.scan():
            if isinstance(record, dict) and "sop" in record:
                offsets[(record.get("study"), record["sop"])] = offset  # a later one supersedes
                if isinstance(record.get("patient"), str):
                    patients[record.get("study")] = record["patient"]
            else:
                log.error("%s", record)
    catalog.clear()
    rows: list[InstanceRow] = []
    for study, series, sop, path in spool.iter_instances():
        try:
            split = dicomfile.read_split(path)
        except dicomfile.DicomFileError as exc:
            log.error("reindex: skipping unreadable %s: %s", path, exc)
            continue
        ds = split.header
        rows.append(
            InstanceRow(
                patient_id=str(ds.get("PatientID", "") or ""),
                patient_name=str(ds.get("PatientName", "") or ""),
                study_uid=study,
                series_uid=series,
                sop_uid=sop,
                sop_class_uid=str(ds.get("SOPClassUID", "")),
                modality=str(ds.get("Modality", "") or ""),
                transfer_syntax=split.transfer_syntax,
                size=split.size,
                vault_offset=offsets.get((study, sop)),
                received_at=path.stat().st_mtime,
                main=dicomfile.main_attributes(ds),  # Q/R main attributes (migration 7)
            )
        )
    summaries = _summaries(spool)
    known = {r.study_uid: (r.patient_id, r.patient_name) for r in rows}  # from the files
    for study, found in summaries.items():
        if study not in known and study in patients:  # deid's pseudonymous name goes with its ID
            known[study] = (patients[study], f"ANON^{patients[study]}")
        rows.extend(_tombstone(study, found, known.get(study, ("", "")), offsets))
    catalog.record_instances(rows)
    outbox, retention = Outbox(catalog), Retention(catalog)
    for study in catalog.study_uids():
        summary = summaries.get(study)
        if summary:
            catalog.restore_study_timeline(
                study,
                summary.get("state", "receiving"),
                summary["first_received"],
                summary["last_received"],
                summary.get("completed_at"),
                int(summary.get("reopened", 0)),
                [(e["ts"], e["event"]) for e in summary.get("events", [])],
            )
            purged = [r.sop_uid for r in _tombstone(study, summary, ("", ""), {})]
            at = summary.get("purged_at")
            if purged:  # listed in the tombstone: their files are gone
                at = float(at) if isinstance(at, (int, float)) else now
                retention.mark_purged(study, purged, at, event=False)
            retention.restore(study, summary.get("destinations") or [], now)
        outbox.settle(study, now)
    return catalog.counts()


def _summaries(spool: Spool) -> dict[str, dict]:
    """Every study.json under studies/, tombstones (no instance files) included."""
    out = {}
    for entry in os.scandir(spool.studies):
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            summary = spool.read_study_json(entry.name)
        except ValueError:  # not a UID: not a study folder of ours
            continue
        if isinstance(summary, dict):
            out[entry.name] = summary
    return out


def _tombstone(
    study: str, summary: dict, patient: tuple[str, str], offsets: dict[tuple[str | None, str], int]
) -> list[InstanceRow]:
    """The purged instances a tombstone lists, as rows (malformed ones skipped).
    ``patient``: the study's files' if any are left, else the pseudonym in the
    vault, else none known ("")."""
    tomb = summary.get("tombstone")
    if not isinstance(tomb, dict) or not isinstance(tomb.get("instances"), list):
        return []
    patient_id, patient_name = patient
    out = []
    for item in tomb["instances"]:
        try:
            series, modality, sop, sop_class, syntax, size, received = item
            fields = (series, modality, sop, sop_class, syntax)
            if not all(isinstance(f, str) for f in fields) or not isinstance(size, int):
                raise TypeError("field types")
            out.append(
                InstanceRow(
                    patient_id=patient_id,
                    patient_name=patient_name,
                    study_uid=study,
                    series_uid=series,
                    sop_uid=sop,
                    sop_class_uid=sop_class,
                    modality=modality,
                    transfer_syntax=syntax,
                    size=size,
                    vault_offset=offsets.get((study, sop)),
                    received_at=float(received),
                )
            )
        except (TypeError, ValueError):
            log.error("reindex: study %s: skipping a malformed tombstone entry", study)
    return out
