"""CPU time per instance of the proxy's receive (ack) path and of its indexer.

Starts the proxy as ``bench/ingest.py`` does, sends N small instances over
one DCMTK storescu association, and reads utime+stime from /proc/<pid>/stat
of the main process (the SCP threads) and of the indexer process (one:
``[indexer] processes = 1``) before and after: the main process's figure
is taken when storescu returns (every instance acknowledged), the
indexer's when the catalog holds all N.  The "net" figures subtract
what each process burns idle (measured for 5 s before sending, once it
has settled) over the
same time, so that a slower run on a loaded machine is not charged its
timers.  CPU time
is the figure to compare on a loaded machine; wall times are printed too.

``--indexer-only`` measures the indexer alone, in this process: the N
instances are first written to a fresh site's incoming/ as the SCP writes
them (encrypted, ``[spool] encrypt_incoming``), then ``Indexer.run_once`` is
called until incoming/ is empty; CPU time is ``getrusage`` (no
watchdog, no SCP, full batches: the steadiest figure for A/B).

``--profile DIR`` runs ``py-spy record`` (``pip install py-spy``, as root or
with ptrace allowed) on both processes during the run and writes
``DIR/main.txt`` and ``DIR/indexer.txt`` (collapsed stacks) plus a summary of
the top own-time frames.

    python bench/recv_cost.py --count 1000 --size 64 [--runs 3] [--profile /tmp/prof]
    python bench/recv_cost.py --indexer-only [--runs 5]
    python bench/recv_cost.py --micro
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # bench/ingest.py: the same start code and data

TICK = os.sysconf("SC_CLK_TCK")
SETTLE = 5.0  # seconds after the health check before anything is measured
IDLE_WINDOW = 5.0  # seconds of idle CPU measured before sending (subtracted: "net")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(p) for p in fh.read().split()]
        except FileNotFoundError:
            pass
    return out


def indexer_pid(main: int) -> int:
    """The indexer child: named ``ith-indexer`` (forked, not the zygote) or
    running ``ith_proxy.indexer_child`` (exec'd)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in children(main):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if comm == "ith-indexer" or b"indexer_child" in cmd:
                return pid
        time.sleep(0.1)
    raise ingest.BenchError("no indexer process found")


def top_frames(collapsed: Path, n: int = 25, inclusive: bool = False) -> list[tuple[float, str]]:
    """Share of the samples in a py-spy collapsed file per frame: own time
    (the leaf), or inclusive (every frame of the stack, line numbers dropped)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if inclusive:
            for frame in {f.rsplit(":", 1)[0] for f in frames[1:]}:
                counts[frame] += int(count)
        else:
            counts[frames[-1]] += int(count)
        total += int(count)
    return [(100.0 * c / total, f) for f, c in counts.most_common(n)] if total else []


def one_run(data: Path, n: int, profile: Path | None) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="ith-recv-cost-"))
    spool, dicom_port, api_port = work / "spool", ingest.free_port(), ingest.free_port()
    env = ingest.proxy_env(work, dicom_port, api_port)
    (work / "one-indexer.ini").write_text("[indexer]\nprocesses = 1\n")  # all the indexing
    env["ITH_PROXY_CONFIG"] = str(work / "one-indexer.ini")
    proc = ingest.start_proxy(work, env, api_port)
    spies: list[subprocess.Popen] = []
    try:
        idx = indexer_pid(proc.pid)
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            for name, pid in (("main", proc.pid), ("indexer", idx)):
                spies.append(
                    subprocess.Popen(
                        [
                            shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                            *("record", "-p", str(pid), "-r", "100", "--gil", "--nonblocking"),
                            *("-f", "raw", "-o", str(profile / f"{name}.txt")),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            time.sleep(1.0)
        time.sleep(SETTLE)  # the indexer process finishes its imports and recovery
        # the idle cost (timers, pollers) per second, charged to no instance
        main_i, idx_i, t_i = sum(cpu_seconds(proc.pid)), sum(cpu_seconds(idx)), time.perf_counter()
        time.sleep(IDLE_WINDOW)
        idle_s = time.perf_counter() - t_i
        main_idle = (sum(cpu_seconds(proc.pid)) - main_i) / idle_s
        idx_idle = (sum(cpu_seconds(idx)) - idx_i) / idle_s
        main0, idx0, t0 = cpu_seconds(proc.pid), cpu_seconds(idx), time.perf_counter()
        ack = ingest.storescu(ingest.PROXY_AET, dicom_port, data)
        main1 = cpu_seconds(proc.pid)
        ack_s = time.perf_counter() - t0
        db = spool / "catalog.sqlite3"
        while ingest.catalog_count(db) < n:
            if time.perf_counter() - t0 > ingest.E2E_TIMEOUT:
                raise ingest.BenchError("not all instances cataloged")
            time.sleep(0.02)
        e2e = time.perf_counter() - t0
        idx1 = cpu_seconds(idx)
        for spy in spies:
            spy.send_signal(2)
            spy.wait(timeout=60)
        return {
            "main net ms/inst": 1000 * (sum(main1) - sum(main0) - main_idle * ack_s) / n,
            "indexer net ms/inst": 1000 * (sum(idx1) - sum(idx0) - idx_idle * e2e) / n,
            "main ms/inst": 1000 * (sum(main1) - sum(main0)) / n,
            "(user": 1000 * (main1[0] - main0[0]) / n,
            "sys)": 1000 * (main1[1] - main0[1]) / n,
            "indexer ms/inst": 1000 * (sum(idx1) - sum(idx0)) / n,
            "(user ": 1000 * (idx1[0] - idx0[0]) / n,
            "sys) ": 1000 * (idx1[1] - idx0[1]) / n,
            "ack inst/s": n / ack,
            "e2e inst/s": n / e2e,
        }
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
        ingest.stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def indexer_only(data: Path) -> dict[str, float]:
    """The indexer's CPU per instance over a full incoming/ (see the module doc)."""
    sys.path.insert(0, str(ingest.REPO))
    from ith_proxy import config
    from ith_proxy.dicom.libsetup import configure_libraries
    from ith_proxy.store.catalog import Catalog
    from ith_proxy.store.spool import Spool
    from ith_proxy.vault import stream as vault_stream
    from ith_proxy.vault.keyfiles import init_secrets, load_site_secret
    from ith_proxy.vault.records import Vault
    from ith_proxy.workers.indexer import Indexer

    configure_libraries()
    work = Path(tempfile.mkdtemp(prefix="ith-recv-idx-"))
    try:
        (work / "proxy.ini").write_text("")
        env = {
            "DICOM_STORAGE_DIR": str(work / "spool"),
            "VAULT_KEY_FILE": str(work / "secrets" / "vault.key"),
            "ITH_PROXY_CONFIG": str(work / "proxy.ini"),
        }
        cfg = config.load(env=env, cwd=work)
        spool = Spool(cfg.spool.dir)
        spool.ensure()
        init_secrets(cfg.vault.key_file)
        catalog, vault = Catalog(spool.catalog_file), Vault(spool.vault_file, cfg.vault.key_file)
        try:
            files = sorted(data.iterdir())
            for path in files:
                spool.deliver_incoming(
                    vault_stream.encrypt_stream(vault.keyring, [path.read_bytes()])
                )
            indexer = Indexer(cfg, spool, catalog, vault, load_site_secret(cfg.vault.secret_file))
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            done = 0
            while (n := indexer.run_once()) > 0:
                done += n
            r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
            user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
            if done != len(files) or indexer.quarantined:
                raise ingest.BenchError(f"indexed {done}/{len(files)}")
        finally:
            vault.close()
            catalog.close()
        return {
            "indexer ms/inst": 1000 * (user + system) / done,
            "(user": 1000 * user / done,
            "sys)": 1000 * system / done,
            "wall ms/inst": 1000 * wall / done,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def micro() -> dict[str, float]:
    """Microseconds per call, best of 7 (robust on a loaded machine): the
    pieces issue 11 replaced, stock against by hand."""
    import io
    import timeit

    sys.path.insert(0, str(ingest.REPO))
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import decode, encode
    from pynetdicom.pdu import P_DATA_TF

    from ith_proxy.deid import meta as deid_meta
    from ith_proxy.dicom import file_meta, find_wire, store_wire

    sop, cls = "1.2.826.0.1.3680043.8.498.12345678901234567890", ingest.CT_IMAGE_STORAGE
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPClassUID = 7, cls
    rsp.AffectedSOPInstanceUID, rsp.Status = sop, 0

    def rsp_stock() -> None:
        msg = C_STORE_RSP()
        msg.primitive_to_message(rsp)
        for p in msg.encode_msg(1, 16384):
            pdu = P_DATA_TF()
            pdu.from_primitive(p)
            pdu.encode()

    def rsp_hand() -> None:
        plain = store_wire._plain(rsp)
        assert plain is not None  # a plain response: what the SCP packs
        find_wire._p_data_tf([(1, b"\x03" + plain)])

    rq = C_STORE()
    rq.MessageID, rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = 7, cls, sop
    rq.Priority, rq.DataSet = 2, io.BytesIO(b"x")
    msg = C_STORE_RQ()
    msg.primitive_to_message(rq)
    raw = encode(msg.command_set, True, True)

    def rq_stock() -> None:
        m = C_STORE_RQ()
        m.command_set = decode(io.BytesIO(raw), True, True)
        m.context_id = 1
        m.message_to_primitive()

    def rq_hand() -> None:
        request = store_wire.parse_store_rq(raw)
        assert request is not None  # a plain C-STORE-RQ: what the SCP reads by hand
        store_wire.store_primitive(request, 1)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = cls, sop
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    deid_meta.rebuild(meta, "2.25.1234")

    def meta_stock() -> None:
        fp = DicomFileLike(io.BytesIO())
        write_file_meta_info(fp, meta, enforce_standard=True)

    def meta_hand() -> None:
        file_meta.encode(meta)

    out = {}
    for name, fn in [
        ("C-STORE-RSP stock", rsp_stock),
        ("C-STORE-RSP hand", rsp_hand),
        ("C-STORE-RQ stock", rq_stock),
        ("C-STORE-RQ hand", rq_hand),
        ("file meta stock", meta_stock),
        ("file meta hand", meta_hand),
    ]:
        out[name + " us"] = 1e6 * min(timeit.repeat(fn, number=500, repeat=7)) / 500
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--indexer-only", action="store_true")
    ap.add_argument("--micro", action="store_true", help="per-call cost of the replaced pieces")
    args = ap.parse_args()
    if args.micro:
        for key, value in micro().items():
            print(f"{key}: {value:.1f}")
        return 0
    for tool in ("storescu", "echoscu"):
        found = ingest.find_tool(tool)
        if found is None:
            raise SystemExit(f"{tool} (DCMTK) not found")
        ingest.TOOLS[tool] = found
    with tempfile.TemporaryDirectory(prefix="ith-recv-data-") as tmp:
        data = Path(tmp) / "data"
        ingest.make_dataset(data, args.count, args.size)
        results = []
        for i in range(args.runs):
            prof = args.profile if (args.profile is not None and i == 0) else None
            r = indexer_only(data) if args.indexer_only else one_run(data, args.count, prof)
            results.append(r)
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
        for key in results[0]:
            vals = sorted(r[key] for r in results)
            print(f"median {key}: {vals[len(vals) // 2]:.3f}")
    if args.profile is not None:
        for name in ("main", "indexer"):
            path = args.profile / f"{name}.txt"
            if path.exists():
                for inclusive in (False, True):
                    kind = "inclusive" if inclusive else "own-time"
                    print(f"\ntop {kind} frames, {name} (samples holding the GIL):")
                    for share, frame in top_frames(path, 30, inclusive):
                        print(f"  {share:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
