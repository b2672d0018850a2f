"""Helpers shared by the test-suite: external tools, ports, HTTP, the proxy
process, DCMTK clients and a parser for ``storescu -v`` output.

No test functions live here. Import it from a test module as ``import tools``
(pytest puts ``tests/`` on ``sys.path``).

Conventions (DESIGN.md section 6):

* real processes and sockets on 127.0.0.1 only;
* a missing external tool skips the test, but fails it under ``CI=true``;
* DCMTK peers run with ``TCP_NODELAY=1`` (Debian's DCMTK 3.6.7 is ~30x slower
  on loopback without it).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Debian package that ships each external tool the tests use.
TOOL_PACKAGES: dict[str, str] = {
    "echoscu": "dcmtk",
    "storescu": "dcmtk",
    "findscu": "dcmtk",
    "getscu": "dcmtk",
    "movescu": "dcmtk",
    "storescp": "dcmtk",
    "dcmdump": "dcmtk",
    "dcmdrle": "dcmtk",
    "Orthanc": "orthanc",
    "dciodvfy": "dicom3tools",
    "ss": "iproute2",
}

#: Environment prefixes that configure the proxy; never inherited by ProxyProcess.
PROXY_ENV_PREFIXES = ("DICOM_", "ITH_", "API_", "JWT_", "VAULT_")


# --------------------------------------------------------------------------
# tools, ports, environment
# --------------------------------------------------------------------------


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Absolute path of an external executable.

    Missing: ``pytest.fail`` under ``CI=true`` (CI must never silently skip),
    ``pytest.skip`` otherwise. The message names the Debian package.
    """
    # Orthanc lives in /usr/sbin, which is not on every user's PATH.
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search)
    if path:
        return os.path.abspath(path)
    package = TOOL_PACKAGES.get(name, "?")
    msg = (
        f"required tool {name!r} not found (Debian package {package!r}; "
        f"`bin/test` installs it, or: apt-get install -y {package})"
    )
    if in_ci():
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


_handed_out_ports: set[int] = set()


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without the proxy's own variables, the repository on
    PYTHONPATH (and tests/, for helpers a child imports), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PROXY_ENV_PREFIXES)}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + str(REPO_ROOT / "tests")
    env.update(extra or {})
    return env


