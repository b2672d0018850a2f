"""Receiver memory for one ~1 GB instance: ith-proxy vs. DCMTK storescp vs. Orthanc.

Builds one Enhanced CT instance of 512x512 16-bit frames (default 2000
frames, about 1.05 GB; ``deid_memory.write_instance``: frame by frame, never
whole in memory), then sends it with DCMTK ``storescu`` (one association,
TCP_NODELAY=1) to each receiver in turn, started as ``bench/ingest.py``
starts them.  For each it prints the receiving process's resident memory
just before the send (``VmRSS``), its peak after the acknowledgement
(``VmHWM``), the growth between the two, and the time to the
acknowledgement.  The proxy's figure is its main process (the SCP; the
indexer is a child process of its own).  Target: the proxy grows by less than
64 MB.  ``storescp`` runs twice: as ``bench/ingest.py`` runs it (``+xa``,
the data set is built in memory) and with ``+B`` (bit-preserving: written to
its file as received).  Needs about 3 GB free in the temp dir; everything is
removed afterwards unless ``--keep``.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # the receivers and tools of the ingest bench
from deid_memory import write_instance

LIMIT_MB = 64.0


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ingest.BenchError(f"no {field} in /proc/{pid}/status")


def send(aet: str, port: int, pid: int, path: Path) -> dict[str, float]:
    before = status_kb(pid, "VmRSS")
    t0 = time.perf_counter()
    r = subprocess.run(
        [ingest.TOOLS["storescu"], "-aec", aet, "127.0.0.1", str(port), str(path)],
        env=ingest.base_env(),
        capture_output=True,
        text=True,
    )
    secs = time.perf_counter() - t0
    peak = status_kb(pid, "VmHWM")
    if r.returncode != 0 or "E:" in r.stderr:
        raise ingest.BenchError(
            f"storescu to {aet}:{port} failed (rc {r.returncode}): "
            + " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        )
    return {
        "before": before / 1024,
        "peak": peak / 1024,
        "growth": (peak - before) / 1024,
        "seconds": secs,
    }


def run_proxy(work: Path, path: Path, encrypt: bool) -> dict[str, float]:
    dicom_port, api_port = ingest.free_port(), ingest.free_port()
    env = ingest.proxy_env(work, dicom_port, api_port)
    env["ITH_PROXY_CONFIG"] = str(work / "proxy.ini")
    (work / "proxy.ini").write_text(f"[spool]\nencrypt_incoming = {str(encrypt).lower()}\n")
    proc = ingest.start_proxy(work, env, api_port)
    try:
        return send(ingest.PROXY_AET, dicom_port, proc.pid, path)
    finally:
        ingest.stop(proc)


def run_storescp(work: Path, path: Path, extra: list[str]) -> dict[str, float]:
    out, port, log = work / "out", ingest.free_port(), work / "storescp.log"
    out.mkdir()
    proc = ingest.start(
        [ingest.TOOLS["storescp"], *extra, "-od", str(out), str(port)], log, work, ingest.base_env()
    )
    try:
        ingest.wait_ready(proc, log, "storescp", lambda: ingest.echo_ok("STORESCP", port))
        return send("STORESCP", port, proc.pid, path)
    finally:
        ingest.stop(proc)


def run_orthanc(work: Path, path: Path) -> dict[str, float]:
    proc, dicom_port, base = ingest.start_orthanc(work)
    try:
        result = send("ORTHANC", dicom_port, proc.pid, path)
        with urllib.request.urlopen(f"{base}/statistics", timeout=10) as r:
            if json.loads(r.read())["CountInstances"] != 1:
                raise ingest.BenchError("Orthanc did not store the instance")
        return result
    finally:
        ingest.stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--frames", type=int, default=2000, help="512x512x2-byte frames (2000 = ~1.05 GB)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if (found := ingest.find_tool(tool)) is None:
            print(f"bench: required tool {tool} not found on PATH", file=sys.stderr)
            return 1
        ingest.TOOLS[tool] = found
    os.environ["TCP_NODELAY"] = "1"
    root = Path(tempfile.mkdtemp(prefix="ith-bench-large-"))
    if shutil.disk_usage(root).free < 3.5e9:
        print(f"bench: needs ~3.5 GB free in {root.parent}", file=sys.stderr)
        shutil.rmtree(root)
        return 1
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        src = root / "enhanced-ct.dcm"
        t0 = time.perf_counter()
        size = write_instance(src, args.frames)
        print(
            f"Enhanced CT: {args.frames} frames 512x512x16 bit, {size / 1e6:.0f} MB "
            f"(written in {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        peers = [
            ("ith-proxy (encrypt_incoming)", lambda w: run_proxy(w, src, True)),
            ("ith-proxy (plain)", lambda w: run_proxy(w, src, False)),
            ("storescp +xa", lambda w: run_storescp(w, src, ["+xa"])),
            ("storescp +B", lambda w: run_storescp(w, src, ["+B"])),
            ("Orthanc", lambda w: run_orthanc(w, src)),
        ]
        for i, (name, fn) in enumerate(peers):
            work = root / f"peer{i}"
            work.mkdir()
            rows.append((name, fn(work)))
            r = rows[-1][1]
            print(
                f"  {name:30s} RSS {r['before']:7.0f} MB -> peak {r['peak']:7.0f} MB "
                f"(+{r['growth']:6.0f} MB), ack {r['seconds']:6.1f} s",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    except ingest.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nRESULTS (one {size / 1e6:.0f} MB instance, storescu, TCP_NODELAY=1)")
    print(f"{'receiver':30s} {'RSS before':>11s} {'peak':>9s} {'growth':>9s} {'ack s':>7s}")
    for name, r in rows:
        print(
            f"{name:30s} {r['before']:8.0f} MB {r['peak']:6.0f} MB {r['growth']:6.0f} MB "
            f"{r['seconds']:7.1f}"
        )
    worst = max(r["growth"] for name, r in rows if name.startswith("ith-proxy"))
    print(
        f"\ntarget proxy RSS growth < {LIMIT_MB:.0f} MB: "
        f"{'PASS' if worst < LIMIT_MB else 'FAIL'} ({worst:.1f} MB)"
    )
    if args.keep:
        print(f"temp dir kept in {root}")
    return 0 if worst < LIMIT_MB else 1


if __name__ == "__main__":
    sys.exit(main())
