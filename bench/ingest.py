"""Ingest benchmark: DCMTK storescu -> ith-proxy vs. DCMTK storescp vs. Orthanc.

Sends the same synthetic data sets with storescu (one association, or N at
once with ``--parallel N``) to each peer in turn and prints instances/s and
MB/s (MB = 10^6 bytes).  For the proxy it reports the acknowledgement rate
(every storescu returned) and the end-to-end rate (incoming/ empty and every
instance anonymized and in the catalog).  ``--matrix`` runs every throughput
row of issue 11, ``--memory`` the PSS / peak RSS of every process at idle and
under 10 and 50 associations, ``--sustained S`` the backlog of a long stream,
``--profile DIR`` py-spy profiles of the proxy.  See bench/README.md.
Stdlib + pydicom (+ py-spy for --profile).  The receivers live in peers.py,
the data sets in dataset.py; their names are re-exported here for the other
benches (``import ingest``).

Nothing is deleted between throughput runs: every run's files stay until the
bench ends.  On ext4 without a journal (this machine kind's disk) a new inode
is not taken from those freed in the last 60-300 s (``recently_deleted`` in
``find_inode_bit``), so every file created after a mass delete scans past
them: deleting a run's thousands of files made the next runs' creates, the
receivers' own, several times dearer (docs/performance.md, "The bench's own
deletions").  Before each run the page cache is written back (``os.sync``),
outside the timing, so no run pays for an earlier one's writes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dataset
import memory
import peers
import pyspy
import sustained
from dataset import CT_IMAGE_STORAGE, DATASETS, make_dataset
from peers import (
    DICOMWEB_PLUGIN,
    E2E_TIMEOUT,
    PROXY_AET,
    REPO,
    START_TIMEOUT,
    TOOLS,
    BenchError,
    base_env,
    catalog_count,
    echo_ok,
    find_tool,
    free_port,
    http_ok,
    proxy_env,
    start,
    start_orthanc,
    start_proxy,
    stop,
    storescu,
    wait_ready,
)

__all__ = [  # the names other benches use as ingest.X
    "CT_IMAGE_STORAGE",
    "DATASETS",
    "DICOMWEB_PLUGIN",
    "E2E_TIMEOUT",
    "PROXY_AET",
    "REPO",
    "START_TIMEOUT",
    "TOOLS",
    "BenchError",
    "base_env",
    "catalog_count",
    "echo_ok",
    "find_tool",
    "free_port",
    "http_ok",
    "make_dataset",
    "proxy_env",
    "start",
    "start_orthanc",
    "start_proxy",
    "stop",
    "storescu",
    "wait_ready",
]

MATRIX = [("large", 1), ("small", 1), ("small", 4), ("small", 10)]
FIGURES = ["proxy ack", "proxy e2e", "storescp", "Orthanc"]
Row = tuple[str, int]  # (data set, associations)


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def run_proxy(
    work: Path,
    shares: list[Path],
    n: int,
    cmd: list[str],
    profile: tuple[Path, str] | None,
    gil: bool = False,
    warm: float = 0.0,
) -> dict[str, float]:
    proc, port = peers.launch_proxy(work, cmd)
    rec = None
    try:
        time.sleep(warm)
        cpu0 = peers.cpu_seconds(peers.tree_pids(proc.pid))
        if profile:
            rec = pyspy.Recorder(proc.pid, *profile, gil=gil)
            time.sleep(0.5)  # let py-spy attach
        t0, meter = time.perf_counter(), peers.MachineMeter()
        ack = peers.send_parallel(PROXY_AET, port, shares)
        e2e = peers.wait_indexed(work / "spool", n, t0)
        cpu = peers.cpu_seconds(peers.tree_pids(proc.pid)) - cpu0
        cores, senders = meter.stop()
    finally:
        if rec:
            rec.stop()
        stop(proc)
    return {
        "proxy ack": ack,
        "proxy e2e": e2e,
        "proxy cpu": 1000 * cpu / n,
        **machine("proxy", cores, senders, e2e, n),
    }


def machine(who: str, cores: float, senders: float, secs: float, n: int) -> dict[str, float]:
    """The whole machine's figures of one run: cores busy on average, CPU
    per instance of every process (senders and the bench's polling
    included), and the storescu senders' own."""
    return {
        f"{who} cores": cores,
        f"{who} machine cpu": 1000 * cores * secs / n,
        f"{who} senders cpu": 1000 * senders / n,
    }