def run_cli(
    args: Sequence[str],
    cwd: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``python -m ith_proxy.cli ARGS`` in ``cwd``, in a clean environment plus ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "ith_proxy.cli", *args],
        cwd=cwd,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_python(
    code: str, cwd: str | os.PathLike[str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -c CODE`` (dedented) in ``cwd``, in a clean environment."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _port_share() -> tuple[int, int]:
    """(this pytest-xdist worker's index, number of workers); (0, 1) without xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 1:
        return int(worker[2:]), int(count)
    return 0, 1


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1, not handed out before by this
    process (so two calls in a row never return the same port).

    Under pytest-xdist each worker takes only its own share of the ports
    (``(port >> 1) % workers == index``; the kernel hands out odd ports for
    bind(0)), so two workers never hand out the same port between the probe
    and the real bind."""
    index, workers = _port_share()
    for _ in range(100 * workers):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if (port >> 1) % workers == index and port not in _handed_out_ports:
            _handed_out_ports.add(port)
            return port
    raise RuntimeError("could not find a free port")


def dcmtk_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``os.environ`` with ``TCP_NODELAY=1`` (and ``extra``)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def run_tool(
    args: Sequence[str | os.PathLike[str]],
    timeout: float = 120,
    *,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run an external tool with captured text output and ``dcmtk_env()``.

    A bare program name is resolved with :func:`require_tool` first. Never
    raises on a non-zero exit; check ``returncode`` yourself.
    """
    argv = [os.fspath(a) for a in args]
    if os.sep not in argv[0]:
        argv[0] = require_tool(argv[0])
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        errors="replace",
        env=dcmtk_env(),
        timeout=timeout,
        cwd=cwd,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        check=False,
    )


def port_listening(port: int) -> bool:
    """Is some socket LISTENing on ``port``? Reads /proc/net/tcp{,6} so that
    the listener sees no connection at all (a bare connect would make a DICOM
    SCP log an aborted association). Falls back to a connect elsewhere."""
    found_proc = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)  # header
                found_proc = True
                for line in f:
                    fields = line.split()
                    # fields[1] = "ADDR:PORT" (hex), fields[3] = state, 0A = LISTEN
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if found_proc:
        return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on ``port``; ``TimeoutError`` otherwise."""
    deadline = time.monotonic() + timeout
    while not port_listening(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------


def http_json(
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """One HTTP request. Returns ``(status, data)``; ``data`` is the parsed
    JSON body, or the text when it is not JSON (``None`` when empty).
    HTTP error statuses are returned, not raised; connection errors raise."""
    data = None
    hdrs = {"Accept": "application/json"}
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method.upper(), headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    if not raw:
        return status, None
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait_http(url: str, timeout: float = 30.0, statuses: Iterable[int] = (200, 503)) -> int:
    """Poll ``url`` until it answers with one of ``statuses`` (default 200 or
    503); return that status. ``TimeoutError`` on timeout."""
    wanted = set(statuses)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, _ = http_json("GET", url, timeout=2)
            if status in wanted:
                return status
            last = f"HTTP {status}"
        except (OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(
        f"{url} did not answer {sorted(wanted)} within {timeout:.0f}s (last: {last})"
    )


# --------------------------------------------------------------------------
# the proxy as a process
# --------------------------------------------------------------------------


class ProxyStartError(RuntimeError):
    """The proxy exited, or did not become ready, during start()."""


def _tail(path: Path, offset: int = 0, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_live_processes: weakref.WeakSet[ProxyProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    # A test that crashed without stop() must not leave a proxy running after pytest.
    for proc in list(_live_processes):
        try:
            proc.kill9()
        except Exception:
            pass


class ProxyProcess:
    """``python -m ith_proxy.cli run`` as a subprocess in its own work dir.

    The environment is ``os.environ`` minus every ``DICOM_*``, ``ITH_*``,
    ``API_*``, ``JWT_*`` and ``VAULT_*`` variable, plus::

        PYTHONPATH=<repo>  PYTHONUNBUFFERED=1
        DICOM_PORT, API_PORT            free ports (kept across restarts)
        DICOM_BIND_ADDRESS=127.0.0.1    API_BIND_ADDRESS=127.0.0.1
        DICOM_STORAGE_DIR=<workdir>/spool
        VAULT_KEY_FILE=<workdir>/secrets/vault.key   (not created here)
        ITH_PROXY_CONFIG=<workdir>/proxy.ini         (empty, or config_text)

    and then ``env`` from the caller (which wins). ``self.env`` may be changed
    between ``stop()`` and ``start()``. stdout/stderr go to
    ``<workdir>/proxy.stdout.log`` and ``<workdir>/proxy.stderr.log``
    (appended across restarts).

    Use as a context manager (starts on enter unless already running, stops on
    exit) or call start()/stop() yourself.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        config_text: str | None = None,
        config_path: str | os.PathLike[str] | None = None,
        dicom_port: int | None = None,
        api_port: int | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self._workdir = Path(workdir).resolve()
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._dicom_port = dicom_port or free_port()
        self._api_port = api_port or free_port()
        if config_path is not None:
            self.config_path = Path(config_path).resolve()
        else:
            self.config_path = self._workdir / "proxy.ini"
            if config_text is not None or not self.config_path.exists():
                self.config_path.write_text(config_text or "")
        self.command: list[str] = list(command or [sys.executable, "-m", "ith_proxy.cli", "run"])
        self.env: dict[str, str] = self._base_env()
        self.env.update(env or {})
        self.stdout_path = self._workdir / "proxy.stdout.log"
        self.stderr_path = self._workdir / "proxy.stderr.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []
        self._stderr_offset = 0
        self._stdout_offset = 0

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(PROXY_ENV_PREFIXES)}
        pythonpath = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pythonpath if pythonpath else "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(
            DICOM_PORT=str(self._dicom_port),
            API_PORT=str(self._api_port),
            DICOM_BIND_ADDRESS="127.0.0.1",
            API_BIND_ADDRESS="127.0.0.1",
            DICOM_STORAGE_DIR=str(self._workdir / "spool"),
            VAULT_KEY_FILE=str(self._workdir / "secrets" / "vault.key"),
            ITH_PROXY_CONFIG=str(self.config_path),
        )
        return env

    # -- properties ---------------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def spool(self) -> Path:
        return Path(self.env["DICOM_STORAGE_DIR"])

    @property
    def dicom_port(self) -> int:
        return self._dicom_port

    @property
    def api_port(self) -> int:
        return self._api_port

    @property
    def api_url(self) -> str:
        """Base URL without trailing slash, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._api_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    # -- lifecycle ----------------------------------------------------------

    def start(
        self, wait: bool = True, timeout: float = 30.0, wait_dicom: bool | None = None
    ) -> ProxyProcess:
        """Start the process. With ``wait``: until ``GET /api/health/`` answers
        at all (any HTTP status), and, unless ``wait_dicom`` is False (default:
        True unless ``DICOM_AUTO_START`` is false), until the DICOM port is
        listening. Raises :class:`ProxyStartError` with the stderr tail when
        the process exits or is not ready in ``timeout`` seconds (it is
        killed then)."""
        if self.running:
            raise RuntimeError("proxy already running")
        self._close_files()
        out = open(self.stdout_path, "ab")  # noqa: SIM115  # open while it runs: _close_files
        err = open(self.stderr_path, "ab")  # noqa: SIM115  # open while it runs: _close_files
        self._files = [out, err]
        self._stdout_offset, self._stderr_offset = out.tell(), err.tell()
        self._proc = subprocess.Popen(
            self.command,
            cwd=self._workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # our SIGTERM goes to the proxy only, not to pytest's group
        )
        _live_processes.add(self)
        if wait:
            if wait_dicom is None:
                wait_dicom = self.env.get("DICOM_AUTO_START", "true").strip().lower() not in (
                    "0",
                    "false",
                    "no",
                    "off",
                )
            self.wait_ready(timeout, wait_dicom=wait_dicom)
        return self

    def wait_ready(self, timeout: float = 30.0, wait_dicom: bool = True) -> None:
        deadline = time.monotonic() + timeout
        api_up = False
        while True:
            assert self._proc is not None
            rc = self._proc.poll()
            if rc is not None:
                raise ProxyStartError(
                    f"proxy exited with code {rc} during start\n{self._start_tail()}"
                )
            if not api_up:
                try:
                    http_json("GET", self.api_url + "/api/health/", timeout=1)
                    api_up = True
                except (OSError, urllib.error.URLError):
                    pass
            if api_up and (not wait_dicom or port_listening(self._dicom_port)):
                return
            if time.monotonic() > deadline:
                what = "API" if not api_up else f"DICOM port {self._dicom_port}"
                self.kill9()
                raise ProxyStartError(
                    f"proxy {what} not ready after {timeout:.0f}s (killed)\n{self._start_tail()}"
                )
            time.sleep(0.05)

    def _start_tail(self) -> str:
        for f in self._files:
            f.flush()
        err = _tail(self.stderr_path, self._stderr_offset)
        out = _tail(self.stdout_path, self._stdout_offset)
        return f"--- stderr (tail) ---\n{err}\n--- stdout (tail) ---\n{out}"

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``python -m ith_proxy.cli ARGS`` against this proxy's work dir and environment."""
        return subprocess.run(
            [sys.executable, "-m", "ith_proxy.cli", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._kill_group()  # children the proxy failed to reap must not outlive it
        self._close_files()
        _live_processes.discard(self)
        return self._proc.returncode

    def kill9(self) -> int | None:
        """SIGKILL to the proxy and every process it started (a crash of the
        whole service: no cleanup at all). Returns the main exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._kill_group()
            self._proc.kill()
            self._proc.wait()
        self._kill_group()
        self._close_files()
        _live_processes.discard(self)
        return self._proc.returncode

    def _kill_group(self) -> None:
        # start_new_session=True made the proxy the leader of its own process group.
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def send_signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def restart(self, wait: bool = True, timeout: float = 30.0) -> ProxyProcess:
        """stop() then start() with the same ports, config and ``self.env``."""
        self.stop()
        return self.start(wait=wait, timeout=timeout)

    def _close_files(self) -> None:
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass
        self._files = []

    def __enter__(self) -> ProxyProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- talking to it ------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """HTTP request to the proxy's API; ``path`` starts with ``/``."""
        return http_json(method, self.api_url + path, body, token=token, timeout=timeout)

    def health(self) -> tuple[int, Any]:
        """``(status_code, parsed JSON)`` of ``GET /api/health/``."""
        return self.api("GET", "/api/health/")

    def stderr_text(self) -> str:
        """Everything the process wrote to stderr so far (all runs)."""
        for f in self._files:
            f.flush()
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stdout_text(self) -> str:
        for f in self._files:
            f.flush()
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def __repr__(self) -> str:
        return (
            f"<ProxyProcess pid={self.pid} dicom={self._dicom_port} "
            f"api={self._api_port} workdir={self._workdir}>"
        )


def refused_start(workdir: str | os.PathLike[str], **kwargs: Any) -> str:
    """Start a proxy that must refuse to start: exit 1 with one stderr line
    and no traceback.  Returns that line."""
    proxy = ProxyProcess(workdir, **kwargs)
    try:
        try:
            proxy.start(timeout=60)
        except ProxyStartError:
            pass
        else:
            raise AssertionError("the proxy started; it should have refused")
    finally:
        proxy.stop()
    assert proxy.returncode == 1, proxy.returncode
    err = proxy.stderr_text().strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------
# DCMTK clients
# --------------------------------------------------------------------------


def _as_paths(files_or_dir: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    if isinstance(files_or_dir, (str, os.PathLike)):
        items: Iterable[str | os.PathLike[str]] = [files_or_dir]
    else:
        items = files_or_dir
    # absolute, so that the "Sending file:" lines name absolute paths
    return [os.path.abspath(os.fspath(p)) for p in items]


def storescu(
    port: int,
    files_or_dir: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    aet: str = "STORESCU",
    aec: str = "DICOMRCV",
    extra: Sequence[str] = (),
    timeout: float = 600,
    *,
    host: str = "127.0.0.1",
) -> subprocess.CompletedProcess[str]:
    """DCMTK ``storescu -v`` (one association; directories are scanned
    recursively with ``+sd +r``). Proposes DCMTK's default uncompressed
    transfer syntaxes plus each file's own. Note storescu halts at the first
    unsuccessful store unless ``extra`` has ``-nh``. Parse the result with
    :func:`parse_storescu` / :func:`acked_files` / :func:`acked_sop_uids`."""
    paths = _as_paths(files_or_dir)
    args: list[str] = [require_tool("storescu"), "-v", "-aet", aet, "-aec", aec]
    if any(os.path.isdir(p) for p in paths):
        args += ["+sd", "+r"]
    args += [*extra, host, str(port), *paths]
    return run_tool(args, timeout=timeout)


def echoscu(
    port: int,
    aec: str = "DICOMRCV",
    aet: str = "ECHOSCU",
    *,
    host: str = "127.0.0.1",
    extra: Sequence[str] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """DCMTK ``echoscu -v``; ``returncode == 0`` means the C-ECHO succeeded."""
    return run_tool(
        [require_tool("echoscu"), "-v", "-aet", aet, "-aec", aec, *extra, host, str(port)],
        timeout=timeout,
    )


@dataclass(frozen=True)
class StoreResult:
    """One file from a ``storescu -v`` run.

    ``status`` is the text DCMTK printed inside ``Received Store Response
    (...)``, e.g. ``"Success"``, ``"Warning: CoercionOfDataElements"``,
    ``"Refused: OutOfResources"``, ``"Error: CannotUnderstand"``; or ``None``
    when no response came (``error`` then says why, e.g. "No presentation
    context" or "Peer aborted Association").
    """

    path: str
    status: str | None
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.status == "Success"

    @property
    def warning(self) -> bool:
        return self.status is not None and self.status.startswith("Warning")


# DCMTK 3.6.7 `storescu -v` (stderr), per file:
#   I: Sending file: /abs/path/x.dcm
#   I: Converting transfer syntax: Little Endian Explicit -> Little Endian Explicit
#   I: Sending Store Request (MsgID 1, CT)
#   I: Received Store Response (Success)          | (Warning: ...) | (Refused: ...) | (Error: ...)
# or instead of a response:
#   E: No presentation context for: (RP) 1.2.840.10008.5.1.4.1.1.481.5
#   E: Store Failed, file: /abs/path/x.dcm:
#   E: 0006:0317 Peer aborted Association (or never connected)
# Not anchored at line start: stdout's "XMIT: ." progress dots may share a line
# when both streams are merged.
_RE_SENDING = re.compile(r"I: Sending file: (.+?)\s*$")
_RE_RESPONSE = re.compile(r"I: Received Store Response \((.*)\)\s*$")
_RE_ERROR = re.compile(r"E: (.+?)\s*$")


def parse_storescu(output: str | subprocess.CompletedProcess[str]) -> list[StoreResult]:
    """Every file storescu started to send, in order, with its outcome.
    Accepts the text (stderr, or stdout+stderr) or the CompletedProcess."""
    if isinstance(output, subprocess.CompletedProcess):
        output = (output.stderr or "") + "\n" + (output.stdout or "")
    results: list[StoreResult] = []
    current: str | None = None
    errors: list[str] = []

    def close(status: str | None) -> None:
        nonlocal current, errors
        if current is not None:
            results.append(StoreResult(current, status, "; ".join(errors) or None))
        current, errors = None, []

    for line in output.splitlines():
        if m := _RE_SENDING.search(line):
            close(None)  # the previous file got no response
            current = m.group(1)
        elif m := _RE_RESPONSE.search(line):
            close(m.group(1))
        elif (m := _RE_ERROR.search(line)) and current is not None:
            errors.append(m.group(1))
    close(None)
    return results


def acked_files(
    output: str | subprocess.CompletedProcess[str],
    include_warnings: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Paths (absolute; relative ones resolved against ``cwd``, default the
    current dir) whose store response was Success (or a Warning too, with
    ``include_warnings``)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    return [
        base / r.path if not os.path.isabs(r.path) else Path(r.path)
        for r in parse_storescu(output)
        if r.success or (include_warnings and r.warning)
    ]


def acked_sop_uids(
    output: str | subprocess.CompletedProcess[str],
    include_warnings: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> set[str]:
    """SOPInstanceUIDs of the acked files (read back from the files, since
    ``storescu -v`` does not print UIDs)."""
    from pydicom import dcmread

    return {
        str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for p in acked_files(output, include_warnings, cwd)
    }


# --------------------------------------------------------------------------
# DCMTK storescp as a simple forwarding target
# --------------------------------------------------------------------------


class StoreSCP:
    """DCMTK ``storescp`` on 127.0.0.1 writing into ``out_dir`` (one file per
    received instance, named ``<modality>.<SOPInstanceUID>``). Log goes to
    ``<out_dir>/../storescp-<port>.log``. Context manager."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        port: int | None = None,
        aet: str = "STORESCP",
        extra: Sequence[str] = ("+xa",),  # accept all supported transfer syntaxes
    ) -> None:
        self.out_dir = Path(out_dir).resolve()
        self.port = port or free_port()
        self.aet = aet
        self.extra = list(extra)
        self.log_path = self.out_dir.parent / f"storescp-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> StoreSCP:
        exe = require_tool("storescp")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    exe,
                    "-v",
                    "-aet",
                    self.aet,
                    "-od",
                    str(self.out_dir),
                    *self.extra,
                    str(self.port),
                ],
                env=dcmtk_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not port_listening(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"storescp did not start on port {self.port}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def received(self) -> list[Path]:
        """Files received so far (excluding storescp's temporary files)."""
        if not self.out_dir.exists():
            return []
        return sorted(
            p for p in self.out_dir.iterdir() if p.is_file() and not p.name.endswith(".tmp")
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
