"""Shared pieces of the forwarding end-to-end tests (test_forward_e2e*.py):
a real proxy process forwarding to a real Orthanc.

The INI keeps everything fast but real: a study completes 1 s after its last
instance, the scheduler rewrites study.json every 0.2 s, retries come within
a second and the attempts never run out by themselves. A "slow" Orthanc takes
about 0.1 s per instance (a Lua ReceivedInstanceFilter that sleeps), so a test
can act while a send is in progress, by instance counts and ledger rows, never
by elapsed time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tools
from helpers import read_header, study_summary, wait_until
from orthanc import OrthancProcess

FAST = """
[scheduler]
study_timeout = 1
interval = 0.2
[scu]
connect_timeout = 2
acse_timeout = 5
dimse_timeout = 5
[forward]
destinations = {destinations}
max_attempts = 1000
backoff_base = 0.2
backoff_cap = 0.5
"""

SLOW_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  os.execute("sleep 0.1")
  return true
end
"""


def dicom_node(name: str, port: int, ae_title: str = "ORTHANC") -> str:
    return (
        f"\n[node:{name}]\nkind = dicom\nae_title = {ae_title}\nhost = 127.0.0.1\nport = {port}\n"
    )


def web_node(name: str, url: str) -> str:
    return f"\n[node:{name}]\nkind = dicomweb\nurl = {url}\n"


def config(destinations: str, *nodes: str, forward: str = "", extra: str = "") -> str:
    """The fast INI with ``[forward] destinations`` (and the ``forward`` lines
    of that section), the node sections, then ``extra``."""
    return FAST.format(destinations=destinations) + forward + "".join(nodes) + extra


def slow_orthanc(workdir: Path, dicomweb: bool = False) -> OrthancProcess:
    """An Orthanc that takes ~0.1 s per received instance (not started)."""
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "slow.lua"
    script.write_text(SLOW_LUA)
    return OrthancProcess(workdir, dicomweb=dicomweb, extra={"LuaScripts": [str(script)]})


def make_fast(pacs: OrthancProcess) -> None:
    """Drop the slow Lua filter from the configuration (takes effect at start())."""
    cfg = json.loads(pacs.config_path.read_text())
    cfg.pop("LuaScripts", None)
    pacs.config_path.write_text(json.dumps(cfg, indent=2))


def crash(pacs: OrthancProcess) -> None:
    """SIGKILL Orthanc: a PACS that dies mid-association (SIGTERM would let it
    finish the association first). Data and ports stay for start()."""
    assert pacs.proc is not None and pacs.proc.poll() is None, "Orthanc is not running"
    discard(pacs)


def discard(pacs: OrthancProcess) -> None:
    """SIGKILL Orthanc if it runs. The end of a test: a clean stop takes 3.5 s
    (its HTTP server polls every 2 s, its DICOM server every 1 s), and nothing
    of that Orthanc is used afterwards."""
    proc, pacs.proc = pacs.proc, None
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(20)


@contextmanager
def running(pacs: OrthancProcess) -> Iterator[OrthancProcess]:
    """Orthanc started, and discarded at the end."""
    try:
        yield pacs.start()
    finally:
        discard(pacs)


def proxy_sops(proxy: tools.ProxyProcess, study: str) -> set[str]:
    """SOP Instance UIDs of the study's instance files in the proxy's spool."""
    return {
        str(read_header(p).SOPInstanceUID)
        for p in (proxy.spool / "studies" / study).glob("*/*.dcm")
    }


def study_files(proxy: tools.ProxyProcess, study: str) -> list[Path]:
    return sorted((proxy.spool / "studies" / study).glob("*/*.dcm"))


def studies(proxy: tools.ProxyProcess) -> set[str]:
    """Study folders that have a study.json."""
    return {p.parent.name for p in (proxy.spool / "studies").glob("*/study.json")}


def wait_new_study(proxy: tools.ProxyProcess, known: set[str], timeout: float = 60) -> str:
    """The one study that appears besides ``known``."""

    def new() -> str | None:
        fresh = studies(proxy) - known
        assert len(fresh) <= 1, fresh
        return fresh.pop() if fresh else None

    return str(wait_until(new, timeout, "a new study.json", interval=0.1))


def summary(proxy: tools.ProxyProcess, study: str) -> dict:
    return study_summary(proxy.spool, study)


def destination(data: dict, node: str) -> dict:
    """One destination of a study.json ({} when it has none for ``node``)."""
    found = [d for d in data.get("destinations", []) if d["node"] == node]
    return found[0] if found else {}


def wait_state(
    proxy: tools.ProxyProcess, study: str, states: tuple[str, ...], timeout: float = 60
) -> dict:
    """study.json once its state is one of ``states``."""

    def reached() -> dict | None:
        data = summary(proxy, study)
        return data if data.get("state") in states else None

    try:
        return wait_until(reached, timeout, f"study state in {states}")  # type: ignore[return-value]  # reached()'s dict
    except AssertionError:
        raise AssertionError(
            f"study {study} never reached {states}: {json.dumps(summary(proxy, study))[:2000]}"
        ) from None


def wait_destination(
    proxy: tools.ProxyProcess, study: str, node: str, what: str, check, timeout: float = 60
) -> dict:
    """study.json once ``check(destination)`` holds for ``node``."""

    def reached() -> dict | None:
        data = summary(proxy, study)
        dest = destination(data, node)
        return data if dest and check(dest) else None

    try:
        return wait_until(reached, timeout, f"{node}: {what}")  # type: ignore[return-value]  # reached()'s dict
    except AssertionError:
        raise AssertionError(
            f"{node} of {study}: never {what}: {json.dumps(summary(proxy, study))[:2000]}"
        ) from None


def events(data: dict) -> list[str]:
    return [e["event"] for e in data["events"]]


def attempts_logged(proxy: tools.ProxyProcess, study: str, node: str) -> list[tuple[int, int]]:
    """(instances, attempt) of every "forwarding study S to NODE" line of main.log."""
    log = (proxy.spool / "logs" / "main.log").read_text(errors="replace")
    pattern = (
        rf"forwarding study {re.escape(study)} to {re.escape(node)}:"
        r" (\d+) instance\(s\), attempt (\d+)"
    )
    return [(int(n), int(a)) for n, a in re.findall(pattern, log)]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed with exit 1 and one stderr line (no traceback); return it."""
    err = result.stderr.strip()
    assert result.returncode == 1, (result.returncode, result.stdout, err)
    assert "\n" not in err and "Traceback" not in err, err
    assert result.stdout == "", result.stdout
    return err


def store(proxy: tools.ProxyProcess, files: list[Path]) -> None:
    result = tools.storescu(proxy.dicom_port, files)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(tools.acked_files(result)) == len(files), result.stderr[-2000:]
