"""The indexer: incoming/ -> de-identify -> vault -> studies/ -> catalog.

For each raw file in ``incoming/``: parse the header, de-identify it, append
the original values to the vault, write the de-identified file under its new
UIDs (pixel bytes streamed unchanged), and record it in the catalog.  Only
when a whole batch is durable (vault fsynced, files fsynced, catalog
committed) are the raw files deleted: one syncfs per batch makes the
vault records and output files durable together.  A crash at any point leaves the raw
file in ``incoming/``; re-processing it produces the same names and the same
rows, so nothing is lost and nothing is duplicated.

Input that cannot be processed goes to ``quarantine/<reason>/``, always
encrypted under the vault key (it may hold PHI); so does input that is a
PHI risk for de-identification (burned-in annotation), and input that hit
an unexpected error (``failed``: one bad file never stops the others).  An
I/O error leaves the file where it is for the next pass.

A raw file may be plaintext or encrypted (``[spool] encrypt_incoming``); it
is told by its first line, so both kinds are handled whatever the setting.
Encrypted input is read through a seekable decrypting reader, one chunk at
a time.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from . import codestream, dicomfile, vault_stream
from .catalog import Catalog, InstanceRow
from .config import Config
from .deid import Deidentifier
from .deid.risk import phi_risk
from .spool import Spool
from .vault import Vault, VaultRecordError
from .vault_stream import EncryptedFileError

log = logging.getLogger("ith_proxy.indexer")

_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class Inconsistent(ValueError):
    """Parsed, but the dataset contradicts itself or lacks what we need."""


class PhiRisk(ValueError):
    """De-identifying the header would not remove all PHI (e.g. text in the pixels)."""


# Error texts in quarantine .json files and logs are fixed phrases naming
# attributes, never DICOM values.
_REASONS = ((dicomfile.DicomFileError, "unparseable"), (Inconsistent, "inconsistent"),
            (PhiRisk, "phi-risk"), (EncryptedFileError, "undecryptable"))


def _internal_error(exc: Exception) -> str:
    """A PHI-free description of an unexpected error: its type and where it
    happened.  The message is left out (it may quote a value); the frames
    (code only) go to the log."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    log.error("unexpected %s while processing an incoming file; traceback without "
              "the message:\n%s", type(exc).__name__, "".join(traceback.format_list(frames)))
    return f"internal error: {type(exc).__name__}{where}"


def _check(split: dicomfile.SplitFile) -> None:
    ds = split.header
    for kw in _REQUIRED:
        value = str(ds.get(kw, "") or "").strip()
        if not value or len(value) > 64 or not all(p.isdigit() for p in value.split(".")):
            raise Inconsistent(f"missing or invalid {kw}")
    meta = ds.file_meta
    if str(meta.get("MediaStorageSOPInstanceUID", ds.SOPInstanceUID)) != str(ds.SOPInstanceUID):
        raise Inconsistent("file meta SOP Instance UID does not match the dataset")
    if str(meta.get("MediaStorageSOPClassUID", ds.SOPClassUID)) != str(ds.SOPClassUID):
        raise Inconsistent("file meta SOP Class UID does not match the dataset")
    if split.pixel_start >= split.size and "PixelData" not in ds:
        raise Inconsistent("no pixel data")


