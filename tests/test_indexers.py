"""Several indexers on one spool ([indexer] processes; store/buckets.py):
the bucket in an incoming name, the buckets' locks, batch files that a live
indexer holds, the vault under two writing processes, two indexers sharing
a backlog (a reused SOP Instance UID is still refused), and a killed helper
on a real proxy whose files the first indexer takes over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

import dicomgen
import procfs
import tools
from helpers import catalog_counts, same_sop_other_study, wait_indexed, wait_until
from ith_proxy.store import buckets
from ith_proxy.store.buckets import BucketLocks
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.spool import Spool
from ith_proxy.vault.keyfiles import load_site_secret
from ith_proxy.vault.records import Vault
from ith_proxy.workers.indexer import Indexer
from worker_rooms import Rooms

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True
    )


# --- the bucket in the name ---


def test_an_incoming_name_carries_the_bucket_of_its_sop_uid(tmp_path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    sop = "1.2.826.0.1.3680043.8.498.12345"
    fd, path = spool.open_tmp()
    os.write(fd, b"x")
    name = spool.promote_incoming(fd, path, sop)
    assert (spool.incoming / name).read_bytes() == b"x"
    hashed = zlib.crc32(sop.encode()) & 0xFF
    assert name.endswith(f"-{hashed:02x}")
    assert buckets.bucket(name, 2) == hashed % 2 and buckets.bucket(name, 3) == hashed % 3
    assert buckets.bucket(name, 1) == 0
    # a name without a tag (an older proxy, deliver_incoming) and hostile ones: bucket 0
    for odd in (spool.deliver_incoming(b"y"), "", "-", "x-zz", "x-0", "x--1", "x-FF", "x-1f\n"):
        assert buckets.bucket(odd, 2) == 0, odd
    assert buckets.bucket("x-1f", 2) == 0x1F % 2


def test_the_helpers_take_their_bucket_only_under_a_backlog() -> None:
    wanted = buckets.wanted
    # one association: the first indexer keeps up and takes everything
    assert wanted(0, {0, 1}, 128, 64) == {0, 1} and wanted(1, {0, 1}, 128, 64) == set()
    # more than two batches wait: each takes its own bucket
    assert wanted(0, {0, 1}, 129, 64) == {0} and wanted(1, {0, 1}, 129, 64) == {1}
    assert wanted(2, {0, 1}, 500, 64) == set()  # nothing in bucket 2
    # bucket 0 is empty: the first indexer takes the rest (a helper died, or is slow)
    assert wanted(0, {1}, 500, 64) == {1}
    assert wanted(0, set(), 0, 64) == set()


def test_a_bucket_lock_is_counted_and_dies_with_its_process(tmp_path) -> None:
    first, second = BucketLocks(tmp_path), BucketLocks(tmp_path)
    try:
        assert first.take(1) and first.take(1)  # two batches of one pipeline
        assert not second.take(1) and second.take(0)
        first.release(1)
        assert first.held(1) and not second.take(1)  # one batch still holds it
        first.release(1)
        assert not first.held(1) and second.take(1)
        assert not first.take(1)
        second.release(1)
        second.release(0)
        second.release(0)  # a release too many does nothing
        # a process that holds bucket 0 and is killed leaves nothing to clean up
        holder = _python(
            "import sys, time\n"
            "from ith_proxy.store.buckets import BucketLocks\n"
            "assert BucketLocks(sys.argv[1]).take(0)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            str(tmp_path),
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            assert not first.take(0)
            holder.kill()
            holder.wait(30)
            assert first.take(0)
        finally:
            holder.kill()
            holder.wait(30)
    finally:
        first.close()
        second.close()


# --- batch files: a live indexer's are left alone ---


def test_recovery_skips_a_live_indexers_batch_and_takes_a_dead_ones(tmp_path) -> None:
    live, other = Spool(tmp_path / "spool"), Spool(tmp_path / "spool")
    live.ensure()
    batch = live.begin_batch(["a-00", "b-01"])
    live.batch_at(batch, 1)
    assert list(other.dead_batches()) == []  # locked by a live indexer
    assert Path(batch[0]).exists()
    dead = _python(
        "import os, sys\n"
        "from ith_proxy.store.spool import Spool\n"
        "b = Spool(sys.argv[1]).begin_batch(['c-00', 'd-00', 'e-01'])\n"
        "Spool.batch_at(b, 2)\n"
        "print('begun', flush=True)\n"
        "os.kill(os.getpid(), 9)\n",
        str(live.root),
    )
    assert dead.stdout is not None and dead.stdout.readline() == "begun\n"
    dead.wait(30)
    assert list(other.dead_batches()) == [(2, ["c-00", "d-00", "e-01"])]
    assert list(other.dead_batches()) == []  # read once, removed
    assert Path(batch[0]).exists()  # the live one is still there
    live.end_batch(batch)
    assert list(other.dead_batches()) == [] and not Path(batch[0]).exists()


# --- the vault: two processes append ---

_WRITER = """
import sys
from pathlib import Path
from ith_proxy.vault.records import Vault
vault = Vault(Path(sys.argv[1]), Path(sys.argv[2]))
for i in range(int(sys.argv[4])):
    sop = f"{sys.argv[3]}.{i}"
    offset = vault.put({"v": 1, "study": "1.2", "sop": sop, "phi": {"x": "y" * (i % 700)}})
    print(offset, sop, flush=True)
