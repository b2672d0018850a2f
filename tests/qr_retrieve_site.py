"""Shared by test_qr_get.py and test_qr_move.py: a real proxy holding stored
studies, DCMTK getscu/movescu runs, a pynetdicom SCU that reports every
response's status and counts, and the dataset bytes of a file after its meta."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt

import dicomgen
import tools
from helpers import catalog_counts, wait_indexed
from ith_proxy.dicom.scu_wire import read_meta
from ith_proxy.store.catalog import Catalog

PATIENT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
PATIENT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its file meta group."""
    with path.open("rb") as fh:
        meta = read_meta(fh)
        fh.seek(meta.offset)
        return fh.read()


@dataclass(frozen=True)
class Stored:
    """One stored study: its UIDs as the proxy stores them, and its files."""

    study: str
    patient_id: str
    series: str
    files: dict[str, Path]  # SOP Instance UID -> studies/ file


def store_study(
    proxy: tools.ProxyProcess, src_files: Sequence[Path], extra: Sequence[str] = ()
) -> Stored:
    """storescu the files, wait until they are indexed, and return the study
    they made (as the proxy stores it)."""
    before = set(_studies(proxy))
    held = catalog_counts(proxy.spool)["instances"]
    result = tools.storescu(proxy.dicom_port, src_files, extra=extra)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_indexed(proxy.spool, held + len(src_files))
    new = set(_studies(proxy)) - before
    assert len(new) == 1, new
    study = new.pop()
    cat = Catalog(proxy.spool / "catalog.sqlite3", readonly=True)
    try:
        patient = cat.conn.execute(
            "SELECT patient_id FROM studies WHERE study_uid = ?", (study,)
        ).fetchone()[0]
    finally:
        cat.close()
    files = {p.stem: p for p in (proxy.spool / "studies" / study).glob("*/*.dcm")}
    series = {p.parent.name for p in files.values()}
    assert len(series) == 1
    return Stored(study, patient, series.pop(), files)


def _studies(proxy: tools.ProxyProcess) -> list[str]:
    root = proxy.spool / "studies"
    return [p.name for p in root.iterdir() if p.is_dir()] if root.exists() else []


def small_study(tmp: Path, n: int, **kwargs: object) -> list[Path]:
    return list(dicomgen.make_small_series(tmp, n, rows=32, cols=32, **kwargs).files)


def getscu(
    port: int, out: Path, keys: Sequence[str], *, model: str = "-S", extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    args = [tools.require_tool("getscu"), "-v", model, "-aec", "DICOMRCV", "-od", str(out)]
    args += [*extra, *(a for k in keys for a in ("-k", k)), "127.0.0.1", str(port)]
    return tools.run_tool(args, timeout=300)


def movescu(
    port: int, dest: str, keys: Sequence[str], *, aet: str = "MOVER", model: str = "-S"
) -> subprocess.CompletedProcess[str]:
    args = [tools.require_tool("movescu"), "-v", model, "-aec", "DICOMRCV", "-aet", aet]
    args += ["-aem", dest, *(a for k in keys for a in ("-k", k)), "127.0.0.1", str(port)]
    return tools.run_tool(args, timeout=300)


def final_counts(output: str) -> dict[str, int]:
    """The 'Final status report' counts DCMTK's getscu/movescu print."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        for name in ("Remaining", "Completed", "Failed", "Warning"):
            if f"Number of {name} Suboperations" in line:
                counts[name.lower()] = int(line.rsplit(":", 1)[1])
    return counts


@dataclass
class Responses:
    """Every C-GET/C-MOVE response of one request, and what C-GET delivered."""

    statuses: list[int] = field(default_factory=list)
    counts: list[tuple[int | None, int, int, int]] = field(default_factory=list)
    failed_uids: list[str] = field(default_factory=list)
    received: list[Dataset] = field(default_factory=list)

    @property
    def final(self) -> int:
        return self.statuses[-1]


def retrieve(
    port: int,
    sop_class: str,
    identifier: dict[str, object],
    *,
    calling_ae: str = "PYSCU",
    move_to: str | None = None,
    storage_ts: Sequence[str] = (EXPLICIT, IMPLICIT),
    cancel_after: int | None = None,
) -> Responses:
    """One C-GET (``move_to`` None) or C-MOVE by pynetdicom, every response kept;
    a C-GET is cancelled (C-CANCEL) while its ``cancel_after``-th instance is
    being received, before that sub-operation is answered; a C-MOVE when its
    ``cancel_after``-th pending response arrives."""
    out = Responses()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(sop_class, [EXPLICIT, IMPLICIT])
    roles = []
    if move_to is None:
        ae.add_requested_context(CT, list(storage_ts))
        roles.append(build_role(CT, scp_role=True))

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        out.received.append(ds)
        if len(out.received) == cancel_after:
            cx = next(c for c in event.assoc.accepted_contexts if c.abstract_syntax == sop_class)
            event.assoc.send_c_cancel(1, cx.context_id)
        return 0x0000

    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="DICOMRCV",
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    ds = Dataset()
    for key, value in identifier.items():
        setattr(ds, key, value)
    try:
        if move_to is None:
            replies = assoc.send_c_get(ds, sop_class)
        else:
            replies = assoc.send_c_move(ds, move_to, sop_class)
        for status, ident in replies:
            assert status is not None and "Status" in status, "no response"
            out.statuses.append(int(status.Status))
            if move_to is not None and out.statuses.count(0xFF00) == cancel_after == len(
                out.statuses
            ):
                cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class)
                assoc.send_c_cancel(1, cx.context_id)
            out.counts.append(
                (
                    status.get("NumberOfRemainingSuboperations"),
                    int(status.get("NumberOfCompletedSuboperations", 0)),
                    int(status.get("NumberOfFailedSuboperations", 0)),
                    int(status.get("NumberOfWarningSuboperations", 0)),
                )
            )
            if ident is not None and "FailedSOPInstanceUIDList" in ident:
                value = ident.FailedSOPInstanceUIDList
                out.failed_uids = [value] if isinstance(value, str) else list(value)
    finally:
        assoc.release()
    return out


def received_files(folder: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, for what a getscu or storescp wrote."""
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.iterdir()}