def run_storescp(work: Path, shares: list[Path], n: int, warm: float = 0.0) -> dict[str, float]:
    proc, port, out = peers.start_storescp(work, fork=len(shares) > 1)
    try:
        time.sleep(warm)
        secs = peers.send_parallel("STORESCP", port, shares)
    finally:
        stop(proc)
    if (got := len(os.listdir(out))) != n:
        raise BenchError(f"storescp stored {got}/{n} files")
    return {"storescp": secs}


def run_orthanc(work: Path, shares: list[Path], n: int, warm: float = 0.0) -> dict[str, float]:
    proc, dicom_port, base = start_orthanc(work)
    try:
        time.sleep(warm)
        cpu0, meter = peers.cpu_seconds([proc.pid]), peers.MachineMeter()
        secs = peers.send_parallel("ORTHANC", dicom_port, shares)
        cores, senders = meter.stop()
        cpu = peers.cpu_seconds([proc.pid]) - cpu0
        got = peers.orthanc_count(base)
    finally:
        stop(proc)
    if got != n:
        raise BenchError(f"Orthanc stored {got}/{n} instances")
    return {
        "Orthanc": secs,
        "Orthanc cpu": 1000 * cpu / n,
        **machine("Orthanc", cores, senders, secs, n),
    }


def fmt_rate(secs: float, n: int, nbytes: int) -> str:
    return f"{secs:8.2f} s {n / secs:9.1f} inst/s {nbytes / 1e6 / secs:8.1f} MB/s"


def throughput(root: Path, rows: list[Row], args, sizes: dict[str, tuple[int, int]]):
    results: dict[Row, dict[str, list[float]]] = {r: {} for r in rows}
    for run in range(1, args.runs + 1):
        first = (run - 1) % len(rows)  # the rows' order rotates too: no row always runs
        for row in rows[first:] + rows[:first]:  # on a file system the row before it churned
            name, assoc = row
            count, nbytes = sizes[name]
            data = root / "data" / name
            shares = [data]
            if assoc > 1:
                shares_dir = root / "shares" / f"{name}-{assoc}"
                if not shares_dir.exists():
                    dataset.split_shares(data, assoc, shares_dir)
                shares = sorted(shares_dir.iterdir())
            tag = f"{name}x{assoc}-run{run}"
            prof = (Path(args.profile), tag) if args.profile else None
            runners = [
                (
                    "proxy",
                    lambda w, s, n, wm, p=prof: run_proxy(w, s, n, args.proxy_cmd, p, args.gil, wm),
                ),
                ("storescp", run_storescp),
                ("orthanc", run_orthanc),
            ]
            k = (run - 1) % len(runners)  # rotate the order from run to run
            for peer, fn in runners[k:] + runners[:k]:
                work = root / f"{tag}-{peer}"
                work.mkdir()
                os.sync()  # the earlier runs' dirty pages are not written back during this one
                for fig, val in fn(work, shares, count, args.warm).items():
                    results[row].setdefault(fig, []).append(val)
                    if fig in FIGURES:
                        print(
                            f"  {name} x{assoc:<3d} run {run}/{args.runs} {fig:10s}"
                            f"{fmt_rate(val, count, nbytes)}  ({load()})",
                            flush=True,
                        )
                # the work dirs stay until the bench ends (see the module doc)
    return results


def paired(figures: dict, fig: str) -> float:
    """The median over rounds of one round's proxy/Orthanc throughput ratio
    (the figures are seconds, in round order): a box whose speed drifts
    from round to round moves both sides of a pair alike."""
    return statistics.median(o / p for p, o in zip(figures[fig], figures["Orthanc"], strict=True))


