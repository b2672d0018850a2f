"""A really full disk: the spool on a small tmpfs that fills up mid-study.

The SCP must refuse (0xA700) what it cannot make durable and acknowledge only
what it did; the indexer must keep every acknowledged instance in incoming/
while it cannot write, without crashing or spinning; and once space is back,
every acknowledged instance must end up de-identified in studies/. The vault
and the audit log must never be left with a torn record.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

import dicomgen
import tools
from helpers import original_to_anonymized_sop, stored_files, wait_indexed, wait_until
from ith_proxy.store.audit import AuditLog, audit_key
from ith_proxy.vault.keyfiles import init_secrets
from ith_proxy.vault.records import Vault


def _mount_tmpfs(path: Path, size_mb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        msg = f"cannot mount a tmpfs for the full-disk test (needs root): {result.stderr.strip()}"
        if tools.in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def _resize(path: Path, size_mb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path):
    mounted: list[Path] = []

    def make(path: Path, size_mb: int) -> Path:
        _mount_tmpfs(path, size_mb)
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_loses_no_acknowledged_instance(tmp_path: Path, small_disk) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 24, rows=512, cols=512)  # ~12.6 MB
    workdir = tmp_path / "p"
    spool = small_disk(workdir / "spool", 6)
    ini = "[spool]\nmin_free_mb = 0\n[indexer]\nrescan_interval = 1\n"
    with tools.ProxyProcess(workdir, config_text=ini) as proxy:
        result = tools.storescu(proxy.dicom_port, series.files, extra=["-nh"])
        acked = tools.acked_files(result)
        refused = result.stderr.count("Refused: OutOfResources")
        assert 0 < len(acked) < len(series.files), result.stderr[-2000:]
        assert refused == len(series.files) - len(acked)  # every other one was refused
        assert proxy.running and proxy.health()[0] in (200, 503)
        # nothing unacknowledged is in incoming/. (The indexer works meanwhile: an
        # output it wrote before its commit hit the full disk stays in studies/
        # until the retry, so studies/ is counted only at the end, below.)
        assert len(list((spool / "incoming").iterdir())) <= len(acked)

        _resize(spool, 64)  # the admin frees space
        wait_indexed(spool, len(acked), timeout=60)
        wait_until(lambda: not list((spool / "incoming").iterdir()), 30, "incoming drained")
        assert not list((spool / "quarantine").rglob("*"))
        original_to_anon = original_to_anonymized_sop(workdir)
        stored = {
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in stored_files(spool)
        }
        for path in acked:
            original = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert original_to_anon[original] in stored
        assert len(stored) == len(acked)
        vault = Vault(spool / "vault.phi", workdir / "secrets" / "vault.key")
        assert all(isinstance(rec, dict) for _, rec in vault.scan())  # no torn record

        # the rest of the study goes through now
        rest = [f for f in series.files if f not in set(acked)]
        again = tools.storescu(proxy.dicom_port, rest)
        assert again.returncode == 0 and len(tools.acked_files(again)) == len(rest)
        wait_indexed(spool, len(series.files), timeout=60)
        assert proxy.health()[0] == 200


def test_health_reports_an_indexer_that_cannot_write(tmp_path: Path) -> None:
    series = dicomgen.make_ct_series(tmp_path / "in", 2, rows=64, cols=64)
    ini = "[indexer]\nrescan_interval = 1\nstuck_after = 2\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        studies = proxy.spool / "studies"
        aside = proxy.spool / "studies.aside"
        studies.rename(aside)
        studies.write_bytes(b"")  # every output write now fails with ENOTDIR
        try:
            result = tools.storescu(proxy.dicom_port, series.files)
            assert len(tools.acked_files(result)) == 2  # the SCP does not depend on it
            _status, body = wait_until(
                lambda: (h := proxy.health())[0] == 503 and h,
                20,
                "health reports the stuck indexer",
            )
            stuck = [p for p in body["problems"] if p.startswith("indexer is behind or stuck")]
            assert stuck and "2 file(s) in incoming/" in stuck[0], body
        finally:
            studies.unlink()
            aside.rename(studies)
        wait_indexed(proxy.spool, 2, timeout=30)
        wait_until(lambda: proxy.health()[0] == 200, 20, "healthy again")


def test_vault_and_audit_log_stay_whole_on_a_full_disk(tmp_path: Path, small_disk) -> None:
    disk = small_disk(tmp_path / "disk", 1)
    init_secrets(tmp_path / "secrets" / "vault.key")
    vault = Vault(disk / "vault.phi", tmp_path / "secrets" / "vault.key")
    audit = AuditLog(disk / "audit.log", audit_key(b"k" * 64))
    big = {"phi": {"PatientComments": "x" * 20000}}
    puts, failures = 0, 0
    for i in range(200):
        try:
            vault.put({"i": i, **big})
            puts += 1
        except OSError:
            failures += 1
        try:
            audit.record("cli:test", "quarantine.export", f"item-{i}")
        except Exception:
            failures += 1
    assert puts and failures  # it did fill up
    records = [rec for _, rec in vault.scan()]
    assert all(isinstance(r, dict) for r in records) and len(records) == puts
    assert audit.verify().torn == 0
    _resize(disk, 16)
    offset = vault.put({"i": "after", **big})
    assert vault.get(offset)["i"] == "after"
    audit.record("cli:test", "quarantine.export", "after")
    summary = audit.verify()
    assert (
        summary.torn == 0
        and json.loads(audit.path.read_text().splitlines()[-1])["target"] == "after"
    )
    vault.close()
