"""Ingest benchmark: DCMTK storescu -> ith-proxy vs. DCMTK storescp vs. Orthanc.

Sends the same synthetic data sets with one storescu association to each peer
in turn and prints instances/s and MB/s (MB = 10^6 bytes).  For the proxy it
reports the acknowledgement rate (storescu returned) and the end-to-end rate
(incoming/ empty and every instance anonymized and in the catalog).
See bench/README.md.  Stdlib + pydicom only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DATASETS = {
    "large": (200, 512, "200-slice 512x512 16-bit CT"),
    "small": (1000, 64, "1000 small 64x64 CT instances"),
}
PROXY_AET, E2E_TIMEOUT, START_TIMEOUT = "DICOMRCV", 600.0, 60.0
TOOLS: dict[str, str] = {}  # name -> absolute path of the DCMTK / Orthanc binary


class BenchError(Exception):
    pass


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # DCMTK 3.6.7 on loopback is ~30x slower without it
    return env


def find_tool(name: str) -> str | None:
    """First ``name`` on PATH (+ /usr/bin, /usr/sbin) that is the real thing: pynetdicom
    installs look-alike storescu/storescp/echoscu scripts into venvs."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/sbin"]
    for d in dict.fromkeys(filter(None, dirs)):
        path = shutil.which(name, path=d)
        if path is None:
            continue
        if name == "Orthanc":
            return path
        r = subprocess.run([path, "--version"], capture_output=True, text=True)
        if "dcmtk" in (r.stdout + r.stderr).lower():
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- data -------------------------------------------------------------------


