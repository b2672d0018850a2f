"""The health policy (ith_proxy.health) on real spool folders: each problem
line the API's /api/health/ reports, word for word, from the state that
causes it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from ith_proxy import config
from ith_proxy.health import Liveness, problems
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool

ALIVE = Liveness(dicom=True, indexer=True, scheduler=True)


def _site(tmp_path: Path, ini: str = "", min_free_mb: int = 0) -> tuple[config.Config, Spool]:
    """A configuration from INI text and a spool with a catalog, as after a first run."""
    (tmp_path / "proxy.ini").write_text(f"[spool]\nmin_free_mb = {min_free_mb}\n" + ini)
    cfg = config.load(
        env={
            "DICOM_STORAGE_DIR": str(tmp_path / "spool"),
            "VAULT_KEY_FILE": str(tmp_path / "secrets" / "vault.key"),
            "ITH_PROXY_CONFIG": str(tmp_path / "proxy.ini"),
        },
        cwd=tmp_path,
    )
    spool = Spool(cfg.spool.dir)
    spool.ensure()
    Catalog(spool.catalog_file).close()
    return cfg, spool


def test_a_running_site_has_no_problems(tmp_path: Path) -> None:
    cfg, spool = _site(tmp_path)
    assert problems(cfg, spool, ALIVE) == []


def test_workers_that_are_not_running(tmp_path: Path) -> None:
    cfg, spool = _site(tmp_path)
    assert problems(cfg, spool, Liveness(dicom=False, indexer=False, scheduler=False)) == [
        "dicom listener is not running",
        "indexer is not running",
        "scheduler is not running",
    ]
    cfg, spool = _site(tmp_path, "[scp]\nauto_start = false\n")
    assert problems(cfg, spool, Liveness(dicom=False, indexer=True, scheduler=True)) == []


def test_free_disk_below_the_minimum(tmp_path: Path) -> None:
    cfg, spool = _site(tmp_path, min_free_mb=10**9)  # 1 PB: more than any disk
    assert problems(cfg, spool, ALIVE) == ["free disk is below the minimum; C-STORE is refused"]


def test_files_waiting_in_incoming_longer_than_stuck_after(tmp_path: Path) -> None:
    cfg, spool = _site(tmp_path, "[indexer]\nstuck_after = 60\n")
    (spool.incoming / "new").write_bytes(b"x")
    assert problems(cfg, spool, ALIVE) == []  # just received: not stuck
    old = spool.incoming / "old"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 1000, time.time() - 1000))
    found = problems(cfg, spool, ALIVE)
    assert len(found) == 1 and re.fullmatch(
        r"indexer is behind or stuck: 2 file\(s\) in incoming/, the oldest for 100\d s "
        r"\(see error\.log\)",
        found[0],
    ), found


def test_a_catalog_that_cannot_be_read(tmp_path: Path) -> None:
    cfg, spool = _site(tmp_path)
    spool.catalog_file.write_bytes(b"not a database, " * 512)
    assert problems(cfg, spool, ALIVE) == ["catalog is not accessible"]
    spool.catalog_file.unlink()
    assert problems(cfg, spool, ALIVE) == ["catalog is not accessible"]


def test_a_spool_that_is_gone(tmp_path: Path) -> None:
    cfg, spool = _site(tmp_path)
    spool.root.rename(tmp_path / "moved")
    assert problems(cfg, spool, ALIVE) == ["spool is not accessible", "catalog is not accessible"]


def test_the_spool_names_its_files_as_the_layout_has_them(tmp_path: Path) -> None:
    """The spool layout is an external contract: these names never change."""
    spool = Spool(tmp_path)
    assert spool.catalog_file == tmp_path / "catalog.sqlite3"
    assert spool.vault_file == tmp_path / "vault.phi"
    assert spool.logs == tmp_path / "logs"
    assert spool.audit_file == tmp_path / "logs" / "audit.log"
