"""The indexer: incoming/ -> de-identify -> vault -> studies/ -> catalog.

For each raw file in ``incoming/``: parse the header, de-identify it, append
the original values to the vault, write the de-identified file under its new
UIDs (pixel bytes streamed unchanged), and record it in the catalog.  The
common input takes the fast lane (``index_flat.py``: the same steps on the
header's bytes, without pydicom's Dataset); anything it leaves, or any doubt,
takes the pydicom path from the start.  Only
when a whole batch is durable (vault fsynced, files fsynced, catalog
committed) are the raw files deleted: one syncfs per batch makes the
vault records and output files durable together.  A crash at any point leaves the raw
file in ``incoming/``; re-processing it produces the same names and the same
rows, so nothing is lost and nothing is duplicated.

Input that cannot be processed (``index_checks.py``: the checks, the
reasons, the move) goes to ``quarantine/<reason>/``, always
encrypted under the vault key (it may hold PHI); so does input that is a
PHI risk for de-identification (burned-in annotation), and input that hit
an unexpected error (``failed``: one bad file never stops the others).  An
I/O error leaves the file where it is for the next pass.

Poison pills: a file gets at most ``[indexer] max_attempts`` attempts
across indexer crashes, counted from in-progress markers (``Spool.begin_batch``,
``set_attempts``); the file a dead indexer was in is retried alone, taking
turns with normal batches (docs/architecture.md, "Poison pills").  Which
files a pass takes, and how ``[indexer] processes`` indexers share the
backlog, is ``index_claim.py``.

A raw file may be plaintext or encrypted (``[spool] encrypt_incoming``); it
is told by its first line, so both kinds are handled whatever the setting.
Encrypted input is read through a seekable decrypting reader, one chunk at
a time.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ith_proxy.config import Config
from ith_proxy.deid import Deidentifier
from ith_proxy.deid.engine import DeidResult
from ith_proxy.deid.flat import FlatWalk
from ith_proxy.deid.risk import phi_risk
from ith_proxy.dicom import codestream
from ith_proxy.dicom import files as dicomfile
from ith_proxy.store.catalog import Catalog, InstanceRow
from ith_proxy.store.spool import Spool
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.records import Vault, VaultRecordError
from ith_proxy.vault.stream import EncryptedFileError
from ith_proxy.workers import index_checks as checks
from ith_proxy.workers import index_flat
from ith_proxy.workers.index_checks import Inconsistent, PhiRisk
from ith_proxy.workers.index_claim import Claims
from ith_proxy.workers.index_watch import Doorbell

log = logging.getLogger("ith_proxy.indexer")
POLL_BUSY = 0.05  # s between looks while files wait that this indexer may not take yet


class Indexer:
    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        catalog: Catalog,
        vault: Vault,
        secret: bytes,
        slot: int = 0,
    ) -> None:
        self.cfg = cfg
        self.claims = Claims(cfg, spool, slot)  # which files it takes next (index_claim.py)
        self.spool = spool
        self.catalog = catalog
        self.vault = vault
        self.deid = Deidentifier(secret, cfg.deid.options(), cfg.deid.safe_private)
        self.anonymize = cfg.deid.anonymize
        self.wake = threading.Event()
        self.processed = 0
        self.quarantined = 0
        self._pending: dict[str, tuple[str, str]] = {}  # sop -> (study, series), uncommitted
        self._lock = threading.Lock()
        # Test-only failpoint (tests/test_poison_pills.py): the indexer process
        # kills itself (SIGKILL) on a dataset whose ImageComments contain this
        # text.  Never set it in production.
        self._kill_marker = os.environ.get("ITH_PROXY_FAILPOINT_KILL", "")
        # the fast lane, for the de-identifying indexer (not with the test failpoint)
        flat_walk = FlatWalk(self.deid)
        self._flat = (
            flat_walk if cfg.deid.anonymize and flat_walk.ok and not self._kill_marker else None
        )
        # One APSW connection, used by the processing thread (vault-record
        # lookups) and the commit thread: APSW refuses concurrent use
        # (ThreadingViolationError, which failed whole batches and duplicated
        # their vault records on the retry).
        self._db_lock = threading.Lock()
        self._bell: Doorbell | None = None  # while run() runs

    # --- one pass ---

    def run_once(self) -> int:
        """Process and commit up to one batch of incoming files; return how many."""
        batch = self._process_batch()
        if batch is None:
            return 0
        self._commit(batch)
        return batch.handled

    def _process_batch(self, claimed: tuple | None = None) -> _Batch | None:
        """Stage 1: parse, de-identify, write outputs and vault records (not yet durable)."""
        names, prev, marker = claimed if claimed is not None else self.claims.claim()
        if not names:
            return None
        try:
            return self._process_names(names, prev, marker)
        except BaseException:
            self.spool.end_batch(marker)
            self.claims.end(names)
            raise

    def _process_names(self, names: list[str], prev: dict[str, int], marker) -> _Batch:
        batch = _Batch(names=names, prev=prev, marker=marker)
        for index, name in enumerate(names):
            if index:
                self.spool.batch_at(marker, index)
            try:
                row = self._attempt(name, prev.get(name, 0), batch)
            except FileNotFoundError:
                continue  # already handled by an earlier pass
            except OSError as exc:
                log.error("I/O error on incoming file %s: %s; will retry", name, exc.strerror)
                break
            if row is not None:
                with self._lock:
                    self._pending[row.sop_uid] = (row.study_uid, row.series_uid)
                batch.rows.append(row)
                batch.done.append(name)
        self.spool.batch_at(marker, len(names))  # committing
        batch.handled += len(batch.done)
        return batch

    def _attempt(self, name: str, before: int, batch: _Batch) -> InstanceRow | None:
        """One attempt at one file: its row, or None when it was quarantined."""
        if before >= self.cfg.indexer.max_attempts:
            batch.handled += self._quarantine(
                name,
                "failed",
                f"gave up after {before} attempts (the indexer stopped while processing it)",
                before,
            )
            return None
        try:
            return self._process(name)
        except (dicomfile.DicomFileError, Inconsistent, PhiRisk, EncryptedFileError) as exc:
            reason = next(r for cls, r in checks.REASONS if isinstance(exc, cls))
            batch.handled += self._quarantine(name, reason, str(exc), before + 1)
        except OSError:
            raise
        except Exception as exc:  # a bug or MemoryError, not bad input: isolate this file
            batch.handled += self._quarantine(
                name, "failed", checks.internal_error(exc), before + 1
            )
        return None

    def _commit(self, batch: _Batch) -> None:
        """Stage 2: make the batch durable, record it, then drop the raw files."""
        try:
            if batch.rows:
                self.spool.sync_all()  # output files, their directories and the vault
                with self._db_lock:
                    new = self.catalog.record_instances(batch.rows)
                log.debug("indexed %d instance(s) (%d new)", len(batch.rows), new)
            self.spool.remove_incoming(batch.done)
            for name in batch.prev:
                self.spool.set_attempts(name, 0)
            self.processed += len(batch.done)
        finally:  # on failure the raw files stay and are retried, uncharged
            if batch.marker is not None:
                self.spool.end_batch(batch.marker)
            with self._lock:
                for row in batch.rows:
                    self._pending.pop(row.sop_uid, None)
            self.claims.end(batch.names)  # its buckets too, once the catalog has the rows

    def _quarantine(self, name: str, reason: str, why: str, attempts: int = 0) -> int:
        moved = checks.quarantine(self.spool, self.vault.keyring, name, reason, why, attempts)
        self.quarantined += moved
        return moved

    def _process(self, name: str) -> InstanceRow:
        path = self.spool.incoming_path(name)
        received = path.stat().st_mtime
        with vault_stream.open_source(path, self.vault.keyring) as src:
            return self._process_open(path, src, received)

    def _process_open(self, path: Path, src, received: float) -> InstanceRow:
        if self._flat is not None:  # the fast lane (index_flat.py); None: pydicom's path
            try:
                prepared = index_flat.prepare(src, self._flat, self.cfg.deid.quarantine_burned_in)
            except Exception as exc:  # a bug in the lane: the pydicom path decides
                why = checks.internal_error(exc)
                log.warning("fast lane failed (%s); reading the file again", why)
                prepared = None
            if prepared is not None:
                return self._file(
                    prepared.result,
                    lambda out: prepared.write(out, src),
                    prepared.sop_class,
                    prepared.modality,
                    prepared.header.transfer_syntax,
                    prepared.main,
                    received,
                )
        split = dicomfile.read_split(src, path)
        checks.check(split)
        ds = split.header
        if self._kill_marker and self._kill_marker in str(ds.get("ImageComments", "") or ""):
            os.kill(os.getpid(), signal.SIGKILL)  # test-only failpoint, see __init__
        if not self.anonymize:  # stored exactly as received (decrypted)
            return self._file(
                None,
                lambda out: dicomfile.copy_raw(out, src),
                str(ds.SOPClassUID),
                str(ds.get("Modality", "") or ""),
                split.transfer_syntax,
                dicomfile.main_attributes(ds),
                received,
                (
                    str(ds.StudyInstanceUID),
                    str(ds.SeriesInstanceUID),
                    str(ds.SOPInstanceUID),
                    str(ds.get("PatientID", "") or ""),
                    str(ds.get("PatientName", "") or ""),
                ),
            )
        # burned-in (deid/risk.py) and text in the JPEG codestream
        risk = phi_risk(
            ds, codestream.scan(src, split), burned_in=self.cfg.deid.quarantine_burned_in
        )
        if risk:
            raise PhiRisk(risk)
        result = self.deid.apply(ds)
        if split.trailer is not None:
            self.deid.apply_fragment(split.trailer, result)
        return self._file(
            result,
            lambda out: dicomfile.write_joined(out, split, src),
            str(ds.SOPClassUID),
            str(ds.get("Modality", "") or ""),
            split.transfer_syntax,
            dicomfile.main_attributes(ds),  # the de-identified header's (Q/R)
            received,
        )

    def _file(
        self,
        result: DeidResult | None,
        write: Callable[[BinaryIO], None],
        sop_class: str,
        modality: str,
        transfer_syntax: str,
        main: dict[str, dict[str, str]],
        received: float,
        kept: tuple[str, str, str, str, str] | None = None,
    ) -> InstanceRow:
        """Vault the originals (``result``; None: ``kept`` as received, no
        de-identification), write the output, and make its catalog row."""
        if result is not None:
            study, series, sop = result.study_uid, result.series_uid, result.sop_uid
            patient_id, patient_name = result.patient_id, result.patient_name
            known = self._known(study, series, sop)
            offset: int | None = self._vault_put(
                known,
                {
                    "v": 1,
                    "study": study,
                    "series": series,
                    "sop": sop,
                    "patient": patient_id,
                    "phi": result.phi,
                },
            )
        else:
            assert kept is not None
            study, series, sop, patient_id, patient_name = kept
            self._known(study, series, sop)
            offset = None
        stored = self.spool.put_instance(study, series, sop, write, sync=False)
        return InstanceRow(
            patient_id=patient_id,
            patient_name=patient_name,
            study_uid=study,
            series_uid=series,
            sop_uid=sop,
            sop_class_uid=sop_class,
            modality=modality,
            transfer_syntax=transfer_syntax,
            size=os.stat(stored).st_size,
            vault_offset=offset,
            received_at=received,
            main=main,
        )

    def _known(self, study: str, series: str, sop: str) -> int | None:
        """The vault offset recorded for this instance (None if new or none).

        The same SOP Instance UID already recorded (or about to be) under
        another study or series is refused: filing it would repoint the other
        instance's row and vault record.  The same instance re-sent to the
        same place is idempotent."""
        with self._db_lock:
            known = self.catalog.instance_place(sop)
        with self._lock:
            pending = self._pending.get(sop)
        place = (known[0], known[1]) if known is not None else pending
        if place is not None and place != (study, series):
            raise Inconsistent("SOP Instance UID already recorded in another study or series")
        return known[2] if known is not None else None

    def _vault_put(self, existing: int | None, record: dict) -> int:
        """Append the record unless the same originals are already in the vault
        (a record is reused only if it is this very instance's)."""
        if existing is not None:
            try:  # the vault refuses a record that is another instance's
                if self.vault.get(existing, record["study"], record["sop"]) == record:
                    return existing
            except VaultRecordError as exc:
                log.error("%s; not reused", exc)
        return self.vault.put(record)

    # --- the thread loop: the doorbell is a hint, the periodic rescan is the truth ---

    def run(self, stop: threading.Event) -> None:
        """Pipelined loop: batch N+1 is processed while batch N is synced and committed
        in a second thread (the sync is I/O wait, ~30% of the per-instance time)."""
        bell = self._bell = Doorbell(str(self.spool.incoming), self.wake)  # index_watch.py
        bell.start()
        pending: Future | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="indexer-commit") as pool:
            try:
                while not stop.is_set():
                    try:
                        claimed = self.claims.claim()
                        if claimed[1] and pending is not None:  # a suspect runs alone
                            _finish(pending)
                            pending = None
                        batch = self._process_batch(claimed)
                    except Exception:
                        log.exception("indexer pass failed; retrying")
                        batch = None
                        stop.wait(1.0)
                    if pending is not None:
                        _finish(pending)
                        pending = None
                    if batch is not None and batch.solo:
                        _finish(pool.submit(self._commit, batch))
                    elif batch is not None:
                        pending = pool.submit(self._commit, batch)
                    elif self._done_helping():
                        break
                    else:
                        self._idle(stop)
                if pending is not None:
                    pending.result()
            finally:
                bell.stop()
                self._bell = None
                self.claims.close()

    def _done_helping(self) -> bool:
        """A helper (slot 1..N-1) that has seen no backlog for ``[indexer]
        helper_idle`` seconds ends its loop, and so its process: the service
        starts it again when a backlog comes back."""
        claims = self.claims
        idle = time.monotonic() - claims.backlog_at
        if not claims.slot or idle < self.cfg.indexer.helper_idle:
            return False
        log.info("indexer %d stops: no backlog for %.0f s", claims.slot, idle)
        return True

    def _idle(self, stop: threading.Event) -> None:
        """Sleep until the doorbell wakes us, the rescan interval passes, or
        stop; only POLL_BUSY while files wait that this indexer did not take
        (another holds their bucket, or a helper waits for a backlog)."""
        wait = POLL_BUSY if self.claims.poll else self.cfg.indexer.rescan_interval
        if self._bell is not None and not self.claims.poll:  # each arrival would wake it
            self._bell.listen()
        deadline = time.monotonic() + wait
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.wake.wait(min(0.5, remaining)):
                break
        self.wake.clear()


def _finish(pending: Future) -> None:
    """Wait for a commit; a failed one leaves its files for the next pass."""
    try:
        pending.result()
    except Exception:
        log.exception("indexer commit failed; the batch will be retried")


@dataclass
class _Batch:
    rows: list[InstanceRow] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # processed, raw file to remove
    names: list[str] = field(default_factory=list)  # everything the batch claimed
    handled: int = 0  # processed + quarantined
    prev: dict[str, int] = field(default_factory=dict)  # a suspect's attempts so far
    marker: tuple | None = None  # the batch's in-flight file

    @property
    def solo(self) -> bool:  # a suspect: committed before anything else is processed
        return bool(self.prev)
