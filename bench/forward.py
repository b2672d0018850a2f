"""Forwarding benchmark: the 200-slice CT study to a fresh Orthanc by the proxy's
C-STORE SCU, by DCMTK storescu, and by stock pynetdicom, in the same run.

Methods (each run sends the whole study once per method, each to its own
fresh Orthanc, in a rotating order):

- ``proxy C-STORE``: ``ith_proxy.dicom.scu.store`` (one association);
- ``storescu``: DCMTK ``storescu +sd DIR`` with TCP_NODELAY=1 in its env;
- ``pynetdicom``: a stock ``AE.associate`` + ``send_c_store(path)`` loop;
- ``pynetdicom NODELAY``: the same with TCP_NODELAY set on its socket from an
  EVT_CONN_OPEN handler, as a pynetdicom user would;
- ``proxy STOW-RS``: ``ith_proxy.dicom.stow.store`` to Orthanc's DICOMweb
  plugin, in the batches of the proxy's defaults (``[forward] stow_batch_mb``
  16, ``stow_batch_instances`` 100).

Every Orthanc runs with the DICOMweb plugin loaded, so all methods meet the
same server.

Prints seconds, MB/s (10^6 bytes of DICOM files) and the ratio to storescu,
medians of ``--runs``; the targets are proxy C-STORE and proxy STOW-RS >= 0.8x
storescu's MB/s.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import ingest  # bench/ingest.py (this script's own dir): data set, Orthanc, storescu

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # ith_proxy

ORTHANC_AET, CALLING_AET = "ORTHANC", "ITHBENCH"
COUNT, SIZE = 200, 512
TARGET = 0.8

# (Orthanc DICOM port, its HTTP base URL, files, data dir)
Sender = Callable[[int, str, list[Path], Path], None]


def send_proxy(port: int, base: str, files: list[Path], data: Path) -> None:
    from ith_proxy.dicom import scu

    peer = scu.Peer(ORTHANC_AET, "127.0.0.1", port)
    outcomes = scu.store(peer, CALLING_AET, files, scu.Timeouts(10.0, 30.0, 60.0))
    bad = [o for o in outcomes if o.result != "delivered"]
    if bad:
        raise ingest.BenchError(f"proxy C-STORE: {len(bad)} not delivered, first: {bad[0].reason}")


def send_storescu(port: int, base: str, files: list[Path], data: Path) -> None:
    ingest.storescu(ORTHANC_AET, port, data)


def _send_pynetdicom(port: int, files: list[Path], nodelay: bool) -> None:
    from pynetdicom import AE, evt

    def on_open(event: evt.Event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(ingest.CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1"])
    handlers = [(evt.EVT_CONN_OPEN, on_open)] if nodelay else []
    assoc = ae.associate("127.0.0.1", port, ae_title=ORTHANC_AET, evt_handlers=handlers)
    if not assoc.is_established:
        raise ingest.BenchError("pynetdicom: association not established")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            if status.get("Status") != 0:
                state = "aborted" if assoc.is_aborted else "no response within dimse_timeout"
                raise ingest.BenchError(f"pynetdicom: status {status.get('Status')!r} ({state})")
    finally:
        assoc.release()


def send_stow(port: int, base: str, files: list[Path], data: Path) -> None:
    from ith_proxy.dicom import stow

    endpoint = stow.Endpoint(f"{base}/dicom-web")
    outcomes = stow.store(endpoint, files, batch_bytes=16 << 20, batch_instances=100, timeout=60.0)
    bad = [o for o in outcomes if o.result != "delivered"]
    if bad:
        raise ingest.BenchError(f"proxy STOW-RS: {len(bad)} not delivered, first: {bad[0].reason}")


METHODS: dict[str, Sender] = {
    "proxy C-STORE": send_proxy,
    "storescu": send_storescu,
    "pynetdicom": lambda port, base, files, data: _send_pynetdicom(port, files, False),
    "pynetdicom NODELAY": lambda port, base, files, data: _send_pynetdicom(port, files, True),
    "proxy STOW-RS": send_stow,
}


def run_one(name: str, work: Path, files: list[Path], data: Path) -> float:
    """Seconds for one method to deliver every file to a fresh Orthanc."""
    proc, port, base = ingest.start_orthanc(work, dicomweb=True)
    try:
        gc.collect()  # no collection of an earlier method's garbage inside this timing
        t0 = time.perf_counter()
        METHODS[name](port, base, files, data)
        secs = time.perf_counter() - t0
        with urllib.request.urlopen(f"{base}/statistics", timeout=10) as r:
            got = json.loads(r.read())["CountInstances"]
    finally:
        ingest.stop(proc)
    if got != len(files):
        raise ingest.BenchError(f"{name}: Orthanc holds {got}/{len(files)} instances")
    return secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per method (median reported)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    for tool in ("storescu", "Orthanc"):
        if (path := ingest.find_tool(tool)) is None:
            print(f"bench: required tool {tool} not found on PATH", file=sys.stderr)
            return 1
        ingest.TOOLS[tool] = path
    from ith_proxy.dicom.libsetup import configure_libraries

    configure_libraries()  # as the service does at start-up
    root = Path(tempfile.mkdtemp(prefix="ith-bench-forward-"))
    names = list(METHODS)
    secs: dict[str, list[float]] = {n: [] for n in names}
    try:
        data = root / "data"
        nbytes = ingest.make_dataset(data, COUNT, SIZE)
        files = sorted(data.iterdir())
        print(f"200-slice 512x512 CT: {COUNT} instances, {nbytes / 1e6:.1f} MB", flush=True)
        for run in range(1, args.runs + 1):
            shift = (run - 1) % len(names)  # rotate the order: no method always goes first
            for name in names[shift:] + names[:shift]:
                work = root / f"run{run}-{name.replace(' ', '-')}"
                work.mkdir()
                s = run_one(name, work, files, data)
                secs[name].append(s)
                print(f"  run {run}/{args.runs}  {name:20s} {s:7.2f} s", flush=True)
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
    except ingest.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"temp dir kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    agg = f"median of {args.runs} runs" if args.runs > 1 else "1 run"
    rate = {n: statistics.median(nbytes / 1e6 / s for s in v) for n, v in secs.items()}
    print(f"\nRESULTS ({agg}; each method to its own fresh Orthanc; MB = 10^6 bytes)")
    print(f"{'method':20s} {'seconds':>8s} {'MB/s':>8s} {'/ storescu':>11s}")
    for name in names:
        print(
            f"{name:20s} {statistics.median(secs[name]):8.2f} {rate[name]:8.1f} "
            f"{rate[name] / rate['storescu']:10.2f}x"
        )
    verdicts = []
    for name in ("proxy C-STORE", "proxy STOW-RS"):
        ratio = rate[name] / rate["storescu"]
        verdicts.append(verdict := "PASS" if ratio >= TARGET else "FAIL")
        print(f"target {name} >= {TARGET}x storescu MB/s: {verdict} ({ratio:.2f}x)")
    return 0 if verdicts == ["PASS", "PASS"] else 1


if __name__ == "__main__":
    sys.exit(main())
