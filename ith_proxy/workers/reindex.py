"""``ith-proxy reindex``: rebuild the catalog from ``studies/`` and the vault.

Offline (the service is stopped and the CLI holds the spool lock).  The
de-identified files and their ``study.json`` are the truth; the catalog is
an index of them, so it can always be rebuilt.  Each instance gets back its
own vault record: the one whose study and SOP Instance UID match (a later
record for the same instance supersedes an earlier one).
"""

from __future__ import annotations

import logging

from ith_proxy.dicom import files as dicomfile
from ith_proxy.store.catalog import Catalog, InstanceRow
from ith_proxy.store.spool import Spool
from ith_proxy.vault.records import Vault

log = logging.getLogger("ith_proxy.indexer")


def reindex(spool: Spool, catalog: Catalog, vault: Vault | None) -> dict:
    """Rebuild the catalog from studies/ plus the vault; return the new counts."""
    # (study, sop) -> the instance's own record (a record without a study never matches)
    offsets: dict[tuple[str | None, str], int] = {}
    if vault is not None:
        for offset, record in vault.scan():
            if isinstance(record, dict) and "sop" in record:
                offsets[(record.get("study"), record["sop"])] = offset  # a later one supersedes
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
            )
        )
    catalog.record_instances(rows)
    for study in catalog.study_uids():
        summary = spool.read_study_json(study)
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
    return catalog.counts()