def report(results, sizes, runs: int) -> list[str]:
    agg = f"median of {runs} runs" if runs > 1 else "1 run"
    rate = {
        (row, f): statistics.median(sizes[row[0]][0] / s for s in v)
        for row, figs in results.items()
        for f, v in figs.items()
        if f in FIGURES
    }
    cpu = {(row, f): statistics.median(v) for row, figs in results.items() for f, v in figs.items()}
    out = [f"\nRESULTS ({agg}; DCMTK storescu, TCP_NODELAY=1; MB = 10^6 bytes)"]
    out.append(
        f"{'data set':9s} {'assoc':>5s} {'receiver':10s} {'seconds':>8s} {'inst/s':>8s} "
        f"{'MB/s':>7s} {'CPU ms/inst':>11s}"
    )
    for (row, f), r in rate.items():
        n, nbytes = sizes[row[0]]
        c = cpu.get((row, f.split()[0] + " cpu"))
        ctext = f"{c:11.2f}" if c is not None and f != "proxy ack" else ""
        out.append(
            f"{row[0]:9s} {row[1]:5d} {f:10s} {n / r:8.2f} {r:8.1f} "
            f"{r * nbytes / n / 1e6:7.1f} {ctext}"
        )
    out.extend(cores_table(cpu))
    out.append(
        "\nRATIOS (proxy throughput / peer throughput; 1.00x = as fast as the peer; 'paired' ="
        " the median of each round's own ratio, the receivers of a round run back to back)"
    )
    out.append(
        f"{'data set':9s} {'assoc':>5s} {'figure':10s} {'/ Orthanc':>10s} {'/ storescp':>11s}"
        f" {'paired / Orthanc':>17s}"
    )
    for row in results:
        for f in ("proxy e2e", "proxy ack"):
            out.append(
                f"{row[0]:9s} {row[1]:5d} {f:10s} {rate[row, f] / rate[row, 'Orthanc']:9.2f}x "
                f"{rate[row, f] / rate[row, 'storescp']:10.2f}x {paired(results[row], f):16.2f}x"
            )
    out.append("\nTARGETS (issue 11)")
    for row, floor in ((("large", 1), 1.2), (("small", 1), 1.0), (("small", 10), 0.8)):
        if row in results:
            ratio = rate[row, "proxy e2e"] / rate[row, "Orthanc"]
            out.append(
                f"target {row[0]} x{row[1]} e2e >= {floor:.1f}x Orthanc: "
                f"{'PASS' if ratio >= floor else 'FAIL'} ({ratio:.2f}x; paired "
                f"{paired(results[row], 'proxy e2e'):.2f}x)"
            )
    if ("small", 4) in results and ("small", 1) in results:
        four, one = rate[("small", 4), "proxy e2e"], rate[("small", 1), "proxy e2e"]
        out.append(
            f"target small x4 e2e >= small x1 e2e: {'PASS' if four >= one else 'FAIL'} "
            f"({four:.1f} vs {one:.1f} inst/s)"
        )
        out.extend(headroom(cpu, ("small", 1), ("small", 4)))
    return out


def cores_table(cpu: dict) -> list[str]:
    """CORES: how busy the whole machine was while each receiver took a set."""
    out = [
        f"\nCORES (the whole machine during each run, medians: cores busy on average, of"
        f" {os.cpu_count()}; CPU per instance of every process, the senders included)"
    ]
    out.append(
        f"{'data set':9s} {'assoc':>5s} {'receiver':10s} {'cores busy':>10s} "
        f"{'machine ms/inst':>15s} {'senders ms/inst':>15s}"
    )
    for (row, f), busy in cpu.items():
        if f.endswith(" cores"):
            who = f.split()[0]
            label = "proxy e2e" if who == "proxy" else who
            out.append(
                f"{row[0]:9s} {row[1]:5d} {label:10s} {busy:10.2f} "
                f"{cpu[row, who + ' machine cpu']:15.2f} {cpu[row, who + ' senders cpu']:15.2f}"
            )
    return out


def headroom(cpu: dict, one: Row, four: Row) -> list[str]:
    """What x4 can gain over x1 on this machine: the rate is cores busy over
    CPU per instance, so x4/x1 = (cores at x4 / cores at x1) x (CPU per
    instance at x1 / at x4)."""
    if (one, "proxy cores") not in cpu or (four, "proxy cores") not in cpu:
        return []
    c1, c4 = cpu[one, "proxy cores"], cpu[four, "proxy cores"]
    m1, m4 = cpu[one, "proxy machine cpu"], cpu[four, "proxy machine cpu"]
    return [
        f"  (the floor: x1 kept {c1:.2f} of {os.cpu_count()} cores busy and x4 {c4:.2f}, "
        f"{c4 / c1:.2f}x; the machine spent {m1:.2f} ms of CPU per instance at x1 and "
        f"{m4:.2f} at x4, {m4 / m1:.2f}x)"
    ]


