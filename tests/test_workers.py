"""Workers driven through run_once() on real spool folders, plus catalog migrations
and extra transfer syntaxes end to end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless

import dicomgen
import tools
from helpers import stored_files, wait_indexed
from ith_proxy import config
from ith_proxy.dicom.libsetup import configure_libraries
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool
from ith_proxy.vault.keyfiles import init_secrets, load_site_secret
from ith_proxy.vault.records import Vault
from ith_proxy.workers.indexer import Indexer
from ith_proxy.workers.scheduler import Scheduler


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rooms(tmp_path: Path):
    configure_libraries()  # as the indexer process does
    cfg = config.load(
        env={"DICOM_STORAGE_DIR": str(tmp_path / "spool"), "DICOM_STUDY_TIMEOUT": "30"},
        cwd=tmp_path,
    )
    spool = Spool(cfg.spool.dir)
    spool.ensure()
    init_secrets(cfg.vault.key_file)
    catalog = Catalog(cfg.spool.dir / "catalog.sqlite3")
    vault = Vault(cfg.spool.dir / "vault.phi", cfg.vault.key_file)
    indexer = Indexer(cfg, spool, catalog, vault, load_site_secret(cfg.vault.secret_file))
    yield cfg, spool, catalog, indexer
    vault.close()
    catalog.close()


def _drop(spool: Spool, files: list[Path], mtime: float) -> None:
    for f in files:
        name = spool.deliver_incoming(f.read_bytes())
        os.utime(spool.incoming_path(name), (mtime, mtime))


def test_scheduler_completes_only_after_the_quiet_timeout(rooms, tmp_path: Path) -> None:
    cfg, spool, catalog, indexer = rooms
    series = dicomgen.make_ct_series(tmp_path / "in", 3, rows=32, cols=32)
    t0 = time.time() - 1000
    _drop(spool, series.files, t0)
    assert indexer.run_once() == 3
    clock = Clock(t0 + 29.9)
    scheduler = Scheduler(cfg, spool, catalog, clock=clock)
    result = scheduler.run_once()
    assert result["completed"] == [] and result["summaries"] == 1
    study = catalog.study_uids()[0]
    assert json.loads((spool.study_dir(study) / "study.json").read_text())["state"] == "receiving"
    clock.now = t0 + 30.0
    assert scheduler.run_once()["completed"] == [study]
    summary = json.loads((spool.study_dir(study) / "study.json").read_text())
    assert summary["state"] == "complete" and summary["completed_at"] == t0 + 30.0
    assert scheduler.run_once() == {"completed": [], "summaries": 0, "tmp_cleaned": 0, "purged": []}


def test_scheduler_removes_stale_tmp_files_only(rooms) -> None:
    cfg, spool, catalog, _ = rooms
    stale, fresh = spool.tmp / "stale", spool.tmp / "fresh"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    now = time.time()
    os.utime(stale, (now - cfg.spool.tmp_max_age - 5,) * 2)
    result = Scheduler(cfg, spool, catalog, clock=lambda: now).run_once()
    assert result["tmp_cleaned"] == 1
    assert not stale.exists() and fresh.exists()


def test_indexer_is_idempotent_when_the_raw_file_comes_back(rooms, tmp_path: Path) -> None:
    """A crash after the output was written but before the raw file was removed."""
    cfg, spool, catalog, indexer = rooms
    series = dicomgen.make_ct_series(tmp_path / "in", 2, rows=32, cols=32)
    _drop(spool, series.files, time.time())
    indexer.run_once()
    before = {p: p.read_bytes() for p in spool.studies.rglob("*.dcm")}
    vault_size = (cfg.spool.dir / "vault.phi").stat().st_size
    _drop(spool, series.files, time.time())  # the same raw files again
    assert indexer.run_once() == 2
    after = {p: p.read_bytes() for p in spool.studies.rglob("*.dcm")}
    assert after == before
    assert catalog.counts()["instances"] == 2
    assert (cfg.spool.dir / "vault.phi").stat().st_size == vault_size  # records reused


def test_catalog_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    Catalog(path).close()
    cat = Catalog(path)
    assert cat.schema_version() >= 1
    cat.conn.execute("PRAGMA user_version = 999")
    cat.close()
    with pytest.raises(RuntimeError, match="newer than this code"):
        Catalog(path)


def test_catalog_uses_wal(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite3")
    try:
        assert cat.conn.execute("PRAGMA journal_mode").get == "wal"
        assert cat.conn.execute("PRAGMA foreign_keys").get == 1
    finally:
        cat.close()


def test_extra_transfer_syntax_is_stored_as_received(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(
        tmp_path / "in", 3, rows=64, cols=64, transfer_syntax=RLELossless
    )
    ini = "[scp]\ntransfer_syntaxes = rle\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        result = tools.storescu(proxy.dicom_port, series.files, extra=["-xr"])
        assert result.returncode == 0, result.stderr[-1500:]
        wait_indexed(proxy.spool, 3)
        originals = {
            str(pydicom.dcmread(f).InstanceNumber): pydicom.dcmread(f) for f in series.files
        }
        for out in stored_files(proxy.spool):
            ds = pydicom.dcmread(out)
            assert ds.file_meta.TransferSyntaxUID == RLELossless
            assert ds.PixelData == originals[str(ds.InstanceNumber)].PixelData


def test_rle_is_refused_unless_configured(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(
        tmp_path / "in", 1, rows=64, cols=64, transfer_syntax=RLELossless
    )
    with tools.ProxyProcess(tmp_path / "p") as proxy:
        # -xr: propose RLE first; DCMTK cannot decode RLE, so nothing else can be sent
        result = tools.storescu(proxy.dicom_port, series.files, extra=["-xr"])
        assert result.returncode != 0
        assert tools.acked_files(result) == []
        assert stored_files(proxy.spool) == []


def test_auto_start_off_runs_without_the_dicom_listener(tmp_path: Path) -> None:
    with tools.ProxyProcess(tmp_path / "p", env={"DICOM_AUTO_START": "false"}) as proxy:
        assert proxy.health() == (200, {"status": "ok"})
        assert not tools.port_listening(proxy.dicom_port)
        series = dicomgen.make_ct_series(tmp_path / "in", 1, rows=32, cols=32)
        _drop(Spool(proxy.spool), series.files, time.time())  # the indexer still works
        wait_indexed(proxy.spool, 1)


def test_a_batch_file_that_cannot_be_written_leaves_the_files_claimable(
    rooms, tmp_path: Path, monkeypatch
) -> None:
    """A full disk when the indexer writes its in-flight batch file (ENOSPC):
    that pass fails, nothing of the batch file is left, and the next pass takes
    the same files (they stayed "in flight" for ever, never indexed until a
    restart: found by test_full_disk once the indexer ran during the burst)."""
    import errno

    from ith_proxy import fsio
    from ith_proxy.store import attempts

    _cfg, spool, catalog, indexer = rooms
    series = dicomgen.make_ct_series(tmp_path / "in", 2, rows=32, cols=32)
    _drop(spool, series.files, time.time())
    real = fsio.writev_all

    def full(fd: int, chunks: list) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(attempts, "writev_all", full)
    with pytest.raises(OSError):
        indexer.run_once()
    assert not [p for p in (spool.root / "attempts").iterdir() if p.name.startswith(".inflight-")]
    monkeypatch.setattr(attempts, "writev_all", real)  # the admin freed space
    assert indexer.run_once() == 2
    assert catalog.counts()["instances"] == 2
    assert not list(spool.incoming.iterdir())
