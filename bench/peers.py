"""The receivers of the benches and the DCMTK client: start, wait, send, stop.

The proxy (``python -m ith_proxy.cli run`` on embedded defaults in a temp
dir), DCMTK ``storescp`` and Orthanc, each on free ports of 127.0.0.1, and
``storescu`` sending one directory per association (several at once for the
parallel mode).  ``bench/ingest.py`` re-exports these names for the other
benches.  Stdlib only.  See bench/README.md.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROXY_AET, E2E_TIMEOUT, START_TIMEOUT = "DICOMRCV", 600.0, 60.0
TOOLS: dict[str, str] = {}  # name -> absolute path of the DCMTK / Orthanc binary
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


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
    return send_parallel(aet, port, [data])


def send_parallel(aet: str, port: int, shares: list[Path]) -> float:
    """One ``storescu`` per directory of ``shares``, all started together,
    each sending its directory in one association; seconds until the last
    one has returned.  Any failure of any of them raises BenchError."""
    cmd = [TOOLS["storescu"], "-aec", aet, "127.0.0.1", str(port), "+sd"]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*cmd, str(d)],
            env=base_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for d in shares
    ]
    outs = [p.communicate()[0] for p in procs]  # storescu says little without -v
    elapsed = time.perf_counter() - t0
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0 or "E:" in out or "Failed" in out:
            raise BenchError(
                f"storescu to {aet}:{port} failed (rc {p.returncode}): "
                + " | ".join(out.strip().splitlines()[-3:])
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


def incoming_count(spool: Path) -> int:
    """Files waiting in the proxy's ``incoming/`` (acknowledged, not yet indexed)."""
    try:
        with os.scandir(spool / "incoming") as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


def wait_indexed(spool: Path, n: int, t0: float, poll: float = 0.02) -> float:
    """Wait until ``incoming/`` is empty and ``n`` instances are in the
    catalog; seconds since ``t0`` (a ``perf_counter`` value)."""
    db, quarantine = spool / "catalog.sqlite3", spool / "quarantine"
    while True:
        if incoming_count(spool) == 0:
            got = catalog_count(db)
            if got >= n:
                return time.perf_counter() - t0
            if any(f for _, _, fs in os.walk(quarantine) for f in fs):
                raise BenchError(f"proxy quarantined input ({got}/{n} cataloged); see {spool}")
        if time.perf_counter() - t0 > E2E_TIMEOUT:
            raise BenchError(
                f"proxy: only {catalog_count(db)}/{n} instances cataloged after {E2E_TIMEOUT:.0f} s"
            )
        time.sleep(poll)


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


def launch_proxy(work: Path, cmd: list[str] | None = None) -> tuple[subprocess.Popen, int]:
    """``start_proxy`` on free ports: (process, DICOM port)."""
    dicom_port, api_port = free_port(), free_port()
    return start_proxy(work, proxy_env(work, dicom_port, api_port), api_port, cmd), dicom_port


def start_storescp(work: Path, fork: bool = False) -> tuple[subprocess.Popen, int, Path]:
    """``storescp +xa -od OUT PORT`` (with ``--fork``, one child process per
    association), ready when it returns: (process, port, output dir)."""
    out, port, log = work / "out", free_port(), work / "storescp.log"
    out.mkdir()
    cmd = [TOOLS["storescp"], *(["--fork"] if fork else []), "+xa", "-od", str(out), str(port)]
    proc = start(cmd, log, work, base_env())
    try:
        wait_ready(proc, log, "storescp", lambda: echo_ok("STORESCP", port))
    except BaseException:
        stop(proc)
        raise
    return proc, port, out


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


def orthanc_count(base: str) -> int:
    with urllib.request.urlopen(f"{base}/statistics", timeout=10) as r:
        return json.loads(r.read())["CountInstances"]


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (parents before children)."""
    out = [pid]
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    for kid in kids.split():
        out.extend(tree_pids(int(kid)))
    return out


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) seconds of all the threads of ``pid`` and of its reaped
    children (cutime, cstime: a helper indexer that exited is in its zygote's);
    zeros once it is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    user, system, c_user, c_system = (int(f) for f in fields[11:15])  # stat fields 14-17
    return (user + c_user) / tick, (system + c_system) / tick


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (all threads) of the live ``pids``, in seconds."""
    return sum(sum(cpu_times(pid)) for pid in pids)


class MachineMeter:
    """The whole machine's CPU over an interval, from ``/proc/stat``'s first
    line, and the CPU of this process's reaped children (the storescu
    senders; a receiver started by the bench is reaped only after it):
    ``stop()`` -> (cores busy on average, senders' CPU seconds)."""

    def __init__(self) -> None:
        self._stat0, self._kids0 = self._stat(), self._kids()

    @staticmethod
    def _stat() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    @staticmethod
    def _kids() -> float:
        use = resource.getrusage(resource.RUSAGE_CHILDREN)
        return use.ru_utime + use.ru_stime

    def stop(self) -> tuple[float, float]:
        (all1, idle1), (all0, idle0) = self._stat(), self._stat0
        busy = 1 - (idle1 - idle0) / max(all1 - all0, 1)
        return busy * (os.cpu_count() or 1), self._kids() - self._kids0