def make_dataset(out: Path, count: int, size: int) -> int:
    """Write ``count`` CT slices of size x size into ``out``; return total bytes."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out.mkdir(parents=True)
    pixels = bytearray(os.urandom(size * size * 2))
    pixels[1::2] = bytes(b & 0x0F for b in pixels[1::2])  # 12 bits stored
    study, frame = generate_uid(), generate_uid()
    per_series = 200 if count <= 200 else 100
    series = [generate_uid() for _ in range((count + per_series - 1) // per_series)]
    for i in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.ContentTime = f"1016{i % 60:02d}"
        ds.AccessionNumber, ds.Modality = "ACC20240115001", "CT"
        ds.Manufacturer, ds.InstitutionName = "BenchCo", "Bench General Hospital"
        ds.ReferringPhysicianName = "Doe^Referrer"
        ds.StudyDescription, ds.SeriesDescription = "CT CHEST", f"AXIAL {size}"
        ds.PatientName, ds.PatientID = "Bench^Patient^Q", "BENCH000123"
        ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19600302", "F", "063Y"
        ds.BodyPartExamined, ds.SliceThickness, ds.KVP = "CHEST", "1.25", "120"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series[i // per_series]
        ds.StudyID, ds.SeriesNumber = "1", i // per_series + 1
        ds.InstanceNumber = i % per_series + 1
        z = -100.0 - 1.25 * (i % per_series)
        ds.ImagePositionPatient = [-175.0, -175.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.SliceLocation = z
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [350.0 / size, 350.0 / size]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        pixels[0:4] = i.to_bytes(4, "little")  # varying prefix, same buffer
        ds.PixelData = bytes(pixels)
        ds.save_as(out / f"ct{i:05d}.dcm", enforce_file_format=True)
    return sum(p.stat().st_size for p in out.iterdir())


# --- processes ---------------------------------------------------------------


def start(cmd: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    try:
        with open(log, "wb") as fh:
            return subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
            )
    except OSError as exc:
        raise BenchError(f"cannot start {cmd[0]}: {exc}") from None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(proc: subprocess.Popen, log: Path, name: str, probe) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise BenchError(f"{name} exited with code {proc.returncode}: " + " | ".join(tail))
        if probe():
            return
        time.sleep(0.1)
    raise BenchError(f"{name} not ready after {START_TIMEOUT:.0f} s (log: {log})")


def http_ok(url: str, want=None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200 and (want is None or want(json.loads(r.read())))
    except (OSError, ValueError):
        return False


def echo_ok(aet: str, port: int) -> bool:
    return (
        subprocess.run(
            [TOOLS["echoscu"], "-aec", aet, "127.0.0.1", str(port)],
            env=base_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).returncode
        == 0
    )


def storescu(aet: str, port: int, data: Path) -> float:
    """Send every file of ``data`` in one association; return elapsed seconds."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [TOOLS["storescu"], "-aec", aet, "127.0.0.1", str(port), "+sd", str(data)],
        env=base_env(),
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t0
    if r.returncode != 0 or "E:" in r.stderr or "Failed" in r.stderr:
        raise BenchError(
            f"storescu to {aet}:{port} failed (rc {r.returncode}): "
            + " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        )
    return elapsed


def catalog_count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM instances").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0  # not created/migrated yet, or busy: try again next poll


def proxy_env(work: Path, dicom_port: int, api_port: int) -> dict[str, str]:
    """The proxy's environment for a bench: no DICOM_/ITH_/API_/JWT_/VAULT_
    setting from the caller, loopback ports, the spool and keys under ``work``."""
    env = base_env()
    for key in [k for k in env if k.startswith(("DICOM_", "ITH_", "API_", "JWT_", "VAULT_"))]:
        del env[key]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(
        DICOM_PORT=str(dicom_port),
        API_PORT=str(api_port),
        DICOM_BIND_ADDRESS="127.0.0.1",
        API_BIND_ADDRESS="127.0.0.1",
        DICOM_STORAGE_DIR=str(work / "spool"),
        VAULT_KEY_FILE=str(work / "secrets" / "vault.key"),
        DICOM_STUDY_TIMEOUT="600",
    )
    return env


def start_proxy(
    work: Path, env: dict[str, str], api_port: int, cmd: list[str] | None = None
) -> subprocess.Popen:
    """The proxy (``cmd``, default ``python -m ith_proxy.cli run``) with its
    log in ``work/proxy.log`` and ``cwd=work`` (so no conf/proxy.ini or .env is
    picked up), once its health API says ok; stopped again if it never does.
    The DICOM port is never probed: readiness comes from the health API only."""
    log = work / "proxy.log"
    proc = start(cmd or [sys.executable, "-m", "ith_proxy.cli", "run"], log, work, env)
    try:
        wait_ready(
            proc,
            log,
            "proxy",
            lambda: http_ok(
                f"http://127.0.0.1:{api_port}/api/health/", lambda b: b.get("status") == "ok"
            ),
        )
    except BaseException:
        stop(proc)
        raise
    return proc


def run_proxy(work: Path, data: Path, n: int, proxy_cmd: list[str]) -> dict[str, float]:
    spool, dicom_port, api_port = work / "spool", free_port(), free_port()
    proc = start_proxy(work, proxy_env(work, dicom_port, api_port), api_port, proxy_cmd)
    try:
        t0 = time.perf_counter()
        ack = storescu(PROXY_AET, dicom_port, data)
        incoming, db, quarantine = (
            spool / "incoming",
            spool / "catalog.sqlite3",
            spool / "quarantine",
        )
        while True:
            with os.scandir(incoming) as it:
                pending = any(it)
            if not pending:
                got = catalog_count(db)
                if got == n:
                    break
                if any(f for _, _, fs in os.walk(quarantine) for f in fs):
                    raise BenchError(f"proxy quarantined input ({got}/{n} cataloged); see {spool}")
            if time.perf_counter() - t0 > E2E_TIMEOUT:
                raise BenchError(
                    f"proxy: only {catalog_count(db)}/{n} instances cataloged "
                    f"after {E2E_TIMEOUT:.0f} s"
                )
            time.sleep(0.02)
        return {"proxy ack": ack, "proxy e2e": time.perf_counter() - t0}
    finally:
        stop(proc)


def run_storescp(work: Path, data: Path, n: int) -> dict[str, float]:
    out, port, log = work / "out", free_port(), work / "storescp.log"
    out.mkdir()
    proc = start([TOOLS["storescp"], "+xa", "-od", str(out), str(port)], log, work, base_env())
    try:
        wait_ready(proc, log, "storescp", lambda: echo_ok("STORESCP", port))
        secs = storescu("STORESCP", port, data)
    finally:
        stop(proc)
    if (got := len(os.listdir(out))) != n:
        raise BenchError(f"storescp stored {got}/{n} files")
    return {"storescp": secs}


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def start_orthanc(work: Path, dicomweb: bool = False) -> tuple[subprocess.Popen, int, str]:
    """Orthanc on free ports with a fresh SQLite index, no compression, and no
    plugin but DICOMweb when asked (STOW-RS at BASE/dicom-web/studies); ready
    when it returns: (process, DICOM port, HTTP base URL)."""
    dicom_port, http_port, log = free_port(), free_port(), work / "orthanc.log"
    cfg = {
        "Name": "bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
        "StorageCompression": False,
        "OverwriteInstances": True,
    }
    (work / "orthanc.json").write_text(json.dumps(cfg, indent=2))
    proc = start([TOOLS["Orthanc"], str(work / "orthanc.json")], log, work, base_env())
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(proc, log, "Orthanc", lambda: http_ok(f"{base}/system"))
    except BaseException:
        stop(proc)
        raise
    return proc, dicom_port, base


def run_orthanc(work: Path, data: Path, n: int) -> dict[str, float]:
    proc, dicom_port, base = start_orthanc(work)
    try:
        secs = storescu("ORTHANC", dicom_port, data)
        with urllib.request.urlopen(f"{base}/statistics", timeout=10) as r:
            got = json.loads(r.read())["CountInstances"]
    finally:
        stop(proc)
    if got != n:
        raise BenchError(f"Orthanc stored {got}/{n} instances")
    return {"Orthanc": secs}


# --- report ------------------------------------------------------------------

FIGURES = ["proxy ack", "proxy e2e", "storescp", "Orthanc"]


def fmt_rate(secs: float, n: int, nbytes: int) -> str:
    return f"{secs:8.2f} s {n / secs:9.1f} inst/s {nbytes / 1e6 / secs:8.1f} MB/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="runs per data set (median reported)")
    ap.add_argument("--only", choices=list(DATASETS), help="run one data set only")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs")
    ap.add_argument("--proxy-cmd", help="proxy command line (default: python -m ith_proxy.cli run)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    proxy_cmd = (
        shlex.split(args.proxy_cmd)
        if args.proxy_cmd
        else [sys.executable, "-m", "ith_proxy.cli", "run"]
    )
    if shutil.which(proxy_cmd[0]) is None:
        print(f"bench: proxy command '{proxy_cmd[0]}' not found", file=sys.stderr)
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
    root = Path(tempfile.mkdtemp(prefix="ith-bench-"))
    results: dict[str, dict[str, list[float]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    try:
        for name in [args.only] if args.only else list(DATASETS):
            count, px, label = DATASETS[name]
            t = time.perf_counter()
            nbytes = make_dataset(root / "data" / name, count, px)
            sizes[name] = (count, nbytes)
            print(
                f"[{name}] {label}: {count} instances, {nbytes / 1e6:.1f} MB "
                f"(generated in {time.perf_counter() - t:.1f} s)",
                flush=True,
            )
            results[name] = {f: [] for f in FIGURES}
            for run in range(1, args.runs + 1):
                for peer, fn in (
                    ("proxy", lambda w, d, n: run_proxy(w, d, n, proxy_cmd)),
                    ("storescp", run_storescp),
                    ("orthanc", run_orthanc),
                ):
                    work = root / f"{name}-run{run}-{peer}"
                    work.mkdir()
                    for fig, secs in fn(work, root / "data" / name, count).items():
                        results[name][fig].append(secs)
                        print(
                            f"  run {run}/{args.runs}  {fig:10s}{fmt_rate(secs, count, nbytes)}",
                            flush=True,
                        )
                    if not args.keep:
                        shutil.rmtree(work, ignore_errors=True)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    agg = f"median of {args.runs} runs" if args.runs > 1 else "1 run"
    rate = {
        (d, f): statistics.median(sizes[d][0] / s for s in v)
        for d, figs in results.items()
        for f, v in figs.items()
    }
    print(f"\nRESULTS ({agg}; storescu, one association, TCP_NODELAY=1; MB = 10^6 bytes)")
    print(f"{'data set':9s} {'receiver':12s} {'seconds':>9s} {'inst/s':>9s} {'MB/s':>8s}")
    for (d, f), r in rate.items():
        n, nbytes = sizes[d]
        print(f"{d:9s} {f:12s} {n / r:9.2f} {r:9.1f} {r * nbytes / n / 1e6:8.1f}")
    print("\nRATIOS (proxy throughput / peer throughput; 1.00x = as fast as the peer)")
    print(f"{'data set':9s} {'proxy figure':12s} {'/ Orthanc':>10s} {'/ storescp':>11s}")
    for d in results:
        for f in ("proxy e2e", "proxy ack"):
            print(
                f"{d:9s} {f:12s} {rate[d, f] / rate[d, 'Orthanc']:9.2f}x "
                f"{rate[d, f] / rate[d, 'storescp']:10.2f}x"
            )
    if "large" in results:
        ratio = rate["large", "proxy e2e"] / rate["large", "Orthanc"]
        print(
            f"\ntarget large-CT e2e >= 0.8x Orthanc: {'PASS' if ratio >= 0.8 else 'FAIL'} "
            f"({ratio:.2f}x)"
        )
    else:
        print("\ntarget large-CT e2e >= 0.8x Orthanc: NOT RUN (--only small)")
    if args.keep:
        print(f"temp dirs kept in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