class Indexer:
    def __init__(self, cfg: Config, spool: Spool, catalog: Catalog, vault: Vault,
                 secret: bytes, clock=time.time) -> None:
        self.cfg = cfg
        self.spool = spool
        self.catalog = catalog
        self.vault = vault
        self.deid = Deidentifier(secret, cfg.deid.options(), cfg.deid.safe_private)
        self.anonymize = cfg.deid.anonymize
        self.clock = clock
        self.wake = threading.Event()
        self.processed = 0
        self.quarantined = 0
        self._inflight: set[str] = set()  # names in a batch not yet committed
        self._lock = threading.Lock()
        # One APSW connection, used by the processing thread (vault-record
        # lookups) and the commit thread: APSW refuses concurrent use
        # (ThreadingViolationError, which failed whole batches and duplicated
        # their vault records on the retry).
        self._db_lock = threading.Lock()

    # --- one pass ---

    def run_once(self) -> int:
        """Process and commit up to one batch of incoming files; return how many."""
        batch = self._process_batch()
        if batch is None:
            return 0
        self._commit(batch)
        return batch.handled

    def _process_batch(self) -> "_Batch | None":
        """Stage 1: parse, de-identify, write outputs and vault records (not yet durable)."""
        with self._lock:
            names = [n for n in self.spool.incoming_names() if n not in self._inflight]
            names = names[: self.cfg.indexer.batch_size]
            self._inflight.update(names)
        if not names:
            return None
        try:
            return self._process_names(names)
        except BaseException:
            with self._lock:
                self._inflight.difference_update(names)
            raise

    def _process_names(self, names: list[str]) -> "_Batch":
        batch = _Batch(names=names)
        for name in names:
            try:
                row = self._process(name)
            except (dicomfile.DicomFileError, Inconsistent, PhiRisk, EncryptedFileError) as exc:
                reason = next(r for cls, r in _REASONS if isinstance(exc, cls))
                batch.handled += self._quarantine(name, reason, str(exc))
                continue
            except FileNotFoundError:
                continue  # already handled by an earlier pass
            except OSError as exc:
                log.error("I/O error on incoming file %s: %s; will retry", name, exc.strerror)
                break
            except Exception as exc:  # a bug, not bad input: isolate this file, keep ingesting
                batch.handled += self._quarantine(name, "failed", _internal_error(exc))
                continue
            batch.rows.append(row)
            batch.done.append(name)
        batch.handled += len(batch.done)
        return batch

    def _commit(self, batch: "_Batch") -> None:
        """Stage 2: make the batch durable, record it, then drop the raw files."""
        try:
            if batch.rows:
                self.spool.sync_all()  # output files, their directories and the vault
                with self._db_lock:
                    new = self.catalog.record_instances(batch.rows)
                log.debug("indexed %d instance(s) (%d new)", len(batch.rows), new)
            self.spool.remove_incoming(batch.done)
            self.processed += len(batch.done)
        finally:
            with self._lock:  # on failure the raw files stay and are retried
                self._inflight.difference_update(batch.names)

    def _quarantine(self, name: str, reason: str, why: str) -> int:
        """Quarantine encrypted: plaintext input is sealed on the way, encrypted
        input moves as it is.  The .json gets the plaintext's size and sha256."""
        path = self.spool.incoming_path(name)
        keyring = self.vault.keyring
        try:
            if vault_stream.is_encrypted(path):
                try:
                    info = vault_stream.digest(path, keyring)
                except EncryptedFileError:
                    info = {"size": None, "sha256": None}
                self.spool.quarantine(name, reason, {"error": why, "encrypted": True, **info})
            else:
                self.spool.quarantine(name, reason, {"error": why, "encrypted": True},
                                      seal=lambda src, out: vault_stream.seal(src, out, keyring))
        except FileNotFoundError:
            return 0
        self.quarantined += 1
        log.warning("quarantined incoming file %s (%s): %s", name, reason, why)
        return 1

    def _process(self, name: str) -> InstanceRow:
        path = self.spool.incoming_path(name)
        received = path.stat().st_mtime
        with vault_stream.open_source(path, self.vault.keyring) as src:
            return self._process_open(path, src, received)

    def _process_open(self, path: Path, src, received: float) -> InstanceRow:
        split = dicomfile.read_split(src, path)
        _check(split)
        ds = split.header
        if self.anonymize:  # burned-in (deid/risk.py) and text in the JPEG codestream
            risk = phi_risk(ds, codestream.scan(src, split),
                            burned_in=self.cfg.deid.quarantine_burned_in)
            if risk:
                raise PhiRisk(risk)
        if self.anonymize:
            result = self.deid.apply(ds)
            if split.trailer is not None:
                self.deid.apply_fragment(split.trailer, result)
            study, series, sop = result.study_uid, result.series_uid, result.sop_uid
            patient_id, patient_name = result.patient_id, result.patient_name
            offset = self._vault_put(sop, {
                "v": 1, "study": study, "series": series, "sop": sop,
                "patient": patient_id, "phi": result.phi})
        else:
            study, series, sop = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                  str(ds.SOPInstanceUID))
            patient_id = str(ds.get("PatientID", "") or "")
            patient_name = str(ds.get("PatientName", "") or "")
            offset = None
        if self.anonymize:
            self.spool.put_instance(study, series, sop,
                                    lambda out: dicomfile.write_joined(out, split, src),
                                    sync=False)
        else:  # stored exactly as received (decrypted)
            self.spool.put_instance(study, series, sop, lambda out: dicomfile.copy_raw(out, src),
                                    sync=False)
        return InstanceRow(
            patient_id=patient_id, patient_name=patient_name, study_uid=study,
            series_uid=series, sop_uid=sop, sop_class_uid=str(ds.SOPClassUID),
            modality=str(ds.get("Modality", "") or ""), transfer_syntax=split.transfer_syntax,
            size=self.spool.instance_path(study, series, sop).stat().st_size,
            vault_offset=offset, received_at=received)

    def _vault_put(self, sop: str, record: dict) -> int:
        """Append the record unless the same originals are already in the vault."""
        with self._db_lock:
            existing = self.catalog.instance_vault_offset(sop)
        if existing is not None:
            try:
                if self.vault.get(existing) == record:
                    return existing
            except VaultRecordError:
                pass
        return self.vault.put(record)

    # --- the thread loop: watchdog is a hint, the periodic rescan is the truth ---

    def run(self, stop: threading.Event) -> None:
        """Pipelined loop: batch N+1 is processed while batch N is synced and committed
        in a second thread (the sync is I/O wait, ~30% of the per-instance time)."""
        observer = Observer()
        observer.schedule(_Wake(self.wake), str(self.spool.incoming), recursive=False)
        observer.daemon = True
        observer.start()
        pending: Future | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="indexer-commit") as pool:
            try:
                while not stop.is_set():
                    try:
                        batch = self._process_batch()
                    except Exception:
                        log.exception("indexer pass failed; retrying")
                        batch = None
                        stop.wait(1.0)
                    if pending is not None:
                        try:
                            pending.result()
                        except Exception:
                            log.exception("indexer commit failed; the batch will be retried")
                        pending = None
                    if batch is not None:
                        pending = pool.submit(self._commit, batch)
                    else:
                        self._idle(stop)
                if pending is not None:
                    pending.result()
            finally:
                observer.stop()

    def _idle(self, stop: threading.Event) -> None:
        """Sleep until watchdog wakes us, the rescan interval passes, or stop."""
        deadline = time.monotonic() + self.cfg.indexer.rescan_interval
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.wake.wait(min(0.5, remaining)):
                break
        self.wake.clear()