def run_memory(root: Path, refresher: dataset.Refresher, args) -> list[str]:
    loads = {n: refresher.write(root / "memory" / f"load{n}", n) for n in (10, 50)}
    per_load, out, targets = len(refresher.files), [], []
    for name in ("proxy", "Orthanc"):
        work = root / f"memory-{name}"
        work.mkdir()
        if name == "proxy":
            proc, port = peers.launch_proxy(work, args.proxy_cmd)
            aet, sent = PROXY_AET, [0]

            def wait(n: int, sent=sent, spool=work / "spool") -> None:
                sent[0] += per_load
                peers.wait_indexed(spool, sent[0], time.perf_counter())
        else:
            proc, port, _base = start_orthanc(work)
            aet = "ORTHANC"

            def wait(n: int) -> None:
                pass

        try:
            phases = memory.measure(
                proc.pid,
                lambda n, aet=aet, port=port: peers.send_parallel(aet, port, loads[n]),
                wait,
                args.settle,
            )
        finally:
            stop(proc)
        out += memory.table(f"{name} PSS MiB", phases)
        if name == "proxy":
            targets = memory.verdicts(phases)
        print(f"  memory {name} measured ({load()})", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    head = "\nMEMORY (PSS in MiB per process and phase; 'N assoc' = the largest summed PSS "
    head += "sampled every 0.25 s while N storescu sent the small set at once; "
    head += "VmHWM = peak RSS, MiB)"
    return [head, *out, *targets]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="runs per row (median reported)")
    ap.add_argument("--only", choices=list(DATASETS), help="run one data set only")
    ap.add_argument("--parallel", type=int, default=1, help="storescu associations at once")
    ap.add_argument("--matrix", action="store_true", help="large x1, small x1, x4, x10")
    ap.add_argument("--memory", action="store_true", help="PSS at idle, 10 and 50 assoc")
    ap.add_argument("--settle", type=float, default=5.0, help="idle seconds before --memory")
    ap.add_argument("--sustained", type=float, metavar="SECONDS", help="sustained stream")
    ap.add_argument("--senders", type=int, default=1, help="looping storescu for --sustained")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the proxy's processes into DIR")
    ap.add_argument("--warm", type=float, default=0.0, help="idle seconds after ready")
    ap.add_argument("--gil", action="store_true", help="--profile: sample GIL holders only")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs")
    ap.add_argument("--proxy-cmd", help="proxy command line (default: python -m ith_proxy.cli run)")
    args = ap.parse_args()
    if args.runs < 1 or args.parallel < 1 or args.senders < 1 or args.warm < 0:
        ap.error("--runs, --parallel and --senders must be >= 1, --warm >= 0")
    args.proxy_cmd = (
        shlex.split(args.proxy_cmd)
        if args.proxy_cmd
        else [sys.executable, "-m", "ith_proxy.cli", "run"]
    )
    if shutil.which(args.proxy_cmd[0]) is None:
        print(f"bench: proxy command '{args.proxy_cmd[0]}' not found", file=sys.stderr)
        return 1
    if args.profile and pyspy.find_pyspy() is None:
        print("bench: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return 1
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if (path := find_tool(tool)) is None:
            what = "Orthanc" if tool == "Orthanc" else f"DCMTK {tool}"
            print(f"bench: required tool {what} not found on PATH", file=sys.stderr)
            return 1
        TOOLS[tool] = path
    try:
        import pydicom  # noqa: F401  # only: is it installed?
    except ImportError:
        print("bench: pydicom is not installed for this Python", file=sys.stderr)
        return 1
    os.environ["TCP_NODELAY"] = "1"
    if args.matrix:
        rows = MATRIX
    elif args.memory or args.sustained:
        rows = [(args.only, args.parallel)] if args.only else []
    else:
        rows = [(d, args.parallel) for d in ([args.only] if args.only else DATASETS)]
    needed = {r[0] for r in rows} | ({"small"} if args.memory or args.sustained else set())
    root = Path(tempfile.mkdtemp(prefix="ith-bench-"))
    sizes: dict[str, tuple[int, int]] = {}
    lines: list[str] = []
    try:
        for name in [d for d in DATASETS if d in needed]:
            count, px, label = DATASETS[name]
            t = time.perf_counter()
            sizes[name] = (count, make_dataset(root / "data" / name, count, px))
            print(
                f"[{name}] {label}: {count} instances, {sizes[name][1] / 1e6:.1f} MB "
                f"(generated in {time.perf_counter() - t:.1f} s; {load()})",
                flush=True,
            )
        if rows:
            lines += report(throughput(root, rows, args, sizes), sizes, args.runs)
        refresher = None
        if args.memory or args.sustained:
            refresher = dataset.Refresher(root / "data" / "small")
        if args.memory and refresher:
            lines += run_memory(root, refresher, args)
        if args.sustained and refresher:
            work = root / "sustained"
            work.mkdir()
            fig = sustained.run_sustained(
                work, refresher, args.sustained, args.senders, args.proxy_cmd
            )
            lines += ["", *sustained.report(fig, args.senders)]
        if args.profile:
            lines.append(f"\nPROFILES (py-spy, raw files in {args.profile})")
            for raw in sorted(Path(args.profile).glob("*.raw")):
                lines += pyspy.summary(raw, raw.stem)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n".join(lines))
    print(f"\n({load()}; nproc {os.cpu_count()})")
    if args.keep:
        print(f"temp dirs kept in {root}")
    return 1 if any(" FAIL " in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