vault.sync()
vault.close()
"""


def test_two_processes_append_to_the_vault_and_every_record_reads_back(tmp_path) -> None:
    rooms = Rooms(tmp_path / "site")
    try:
        path, key = rooms.spool.vault_file, rooms.cfg.vault.key_file
        writers = [_python(_WRITER, str(path), str(key), f"9.{w}", "400") for w in (1, 2)]
        lines = []
        for writer in writers:
            out, _ = writer.communicate(timeout=120)
            assert writer.returncode == 0
            lines += out.split()
        offsets = dict(zip(lines[1::2], map(int, lines[::2]), strict=True))
        assert len(offsets) == 800 and len(set(offsets.values())) == 800
        for sop, offset in offsets.items():  # sealed at its own offset: each one opens
            record = rooms.vault.get(offset, "1.2", sop)
            assert record["sop"] == sop
    finally:
        rooms.close()


def test_a_tail_torn_by_a_dead_writer_is_sealed_by_another(tmp_path) -> None:
    rooms = Rooms(tmp_path / "site")
    other = Vault(rooms.spool.vault_file, rooms.cfg.vault.key_file)
    try:
        first = other.put({"v": 1, "study": "1.2", "sop": "1.2.1", "phi": {}})
        rooms.vault.put({"v": 1, "study": "1.2", "sop": "1.2.0", "phi": {}})  # its fd is open
        with open(rooms.spool.vault_file, "ab") as fh:
            fh.write(b"v2 torn-by-a-writer-that-was-killed")  # no newline
        offset = rooms.vault.put({"v": 1, "study": "1.2", "sop": "1.2.2", "phi": {}})
        assert rooms.spool.vault_file.read_bytes()[offset - 1 : offset] == b"\n"
        assert rooms.vault.get(offset, "1.2", "1.2.2")["sop"] == "1.2.2"
        assert other.get(first, "1.2", "1.2.1")["sop"] == "1.2.1"
        assert other.get(other.put({"v": 1, "study": "1.2", "sop": "1.2.3", "phi": {}}))
    finally:
        other.close()
        rooms.close()


# --- two indexers share a backlog ---


def test_two_indexers_share_a_backlog_and_a_reused_sop_uid_is_still_refused(tmp_path) -> None:
    rooms = Rooms(tmp_path / "site", "[indexer]\nbatch_size = 4\nprocesses = 2\n")
    series = dicomgen.make_small_series(tmp_path / "in", 60)
    for i, (path, sop) in enumerate(zip(series.files, series.sop_uids, strict=True)):
        rooms.drop(f"{i:04d}-a{buckets.tag(sop)}", path.read_bytes())
    reused = []
    for i in range(0, 60, 5):  # after each original: a re-send, and its UID in another study
        sop = series.sop_uids[i]
        rooms.drop(f"{1000 + i}-again{buckets.tag(sop)}", series.files[i].read_bytes())
        name = f"{2000 + i}-reused{buckets.tag(sop)}"
        rooms.drop(name, same_sop_other_study(series.files[i], tmp_path / f"{i}.dcm"))
        reused.append(name)
    assert {buckets.bucket(n, 2) for n in reused} == {0, 1}
    helper = Indexer(
        rooms.cfg,
        rooms.spool,
        Catalog(rooms.spool.catalog_file),
        Vault(rooms.spool.vault_file, rooms.cfg.vault.key_file),
        load_site_secret(rooms.cfg.vault.secret_file),
        slot=1,
    )
    stop = threading.Event()
    threads = [threading.Thread(target=i.run, args=(stop,)) for i in (rooms.indexer, helper)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: not any(rooms.spool.incoming.iterdir()), 120, "incoming/ drained")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        helper.catalog.close()
        helper.vault.close()
    try:
        assert rooms.indexer.processed > 0 and helper.processed > 0  # both took a share
        assert rooms.indexer.processed + helper.processed == 60 + 12  # and the re-sends
        assert rooms.indexer.quarantined + helper.quarantined == 12
        assert catalog_counts(rooms.spool.root)["instances"] == 60
        refused = rooms.spool.quarantine_dir / "inconsistent"
        assert sorted(p.name for p in refused.iterdir()) == sorted(
            [*reused, *(n + ".json" for n in reused)]
        )
        rows = rooms.catalog.conn.execute("SELECT sop_uid, study_uid, vault_offset FROM instances")
        for sop, study, offset in rows.fetchall():  # each row's record is its own
            assert rooms.vault.get(offset, study, sop)["sop"] == sop
        left = (rooms.spool.root / "attempts").iterdir()  # nothing in flight, only the locks
        assert [p.name for p in left if not p.name.startswith(".bucket-")] == []
    finally:
        rooms.close()


def test_one_indexer_takes_every_bucket(tmp_path) -> None:
    """[indexer] processes = 1: the names' buckets do not matter."""
    rooms = Rooms(tmp_path / "site", "[indexer]\nbatch_size = 2\nprocesses = 1\n")
    try:
        series = dicomgen.make_small_series(tmp_path / "in", 8)
        for i, (path, sop) in enumerate(zip(series.files, series.sop_uids, strict=True)):
            rooms.drop(f"{i:04d}-a{buckets.tag(sop)}", path.read_bytes())
        while rooms.indexer.run_once():
            pass
        assert catalog_counts(rooms.spool.root)["instances"] == 8
    finally:
        rooms.close()