@dataclass
class _Batch:
    rows: list[InstanceRow] = field(default_factory=list)
    done: list[str] = field(default_factory=list)   # processed, raw file to remove
    names: list[str] = field(default_factory=list)  # everything the batch claimed
    handled: int = 0                                 # processed + quarantined


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("created", "moved", "closed"):
            self.event.set()


def reindex(spool: Spool, catalog: Catalog, vault: Vault | None) -> dict:
    """Rebuild the catalog from studies/ plus the vault; return the new counts."""
    offsets: dict[str, int] = {}
    if vault is not None:
        for offset, record in vault.scan():
            if isinstance(record, dict) and "sop" in record:
                offsets[record["sop"]] = offset  # a later record supersedes
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
        rows.append(InstanceRow(
            patient_id=str(ds.get("PatientID", "") or ""),
            patient_name=str(ds.get("PatientName", "") or ""),
            study_uid=study, series_uid=series, sop_uid=sop,
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            modality=str(ds.get("Modality", "") or ""), transfer_syntax=split.transfer_syntax,
            size=split.size, vault_offset=offsets.get(sop), received_at=path.stat().st_mtime))
    catalog.record_instances(rows)
    for study in catalog.study_uids():
        summary = spool.read_study_json(study)
        if summary:
            catalog.restore_study_timeline(
                study, summary.get("state", "receiving"), summary["first_received"],
                summary["last_received"], summary.get("completed_at"),
                int(summary.get("reopened", 0)),
                [(e["ts"], e["event"]) for e in summary.get("events", [])])
    return catalog.counts()
