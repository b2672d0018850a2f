"""Poison pills (issue 6): a file that kills the indexer process gets
[indexer] max_attempts attempts, then goes to quarantine/failed/, and only
it: the files of its batch and the files behind it are indexed.

The kill comes from the indexer's test-only failpoint: with
ITH_PROXY_FAILPOINT_KILL=<text> in its environment the indexer SIGKILLs its
own process on a dataset whose ImageComments contain <text> (a real
SIGKILL, as the OOM killer would send; the memory ceiling itself is tested
in test_indexer_hostile.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom

import dicomgen
import tools
from helpers import catalog_counts, original_to_anonymized_sop, wait_until
from worker_rooms import Rooms

REPO = Path(__file__).resolve().parent.parent
KILL = "ITH_PROXY_FAILPOINT_KILL"


def _make_pill(path: Path, marker: str) -> None:
    ds = pydicom.dcmread(path)
    ds.ImageComments = marker
    ds.save_as(path)


def _catalog_sops(spool: Path) -> set[str]:
    from ith_proxy.store.catalog import Catalog

    cat = Catalog(spool / "catalog.sqlite3", readonly=True)
    try:
        return {r[0] for r in cat.conn.execute("SELECT sop_uid FROM instances")}
    finally:
        cat.close()


def _quarantined(spool: Path) -> list[str]:
    q = spool / "quarantine"
    return sorted(p.relative_to(q).as_posix() for p in q.rglob("*") if p.is_file())


def test_a_pill_that_kills_the_indexer_is_quarantined_and_the_burst_is_indexed(tmp_path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 30)
    marker = f"KILL-{series.token}"
    _make_pill(series.files[15], marker)
    innocent = set(series.sop_uids) - {series.sop_uids[15]}
    with tools.ProxyProcess(
        tmp_path / "proxy", env={KILL: marker}, config_text="[indexer]\nbatch_size = 8\n"
    ) as proxy:
        result = tools.storescu(proxy.dicom_port, series.files)
        assert result.returncode == 0 and len(tools.acked_sop_uids(result)) == 30

        def settled() -> bool:
            return (
                any((proxy.spool / "quarantine").rglob("*.json"))
                and catalog_counts(proxy.spool)["instances"] == 29
                and not any((proxy.spool / "incoming").iterdir())
            )

        wait_until(settled, 240, "the pill quarantined and the other 29 indexed")
        quarantined = _quarantined(proxy.spool)
        assert len(quarantined) == 2 and quarantined[0].startswith("failed/"), quarantined
        info = json.loads((proxy.spool / "quarantine" / quarantined[1]).read_text())
        assert info["attempts"] == 3
        assert info["error"].startswith("gave up after 3 attempts")
        mapping = original_to_anonymized_sop(proxy.workdir)
        assert set(mapping) == innocent
        assert _catalog_sops(proxy.spool) == {mapping[s] for s in innocent}
        assert _in_flight(proxy.spool / "attempts") == []  # no count, no batch left
        # each death is one attempt, whichever indexer it was ([indexer] processes = 2);
        # the other indexer may have quarantined it before the last restart was logged
        wait_until(lambda: len(_deaths(proxy.spool)) >= 3, 30, "the third restart")
        assert len(_deaths(proxy.spool)) == 3
        assert marker not in (proxy.spool / "logs" / "main.log").read_text()


_LOOP = r"""
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from worker_rooms import Rooms
rooms = Rooms(Path(sys.argv[1]))
while rooms.indexer.run_once():
    pass
rooms.close()
"""


def test_a_crash_charges_the_file_in_flight_not_its_batch(tmp_path) -> None:
    """Driven through run_once() in a child process that the pill kills:
    the files processed before it in the same batch get one charge, are then
    retried one at a time and indexed; the pill alone reaches the limit."""
    root = tmp_path / "site"
    rooms = Rooms(root)  # creates the keys; the children use the same site
    series = dicomgen.make_small_series(tmp_path / "in", 6)
    marker = f"KILL-{series.token}"
    _make_pill(series.files[3], marker)
    names = [f"{i}-file" for i in range(1, 7)]
    for name, f in zip(names, series.files, strict=True):
        rooms.drop(name, f.read_bytes())
    attempts = rooms.spool.root / "attempts"
    env = {**os.environ, KILL: marker, "PYTHONPATH": str(REPO)}

    def run() -> int:
        return subprocess.run(
            [sys.executable, "-c", _LOOP, str(root), str(REPO / "tests")], env=env, timeout=300
        ).returncode

    assert run() == -9  # one batch of 6: the first three processed, the pill kills
    counts = {
        p.name: p.read_text().strip() for p in attempts.iterdir() if not p.name.startswith(".")
    }
    assert counts == {}  # charged by the next indexer, from the batch's in-flight file
    assert run() == -9  # the other five in a normal batch, then the pill alone
    counts = {
        p.name: p.read_text().strip() for p in attempts.iterdir() if not p.name.startswith(".")
    }
    assert counts == {"4-file": "1"}
    assert catalog_counts(rooms.spool.root)["instances"] == 5
    assert run() == -9
    assert run() == 0  # at the limit: quarantined unopened
    assert _quarantined(rooms.spool.root) == ["failed/4-file", "failed/4-file.json"]
    info = json.loads((rooms.spool.quarantine_dir / "failed" / "4-file.json").read_text())
    assert info["attempts"] == 3 and marker not in json.dumps(info)
    assert _in_flight(attempts) == [] and not list(rooms.spool.incoming.iterdir())
    rooms.close()


def test_an_io_error_gives_the_attempt_back(tmp_path) -> None:
    """A file that cannot be read for an I/O reason is not charged: it stays
    in incoming/ without a marker, and is indexed once readable."""
    rooms = Rooms(tmp_path / "site")
    series = dicomgen.make_small_series(tmp_path / "in", 1)
    path = rooms.drop("1-file", series.files[0].read_bytes())
    if os.geteuid() != 0:
        path.chmod(0)
        assert rooms.indexer.run_once() == 0
        assert not (rooms.spool.root / "attempts" / "1-file").exists()
        path.chmod(0o600)
    else:  # root reads anything: an I/O error from the spool instead
        real = rooms.spool.put_instance

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        rooms.spool.put_instance = full
        assert rooms.indexer.run_once() == 0
        assert not (rooms.spool.root / "attempts" / "1-file").exists()
        rooms.spool.put_instance = real
    assert rooms.indexer.run_once() == 1
    assert catalog_counts(rooms.spool.root)["instances"] == 1
    rooms.close()


def _in_flight(attempts: Path) -> list[str]:
    """What attempts/ holds but the buckets' lock files (store/buckets.py)."""
    return [p.name for p in attempts.iterdir() if not p.name.startswith(".bucket-")]


def _deaths(spool: Path) -> list[str]:
    log = (spool / "logs" / "main.log").read_text()
    return re.findall(r"indexer process( 1)? exited \(code -9\)", log)
