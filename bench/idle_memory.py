"""Idle memory: the proxy's processes against Orthanc's, side by side.

Starts the proxy (``python -m ith_proxy.cli run`` on embedded defaults, its
spool and keys in a temp dir) and a fresh Orthanc (``ingest.start_orthanc``),
waits until each is ready and then ``--settle`` seconds more, and sums the
PSS (proportional set size, from ``/proc/PID/smaps_rollup``) of each one's
process tree: for the proxy, the service process, the zygote and the indexer.
Medians of ``--runs``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ingest  # bench/ingest.py: ports, environment, Orthanc, process helpers


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss(pid: int) -> dict[int, int]:
    """PSS in KiB of ``pid`` and every descendant."""
    out = {pid: pss_kib(pid)}
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    for kid in kids.split():
        out.update(tree_pss(int(kid)))
    return out


def proxy_idle(work: Path, settle: float) -> dict[int, int]:
    dicom_port, api_port = ingest.free_port(), ingest.free_port()
    proc = ingest.start_proxy(work, ingest.proxy_env(work, dicom_port, api_port), api_port)
    try:
        time.sleep(settle)
        return tree_pss(proc.pid)
    finally:
        ingest.stop(proc)


def orthanc_idle(work: Path, settle: float) -> dict[int, int]:
    proc, _port, _base = ingest.start_orthanc(work)
    try:
        time.sleep(settle)
        return tree_pss(proc.pid)
    finally:
        ingest.stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs (median reported)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds idle before measuring")
    args = ap.parse_args()
    if args.runs < 1 or args.settle < 0:
        ap.error("--runs must be >= 1 and --settle >= 0")
    if (path := ingest.find_tool("Orthanc")) is None:
        print("bench: required tool Orthanc not found on PATH", file=sys.stderr)
        return 1
    ingest.TOOLS["Orthanc"] = path
    root = Path(tempfile.mkdtemp(prefix="ith-bench-idle-"))
    figures: dict[str, list[float]] = {"proxy": [], "Orthanc": []}
    try:
        for run in range(1, args.runs + 1):
            for name, measure in (("proxy", proxy_idle), ("Orthanc", orthanc_idle)):
                work = root / f"run{run}-{name}"
                work.mkdir()
                parts = measure(work, args.settle)
                total = sum(parts.values()) / 1024
                figures[name].append(total)
                detail = ", ".join(f"{kib / 1024:.1f}" for kib in parts.values())
                print(
                    f"  run {run}/{args.runs}  {name:8s} {total:6.1f} MiB  ({detail})", flush=True
                )
                shutil.rmtree(work, ignore_errors=True)
    except ingest.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    proxy, orthanc = (statistics.median(figures[n]) for n in ("proxy", "Orthanc"))
    print(f"\nRESULTS (median of {args.runs}; PSS of each process tree, idle)")
    print(f"proxy   {proxy:6.1f} MiB\nOrthanc {orthanc:6.1f} MiB\nratio   {proxy / orthanc:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
