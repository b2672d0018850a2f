"""Shared checks for the end-to-end tests: catalog, vault and spool inspection."""

from __future__ import annotations

import io
import json
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pydicom

from ith_proxy.deid.engine import Deidentifier
from ith_proxy.dicom import files as dicomfile
from ith_proxy.store.catalog import Catalog, InstanceRow
from ith_proxy.vault.records import Vault


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def study_summary(spool: Path, study_uid: str) -> dict:
    """studies/<uid>/study.json, or {} before the scheduler has first written it."""
    try:
        return json.loads((spool / "studies" / study_uid / "study.json").read_text())
    except FileNotFoundError:
        return {}


def catalog_counts(spool: Path) -> dict:
    path = spool / "catalog.sqlite3"
    if not path.exists():
        return {"instances": 0, "studies": 0, "studies_by_state": {}}
    cat = Catalog(path, readonly=True)
    try:
        return cat.counts()
    finally:
        cat.close()


def catalog_study(spool: Path, study_uid: str) -> dict | None:
    cat = Catalog(spool / "catalog.sqlite3", readonly=True)
    try:
        return cat.study(study_uid)
    finally:
        cat.close()


def wait_indexed(spool: Path, instances: int, timeout: float = 120) -> dict:
    """Until the catalog holds ``instances`` rows and incoming/ is empty."""

    def done() -> dict | None:
        counts = catalog_counts(spool)
        if counts["instances"] >= instances and not any((spool / "incoming").iterdir()):
            return counts
        return None

    return wait_until(done, timeout, f"{instances} indexed instances")  # type: ignore[return-value]  # done()'s counts


def stored_files(spool: Path) -> list[Path]:
    return sorted((spool / "studies").glob("*/*/*.dcm"))


def vault_records(workdir: Path) -> list[dict]:
    vault = Vault(workdir / "spool" / "vault.phi", workdir / "secrets" / "vault.key")
    return [rec for _, rec in vault.scan() if isinstance(rec, dict)]


def original_to_anonymized_sop(workdir: Path) -> dict[str, str]:
    """From the vault: original SOP Instance UID -> anonymized one."""
    out = {}
    for rec in vault_records(workdir):
        original = rec["phi"].get("instance", {}).get("SOPInstanceUID")
        if original:
            out[original] = rec["sop"]
    return out


def find_bytes(root: Path, needles: Iterable[str], skip: Iterable[Path] = ()) -> list[str]:
    """Every (file, needle) where a needle's bytes appear in a file under root."""
    skip = {p.resolve() for p in skip}
    encoded = [(n, n.encode()) for n in needles if n]
    hits = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.resolve() in skip:
            continue
        data = path.read_bytes()
        hits.extend(f"{path.relative_to(root)}: {n}" for n, b in encoded if b in data)
    return hits


def read_header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def encrypt_v1(keyring, data: bytes, chunk: int = 1 << 20) -> bytes:
    """A raw input file in the legacy v1 format (``vault.stream`` reads it but
    writes v2 only): a magic line, then per chunk one Fernet token holding an
    8-byte index, a last-chunk flag and the chunk."""
    import struct

    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    lines = [f"ITH-PROXY-ENCRYPTED v1 chunk={chunk}\n".encode()]
    for i, piece in enumerate(pieces):
        token = keyring.encrypt(struct.pack(">QB", i, i == len(pieces) - 1) + piece)
        lines.append(token + b"\n")
    return b"".join(lines)


def deidentify_file(
    path: Path, secret: bytes, options: frozenset[str] = frozenset()
) -> tuple[bytes, dict]:
    """What the indexer does with one file: its output bytes and vault record."""
    deid = Deidentifier(secret, options)
    with open(path, "rb") as src:
        split = dicomfile.read_split(src, path)
        result = deid.apply(split.header)
        if split.trailer is not None:
            deid.apply_fragment(split.trailer, result)
        out = io.BytesIO()
        dicomfile.write_joined(out, split, src)
    return out.getvalue(), {"phi": result.phi}


def bulk_rows(
    patient: str, study: str, series: str, sop_root: str, count: int
) -> list[InstanceRow]:
    """``count`` catalog rows of one CT series with no files behind them (Q/R
    answers without ingest): patient ``patient`` (named ``ANON^<patient>``),
    SOP Instance UIDs ``<sop_root>.<n>``."""
    return [
        InstanceRow(
            patient_id=patient,
            patient_name=f"ANON^{patient}",
            study_uid=study,
            series_uid=series,
            sop_uid=f"{sop_root}.{n}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            modality="CT",
            transfer_syntax="1.2.840.10008.1.2.1",
            size=1,
            vault_offset=None,
            received_at=1.0,
        )
        for n in range(count)
    ]


def associate_rq(
    abstract: str, transfer: str, calling: bytes, max_pdu: int = 16384, called: bytes = b"DICOMRCV"
) -> bytes:
    """An A-ASSOCIATE-RQ PDU with one presentation context (ID 1), for raw-socket peers."""

    def item(kind: int, data: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(data)) + data

    context = bytes([1, 0, 0, 0]) + item(0x30, abstract.encode()) + item(0x40, transfer.encode())
    user = item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.10.9998")
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)
        + calling.ljust(16)
        + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1")
        + item(0x20, context)
        + item(0x50, user)
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def same_sop_other_study(src: Path, out: Path) -> bytes:
    """``src`` with its SOP Instance UID kept and a new study and series (a
    reused UID), written to ``out``; its bytes."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(out)
    return out.read_bytes()