# --- a real proxy: the helper is killed in the middle of a backlog ---


@pytest.mark.timeout(300)
def test_a_killed_helper_loses_nothing_and_comes_back(tmp_path) -> None:
    series = dicomgen.make_small_series(tmp_path / "in", 240)
    shares = [series.files[i::4] for i in range(4)]
    with tools.ProxyProcess(
        tmp_path / "p", config_text="[indexer]\nbatch_size = 4\n[scp]\nin_flow_backlog = 0\n"
    ) as proxy:
        assert proxy.pid is not None
        kids = {procfs.comm(k): k for k in procfs.children(proxy.pid)}
        first, zygote = kids["ith-indexer"], kids["ith-zygote"]
        os.kill(first, signal.SIGSTOP)  # the backlog grows: the helper must help alone
        try:
            results: list[subprocess.CompletedProcess] = []
            senders = [
                threading.Thread(
                    target=lambda s=s: results.append(tools.storescu(proxy.dicom_port, s))
                )
                for s in shares
            ]
            for sender in senders:
                sender.start()
            log = proxy.spool / "logs" / "main.log"
            wait_until(lambda: "indexer 1 helps" in log.read_text(), 60, "the helper helping")
            (helper,) = procfs.children(zygote)  # started by the backlog, forked by the zygote
            assert procfs.comm(helper) == "ith-indexer1"
            os.kill(helper, signal.SIGKILL)  # most likely in the middle of a batch
            for sender in senders:
                sender.join(120)
            assert [r.returncode for r in results] == [0, 0, 0, 0]
            assert sum(len(tools.acked_sop_uids(r)) for r in results) == 240
        finally:
            os.kill(first, signal.SIGCONT)
        wait_indexed(proxy.spool, 240)  # its batch is taken over (charged, then indexed)
        wait_until(
            lambda: "indexer process 1 exited (code -9); restarting" in log.read_text(),
            30,
            "restart",
        )
        wait_until(lambda: proxy.health()[0] == 200, 30, "health")
        assert not any((proxy.spool / "quarantine").rglob("*"))
        assert not any((proxy.spool / "incoming").iterdir())
        assert proxy.stop() == 0
